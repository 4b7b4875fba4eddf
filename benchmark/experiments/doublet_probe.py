"""Issue 9: what does atlasmtl say of doublets, two cells of different types in one droplet?

Research script (the fifty-third session). Droplet data holds a few percent heterotypic doublets unless a tool
such as Scrublet removed them; no reference type describes them. Per case and seed, the default model (loaded
from ``--models``) predicts the query, then the query with ``--share`` (10%) of heterotypic doublets added:
pairs of query cells of different finest true types, drawn with ``numpy`` from ``seed``, their counts summed
(``X`` recomputed as log1p of counts per 10,000, the cases' own normalisation). A row per case and seed:

- of the doublets, at every level: the share ``Unknown``, the share low-confidence, and the share called as one of
  its two cells' types (where both are labelled at that level);
- of the query's own cells, at every level: accuracy and ``Unknown`` share with and without the doublets beside
  them (the novelty scores are located at the query, so added doublets could move the known cells' calls).

    PYTHONPATH=$PWD python benchmark/experiments/doublet_probe.py <cases> 0,1,2 out.csv.gz --cases-dir W/cases --models DIR
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import load_case, probe_parser, read_truth  # noqa: E402


def with_doublets(query, truth: pd.DataFrame, fine: str, share: float, seed: int):
    """``query`` and ``round(share * n)`` heterotypic doublets after it; their two cells' positions."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    labels = truth[fine].astype(str).to_numpy()
    n = int(round(share * query.n_obs))
    pairs = []
    while len(pairs) < n:
        a, b = rng.integers(0, query.n_obs, size=2)
        if labels[a] != labels[b] and labels[a] != "nan" and labels[b] != "nan":
            pairs.append((a, b))
    pairs = np.array(pairs)
    counts = sp.csr_matrix(query.layers["counts"], dtype=np.float64)
    summed = counts[pairs[:, 0]] + counts[pairs[:, 1]]
    total = np.asarray(summed.sum(axis=1)).ravel()
    x = sp.diags(1e4 / np.maximum(total, 1)) @ summed
    x.data = np.log1p(x.data)
    doublets = ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), var=query.var.copy(),
                          layers={"counts": sp.csr_matrix(summed, dtype=np.float32)})
    doublets.obs_names = [f"doublet_{i}" for i in range(n)]
    for col in query.obs.columns:
        doublets.obs[col] = query.obs[col].iloc[pairs[:, 0]].to_numpy()
    both = ad.concat([query, doublets], merge="same")
    both.X = sp.csr_matrix(both.X, dtype=np.float32)
    return both, pairs


def main() -> None:
    import torch
    import atlasmtl

    ap = probe_parser(__doc__)
    ap.add_argument("--share", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import anndata as ad

    rows = []
    for case in args.cases.split(","):
        meta = load_case(args.cases_dir / case)
        if not meta.get("has_counts"):
            continue
        levels = meta["levels"]
        query = ad.read_h5ad(args.cases_dir / case / "query.h5ad")
        truth = read_truth(args.cases_dir / case).reindex(query.obs_names)
        for seed in (int(s) for s in args.seeds.split(",")):
            model = atlasmtl.TrainedModel.load(args.models / f"{case}_{seed}.pth")
            alone = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
            both, pairs = with_doublets(query, truth, levels[-1], args.share, seed)
            mixed = atlasmtl.predict(model, both, show_progress=False, show_summary=False)
            row = {"case": case, "seed": seed, "n_query": query.n_obs, "n_doublets": len(pairs)}
            n = query.n_obs
            for lv in levels:
                classes = np.asarray(model.classes[lv] + ["Unknown"])
                t = truth[lv].astype(str).to_numpy()
                a_calls, m_calls = mixed.levels[lv], alone.levels[lv]
                pred_alone = classes[np.where(m_calls.pred >= 0, m_calls.pred, -1)]
                pred_mixed = classes[np.where(a_calls.pred >= 0, a_calls.pred, -1)]
                d = slice(n, n + len(pairs))
                first, second = t[pairs[:, 0]], t[pairs[:, 1]]
                labelled = (first != "nan") & (second != "nan")
                called = pred_mixed[d]
                row.update({
                    f"{lv}|doublet_unknown": float(a_calls.is_unknown[d].mean()),
                    f"{lv}|doublet_low_conf": float(a_calls.is_low_conf[d].mean()),
                    f"{lv}|doublet_called_as_a_parent": float(((called == first) | (called == second))[labelled].mean())
                    if labelled.any() else np.nan,
                    f"{lv}|doublet_homotypic_at_level": float((first == second)[labelled].mean()) if labelled.any() else np.nan,
                    f"{lv}|cells_acc_alone": float((pred_alone == t)[t != "nan"].mean()),
                    f"{lv}|cells_acc_with_doublets": float((pred_mixed[:n] == t)[t != "nan"].mean()),
                    f"{lv}|cells_unknown_alone": float(m_calls.is_unknown.mean()),
                    f"{lv}|cells_unknown_with_doublets": float(a_calls.is_unknown[:n].mean()),
                    f"{lv}|cells_changed": int((pred_alone != pred_mixed[:n]).sum()),
                })
            rows.append(row)
            print(json.dumps(row), flush=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
