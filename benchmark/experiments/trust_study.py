"""Issue 9 research: calibration, gate, open-set novelty, joint hierarchy decoding, KNN votes.

Stage 1 (``--train``) builds every case in memory from ../shared/data, trains
atlasmtl models and caches the network outputs (logits, embeddings) of the
reference (training cells and a held-out calibration split) and of the query.
Stage 2 (default) evaluates every post-hoc method from the cache, so methods
are compared on identical networks.

    cd /work/wt/research-trust
    PYTHONPATH=$PWD python benchmark/experiments/trust_study.py --train
    PYTHONPATH=$PWD python benchmark/experiments/trust_study.py

Everything runs on one thread (shared machine).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import lognorm_cp10k, shared_data_dir  # noqa: E402

import atlasmtl  # noqa: E402
from atlasmtl.genes import build_aligner  # noqa: E402
from atlasmtl.inputs import detect_semantics, get_matrix_source  # noqa: E402

CACHE = Path(os.environ.get("TRUST_CACHE", "/tmp/trust_cache"))
UNKNOWN = "Unknown"


# ----------------------------------------------------------------------------- cases
def _case(name, ref, query, levels, novel=None, kind="shift"):
    truth = query.obs[levels].astype(str).copy()
    return {"name": name, "ref": ref, "query": query, "levels": levels, "truth": truth, "novel": novel or {}, "kind": kind}


def _hvg(counts_ref: sp.csr_matrix, names, n=3000):
    import scanpy as sc

    det = np.asarray((counts_ref > 0).sum(axis=0)).ravel() >= 3
    hv = ad.AnnData(X=lognorm_cp10k(counts_ref[:, det]), var=pd.DataFrame(index=np.asarray(names)[det]))
    sc.pp.highly_variable_genes(hv, n_top_genes=min(n, int(det.sum()) - 1), flavor="seurat")
    keep = np.flatnonzero(det)[hv.var["highly_variable"].to_numpy()]
    return keep


def _mk(counts, obs, genes):
    a = ad.AnnData(X=lognorm_cp10k(counts), obs=obs.copy(), var=pd.DataFrame(index=pd.Index(genes).astype(str)))
    a.layers["counts"] = sp.csr_matrix(counts, dtype=np.float32)
    return a


def symphony_cases():
    from cases import _symphony

    adata, counts = _symphony()
    lv = ["cell_type_broad", "cell_type"]
    out = []
    for chem in ("3pv1", "3pv2", "5p"):
        q = (adata.obs["dataset"] == chem).to_numpy()
        ref, query = _mk(counts[~q], adata.obs[~q], adata.var_names), _mk(counts[q], adata.obs[q], adata.var_names)
        out.append(_case(f"sym_{chem}", ref, query, lv))
        for removed in ("B", "NK"):
            keep = (ref.obs["cell_type"] != removed).to_numpy()
            out.append(_case(f"sym_{chem}_no{removed}", ref[keep].copy(), query, lv,
                             novel={"cell_type": [removed], "cell_type_broad": [removed]}, kind="novel"))
    return out


def cellbench_cases():
    a = ad.read_h5ad(shared_data_dir() / "cellbench_celseq2_dropseq.h5ad")
    a = a[(a.obs["demuxlet_cls"] == "SNG").to_numpy()].copy()
    counts = sp.csr_matrix(a.X, dtype=np.float32)
    train = a.obs["protocol"].str.startswith("CEL-seq2 5cl").to_numpy()
    keep = _hvg(counts[train], a.var_names)
    counts, genes = counts[:, keep], a.var_names[keep]
    lv = ["cell_line"]
    ref = _mk(counts[train], a.obs[train], genes)
    out = []
    for tag, prot in (("celseq2", "CEL-seq2 (3 lines)"), ("dropseq", "Drop-seq (3 lines)")):
        q = (a.obs["protocol"] == prot).to_numpy()
        out.append(_case(f"cb_{tag}", ref, _mk(counts[q], a.obs[q], genes), lv))
    q = a.obs["protocol"].isin(["CEL-seq2 (3 lines)", "Drop-seq (3 lines)"]).to_numpy()
    k = (ref.obs["cell_line"] != "H1975").to_numpy()
    out.append(_case("cb_noH1975", ref[k].copy(), _mk(counts[q], a.obs[q], genes), lv,
                     novel={"cell_line": ["H1975"]}, kind="novel"))
    return out


def pbmc68k_case():
    from atlasmtl.datasets import pbmc68k_reference_query

    ref, query = pbmc68k_reference_query(test_size=0.3, random_state=0)
    return [_case("pbmc68k", ref, query, ["lineage", "bulk_labels"], kind="indist")]


def ding_case():
    a = ad.read_h5ad(shared_data_dir() / "ding2020_pbmc_dropseq_vs_indrops.h5ad")
    counts = sp.csr_matrix(a.X, dtype=np.float32)
    r = (a.obs["platform"] == "Drop-seq").to_numpy()
    return [_case("ding", _mk(counts[r], a.obs[r], a.var_names), _mk(counts[~r], a.obs[~r], a.var_names), ["cell_type"])]


def zilionis_case():
    a = ad.read_h5ad(shared_data_dir() / "zilionis2019_mouse_lung_healthy_vs_tumor.h5ad")
    counts = sp.csr_matrix(a.X, dtype=np.float32)
    r = (a.obs["condition"] == "healthy").to_numpy()
    keep = _hvg(counts[r], a.var_names)
    counts, genes = counts[:, keep], a.var_names[keep]
    lv = ["cell_type_coarse", "cell_type_fine"]
    ref, query = _mk(counts[r], a.obs[r], genes), _mk(counts[~r], a.obs[~r], genes)
    novel_fine = sorted(set(query.obs["cell_type_fine"]) - set(ref.obs["cell_type_fine"]))
    return [_case("zil_tumour", ref, query, lv, novel={"cell_type_fine": novel_fine}, kind="novel")]


def all_cases():
    return symphony_cases() + cellbench_cases() + pbmc68k_case() + ding_case() + zilionis_case()


# ----------------------------------------------------------------------------- training + cache
def holdout_split(codes_fine: np.ndarray, frac: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of held-out cells: floor(frac * n_c) per class (classes under 1/frac cells keep all)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(codes_fine), dtype=bool)
    for c in np.unique(codes_fine):
        idx = np.flatnonzero(codes_fine == c)
        m = int(np.floor(frac * len(idx)))
        if m:
            held[rng.choice(idx, m, replace=False)] = True
    return held


def forward(model, adata):
    src = get_matrix_source(adata)
    sem = detect_semantics(src)
    al = build_aligner(model.genes, model.metadata["gene_namespace"], model.metadata.get("gene_alt_ids", {}), src,
                       model.metadata["input_transform"], sem["semantics"], min_gene_overlap=0.0)
    x = al.transform(src.rows(slice(None)))
    with torch.no_grad():
        z, logits, _ = model.network(torch.from_numpy(x))
    return {"z": z.numpy(), "logits": [l.numpy() for l in logits], "n_detected": (x > 0).sum(1)}


def train_case(case, variant):
    ref, levels = case["ref"], case["levels"]
    fine = ref.obs[levels[-1]].astype(str).to_numpy()
    held = holdout_split(fine, variant["holdout"]) if variant["holdout"] else np.zeros(len(fine), bool)
    t0 = time.perf_counter()
    kw = dict(input_transform=variant.get("input_transform", "float"), label_smoothing=variant["ls"],
              num_threads=1, show_progress=False, show_summary=False)
    kw.update(variant.get("extra", {}))
    model = atlasmtl.build_model(ref[~held].copy(), levels, **kw)
    secs = time.perf_counter() - t0
    st = {"train": forward(model, ref[~held]), "held": forward(model, ref[held]) if held.any() else None,
          "query": forward(model, case["query"]), "classes": model.classes, "hierarchy": model.hierarchy,
          "ref_labels": ref.obs[levels].astype(str).to_numpy()[~held],
          "held_labels": ref.obs[levels].astype(str).to_numpy()[held], "train_seconds": secs}
    # reference PCA space (for the PCA novelty score): centred log1p CP10k of the training cells
    from sklearn.decomposition import TruncatedSVD

    dense = lambda a: np.asarray(a.X.toarray() if sp.issparse(a.X) else a.X, dtype=np.float32)  # small, study only
    xr = dense(ref[~held])
    mu = xr.mean(axis=0)
    svd = TruncatedSVD(n_components=min(50, xr.shape[1] - 1), random_state=0).fit(xr - mu)
    pca = lambda a: (dense(a) - mu) @ svd.components_.T
    st["pca"] = {"train": pca(ref[~held]), "held": pca(ref[held]) if held.any() else None, "query": pca(case["query"])}
    return st


VARIANTS = {
    "ls01_h20": {"ls": 0.1, "holdout": 0.2},
    "ls0_h20": {"ls": 0.0, "holdout": 0.2},
    "ls01_full": {"ls": 0.1, "holdout": 0.0},
    "bin_h20": {"ls": 0.1, "holdout": 0.2, "input_transform": "binary"},
    "bin_full": {"ls": 0.1, "holdout": 0.0, "input_transform": "binary"},
}


def stage_train(names=None, variants=None):
    CACHE.mkdir(parents=True, exist_ok=True)
    for case in all_cases():
        if names and case["name"] not in names:
            continue
        for vname, v in VARIANTS.items():
            if variants and vname not in variants:
                continue
            path = CACHE / f"{case['name']}__{vname}.pkl"
            if path.exists():
                continue
            st = train_case(case, v)
            st["truth"] = case["truth"]
            st["levels"] = case["levels"]
            st["novel"] = case["novel"]
            st["kind"] = case["kind"]
            path.write_bytes(pickle.dumps(st))
            print(f"{case['name']} {vname}: {st['train_seconds']:.1f}s", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--cases", nargs="*")
    ap.add_argument("--variants", nargs="*")
    args = ap.parse_args()
    if args.train:
        stage_train(args.cases, args.variants)
    else:
        from trust_analysis import main

        main(args)
