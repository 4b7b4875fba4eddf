"""Pilot (before ``predict(coordinates=)`` existed): query coordinates from the regression heads against ways
of averaging the coordinates of the query cell's nearest reference cells in the KNN space (5, 15 or 30
neighbours; mean, similarity-weighted mean ``exp((s - 1) / 0.05)``, median; the 15 nearest of the cell's own
call). It reads the query cells' embeddings from the prediction's search (a spy on
``prediction._search_block``) and searches the reference embedding exactly. One row per case, seed and way;
the chosen way (the mean of 15) is compared with the heads in ``coordinate_placement_study.py``.

    PYTHONPATH=$PWD python benchmark/experiments/coordinate_placement_pilot.py 0,1,2 rows.csv
"""
import os
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy.spatial import cKDTree

import atlasmtl
import atlasmtl.prediction as P
from atlasmtl.datasets import pbmc68k_reference_query

warnings.filterwarnings("ignore")
D = str(Path(os.environ.get("ATLASMTL_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))) + "/"
captured = []
_orig = P._search_block
def spy(model, search, points, any_low, gate, decoder, buffers, start):
    captured.append((start, points.copy()))
    return _orig(model, search, points, any_low, gate, decoder, buffers, start)
P._search_block = spy


def umap_of(a, seed=0):
    b = a.copy()
    sc.pp.pca(b, n_comps=30, random_state=seed)
    sc.pp.neighbors(b, n_neighbors=15, random_state=seed)
    sc.tl.umap(b, random_state=seed)
    return np.asarray(b.obsm["X_umap"])


def split(a, label, frac, seed):
    rng = np.random.default_rng(seed)
    q = np.zeros(a.n_obs, bool)
    for c in a.obs[label].unique():
        idx = np.flatnonzero((a.obs[label] == c).to_numpy())
        q[rng.choice(idx, int(round(frac * len(idx))), replace=False)] = True
    return a[~q].copy(), a[q].copy()


def cases():
    r, q = pbmc68k_reference_query()
    yield "pbmc68k", r, q, ["lineage", "bulk_labels"], True
    sy = ad.read_h5ad(D + "symphony_pbmc_small.h5ad")
    sy.obsm["X_umap"] = umap_of(sy)
    for s in range(2):
        r, q = split(sy, "cell_type", 0.3, s)
        yield f"symphony_random{s}", r, q, ["cell_type_broad", "cell_type"], True
    for held in ["5p", "3pv2", "3pv1"]:  # joint UMAP as a loose truth; also the reference's own UMAP
        r, q = sy[sy.obs.dataset != held].copy(), sy[sy.obs.dataset == held].copy()
        yield f"symphony_loco_{held}_joint", r, q, ["cell_type_broad", "cell_type"], True
        r.obsm["X_umap"] = umap_of(r)
        yield f"symphony_loco_{held}_refumap", r, q, ["cell_type_broad", "cell_type"], False
    z = ad.read_h5ad(D + "zilionis2019_mouse_lung_healthy_vs_tumor.h5ad")
    sc.pp.normalize_total(z, 1e4); sc.pp.log1p(z)
    z.obsm["X_umap"] = umap_of(z)
    r, q = split(z, "cell_type_fine", 0.3, 0)
    yield "zilionis_random0", r, q, ["cell_type_coarse", "cell_type_fine"], True
    r, q = z[z.obs.condition == "healthy"].copy(), z[z.obs.condition != "healthy"].copy()
    q = q[q.obs.cell_type_fine.isin(r.obs.cell_type_fine.unique())].copy()
    r.obsm["X_umap"] = umap_of(r)
    yield "zilionis_h2t_refumap", r, q, ["cell_type_coarse", "cell_type_fine"], False
    d = ad.read_h5ad(D + "ding2020_pbmc_dropseq_vs_indrops.h5ad")
    sc.pp.normalize_total(d, 1e4); sc.pp.log1p(d)
    d.obsm["X_umap"] = umap_of(d)
    r, q = split(d, "cell_type", 0.3, 0)
    yield "ding_random0", r, q, ["cell_type"], True
    r, q = d[d.obs.platform == d.obs.platform.unique()[0]].copy(), d[d.obs.platform != d.obs.platform.unique()[0]].copy()
    r.obsm["X_umap"] = umap_of(r)
    yield "ding_platform_refumap", r, q, ["cell_type"], False


def spread(x):
    return float(np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()))


def metrics(pred, ref_xy, ref_lab, q_lab, truth):
    out = {}
    tree = cKDTree(ref_xy)
    _, nb = tree.query(pred, 15)
    maj = pd.DataFrame(ref_lab[nb]).mode(axis=1)[0].to_numpy()
    out["label_agree"] = float((maj == q_lab).mean())
    out["spread_vs_ref"] = spread(pred) / spread(ref_xy)
    d1, _ = tree.query(pred, 1)
    out["gap_to_ref_med"] = float(np.median(d1)) / spread(ref_xy)
    if truth is not None:
        out["rmse"] = float(np.sqrt(((pred - truth) ** 2).sum(1).mean())) / spread(ref_xy)
        out["spread_vs_truth"] = spread(pred) / spread(truth)
        tt, tp = cKDTree(truth), cKDTree(pred)
        _, a = tt.query(truth, 11); _, b = tp.query(pred, 11)
        out["nbr_pres"] = float(np.mean([len(set(a[i, 1:]) & set(b[i, 1:])) / 10 for i in range(len(a))]))
    return out


rows = []
seeds = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0]
for name, r, q, levels, has_truth in cases():
    for seed in seeds:
        model = atlasmtl.build_model(r, levels, coord_targets={"umap": "X_umap"}, random_state=seed, show_progress=False,
                                     show_summary=False)
        captured.clear()
        res = atlasmtl.predict(model, q, coordinates="heads", show_progress=False, show_summary=False)
        head = np.asarray(res.coords["umap"])
        emb = np.zeros((q.n_obs, model.reference["embedding"].shape[1]), np.float32)
        for start, pts in captured:
            emb[start:start + len(pts)] = pts
        refemb = np.asarray(model.reference["embedding"], dtype=np.float32)
        assert refemb.shape[0] == r.n_obs, (refemb.shape, r.n_obs)
        ref_xy = np.asarray(r.obsm["X_umap"])
        truth = np.asarray(q.obsm["X_umap"]) if has_truth else None
        fine = levels[-1]
        ref_lab, q_lab = r.obs[fine].astype(str).to_numpy(), q.obs[fine].astype(str).to_numpy()
        sims = emb @ refemb.T
        order = np.argsort(-sims, 1)
        raw_fine = np.array(model.classes[fine])[res.levels[fine].raw]
        methods = {"head": head}
        for k in (5, 15, 30):
            nb = order[:, :k]
            methods[f"knn{k}_mean"] = ref_xy[nb].mean(1)
            w = np.exp((np.take_along_axis(sims, nb, 1) - 1) / 0.05)
            methods[f"knn{k}_w"] = (ref_xy[nb] * w[..., None]).sum(1) / w.sum(1, keepdims=True)
            methods[f"knn{k}_median"] = np.median(ref_xy[nb], 1)
        # neighbours of the network's call only (first 15 among the top 200 with that label)
        cls = np.zeros_like(head)
        for i in range(q.n_obs):
            o = order[i, :200]
            same = o[ref_lab[o] == raw_fine[i]][:15]
            cls[i] = ref_xy[same].mean(0) if len(same) else ref_xy[order[i, :15]].mean(0)
        methods["knn15_call"] = cls
        for m, xy in methods.items():
            row = {"case": name, "seed": seed, "method": m, **metrics(xy, ref_xy, ref_lab, q_lab, truth)}
            rows.append(row)
            print(row, flush=True)
pd.DataFrame(rows).to_csv(sys.argv[2] if len(sys.argv) > 2 else "coordinate_placement_pilot.csv", index=False)
