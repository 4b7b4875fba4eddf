"""Issue 9: does a missing type lack the marker genes of the class it is called as? (research probe, not built)

For each finest reference class: its markers are the (up to) 20 genes it detects in >= 40% of its cells and at
least 20 points more often than every other class does; its background genes are the other genes it detects in
>= 40% of its cells. A query cell's score is log((markers detected + 0.05) / (background detected + 0.05)) in
shares, so depth cancels; it is located and scaled (median, 1.4826 MAD) by the class's reference cells, and
averaged over the cell's 30 nearest query cells (PCA of the query's log values). A class with under 5 markers is
not scored. The calls are the network's raw finest calls of a benchmark run (``WORK/runs/<case>/atlasmtl``).
Prints one JSON line per case: AUROC (cell, neighbourhood) and the shares of novel / known cells under -1.5,
-2 and -3, or for a known-type case the shares of all cells and each type's median.

    python benchmark/experiments/marker_recall_probe.py <case,case,...> [WORK]
"""
import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import open_set_truth  # noqa: E402
from marker_flag_probe import cell_marker_z, marker_tables, neighbour_mean  # noqa: E402


def main(cases: list[str], work: Path) -> None:
    for case in cases:
        spec = json.loads((work / "cases" / case / "case.json").read_text())
        lv = spec["levels"][-1]
        ref = ad.read_h5ad(work / "cases" / case / "ref.h5ad")
        q = ad.read_h5ad(work / "cases" / case / "query.h5ad")
        truth = pd.read_csv(work / "cases" / case / "truth.csv.gz", index_col=0).reindex(q.obs_names)
        tabs = marker_tables(ref, q, lv)
        pred = pd.read_csv(work / "runs" / case / "atlasmtl" / "pred_atlasmtl.csv.gz", index_col=0).reindex(q.obs_names)
        z = cell_marker_z(q, pred[f"pred_{lv}_raw"].astype(str).to_numpy(), tabs)
        znb = neighbour_mean(q, tabs["genes"], z)
        out = {"case": case, "scored": float(np.isfinite(z).mean()),
               "markers": {c: len(tabs["tables"][c][0]) if c in tabs["tables"] else 0 for c in tabs["classes"]}}
        novel = open_set_truth(spec, truth)[0] if spec.get("novel") else None
        if novel is not None and novel.any():
            ok = np.isfinite(znb)
            out["auc_cell"] = round(roc_auc_score(novel[np.isfinite(z)], -z[np.isfinite(z)]), 3)
            out["auc_nb"] = round(roc_auc_score(novel[ok], -znb[ok]), 3)
            out["novel_znb_med"] = round(float(np.nanmedian(znb[novel])), 2)
            out["known_znb_q05"] = round(float(np.nanquantile(znb[~novel], 0.05)), 2)
            for thr in (-1.5, -2.0, -3.0):
                out[f"thr{thr}"] = (round(float(np.nanmean(znb[novel] < thr)), 2),
                                    round(float(np.nanmean(znb[~novel] < thr)), 3))
        else:
            out["known_znb_q05"] = round(float(np.nanquantile(znb, 0.05)), 2)
            for thr in (-1.5, -2.0, -3.0):
                out[f"thr{thr}"] = round(float(np.nanmean(znb < thr)), 3)
            t = truth[lv].astype(str).to_numpy()
            out["by_type_median"] = pd.DataFrame({"t": t, "z": znb}).groupby("t").z.median().round(2).to_dict()
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","), Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/work/bench_work"))
