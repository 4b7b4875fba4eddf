"""Issue 10: does blending the network's calibrated probabilities with a logistic regression on the
reference's principal components (the benchmark's strongest peer) make the calls more accurate?

Research script. Per case and seed, the default model (trained, or loaded from ``--models``) predicts with
its per-level probabilities replaced, before decoding, gating, the KNN vote and the novelty flags, by a
blend with the probabilities of the benchmark's ``logreg`` peer (``benchmark/runner.py``: sklearn PCA with
100 components on the case's log1p CP10k values, standardised scores, multinomial lbfgs logistic
regression, ``C=1``; fitted on the whole reference, one model per level):

- ``geo<w>``: ``p ∝ p_net^(1−w) · p_lr^w`` (a product of experts);
- ``ari<w>``: ``p = (1−w) p_net + w p_lr``;
- ``lr``: the logistic regression alone (``w = 1``) through atlasmtl's gate;
- ``knn0.3``: ``p = 0.7 p_net + 0.3 v`` with ``v`` the vote fractions of the ``knn`` peer (15 nearest
  reference cells, uniform vote, on 50 principal components of the same values);

each at the default KNN setting, and ``default`` (the network alone). Rows in ``threshold_table.py``'s
format (``off@<name>``: the same with ``knn_correction="off"``).

    PYTHONPATH=$PWD python benchmark/experiments/linear_blend_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.prediction as prediction  # noqa: E402

BLENDS = {"geo0.3": ("lr", "geo", 0.3), "geo0.5": ("lr", "geo", 0.5), "ari0.3": ("lr", "ari", 0.3),
          "ari0.5": ("lr", "ari", 0.5), "lr": ("lr", "geo", 1.0), "knn0.3": ("knn", "ari", 0.3)}


def peer_probs(ref, query, levels, classes, seed, n_pcs=100):
    """``{"lr": ..., "knn": ...}``: per level, the ``logreg`` peer's query probabilities and the ``knn``
    peer's vote fractions, in the model's class order."""
    from sklearn.neighbors import NearestNeighbors
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    n = min(n_pcs, ref.shape[1] - 1, ref.shape[0] - 1)
    pca = PCA(n_components=n, svd_solver="arpack", random_state=seed)
    z = pca.fit_transform(ref.X)
    scaler = StandardScaler().fit(z)
    zq = scaler.transform(pca.transform(query.X))
    out = {"lr": {}, "knn": {}}
    idx = NearestNeighbors(n_neighbors=15).fit(z[:, :50]).kneighbors(pca.transform(query.X)[:, :50], return_distance=False)
    for lv in levels:
        labels = ref.obs[lv].astype(str).to_numpy()
        code = np.array([list(classes[lv]).index(c) if c in classes[lv] else -1 for c in labels])
        v = np.zeros((query.n_obs, len(classes[lv])))
        for j in range(idx.shape[1]):
            ok = code[idx[:, j]] >= 0
            np.add.at(v, (np.flatnonzero(ok), code[idx[ok, j]]), 1.0)
        out["knn"][lv] = v / np.maximum(v.sum(1, keepdims=True), 1)
        keep = code >= 0
        lr = LogisticRegression(C=1.0, max_iter=1000, random_state=seed).fit(scaler.transform(z[keep]), labels[keep])
        p = np.full((query.n_obs, len(classes[lv])), 1e-12)
        cols = [list(classes[lv]).index(c) for c in lr.classes_]
        p[:, cols] = np.maximum(lr.predict_proba(zq), 1e-12)
        out["lr"][lv] = p / p.sum(1, keepdims=True)
    return out


def patched_softmax(lr, levels, how, w):
    """A replacement for ``prediction.softmax`` that blends each call's probabilities with ``lr``'s rows.

    ``_infer`` calls ``softmax`` once per level in level order on consecutive row blocks of the query."""
    state = {"level": 0, "start": 0}
    original = prediction.softmax

    def softmax(logits, t):
        p = original(logits, t)
        lv = levels[state["level"]]
        q = lr[lv][state["start"]:state["start"] + len(p)]
        if how == "geo":
            logp = (1 - w) * np.log(np.maximum(p, 1e-12)) + w * np.log(q)
            logp -= logp.max(1, keepdims=True)
            out = np.exp(logp)
            out /= out.sum(1, keepdims=True)
        else:
            out = (1 - w) * p + w * q
        state["level"] += 1
        if state["level"] == len(levels):
            state["level"], state["start"] = 0, state["start"] + len(p)
        return out

    return softmax


def study(models):
    original = prediction.softmax
    for case, seed, spec, ref, query, truth, model in models:
        levels = spec["levels"]
        peers = peer_probs(ref, query, levels, model.classes, seed)
        row = {"case": case, "seed": seed, "K": "auto"}
        for name, blend in {"default": None, **BLENDS}.items():
            for prefix, kw in (("", {}), ("off@", {"knn_correction": "off"})):
                if blend is not None:
                    prediction.softmax = patched_softmax(peers[blend[0]], levels, *blend[1:])
                try:
                    res = atlasmtl.predict(model, query, show_progress=False, show_summary=False, **kw)
                finally:
                    prediction.softmax = original
                row[prefix + name] = score_result(res, truth, spec)
        fine = levels[-1]
        print_progress(case, seed, row, fine)
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
