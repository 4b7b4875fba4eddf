"""Issue 10 (accuracy under real shifts): training recipes, coarse-level decoding and query-statistics
adaptation of the package's own build_model / predict, on the benchmark's prepared cases.

Research script, not part of the benchmark proper. Per case and seed it trains one model with the
given recipe and predicts with every combination of KNN step (off / default), hierarchical decoding
and gene statistics (reference / query / blend), scoring with atlasmtl.evaluate exactly as
benchmark/run.py does; peers' figures are read from a benchmark results.json of the same cases.

    cd /work/wt/acc && PYTHONPATH=$PWD nice -n 10 python benchmark/experiments/acc_study.py \
        --work /work/bench_acc --recipe base --seeds 0,1 --out /tmp/acc_base.json
    python benchmark/experiments/acc_study.py --recipe base,ms300cos,ms500cos \
        --summarise benchmark/experiments/results/acc_study_seeds01.json.gz
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_cells, read_truth  # noqa: E402

import atlasmtl  # noqa: E402
import atlasmtl.augment as A  # noqa: E402
import atlasmtl.hierarchy as H  # noqa: E402
import atlasmtl.prediction as P  # noqa: E402
import atlasmtl.training as T  # noqa: E402

torch.set_num_threads(1)


def decode_paths(probs, runs, method: str = "joint"):
    """Class code per level along a valid reference path (atlasmtl.hierarchy.decode_paths and two alternatives).

    Parameters
    ----------
    probs
        Calibrated probabilities per level (cells × classes), coarse to fine.
    runs
        From :func:`level_paths`.
    method
        ``"joint"``: the path maximising the product of the level probabilities.
        ``"marginal"``: top-down; at each level, among the children of the
        level above's call, the class maximising its own probability times, for
        every finer level of the run, the summed probability of its descendants
        there (the finer heads' vote for the whole subtree, not for its best
        member). ``"top_down"``: top-down on each level's own probability.
    """
    codes: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(probs)
    for first, last, paths in runs:
        if first == last:
            codes[first] = probs[first].argmax(axis=1)
            continue
        if method == "joint":
            joint = H.decode_paths(probs, [(first, last, paths)])
            for m in range(first, last + 1):
                codes[m] = joint[m]
            continue
        n = probs[first].shape[0]
        alive = np.ones((n, len(paths)), dtype=bool)  # paths consistent with the calls made so far
        for m in range(first, last + 1):
            n_m = probs[m].shape[1]
            log_score = np.log(np.clip(probs[m], 1e-30, None))
            if method == "marginal":
                for k in range(m + 1, last + 1):
                    # descendant mass at level k of each level-m class (each level-k class counted once)
                    pairs = np.unique(paths[:, [k - first, m - first]], axis=0)
                    below = np.zeros((probs[k].shape[1], n_m))
                    below[pairs[:, 0], pairs[:, 1]] = 1.0
                    log_score = log_score + np.log(np.clip(probs[k] @ below, 1e-30, None))
            allowed = np.zeros((n, n_m), dtype=bool)
            rows, cols = np.nonzero(alive)
            allowed[rows, paths[cols, m - first]] = True
            codes[m] = np.where(allowed, log_score, -np.inf).argmax(axis=1)
            alive &= paths[:, m - first][None, :] == codes[m][:, None]
    return codes


CASES = ("symphony_3pv1,symphony_3pv2,symphony_5p,symphony_5p_novel_NK,cellbench_celseq2_3line,cellbench_dropseq_3line,"
         "cellbench_novel_H1975,pbmc68k_70_30,ding2020_dropseq_indrops,zilionis_healthy_tumour,"
         "zilionis_novel_tumour_subsets,brain_mouse_human,symphony_5p_thin_query,symphony_5p_missing_genes").split(",")

# recipe name -> (build_model kwargs, ShiftAugmentation overrides); recipes combine with "+"
RECIPES = {
    "base": ({}, {}),
    "wd": ({"weight_decay": 1e-2}, {}),
    "cos": ({"lr_schedule": "cosine"}, {}),
    "ms500": ({"min_steps": 500}, {}),
    "ms1000": ({"min_steps": 1000}, {}),
    "ms300": ({"min_steps": 300}, {}),
    "ls0": ({"label_smoothing": 0.0}, {}),
    "cw0": ({"class_weight_power": 0.0}, {}),
    "cw1": ({"class_weight_power": 1.0}, {}),
    "do1": ({"dropout_rate": 0.1}, {}),
    "do5": ({"dropout_rate": 0.5}, {}),
    "gd5": ({}, {"max_gene_dropout": 0.5}),
    "bs64": ({"batch_size": 64}, {}),
}
RECIPES["ms500cos"] = ({"min_steps": 500, "lr_schedule": "cosine"}, {})
RECIPES["ms300cos"] = ({"min_steps": 300, "lr_schedule": "cosine"}, {})


def parse_recipe(name: str):
    kw, aug = {}, {}
    for part in name.split("+"):
        a, b = RECIPES[part]
        kw.update(a), aug.update(b)
    return kw, aug


def query_stats(model, query):
    """Per model gene mean / std of the query's log1p CP10k values (genes the query lacks: the reference's)."""
    aligner, _, _ = P.prepare_query(model, P.get_matrix_source(query), None, 0.5)
    x = aligner._sparse_values(query.X)  # what predict reads by default
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    std = np.sqrt(np.maximum(sq - mean**2, 0))
    ref = P._gene_stats(model)
    present = np.asarray(np.abs(aligner.aggregation).sum(axis=0)).ravel() > 0 if aligner.aggregation is not None \
        else np.ones(len(mean), bool)
    std[std < 1e-3] = 1.0
    mean = np.where(present, mean, ref["gene_mean"]).astype(np.float32)
    std = np.where(present, std, ref["gene_std"]).astype(np.float32)
    return ref, {"gene_mean": mean, "gene_std": std}


def summarise(paths: list[str], results: str, recipes: list[str], tta: str = "none", decode: str = "joint") -> str:
    """Markdown table: per case the best peer (from a benchmark results.json) and each recipe at the default
    gate and with KNN off, finest / coarse macro-F1 (mean over seeds), and the mean (worst) Δ to the best peer."""
    import gzip
    import statistics as st
    from collections import defaultdict

    best: dict = {}
    for x in json.loads(Path(results).read_text())["runs"]:
        if x["status"] == "ok" and x["method"] in ("celltypist", "logreg", "knn", "symphonypy"):
            for lv, m in x["metrics"]["levels"].items():
                if m["macro_f1"] > best.get((x["case"], lv), (-1, ""))[0]:
                    best[(x["case"], lv)] = (m["macro_f1"], x["method"])
    rows = [r for p in paths for r in json.load(gzip.open(p, "rt") if p.endswith(".gz") else open(p))
            if r["tta"] == tta and r["decode"] == decode]
    cols = [(rc, k) for k in ("low_conf_only", "off") for rc in recipes]
    out = ["| case | best peer fine | best peer coarse | " + " | ".join(
        f"{rc} {'default' if k != 'off' else 'KNN off'}" for rc, k in cols) + " |", "|---" * (3 + len(cols)) + "|"]
    agg = defaultdict(list)
    for case in dict.fromkeys(r["case"] for r in rows):
        lv = list(next(r for r in rows if r["case"] == case)["f1"])
        bf, bc = best[(case, lv[-1])], best[(case, lv[0])] if len(lv) > 1 else None
        line = f"| {case} | {bf[0]:.3f} ({bf[1]}) | " + (f"{bc[0]:.3f} ({bc[1]})" if bc else "–") + " |"
        for rc, k in cols:
            rs = [r for r in rows if r["case"] == case and r["recipe"] == rc and r["knn"] == k]
            f = st.mean(r["f1"][lv[-1]] for r in rs)
            agg[(rc, k, "f")].append(f - bf[0])
            cell = f" {f:.3f}"
            if bc:
                c = st.mean(r["f1"][lv[0]] for r in rs)
                agg[(rc, k, "c")].append(c - bc[0])
                cell += f" / {c:.3f}"
            line += cell + " |"
        out.append(line)
    out.append("| mean Δ (worst) | | |" + "".join(
        f" {st.mean(agg[(rc, k, 'f')]):+.4f} ({min(agg[(rc, k, 'f')]):+.3f}) / {st.mean(agg[(rc, k, 'c')]):+.4f} "
        f"({min(agg[(rc, k, 'c')]):+.3f}) |" for rc, k in cols))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/work/bench_acc")
    ap.add_argument("--results", default="benchmark/results/results.json")
    ap.add_argument("--cases", default="all")
    ap.add_argument("--recipe", default="base")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--decodings", default="joint,marginal,top_down")
    ap.add_argument("--tta", default="none,query,blend")
    ap.add_argument("--knn", default="off,low_conf_only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarise", nargs="*", default=None, help="result files to tabulate (with --recipe a,b,...)")
    a = ap.parse_args()
    if a.summarise:
        print(summarise(a.summarise, a.results, a.recipe.split(",")))
        return 0
    cases = CASES if a.cases == "all" else a.cases.split(",")
    kw, aug = parse_recipe(a.recipe)
    if aug:
        T.ShiftAugmentation = functools.partial(A.ShiftAugmentation, **aug)
    rows = []
    for case in cases:
        cdir = Path(a.work) / "cases" / case
        spec = json.loads((cdir / "case.json").read_text())
        levels = spec["levels"]
        ref, query, truth = read_cells(cdir / "ref.h5ad"), read_cells(cdir / "query.h5ad", obsm=False), read_truth(cdir)
        for seed in [int(s) for s in a.seeds.split(",")]:
            t0 = time.perf_counter()
            model = atlasmtl.build_model(ref, label_columns=levels, random_state=seed, num_threads=1,
                                         show_progress=False, show_summary=False, **kw)
            train_s = time.perf_counter() - t0
            stats = dict(zip(("none", "query"), query_stats(model, query)))
            stats["blend"] = {k: (stats["none"][k] + stats["query"][k]) / 2 for k in stats["none"]}
            for tta in a.tta.split(","):
                P._gene_stats = lambda m, s=stats[tta]: s
                for dec in a.decodings.split(","):
                    P.decode_paths = functools.partial(decode_paths, method=dec)
                    for knn in a.knn.split(","):
                        res = atlasmtl.predict(model, query, knn_correction=knn, show_progress=False, show_summary=False)
                        met = atlasmtl.evaluate(res, truth, label_columns=levels,
                                                **({"novel_labels": spec["novel"]} if spec.get("novel") else {}))
                        row = {"case": case, "seed": seed, "recipe": a.recipe, "tta": tta, "decode": dec, "knn": knn,
                               "train_s": round(train_s, 2),
                               "f1": {lv: met["levels"][lv]["macro_f1"] for lv in levels},
                               "f1_raw": {}}
                        for lv in levels:
                            raw = np.asarray(res.classes[lv])[res.levels[lv]["raw_code"]]
                            t = truth.loc[res.obs_names, lv].astype(str).to_numpy()
                            ok = truth.loc[res.obs_names, lv].notna().to_numpy()
                            row["f1_raw"][lv] = atlasmtl.metrics.macro_f1(t[ok], raw[ok])
                        if len(levels) > 1 and levels[-1] in model.hierarchy:
                            par = np.array([model.hierarchy[levels[-1]][c] for c in np.asarray(res.classes[levels[-1]])[res.levels[levels[-1]]["raw_code"]]])
                            row["path_consistent"] = float((par == np.asarray(res.classes[levels[-2]])[res.levels[levels[-2]]["raw_code"]]).mean())
                        if met.get("novel"):
                            row["novel"] = {lv: {k: v.get(k) for k in ("auroc", "novel_unknown_rate", "known_unknown_rate")}
                                            for lv, v in met["novel"]["levels"].items()}
                        rows.append(row)
            P._gene_stats = ORIG_STATS
            print(case, seed, f"{train_s:.1f}s", [(r["tta"], r["decode"], r["knn"], round(r["f1"][levels[-1]], 3), round(r["f1"][levels[0]], 3))
                                               for r in rows[-3:] if r["case"] == case], flush=True)
        Path(a.out).write_text(json.dumps(rows))
    return 0


ORIG_STATS = P._gene_stats
if __name__ == "__main__":
    sys.exit(main())
