"""Issue 10: does blending the network's calibrated probabilities with a linear model on the network's own
input (a logistic regression on the model's z-scored genes, as CellTypist fits) make the calls more accurate?

Research script. ``linear_blend_study.py`` blended a logistic regression on 100 principal components (the
benchmark's ``logreg`` peer) and lost on pbmc68k. That peer is not the one atlasmtl trails: where it trails
(Ding, pbmc68k, Zilionis healthy → tumour) the best peer is CellTypist, a linear model on the scaled genes.
Here the linear model reads exactly what the network reads: the model's genes, log1p CP10k, standardised with
the model's ``gene_stats`` and clipped to ±10 (a query gene the query lacks reads as zero counts, as the
network reads it), sklearn ``LogisticRegression(C=0.1)`` (lbfgs, multinomial), fitted on every labelled
reference cell, one per level. Blends, before decoding, the gate, the KNN vote and the novelty flags
(``linear_blend_study.patched_softmax``):

- ``geo<w>``: ``p ∝ p_net^(1−w) · p_lin^w``; ``ari<w>``: ``(1−w) p_net + w p_lin``;
- ``lin``: the linear model alone through atlasmtl's gate;

and ``default`` (the network alone); ``off@<name>``: with ``knn_correction="off"``; ``union@<name>``: the
network's calls (the defaults'), made Unknown wherever the blend's are. Rows in ``threshold_table.py``'s format.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmark/experiments/linear_genes_blend_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import os
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
from linear_blend_study import patched_softmax  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.prediction as prediction  # noqa: E402

BLENDS = {"geo0.2": ("geo", 0.2), "geo0.35": ("geo", 0.35), "geo0.5": ("geo", 0.5), "ari0.3": ("ari", 0.3),
          "ari0.5": ("ari", 0.5), "lin": ("geo", 1.0)}
if os.environ.get("LIN_BLENDS"):  # a subset, e.g. LIN_BLENDS=geo0.35,geo0.5
    BLENDS = {k: BLENDS[k] for k in os.environ["LIN_BLENDS"].split(",")}
#: The linear model's inverse L2 strength and class-weight power (weights ∝ class frequency^−power, mean 1
#: per cell, as ``build_model(class_weight_power=...)``); LIN_C / LIN_CW in the environment.
LIN_C = float(os.environ.get("LIN_C", "0.1"))
LIN_CW = float(os.environ.get("LIN_CW", "0"))


def z_genes(adata, model):
    """The model's genes of ``adata`` (log1p CP10k in X), z-scored with the model's statistics, clipped."""
    genes = list(model.metadata["genes"])
    where = adata.var_names.get_indexer(genes)
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    dense = np.zeros((adata.n_obs, len(genes)))
    ok = where >= 0
    dense[:, ok] = X[:, where[ok]].toarray()
    stats = model.metadata["gene_stats"]
    return np.clip((dense - np.asarray(stats["mean"])) / np.asarray(stats["std"]), -10, 10)


def linear_probs(ref, query, model, seed, C=None, power=None):
    """Per level, the linear model's query probabilities in the model's class order."""
    from sklearn.linear_model import LogisticRegression

    C = LIN_C if C is None else C
    power = LIN_CW if power is None else power
    zr, zq = z_genes(ref, model), z_genes(query, model)
    out = {}
    for lv in model.label_columns:
        classes = list(model.classes[lv])
        labels = ref.obs[lv].astype(str).to_numpy()
        keep = np.isin(labels, classes)
        names, counts = np.unique(labels[keep], return_counts=True)
        w = dict(zip(names, counts.astype(float) ** -power))
        weight = np.array([w[c] for c in labels[keep]])
        lr = LogisticRegression(C=C, max_iter=1000, random_state=seed).fit(zr[keep], labels[keep],
                                                                           sample_weight=weight / weight.mean())
        p = np.full((query.n_obs, len(classes)), 1e-12)
        p[:, [classes.index(c) for c in lr.classes_]] = np.maximum(lr.predict_proba(zq), 1e-12)
        out[lv] = p / p.sum(1, keepdims=True)
    return out


def union_frame(base, other, levels):
    """``base``'s calls (a full table) with every cell ``other`` leaves Unknown made Unknown too, level by level."""
    df = base.to_dataframe("full")
    theirs = other.to_dataframe("full")
    for lv in levels:
        unknown = (theirs[f"pred_{lv}"].astype(str) == "Unknown").to_numpy()
        col = df[f"pred_{lv}"].astype(object)
        col[unknown] = "Unknown"
        df[f"pred_{lv}"] = col
    return df


def study(models):
    original = prediction.softmax
    off = os.environ.get("LIN_OFF", "1") == "1"  # LIN_OFF=0: no knn_correction="off" rows
    for case, seed, spec, ref, query, truth, model in models:
        levels = spec["levels"]
        lin = linear_probs(ref, query, model, seed)
        row = {"case": case, "seed": seed, "K": "auto"}
        results = {}
        for name, blend in {"default": None, **BLENDS}.items():
            for prefix, kw in (("", {}), ("off@", {"knn_correction": "off"})) if off else (("", {}),):
                if blend is not None:
                    prediction.softmax = patched_softmax(lin, levels, *blend)
                try:
                    res = atlasmtl.predict(model, query, show_progress=False, show_summary=False, **kw)
                finally:
                    prediction.softmax = original
                results[prefix + name] = res
                row[prefix + name] = score_result(res, truth, spec)
        for name in BLENDS:  # the network's calls, Unknown where the blend abstains
            row["union@" + name] = score_result(union_frame(results["default"], results[name], levels), truth, spec)
        print_progress(case, seed, row, levels[-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
