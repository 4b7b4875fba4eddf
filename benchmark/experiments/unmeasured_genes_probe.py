"""Can a query's unmeasured genes be told from genes it detects rarely because it is shallow? (research probe)

The benchmark's genes-missing queries hold their removed genes as all-zero columns, as a query zero-padded to
the reference's genes does; a thinned query also leaves many genes undetected in every cell, from its depth
alone (thirty-seventh session: "the aligner cannot tell which case it is facing"). This probe tests a depth
model: under Poisson sampling a gene detected in a share ``r_j`` of the reference's cells has rate
``lambda_j = -log(1 - r_j) / median reference depth`` per count, so a query cell of depth ``N_c`` detects it
with probability ``1 - exp(-lambda_j N_c)``; ``E_j``, the sum over the query's cells, is how many cells
should detect it. A gene with ``E_j >= threshold`` that no query cell detects is *unexpectedly zero*.
Depths are taken over the genes the query detects, in pseudo-counts (``atlasmtl.inputs.pseudo_counts``:
log-normalised values brought back to counts per cell), for the reference and the query alike.

    PYTHONPATH=$PWD python benchmark/experiments/unmeasured_genes_probe.py <case,case,...> [--work DIR] [--single-class]

prints, per case, the share of model genes no query cell detects, and, for thresholds 5, 10, 20 and 50, the
unexpectedly zero genes among those expected (``E_j >= threshold``); ``--single-class`` repeats it for each
finest class of ≥ 20 query cells predicted on its own (a query of one type lacks the others' markers).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_study_case  # noqa: E402
from atlasmtl.inputs import pseudo_counts  # noqa: E402

THRESHOLDS = (5, 10, 20, 50)


def expected_detections(ref_counts: sp.csr_matrix, query_counts: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """``(E, detected)`` per gene (shared columns): the query cells expected to detect it, and whether any does."""
    r = np.asarray((ref_counts > 0).mean(axis=0)).ravel()
    detected = np.asarray((query_counts > 0).sum(axis=0)).ravel() > 0
    ref_depth = np.asarray(ref_counts[:, detected].sum(axis=1)).ravel()
    query_depth = np.asarray(query_counts[:, detected].sum(axis=1)).ravel()
    rate = -np.log(np.clip(1.0 - r, 1e-9, 1.0)) / max(float(np.median(ref_depth)), 1e-9)
    expected = np.zeros(len(r))
    for start in range(0, len(query_depth), 1024):  # bounded memory: a block of cells × genes at a time
        expected += (1.0 - np.exp(-np.outer(query_depth[start:start + 1024], rate))).sum(axis=0)
    return expected, detected


def unexpected_zero_genes(ref, query, threshold: float = 20.0) -> np.ndarray:
    """Boolean mask over ``query.var_names``: genes the reference has, expected in ``>= threshold`` query
    cells at the query's depth, detected in none. Both matrices hold log1p CP10k (the prepared cases' ``X``)."""
    genes = query.var_names.intersection(ref.var_names)
    ref_counts = pseudo_counts(ref[:, genes].X, "lognorm")
    query_counts = pseudo_counts(query[:, genes].X, "lognorm")
    expected, detected = expected_detections(ref_counts, query_counts)
    flagged = pd.Index(genes[(expected >= threshold) & ~detected])
    return query.var_names.isin(flagged)


def shares(ref_counts, query_counts) -> str:
    expected, detected = expected_detections(ref_counts, query_counts)
    parts = [f"undetected {1 - detected.mean():.3f}"]
    for t in THRESHOLDS:
        sel = expected >= t
        parts.append(f"E>={t}: {int((sel & ~detected).sum())}/{int(sel.sum())} "
                     f"({(sel & ~detected).sum() / max(sel.sum(), 1):.3f})")
    return " | ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases")
    ap.add_argument("--work", type=Path, default=Path("/work/bench_work"))
    ap.add_argument("--single-class", action="store_true")
    a = ap.parse_args()
    for case in a.cases.split(","):
        spec, ref, query, truth = read_study_case(a.work / "cases" / case)
        genes = query.var_names.intersection(ref.var_names)
        ref_counts = pseudo_counts(ref[:, genes].X, "lognorm")
        query_counts = pseudo_counts(query[:, genes].X, "lognorm")
        print(f"{case:45s} {query.n_obs:5d} cells | {shares(ref_counts, query_counts)}", flush=True)
        if a.single_class:
            finest = truth.loc[query.obs_names, spec["levels"][-1]].astype(str).to_numpy()
            for cls, n in pd.Series(finest).value_counts().items():
                if n >= 20:
                    print(f"    only {cls:30s} {n:5d} cells | {shares(ref_counts, query_counts[finest == cls])}", flush=True)


if __name__ == "__main__":
    main()
