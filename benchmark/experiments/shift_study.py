"""Accuracy under shift: input representations and training recipes for atlasmtl's network, side by side.

Research script (issue 10), not part of the benchmark proper. On every case it
trains, in one process and on one core:

- logistic regression on 100 PCs and kNN (15) on 50 PCs, exactly as
  ``benchmark/runner.py`` runs them;
- ``atlasmtl.build_model`` / ``atlasmtl.predict`` from the checked-out package
  (``pkg_binary``, ``pkg_float``), KNN off and at the default gate;
- variants of the same network (``atlasmtl.network.MultiTaskNetwork``, same
  architecture, same loss) with another input representation / training
  recipe, trained by the small loop below on dense matrices (cases are ~1k
  cells), predicted with the heads alone (``off``) and with the package's gate
  + KNN vote in the L2-normalised embedding (``knn``).

Prints finest and coarse macro-F1 per case and variant, and the mean Δ to the
best peer at the finest level (logreg, kNN, and the CellTypist / scANVI /
symphonypy numbers of ``../shared/docs/what-we-know.md`` where known).

    cd /work/wt/research-acc && PYTHONPATH=$PWD python benchmark/experiments/shift_study.py \
        --package zscore,float,binary --variants base_log,z_aug --cases all --out /tmp/shift_study.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cases as case_mod  # noqa: E402
from common import load_case, read_cells, read_truth  # noqa: E402

from atlasmtl.metrics import macro_f1  # noqa: E402
from atlasmtl.gating import GatingConfig, apply_gate, top_two  # noqa: E402
from atlasmtl.knn import vote  # noqa: E402
from atlasmtl.network import MultiTaskNetwork  # noqa: E402

torch.set_num_threads(1)

CASES = ["symphony_3pv1", "symphony_3pv2", "symphony_5p", "cellbench_celseq2_3line", "cellbench_dropseq_3line",
         "pbmc68k_70_30", "ding2020_dropseq_indrops", "zilionis_healthy_tumour", "brain_mouse_human",
         "symphony_5p_thin_query", "symphony_5p_missing_genes"]

# finest-level macro-F1 of peers measured by the project (what-we-know.md); None = not measured / failed
KNOWN_PEERS = {
    "symphony_3pv1": {"celltypist": .773, "scanvi": .793, "symphonypy": .701},
    "symphony_3pv2": {"celltypist": .812, "scanvi": .824, "symphonypy": .755},
    "symphony_5p": {"celltypist": .828, "scanvi": .827, "symphonypy": .718},
    "cellbench_celseq2_3line": {"celltypist": .997, "scanvi": .999, "symphonypy": 1.0},
    "pbmc68k_70_30": {"celltypist": .724, "scanvi": None, "symphonypy": .668},
    "ding2020_dropseq_indrops": {"celltypist": .965, "scanvi": .958, "symphonypy": .965},
    "symphony_5p_thin_query": {"celltypist": .782},  # measured here: benchmark/run.py --methods celltypist
    "zilionis_healthy_tumour": {"celltypist": .628, "scanvi": None, "symphonypy": .445},
    "brain_mouse_human": {"celltypist": .593, "scanvi": .666, "symphonypy": .488},
}

# --------------------------------------------------------------------------- variants
BASE = dict(rep="log", hvg=None, clip=10.0, thin=0.0, thin_low=0.1, gdrop=0.0, gscale=0.0, wd=0.0, sched="none",
            ls=0.1, epochs=40, min_steps=0, lr=1e-3, ens=1, dropout=0.3, tta="none", cw=0.5, indrop=0.0, hidden=(256, 128))
VARIANTS: dict[str, dict[str, Any]] = {
    "base_bin": dict(rep="binary"),
    "base_log": dict(rep="log"),
    "log_hvg": dict(rep="log", hvg=2000),
    "z": dict(rep="z"),
    "z_hvg": dict(rep="z", hvg=2000),
    "scaled": dict(rep="scaled"),
    "scaled_hvg": dict(rep="scaled", hvg=2000),
    "bin_hvg": dict(rep="binary", hvg=2000),
    "rank_hvg": dict(rep="rank", hvg=2000),
    "log_thin": dict(rep="log", thin=0.5),
    "log_gdrop": dict(rep="log", gdrop=0.3),
    "z_thin": dict(rep="z", thin=0.5),
    "z_gdrop": dict(rep="z", gdrop=0.3),
    "z_aug": dict(rep="z", thin=0.5, gdrop=0.3),
    "z_aug_scale": dict(rep="z", thin=0.5, gdrop=0.3, gscale=0.3),
    "z_wd": dict(rep="z", wd=1e-4),
    "z_cos": dict(rep="z", sched="cosine"),
    "z_ls0": dict(rep="z", ls=0.0),
    "z_ens3": dict(rep="z", ens=3),
    "z_adabn": dict(rep="z", tta="adabn"),
    "log_aug": dict(rep="log", thin=0.5, gdrop=0.3),
    "log_s": dict(rep="log", min_steps=300),
    "z_s": dict(rep="z", min_steps=300),
    "zh_s": dict(rep="z", hvg=2000, min_steps=300),
    "zh_aug_s": dict(rep="z", hvg=2000, thin=0.5, gdrop=0.3, min_steps=300),
    "z_aug_s": dict(rep="z", thin=0.5, gdrop=0.3, min_steps=300),
    "log_aug_s": dict(rep="log", thin=0.5, gdrop=0.3, min_steps=300),
    "scaled_aug": dict(rep="scaled", thin=0.5, gdrop=0.3),
}


def parse_variant(name: str) -> dict[str, Any]:
    """A named variant, or ``name:key=value,key=value`` overrides on a named one."""
    if ":" in name:
        base, extra = name.split(":", 1)
        cfg = dict(BASE, **VARIANTS[base])
        for kv in extra.split("+"):
            k, v = kv.split("=")
            cfg[k] = type(BASE[k])(v) if BASE[k] is not None and not isinstance(BASE[k], tuple) else (
                None if v == "None" else (int(v) if v.isdigit() else v))
        return cfg
    return dict(BASE, **VARIANTS[name])


# --------------------------------------------------------------------------- data
def pseudo_counts(a) -> sp.csr_matrix:
    """Integer counts: layers['counts'] when the case has them, else round(expm1(X)) (pbmc68k)."""
    return sp.csr_matrix(a.X, dtype=np.float32)


def load(case: str) -> dict[str, Any]:
    d = case_mod.prepare(case)
    spec = load_case(d)
    ref, query = read_cells(d / "ref.h5ad"), read_cells(d / "query.h5ad", obsm=False)
    if spec["has_counts"]:
        cr = sp.csr_matrix(read_cells(d / "ref.h5ad", matrix="counts", obs=False, obsm=False).X)
        cq = sp.csr_matrix(read_cells(d / "query.h5ad", matrix="counts", obs=False, obsm=False).X)
    else:
        cr, cq = (sp.csr_matrix(a.X).expm1() for a in (ref, query))
        for c in (cr, cq):
            c.data = np.maximum(np.round(c.data), 1.0).astype(np.float32)
    truth = read_truth(d).loc[query.obs_names]
    return {"spec": spec, "ref": ref, "query": query, "cr": cr, "cq": cq, "truth": truth, "dir": d}


def hvg_mask(log_ref: sp.csr_matrix, n: int) -> np.ndarray:
    import anndata as ad
    import scanpy as sc

    if n is None or n >= log_ref.shape[1]:
        return np.ones(log_ref.shape[1], dtype=bool)
    a = ad.AnnData(X=log_ref.copy())
    sc.pp.highly_variable_genes(a, n_top_genes=n, flavor="seurat")
    return a.var["highly_variable"].to_numpy()


def lognorm(c: np.ndarray) -> np.ndarray:
    tot = c.sum(1, keepdims=True)
    return np.log1p(c * np.divide(1e4, tot, out=np.zeros_like(tot), where=tot > 0)).astype(np.float32)


class Rep:
    """Input representation fitted on the reference: binary | log | z | scaled | rank."""

    def __init__(self, kind: str, clip: float) -> None:
        self.kind, self.clip = kind, clip

    def fit(self, log_ref: np.ndarray) -> "Rep":
        self.mu = log_ref.mean(0)
        sd = log_ref.std(0)
        self.sd = np.where(sd > 1e-3, sd, 1.0).astype(np.float32)
        return self

    def __call__(self, counts: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        if self.kind == "binary":
            return (counts > 0).astype(np.float32)
        x = lognorm(counts)
        mu, sd = stats if stats is not None else (self.mu, self.sd)
        if self.kind == "log":
            return x
        if self.kind == "z":
            return np.clip((x - mu) / sd, -self.clip, self.clip).astype(np.float32)
        if self.kind == "scaled":  # no centring: keeps zeros zero (sparse input stays sparse)
            return np.minimum(x / sd, self.clip).astype(np.float32)
        if self.kind == "rank":  # within-cell rank of expressed genes, scaled to (0, 1]; zeros stay 0
            out = np.zeros_like(x)
            for i in range(len(x)):
                nz = np.flatnonzero(x[i])
                if nz.size:
                    r = x[i, nz].argsort().argsort() + 1
                    out[i, nz] = r / nz.size
            return out
        raise ValueError(self.kind)


def augment(c: np.ndarray, cfg: dict, rng: np.random.Generator) -> np.ndarray:
    """Imitate shifts on a count block: binomial thinning, gene dropout, per-gene scale noise."""
    c = c.copy()
    n, g = c.shape
    if cfg["thin"] > 0:
        which = rng.random(n) < cfg["thin"]
        if which.any():
            # log-uniform depth fraction in [thin_low, 1]
            p = np.exp(rng.uniform(np.log(cfg["thin_low"]), 0.0, size=which.sum()))[:, None]
            c[which] = rng.binomial(c[which].astype(np.int64), p).astype(np.float32)
    if cfg["gdrop"] > 0:
        frac = rng.uniform(0, cfg["gdrop"])
        c[:, rng.random(g) < frac] = 0.0
    if cfg["gscale"] > 0:
        c = c * np.exp(rng.normal(0, cfg["gscale"], size=(1, g))).astype(np.float32)
    return c


# --------------------------------------------------------------------------- training
def class_weights(codes: np.ndarray, k: int, power: float) -> torch.Tensor:
    counts = np.bincount(codes[codes >= 0], minlength=k).astype(np.float64)
    w = np.where(counts > 0, (1.0 / np.maximum(counts, 1)) ** power, 0.0)
    w = w / (w[codes[codes >= 0]].mean())
    return torch.tensor(w, dtype=torch.float32)


def train_one(cr: np.ndarray, codes: np.ndarray, n_classes: list[int], rep: Rep, cfg: dict, seed: int):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = MultiTaskNetwork(cr.shape[1], n_classes, {}, list(cfg["hidden"]), cfg["dropout"])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["wd"]) if cfg["wd"] else \
        torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    n, bs = len(cr), 256
    per_epoch = int(np.ceil(n / bs))
    epochs = max(cfg["epochs"], int(np.ceil(cfg["min_steps"] / per_epoch)))
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps) if cfg["sched"] == "onecycle" \
        else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cfg["sched"] == "cosine" else None
    losses = [torch.nn.CrossEntropyLoss(weight=class_weights(codes[:, j], k, cfg["cw"]), ignore_index=-1,
                                        label_smoothing=cfg["ls"]) for j, k in enumerate(n_classes)]
    y_all = torch.from_numpy(codes.astype(np.int64))
    net.train()
    for _ in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, bs):
            rows = order[s:s + bs]
            c = augment(cr[rows], cfg, rng) if (cfg["thin"] or cfg["gdrop"] or cfg["gscale"]) else cr[rows]
            x = torch.from_numpy(rep(c))
            if cfg["indrop"]:
                x = torch.nn.functional.dropout(x, cfg["indrop"])
            _, logits, _ = net(x)
            loss = sum(losses[j](lg, y_all[rows, j]) for j, lg in enumerate(logits))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    net.eval()
    return net


def forward(net, x: np.ndarray):
    with torch.no_grad():
        z, logits, _ = net(torch.from_numpy(x))
    z = z.numpy()
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return z, [torch.softmax(lg, 1).numpy() for lg in logits]


def gate_knn(probs: list[np.ndarray], zq: np.ndarray, zr: np.ndarray, codes: np.ndarray, n_classes: list[int]) -> list[np.ndarray]:
    """The package's default gate + KNN vote (low_conf_only, k=15, knn_conf_low=0.6)."""
    from sklearn.neighbors import NearestNeighbors

    cfg = GatingConfig()
    nbr = NearestNeighbors(n_neighbors=cfg.knn_k).fit(zr).kneighbors(zq, return_distance=False)
    tops = [top_two(p) for p in probs]
    any_low = np.zeros(len(zq), dtype=bool)
    for raw, conf, margin in tops:
        any_low |= (conf < cfg.confidence_high) | (margin < cfg.margin_threshold)
    out = []
    for j, (raw, conf, margin) in enumerate(tops):
        low = (conf < cfg.confidence_high) | (margin < cfg.margin_threshold)
        covered = any_low & low
        kc, kf = np.full(len(zq), -1), np.zeros(len(zq), dtype=np.float32)
        if covered.any():
            kc[covered], kf[covered] = vote(nbr[covered], codes[:, j], n_classes[j])
        out.append(apply_gate(raw, conf, margin, kc, kf, covered, cfg)["code"])
    return out


def run_variant(data: dict, cfg: dict, seed: int = 0) -> dict[str, Any]:
    spec, levels = data["spec"], data["spec"]["levels"]
    classes = [np.unique(data["ref"].obs[lv].astype(str)) for lv in levels]
    codes = np.stack([np.searchsorted(cl, data["ref"].obs[lv].astype(str).to_numpy()) for cl, lv in zip(classes, levels)], 1)
    log_ref_sparse = sp.csr_matrix(data["ref"].X)
    genes = hvg_mask(log_ref_sparse, cfg["hvg"]) if cfg["hvg"] else np.ones(data["cr"].shape[1], dtype=bool)
    cr = data["cr"][:, genes].toarray().astype(np.float32)
    cq = data["cq"][:, genes].toarray().astype(np.float32)
    rep = Rep(cfg["rep"], cfg["clip"]).fit(lognorm(cr))
    stats_q = None
    if cfg["tta"] == "adabn":
        lq = lognorm(cq)
        sd = lq.std(0)
        stats_q = (lq.mean(0), np.where(sd > 1e-3, sd, 1.0).astype(np.float32))
    t0 = time.perf_counter()
    zr_all, zq_all, pq_all = [], [], []
    n_classes = [len(c) for c in classes]
    for m in range(cfg["ens"]):
        net = train_one(cr, codes, n_classes, rep, cfg, seed + m)
        zr, _ = forward(net, rep(cr))
        zq, pq = forward(net, rep(cq, stats_q))
        zr_all.append(zr), zq_all.append(zq), pq_all.append(pq)
    secs = time.perf_counter() - t0
    pq = [np.mean([p[j] for p in pq_all], 0) for j in range(len(levels))]
    zr = np.concatenate(zr_all, 1) / np.sqrt(cfg["ens"])
    zq = np.concatenate(zq_all, 1) / np.sqrt(cfg["ens"])
    out = {"seconds": round(secs, 2), "n_genes": int(genes.sum())}
    heads = [p.argmax(1) for p in pq]
    knn = gate_knn(pq, zq, zr, codes, n_classes)
    for mode, pred in (("off", heads), ("knn", knn)):
        for j, lv in enumerate(levels):
            lab = np.where(pred[j] >= 0, classes[j][np.maximum(pred[j], 0)], "Unknown")
            out[f"{mode}_{lv}"] = macro_f1(data["truth"][lv].to_numpy(), lab)
    return out


# --------------------------------------------------------------------------- baselines
def run_baselines(case: str, data: dict) -> dict[str, dict[str, float]]:
    import runner

    levels = data["spec"]["levels"]
    out = {}
    for name, fn in (("logreg", runner.run_logreg), ("knn", runner.run_knn)):
        res = fn(data["spec"], data["dir"] / "ref.h5ad", data["dir"] / "query.h5ad", {}, 0)["outputs"][name]
        out[name] = {lv: macro_f1(data["truth"][lv].to_numpy(), np.asarray(res["pred"][lv])) for lv in levels}
    return out


def run_package(data: dict, transform: str, seed: int = 0) -> dict[str, dict[str, float]]:
    """``transform`` = an input_transform, optionally with ``+noaug`` (augment=False)."""
    import atlasmtl

    levels = data["spec"]["levels"]
    name, _, flag = transform.partition("+")
    model = atlasmtl.build_model(data["ref"], label_columns=levels, input_transform=name, augment=flag != "noaug",
                                 num_threads=1, show_progress=False, show_summary=False, random_state=seed)
    out = {}
    for mode, knn in (("off", "off"), ("knn", "low_conf_only")):
        res = atlasmtl.predict(model, data["query"], knn_correction=knn, num_threads=1, show_progress=False, show_summary=False)
        out[mode] = {lv: macro_f1(data["truth"][lv].to_numpy(), np.asarray(res.labels(lv)).astype(str)) for lv in levels}
        if mode == "off":  # the heads' own argmax, before the gate's abstention
            out["heads"] = {lv: macro_f1(data["truth"][lv].to_numpy(),
                                         np.asarray(res.classes[lv])[res.levels[lv]["raw_code"]].astype(str))
                            for lv in levels}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="all")
    ap.add_argument("--variants", default="base_log,z_hvg")
    ap.add_argument("--package", default="", help="comma-separated input_transforms to run through "
                    "atlasmtl.build_model/predict (e.g. zscore,float,binary,zscore+noaug)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    case_names = CASES if args.cases == "all" else args.cases.split(",")
    variants = args.variants.split(",") if args.variants else []
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    for case in case_names:
        data = load(case)
        levels = data["spec"]["levels"]
        fine, coarse = levels[-1], levels[0]
        r = results.setdefault(case, {})
        if "logreg" not in r:
            for name, v in run_baselines(case, data).items():
                r[name] = {"fine": v[fine], "coarse": v[coarse]}
        for t in [t for t in args.package.split(",") if t]:
            pks = [run_package(data, t, seed) for seed in seeds]
            for mode in ("heads", "off", "knn"):
                r[f"pkg_{t}/{mode}"] = {"fine": float(np.mean([pk[mode][fine] for pk in pks])),
                                        "coarse": float(np.mean([pk[mode][coarse] for pk in pks]))}
        for v in variants:
            cfg = parse_variant(v)
            fs = [run_variant(data, cfg, seed) for seed in seeds]
            for mode in ("off", "knn"):
                r[f"{v}/{mode}"] = {"fine": float(np.mean([f[f"{mode}_{fine}"] for f in fs])),
                                    "coarse": float(np.mean([f[f"{mode}_{coarse}"] for f in fs])),
                                    "seconds": fs[0]["seconds"], "n_genes": fs[0]["n_genes"]}
        peers = {k: v["fine"] for k, v in r.items() if k in ("logreg", "knn")}
        peers.update({k: v for k, v in KNOWN_PEERS.get(case, {}).items() if v is not None})
        r["_best_peer"] = max(peers.values())
        r["_best_peer_coarse"] = max(v["coarse"] for k, v in r.items() if k in ("logreg", "knn"))
        print(f"\n== {case} (best peer fine {r['_best_peer']:.3f}; logreg {r['logreg']['fine']:.3f} "
              f"kNN {r['knn']['fine']:.3f}; coarse logreg {r['logreg']['coarse']:.3f})", flush=True)
        for k, v in r.items():
            if not k.startswith("_") and k not in ("logreg", "knn"):
                print(f"  {k:32s} fine {v['fine']:.3f} (Δ {v['fine'] - r['_best_peer']:+.3f})  coarse {v['coarse']:.3f}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    # summary: mean / worst Δ to the best peer per variant
    keys = sorted({k for r in results.values() for k in r if not k.startswith("_") and k not in ("logreg", "knn")})
    print("\nvariant                           n  meanΔfine  worstΔfine  worst case            meanΔcoarse(vs logreg/kNN)")
    for k in keys:
        d = [(c, r[k]["fine"] - r["_best_peer"], r[k]["coarse"] - r["_best_peer_coarse"]) for c, r in results.items() if k in r]
        w = min(d, key=lambda t: t[1])
        print(f"{k:32s} {len(d):2d}  {np.mean([t[1] for t in d]):+.3f}     {w[1]:+.3f}     {w[0]:22s} {np.mean([t[2] for t in d]):+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
