"""Issues 9 (item 5) / 10: should the KNN vote that confirms a low-confidence call be cast in the input view's
PCA instead of the encoder's embedding?

Research script. The shipped vote (``prediction._search_block``) searches the encoder's L2-normalised
embedding, the space the heads were trained on, so a neighbour vote there partly repeats the network's own
view of the cell. The novelty score's input view (``novelty.InputView``) already stores a PCA of the network
input and up to 500 training cells per class and level in it: a class-balanced vote among their ``knn_k``
nearest (Euclidean, the PCA coordinates without the residual; at a nested level only children of the
parent's call can win, as now) is an independent check, like the kNN-on-PCA peer. Per case and seed the
default model (trained, or loaded from ``--models``) predicts with the vote patched to:

- ``emb``: the shipped vote (the defaults; reproduces the benchmark's rows);
- ``pca``: the vote in the input view's PCA;
- ``both``: a call is confirmed only when both votes confirm it (fraction: the smaller);
- ``either``: a call is confirmed when either vote confirms it;

and with ``knn_correction="off"`` (``off@emb``). Rows in ``threshold_table.py``'s format.

    PYTHONPATH=$PWD python benchmark/experiments/knn_space_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json        # rows emb / pca / both / either / off@emb
"""
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import keep_view_points, posthoc_main, score_result  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.prediction as P  # noqa: E402
from atlasmtl.knn import vote  # noqa: E402

VARIANTS = ("emb", "pca", "both", "either")
STATE: dict = {"variant": "emb", "points": None, "index": None}
_search_block = P._search_block


def search_block(model, search, points, any_low, gate, decoder, buffers, start):
    """The shipped searches, then (unless ``emb``) the votes of the searched cells replaced as the variant says."""
    _search_block(model, search, points, any_low, gate, decoder, buffers, start)
    view = decoder.input_view
    if STATE["variant"] == "emb" or gate.knn_correction == "off" or view is None:
        return
    stop = start + len(any_low)
    if STATE["index"] is None:
        STATE["index"] = NearestNeighbors(n_neighbors=min(gate.knn_k, len(view.points)), algorithm="brute").fit(
            view.points[:, : view.n_components])
    levels = model.label_columns
    for j, lv in enumerate(levels):
        o = buffers.levels[lv]
        cells = start + np.flatnonzero(o["covered"][start:stop])
        if len(cells) == 0 or lv not in view.members:
            continue
        nbr = STATE["index"].kneighbors(STATE["points"][cells][:, : view.n_components], return_distance=False)
        members = view.members[lv]
        counts = np.bincount(members[members >= 0], minlength=len(model.classes[lv]))
        allowed = None
        if lv in decoder.parent_of:  # the children of the parent level's call, as the shipped vote
            parent_call = buffers.levels[levels[j - 1]]["raw"][cells].astype(np.int64)
            allowed = decoder.parent_of[lv][None, :] == parent_call[:, None]
        code, frac = vote(nbr, members, len(model.classes[lv]), class_counts=counts, allowed=allowed)
        raw = o["raw"][cells]
        emb_code, emb_frac = o["knn"][cells].copy(), o["knn_vote_frac"][cells].copy()
        emb_ok = (emb_code == raw) & (emb_frac >= gate.knn_conf_low)
        pca_ok = (code == raw) & (frac >= gate.knn_conf_low)
        if STATE["variant"] == "pca":
            new_code, new_frac = code, frac
        elif STATE["variant"] == "both":
            new_code = np.where(emb_ok & pca_ok, raw, np.where(emb_ok, code, emb_code))
            new_frac = np.where(emb_ok & pca_ok, np.minimum(emb_frac, frac), np.where(emb_ok, frac, emb_frac))
        else:  # either
            new_code = np.where(emb_ok | pca_ok, raw, emb_code)
            new_frac = np.where(emb_ok, emb_frac, np.where(pca_ok, frac, emb_frac))
        o["knn"][cells], o["knn_vote_frac"][cells] = new_code, new_frac


keep_view_points(STATE)
P._search_block = search_block


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        row = {"case": case, "seed": seed, "K": "auto"}
        STATE["index"] = None
        for variant in VARIANTS:
            STATE["variant"] = variant
            row[variant] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)
        STATE["variant"] = "emb"
        row["off@emb"] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False,
                                                       knn_correction="off"), truth, spec)
        fine = spec["levels"][-1]
        print(json.dumps({"case": case, "seed": seed, **{v: round(row[v]["levels"][fine]["macro_f1"], 4)
                                                          for v in (*VARIANTS, "off@emb")}}), flush=True)
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
