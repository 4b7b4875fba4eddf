"""Issue 9 (novel types): a class-agnostic input-view distance as one more novelty flag (research script).

The input view (``novelty.InputView``) scores a cell against the kept training cells of its *call*, and only
for classes with at least ``INPUT_VIEW_MIN_MEMBERS`` kept cells. A type the reference lacks that the network
calls as a small class (Symphony B cells called DC / HSC) is then judged by the embedding alone. Here the
same PCA (with its residual coordinate; ``SPACE``) judges a cell by its mean distance to the ``k`` nearest
kept training cells of *any* class (the finest level's kept set), so no class needs a spread of its own: the
null is the kept cells' leave-one-out log distances (median, 1.4826 · MAD), and the query is located as the
embedding view is (less ``max(0, query_location_z(z0, calls))``). A finest call above the threshold becomes
Unknown (novel; never relabelled), and ``novelty_<finest>`` reports the larger of the shipped score and this
one. Post hoc: the network, the shipped views and the gate are unchanged.

    PYTHONPATH=$PWD python benchmark/experiments/agnostic_view_study.py <case,case,...> 0,1,2 out.json \\
        [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json      # rows: default, a2.0, a2.5, a3.0
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import keep_view_points, posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.prediction as P  # noqa: E402
from atlasmtl.novelty import log_distance, mean_neighbour_distance, null_summary, query_location_z  # noqa: E402

VARIANTS = {"default": None, "a2.0": 2.0, "a2.5": 2.5, "a3.0": 3.0}
K = 10
#: "pca": the view's components only; "residual": with the distance from their subspace as one more coordinate.
SPACE = "residual"
STATE: dict = {"threshold": None, "points": None}
_assemble = P._assemble
keep_view_points(STATE)


def assemble(model, buffers, gate, decoder, novelty_threshold, neighbourhood_k=0):
    """The shipped calls, then the class-agnostic flag at the finest level."""
    calls = _assemble(model, buffers, gate, decoder, novelty_threshold, neighbourhood_k)
    view, t = decoder.input_view, STATE["threshold"]
    if t is None or view is None or STATE["points"] is None:
        return calls
    fine = model.label_columns[-1]
    width = view.points.shape[1] if SPACE == "residual" else view.n_components
    ref = view.points[view.members[fine] >= 0][:, :width]
    null = null_summary(log_distance(mean_neighbour_distance(ref, ref, K, skip_self=True)))
    usable = ~buffers.no_signal
    z = np.full(len(usable), np.nan)
    z0 = (log_distance(mean_neighbour_distance(STATE["points"][usable][:, :width], ref, K)) - null["median"]) / null["scale"]
    z[usable] = z0 - max(0.0, query_location_z(z0, calls[fine].raw[usable]))
    flag = np.nan_to_num(z, nan=-np.inf) > t
    c = calls[fine]
    c.novelty = np.fmax(c.novelty, z).astype(np.float32)
    c.is_novel, c.is_unknown, c.used_knn = c.is_novel | flag, c.is_unknown | flag, c.used_knn & ~flag
    c.pred = np.where(flag, -1, c.pred).astype(c.pred.dtype)
    return calls


P._assemble = assemble


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        row = {"case": case, "seed": seed, "K": "auto"}
        for name, threshold in VARIANTS.items():
            STATE["threshold"] = threshold
            row[name] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)
        STATE["threshold"] = None
        print_progress(case, seed, row, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
