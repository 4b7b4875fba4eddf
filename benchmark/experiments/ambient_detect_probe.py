"""Issues 9 and 10: can a query's ambient RNA be told from its counts, so that it could be warned of or removed?

Research script (the fifty-third session; a negative result). Two SoupX-like statistics per case, on the counts
of the genes the reference and the query share (upper-cased names):

- ``rho``: counts a cell holds on the genes its class (the reference class profile, fitted on one random half
  of the reference) barely expresses (below ``frac`` × the gene's largest class mean) among the 10% genes most
  abundant in the dataset's pool, over the counts the pool's share of those genes predicts: ambient RNA
  contributes exactly that ratio. For the reference (the other half, true labels) and the query (true labels,
  ``truth``; atlasmtl's seed-0 calls, ``pred``).
- ``shape``: per called class with ≥ 20 query cells and ≥ 10 such genes, the Spearman correlation of their
  summed counts with the query's pool share; averaged over the classes, weighted by cells. Ambient counts follow
  the pool; a platform or species difference need not.

    python benchmark/experiments/ambient_detect_probe.py --cases-dir W/cases --runs RUNS [--runs RUNS2] out.csv

``--runs`` folders hold ``<case>/atlasmtl/pred_atlasmtl.csv.gz`` (the benchmark's seed-0 predictions); the
first that has a case's is read. Cases without counts are skipped; so are cases sharing under half their
genes by name.
"""
import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import spearmanr


def counts(a: ad.AnnData) -> sp.csr_matrix:
    return sp.csr_matrix(a.layers["counts"] if "counts" in a.layers else a.X, dtype=np.float64)


def profiles(x: sp.csr_matrix, labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    classes = sorted(set(labels))
    out = np.zeros((len(classes), x.shape[1]))
    for i, k in enumerate(classes):
        total = np.asarray(x[labels == k].sum(axis=0)).ravel()
        out[i] = total / max(total.sum(), 1)
    return classes, out


def off_genes(profile: np.ndarray, all_profiles: np.ndarray, pool: np.ndarray, frac: float) -> np.ndarray:
    return (profile < frac * all_profiles.max(axis=0)) & (pool >= np.quantile(pool, 0.9))


def rho(x, labels, classes, prof, pool, frac):
    n = np.asarray(x.sum(axis=1)).ravel()
    num = den = 0.0
    for i, k in enumerate(classes):
        rows = np.flatnonzero(labels == k)
        off = off_genes(prof[i], prof, pool, frac)
        if len(rows) and off.any():
            num += x[rows][:, off].sum()
            den += n[rows].sum() * pool[off].sum()
    return num / den if den else np.nan


def shape(x, calls, classes, prof, pool):
    cors, weights = [], []
    for i, k in enumerate(classes):
        rows = np.flatnonzero(calls == k)
        off = off_genes(prof[i], prof, pool, 0.02)
        if len(rows) >= 20 and off.sum() >= 10:
            cors.append(spearmanr(np.asarray(x[rows][:, off].sum(axis=0)).ravel(), pool[off]).statistic)
            weights.append(len(rows))
    return float(np.average(cors, weights=weights)) if cors else np.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--cases-dir", type=Path, required=True)
    ap.add_argument("--runs", type=Path, action="append", required=True)
    args = ap.parse_args()
    rows = []
    for case_dir in sorted(p for p in args.cases_dir.iterdir() if (p / "case.json").exists()):
        case = json.loads((case_dir / "case.json").read_text())
        runs = [r / case_dir.name / "atlasmtl" / "pred_atlasmtl.csv.gz" for r in args.runs]
        runs = [r for r in runs if r.exists()]
        if not case.get("has_counts") or not runs:
            continue
        fine = case["levels"][-1]
        ref, query = ad.read_h5ad(case_dir / "ref.h5ad"), ad.read_h5ad(case_dir / "query.h5ad")
        rg, qg = pd.Index(ref.var_names.str.upper()), pd.Index(query.var_names.str.upper())
        shared = rg.intersection(qg).unique()
        if len(shared) < 0.5 * len(rg):
            continue
        r_x, q_x = counts(ref)[:, rg.get_indexer(shared)], counts(query)[:, qg.get_indexer(shared)]
        r_lab = ref.obs[fine].astype(str).to_numpy()
        labelled = r_lab != "nan"
        half = np.random.default_rng(0).random(len(r_lab)) < 0.5
        truth = pd.read_csv(case_dir / "truth.csv.gz", index_col=0)[fine].reindex(query.obs_names).astype(str).to_numpy()
        pred = pd.read_csv(runs[0], index_col=0)[f"pred_{fine}"].reindex(query.obs_names).astype(str).to_numpy()
        classes, prof = profiles(r_x[half & labelled], r_lab[half & labelled])
        pool_r = np.asarray(r_x[~half & labelled].sum(axis=0)).ravel()
        pool_q = np.asarray(q_x.sum(axis=0)).ravel()
        pool_r, pool_q = pool_r / pool_r.sum(), pool_q / pool_q.sum()
        row = {"case": case_dir.name}
        for frac in (0.02, 0.05):
            row[f"rho_ref_f{frac}"] = rho(r_x[~half & labelled], r_lab[~half & labelled], classes, prof, pool_r, frac)
            row[f"rho_truth_f{frac}"] = rho(q_x, truth, classes, prof, pool_q, frac)
            row[f"rho_pred_f{frac}"] = rho(q_x, pred, classes, prof, pool_q, frac)
        all_classes, all_prof = profiles(r_x[labelled], r_lab[labelled])
        row["shape_pred"] = shape(q_x, pred, all_classes, all_prof, pool_q)
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows).set_index("case")
    table.to_csv(args.out)
    pd.set_option("display.width", 250)
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
