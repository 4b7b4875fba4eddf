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
from pathlib import Path
import sys, json, warnings, numpy as np, pandas as pd, anndata as ad, scipy.sparse as sp
from sklearn.metrics import roc_auc_score
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import open_set_truth
W = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/work/bench_work")
N_MARK, MIN_DET, MIN_DIFF, K = 20, 0.4, 0.2, 30

def det(X):
    X = sp.csr_matrix(X); return X > 0

for case in sys.argv[1].split(","):
    spec = json.load(open(W / "cases" / case / "case.json")); lv = spec["levels"][-1]
    ref = ad.read_h5ad(W / "cases" / case / "ref.h5ad"); q = ad.read_h5ad(W / "cases" / case / "query.h5ad")
    truth = pd.read_csv(W / "cases" / case / "truth.csv.gz", index_col=0)
    genes = ref.var_names.intersection(q.var_names)
    R = det(ref[:, genes].X); Q = det(q[:, genes].X)
    labs = ref.obs[lv].astype(str).to_numpy(); classes = np.unique(labs)
    D = np.stack([np.asarray(R[labs == c].mean(0)).ravel() for c in classes])
    pred = pd.read_csv(W / "runs" / case / "atlasmtl" / "pred_atlasmtl.csv.gz", index_col=0).reindex(q.obs_names)
    raw = pred[f"pred_{lv}_raw"].astype(str).to_numpy()
    z = np.full(q.n_obs, np.nan)
    info = {}
    for i, c in enumerate(classes):
        other = np.delete(D, i, 0).max(0) if len(classes) > 1 else np.zeros(D.shape[1])
        diff = D[i] - other
        cand = np.flatnonzero((D[i] >= MIN_DET) & (diff >= MIN_DIFF))
        mk = cand[np.argsort(-diff[cand])][:N_MARK]
        bg = np.setdiff1d(np.flatnonzero(D[i] >= MIN_DET), mk)
        if len(mk) < 5 or len(bg) < 20:
            info[c] = 0; continue
        info[c] = len(mk)
        def score(M, rows):
            m = np.asarray(M[rows][:, mk].mean(1)).ravel(); b = np.asarray(M[rows][:, bg].mean(1)).ravel()
            return np.log((m + 0.05) / (b + 0.05))
        sr = score(R, np.flatnonzero(labs == c))
        med = np.median(sr); mad = 1.4826 * np.median(np.abs(sr - med)) + 1e-3
        rows = np.flatnonzero(raw == c)
        if len(rows): z[rows] = (score(Q, rows) - med) / mad
    # neighbourhood mean over the query's own 30 nearest cells (PCA of log values)
    X = sp.csr_matrix(q[:, genes].X).toarray()  # the benchmark's queries: <= 1,200 cells
    pcs = PCA(30, random_state=0).fit_transform(X - X.mean(0))
    nn = NearestNeighbors(n_neighbors=min(K, q.n_obs)).fit(pcs).kneighbors(pcs, return_distance=False)
    with warnings.catch_warnings():  # a cell whose neighbours are all unscored has no mean
        warnings.simplefilter("ignore", RuntimeWarning)
        znb = np.nanmean(z[nn], axis=1)
    novel = None
    if spec.get("novel"):
        novel, _, _ = open_set_truth(spec, truth.reindex(q.obs_names))
    t = truth.reindex(q.obs_names)[lv].astype(str).to_numpy()
    out = {"case": case, "scored": float(np.isfinite(z).mean()), "markers": info}
    if novel is not None and novel.any():
        ok = np.isfinite(znb)
        out["auc_cell"] = round(roc_auc_score(novel[np.isfinite(z)], -z[np.isfinite(z)]), 3)
        out["auc_nb"] = round(roc_auc_score(novel[ok], -znb[ok]), 3)
        out["novel_znb_med"] = round(float(np.nanmedian(znb[novel])), 2)
        out["known_znb_q05"] = round(float(np.nanquantile(znb[~novel], 0.05)), 2)
        for thr in (-1.5, -2.0, -3.0):
            out[f"thr{thr}"] = (round(float(np.nanmean(znb[novel] < thr)), 2), round(float(np.nanmean(znb[~novel] < thr)), 3))
    else:
        out["known_znb_q05"] = round(float(np.nanquantile(znb, 0.05)), 2)
        for thr in (-1.5, -2.0, -3.0):
            out[f"thr{thr}"] = round(float(np.nanmean(znb < thr)), 3)
        g = pd.DataFrame({"t": t, "z": znb}).groupby("t").z.median().round(2).to_dict()
        out["by_type_median"] = g
    print(json.dumps(out), flush=True)
