"""How well can a model gene the query lacks be filled in? (research probe; needs the PCA-fill patch)

A genes-missing case's query holds the same cells as its base case's query with some genes set to zero. The
base query's network input of those genes is the truth; this prints the mean squared error against it of
three readings of a missing gene: the probabilistic-PCA fill of ``patches/impute_missing_genes_ppca.diff``
(``genes.IMPUTE_MISSING_GENES = "pca"``), the reference's mean (0 in ``zscore`` units) and a zero count
(what the shipped code reads), plus the median per-gene correlation of the fill with the truth.

    git apply benchmark/experiments/patches/impute_missing_genes_ppca.diff
    PYTHONPATH=$PWD python benchmark/experiments/imputation_error_probe.py symphony_5p symphony_5p_missing_genes 0 [--work DIR] [--models DIR]
"""
import argparse
import warnings
from pathlib import Path

import anndata as ad
import numpy as np

import atlasmtl
from atlasmtl import genes, prediction
from atlasmtl.inputs import get_matrix_source


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("full_case")
    ap.add_argument("missing_case")
    ap.add_argument("seed", type=int)
    ap.add_argument("--work", type=Path, default=Path("/work/bench_work"))
    ap.add_argument("--models", type=Path, default=Path("/work/bench_models"))
    ap.add_argument("--cells", type=int, default=3000)
    a = ap.parse_args()
    if not hasattr(genes, "IMPUTE_MISSING_GENES"):
        raise SystemExit("apply benchmark/experiments/patches/impute_missing_genes_ppca.diff first")
    model = atlasmtl.TrainedModel.load(a.models / f"{a.missing_case}_{a.seed}.pth")
    full = ad.read_h5ad(a.work / "cases" / a.full_case / "query.h5ad")
    missing = ad.read_h5ad(a.work / "cases" / a.missing_case / "query.h5ad")
    missing = missing[:, np.asarray((missing.X != 0).sum(axis=0)).ravel() > 0].copy()  # the removed genes leave
    if not (full.obs_names == missing.obs_names).all():
        raise SystemExit("the two queries must hold the same cells")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        genes.IMPUTE_MISSING_GENES = False
        truth_aligner, _, _ = prediction.prepare_query(model, get_matrix_source(full), None, 0.0)
        genes.IMPUTE_MISSING_GENES = "pca"
        fill_aligner, _, _ = prediction.prepare_query(model, get_matrix_source(missing), None, 0.0)
    absent = fill_aligner.imputed
    truth = truth_aligner.transform(full.X[: a.cells])[:, absent]
    filled = fill_aligner.transform(missing.X[: a.cells])[:, absent]
    zero = truth_aligner.zero_input()[absent]
    print(f"{a.missing_case} seed {a.seed}: {int(absent.sum())} of {len(absent)} model genes missing, "
          f"{truth.shape[0]} cells")
    for name, guess in (("PCA fill", filled), ("reference mean", np.zeros_like(truth)),
                        ("zero count", np.broadcast_to(zero, truth.shape))):
        print(f"  {name:15s} mean squared error {float(((guess - truth) ** 2).mean()):.3f}")
    truth64, filled64 = truth.astype(np.float64), filled.astype(np.float64)
    varying = (truth64.std(axis=0) > 1e-6) & (filled64.std(axis=0) > 1e-6)
    corr = [np.corrcoef(truth64[:, j], filled64[:, j])[0, 1] for j in np.flatnonzero(varying)]
    print(f"  PCA fill: median per-gene correlation with the truth {np.median(corr):.3f} ({len(corr)} genes)")


if __name__ == "__main__":
    main()
