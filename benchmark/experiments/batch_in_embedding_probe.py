"""Issue 10: how much of the reference's batch does the default model's embedding still carry?

Research probe (2026-12-06, forty-second session; API contract, "Measured 2026-12-06, forty-second session").
Domain-adversarial training (a batch classifier behind a gradient-reversal layer, as scDGN does) makes an
encoder forget the reference's batches so that a new batch maps like the old ones. It can only help where the
embedding still tells the batches apart within a cell type. Per case: the KNN embedding the default model stores
for its reference cells (``MODELS/<case>_<seed>_embedding.npy``, every member side by side), and a logistic
regression predicting the case's ``batch_key`` from it (5-fold cross-validated accuracy), over all cells and
within each finest type with at least 40 cells and 5 in each of two batches, each beside the majority batch's
share (what a classifier that learned nothing scores); then the same from 50 principal components of the
reference's log1p CP10k values (``X`` of the prepared case), what the input itself carries.

    PYTHONPATH=$PWD python benchmark/experiments/batch_in_embedding_probe.py <case,case,...> [SEED] [MODELS] [WORK]
"""
import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score


def batch_accuracy(embedding: np.ndarray, batches: np.ndarray) -> tuple[float, float]:
    """5-fold accuracy of a logistic regression predicting ``batches`` from ``embedding``, and the majority share."""
    accuracy = cross_val_score(LogisticRegression(max_iter=2000), embedding, batches, cv=5).mean()
    return float(accuracy), float(pd.Series(batches).value_counts(normalize=True).iloc[0])


def main() -> None:
    cases = sys.argv[1].split(",")
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    models = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/work/bench_models")
    work = Path(sys.argv[4]) if len(sys.argv) > 4 else Path("/work/bench_work")
    for case in cases:
        spec = json.loads((work / "cases" / case / "case.json").read_text())
        ref = ad.read_h5ad(work / "cases" / case / "ref.h5ad")
        embedding = np.load(models / f"{case}_{seed}_embedding.npy")
        batches = ref.obs[spec["batch_key"]].astype(str).to_numpy()
        labels = ref.obs[spec["levels"][-1]].astype(str).to_numpy()
        if embedding.shape[0] != ref.n_obs or len(set(batches)) < 2:
            print(f"{case}: skipped (embedding rows {embedding.shape[0]}, reference cells {ref.n_obs},"
                  f" batches {len(set(batches))})")
            continue
        pcs = PCA(50, random_state=0).fit_transform(ref.X.toarray() if sp.issparse(ref.X) else np.asarray(ref.X))
        for name, space in (("embedding", embedding), ("input PCA", pcs)):
            overall = batch_accuracy(space, batches)
            within = []
            for label in sorted(set(labels)):
                own = labels == label
                counts = pd.Series(batches[own]).value_counts()
                if own.sum() >= 40 and len(counts) > 1 and counts.min() >= 5:
                    acc, majority = batch_accuracy(space[own], batches[own])
                    within.append(f"{label} {acc:.2f} ({majority:.2f})")
            print(f"{case}, {name}: all cells {overall[0]:.3f} (majority {overall[1]:.3f}); within type: "
                  f"{', '.join(within)}", flush=True)


if __name__ == "__main__":
    main()
