"""Query coordinates: the coordinate heads' regression against the mean of the nearest reference cells'.

``predict(coordinates=)`` places a query cell either by the regression heads or at the mean coordinates of its
``knn_k`` nearest reference cells in the KNN space. This study compares the two, and the benchmark's kNN peer
(15 nearest reference cells in 50 principal components of the reference, the mean of their coordinates), on
real splits from ``../shared/data``, for a 2-D UMAP target:

- random splits of one dataset (30% of each finest type held out as the query), with the UMAP computed on all
  of its cells: the query's own UMAP position is the truth (``rmse`` in units of the reference's spread,
  ``trustworthiness`` and ``neighbour_overlap`` as ``atlasmtl.evaluate`` computes them);
- the natural cross-dataset splits, with the UMAP computed on the reference alone, as a user would: no true
  position exists, so the study asks whether a cell lands among reference cells of its own type
  (``label_agreement``: the majority finest label of the 15 reference cells nearest its 2-D position is its
  true label) and how spread out the query is (``spread``: root mean squared distance to the query's centre,
  over the reference's).

    PYTHONPATH=$PWD python benchmark/experiments/coordinate_placement_study.py --seeds 0,1,2 --out rows.csv.gz
"""
import argparse
import os
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy.spatial import cKDTree
from sklearn.decomposition import PCA
from sklearn.manifold import trustworthiness

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]
import atlasmtl  # noqa: E402
from atlasmtl.datasets import pbmc68k_reference_query  # noqa: E402

DATA = Path(os.environ.get("ATLASMTL_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def umap_of(a: ad.AnnData) -> np.ndarray:
    b = a.copy()
    sc.pp.pca(b, n_comps=30, random_state=0)
    sc.pp.neighbors(b, n_neighbors=15, random_state=0)
    sc.tl.umap(b, random_state=0)
    return np.asarray(b.obsm["X_umap"])


def lognorm(a: ad.AnnData) -> ad.AnnData:
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a


def random_split(a: ad.AnnData, label: str, seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    rng = np.random.default_rng(seed)
    q = np.zeros(a.n_obs, dtype=bool)
    for c in a.obs[label].unique():
        idx = np.flatnonzero((a.obs[label] == c).to_numpy())
        q[rng.choice(idx, int(round(0.3 * len(idx))), replace=False)] = True
    return a[~q].copy(), a[q].copy()


def with_reference_umap(r: ad.AnnData, q: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    r.obsm["X_umap"] = umap_of(r)
    if "X_umap" in q.obsm:
        del q.obsm["X_umap"]
    return r, q


def cases():
    """(name, reference, query, levels, the query's UMAP is a truth)."""
    r, q = pbmc68k_reference_query()
    yield "pbmc68k_random", r, q, ["lineage", "bulk_labels"], True
    sy = ad.read_h5ad(DATA / "symphony_pbmc_small.h5ad")
    sy.obsm["X_umap"] = umap_of(sy)
    levels = ["cell_type_broad", "cell_type"]
    yield ("symphony_random",) + random_split(sy, "cell_type") + (levels, True)
    for held in ("3pv1", "3pv2", "5p"):
        yield (f"symphony_loco_{held}",) + with_reference_umap(sy[sy.obs.dataset != held].copy(),
                                                              sy[sy.obs.dataset == held].copy()) + (levels, False)
    z = lognorm(ad.read_h5ad(DATA / "zilionis2019_mouse_lung_healthy_vs_tumor.h5ad"))
    z.obsm["X_umap"] = umap_of(z)
    levels = ["cell_type_coarse", "cell_type_fine"]
    yield ("zilionis_random",) + random_split(z, "cell_type_fine") + (levels, True)
    healthy = (z.obs.condition == "healthy").to_numpy()
    for name, ref_mask in (("zilionis_healthy_tumour", healthy), ("zilionis_tumour_healthy", ~healthy)):
        r, q = z[ref_mask].copy(), z[~ref_mask].copy()
        q = q[q.obs.cell_type_fine.isin(r.obs.cell_type_fine.unique())].copy()
        yield (name,) + with_reference_umap(r, q) + (levels, False)
    d = lognorm(ad.read_h5ad(DATA / "ding2020_pbmc_dropseq_vs_indrops.h5ad"))
    d.obsm["X_umap"] = umap_of(d)
    yield ("ding_random",) + random_split(d, "cell_type") + (["cell_type"], True)
    for ref_platform in ("Drop-seq", "inDrops"):
        mask = (d.obs.platform == ref_platform).to_numpy()
        yield (f"ding_{ref_platform}_reference",) + with_reference_umap(d[mask].copy(), d[~mask].copy()) \
            + (["cell_type"], False)
    cb = ad.read_h5ad(DATA / "cellbench_celseq2_dropseq.h5ad")
    cb = lognorm(cb[cb.obs.demuxlet_cls == "SNG"].copy())
    sc.pp.filter_genes(cb, min_cells=3)
    cb.obsm["X_umap"] = umap_of(cb)
    yield ("cellbench_random",) + random_split(cb, "cell_line") + (["cell_line"], True)
    plates = cb.obs.protocol.astype(str).str.contains("5")
    yield ("cellbench_5line_to_3line",) + with_reference_umap(cb[plates.to_numpy()].copy(), cb[~plates.to_numpy()].copy()) \
        + (["cell_line"], False)
    br = ad.read_h5ad(DATA / "brain_human_Darmanis_vs_mouse_TabulaMuris_1to1orthologs.h5ad")
    br = lognorm(br[~br.obs.compartment.isin(["fetal", "excluded"])].copy())
    mouse = (br.obs.species.astype(str).str.lower() == "mouse").to_numpy()
    r, q = br[mouse].copy(), br[~mouse].copy()
    q = q[q.obs.cell_type.isin(r.obs.cell_type.unique())].copy()
    yield ("brain_mouse_human",) + with_reference_umap(r, q) + (["compartment", "cell_type"], False)


def spread(x: np.ndarray) -> float:
    return float(np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()))


def scores(pred: np.ndarray, ref_xy: np.ndarray, ref_labels: np.ndarray, labels: np.ndarray) -> dict:
    ok = np.isfinite(pred).all(axis=1)
    _, nb = cKDTree(ref_xy).query(pred[ok], 15)
    majority = pd.DataFrame(ref_labels[nb]).mode(axis=1)[0].to_numpy()
    return {"label_agreement": float((majority == labels[ok]).mean()), "spread": spread(pred[ok]) / spread(ref_xy),
            "placed": float(ok.mean())}


def pca_knn(r: ad.AnnData, q: ad.AnnData, seed: int) -> np.ndarray:
    """The benchmark's kNN peer: 15 nearest reference cells in 50 PCs of the reference, mean coordinates."""
    xr = r.X.toarray() if hasattr(r.X, "toarray") else np.asarray(r.X)
    xq = q[:, r.var_names].X
    xq = xq.toarray() if hasattr(xq, "toarray") else np.asarray(xq)
    pca = PCA(n_components=min(50, xr.shape[0] - 1, xr.shape[1]), random_state=seed).fit(xr)
    _, nb = cKDTree(pca.transform(xr)).query(pca.transform(xq), 15)
    return np.asarray(r.obsm["X_umap"])[nb].mean(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name, r, q, levels, truth in cases():
        fine = levels[-1]
        ref_xy = np.asarray(r.obsm["X_umap"])
        ref_labels, labels = r.obs[fine].astype(str).to_numpy(), q.obs[fine].astype(str).to_numpy()
        for seed in [int(s) for s in args.seeds.split(",")]:
            model = atlasmtl.build_model(r, levels, coord_targets={"umap": "X_umap"}, random_state=seed,
                                         show_progress=False, show_summary=False)
            placed = {m: atlasmtl.predict(model, q, coordinates=m, show_progress=False, show_summary=False).coords["umap"]
                      for m in ("heads", "neighbours")}
            placed["knn_pca_peer"] = pca_knn(r, q, seed)
            for method, xy in placed.items():
                row = {"case": name, "seed": seed, "method": method, "cells": q.n_obs,
                       **scores(np.asarray(xy), ref_xy, ref_labels, labels)}
                if truth:
                    true = np.asarray(q.obsm["X_umap"])
                    ok = np.isfinite(xy).all(axis=1)
                    row["rmse"] = float(np.sqrt(((xy[ok] - true[ok]) ** 2).sum(1).mean())) / spread(ref_xy)
                    row["trustworthiness"] = float(trustworthiness(true[ok], xy[ok], n_neighbors=15))
                    tree = cKDTree(ref_xy)
                    at_pred, at_true = tree.query(xy[ok], 15)[1], tree.query(true[ok], 15)[1]
                    row["neighbour_overlap"] = float(np.mean([len(set(a) & set(b)) / 15 for a, b in zip(at_pred, at_true)]))
                rows.append(row)
                print(row, flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out, index=False)
    keys = [c for c in ("label_agreement", "spread", "rmse", "trustworthiness", "neighbour_overlap") if c in frame]
    print(frame.groupby(["case", "method"])[keys].mean().round(3).to_string())


if __name__ == "__main__":
    main()
