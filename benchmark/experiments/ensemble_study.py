"""Issue 10 / 9: does an ensemble of networks (``build_model(ensemble_size=...)``) pay for itself?

Research script, not part of the benchmark proper. For each prepared benchmark case, seed and
ensemble size it trains a model at the defaults (only ``ensemble_size`` and ``random_state``
change), predicts the query with the default KNN step and with KNN off, and scores with
``atlasmtl.evaluate`` as ``benchmark/run.py`` does. ``--summarise`` prints per case the mean over
seeds of finest / coarse macro-F1 against the best peer of a benchmark ``results.json`` (peers are
deterministic or seeded once there), finest ECE, the Unknown share and the novelty figures.

    PYTHONPATH=$PWD nice -n 5 python benchmark/experiments/ensemble_study.py --work /work/bench_work \\
        --sizes 1,auto --seeds 0,1,2,3,4 --out /tmp/ensemble.json
    python benchmark/experiments/ensemble_study.py --summarise /tmp/ensemble.json
    python benchmark/experiments/ensemble_study.py --summarise \
        benchmark/experiments/results/ensemble_study_seeds0-4.json.gz   # the committed run
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics as st
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_cells, read_truth  # noqa: E402

import atlasmtl  # noqa: E402

CASES = ("symphony_3pv1,symphony_3pv2,symphony_5p,symphony_5p_novel_NK,symphony_5p_novel_B,cellbench_celseq2_3line,"
         "cellbench_dropseq_3line,cellbench_novel_H1975,pbmc68k_70_30,ding2020_dropseq_indrops,zilionis_healthy_tumour,"
         "zilionis_novel_tumour_subsets,brain_mouse_human,symphony_5p_thin_query,symphony_5p_missing_genes")
PEERS = ("celltypist", "logreg", "knn", "symphonypy")


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {(r["case"], r["seed"], r["ensemble_size"]) for r in rows}
    sizes = [s if s == "auto" else int(s) for s in args.sizes.split(",")]
    for case in args.cases.split(","):
        cdir = Path(args.work) / "cases" / case
        spec = json.loads((cdir / "case.json").read_text())
        levels = spec["levels"]
        ref, query, truth = read_cells(cdir / "ref.h5ad"), read_cells(cdir / "query.h5ad", obsm=False), read_truth(cdir)
        novel = {"novel_labels": spec["novel"]} if spec.get("novel") else {}
        for seed in [int(s) for s in args.seeds.split(",")]:
            for size in sizes:
                if (case, seed, size) in done:
                    continue
                t0 = time.perf_counter()
                model = atlasmtl.build_model(ref, levels, random_state=seed, ensemble_size=size, num_threads=1,
                                             show_progress=False, show_summary=False)
                row = {"case": case, "seed": seed, "ensemble_size": size, "train_s": time.perf_counter() - t0,
                       "members": model.metadata["architecture"].get("ensemble_size", 1)}
                for knn in ("low_conf_only", "off"):
                    res = atlasmtl.predict(model, query, knn_correction=knn, show_progress=False, show_summary=False)
                    met = atlasmtl.evaluate(res, truth, label_columns=levels, **novel)
                    row[knn] = {
                        "levels": {lv: {k: v for k, v in met["levels"][lv].items() if isinstance(v, (int, float))}
                                   for lv in levels},
                        "novel": {lv: {k: v.get(k) for k in ("auroc", "novel_unknown_rate", "known_unknown_rate")}
                                  for lv, v in met["novel"]["levels"].items()} if met.get("novel") else None,
                    }
                rows.append(row)
                out.write_text(json.dumps(rows))
                print(case, seed, size, round(row["train_s"], 1),
                      {lv: round(row["low_conf_only"]["levels"][lv]["macro_f1"], 3) for lv in levels}, flush=True)


def summarise(paths: list[str], results: str, knn: str = "low_conf_only") -> str:
    """Markdown table, one column group per ensemble size, means over seeds."""
    runs = [x for x in json.loads(Path(results).read_text())["runs"] if x["status"] == "ok"]
    by: dict[str, dict] = {}
    for x in runs:
        by.setdefault(x["case"], {})[x["method"]] = x["metrics"]
    rows = [r for p in paths for r in json.loads(gzip.open(p, "rt").read() if p.endswith(".gz") else Path(p).read_text())]
    sizes = list(dict.fromkeys(r["ensemble_size"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    lines = ["| case | best peer fine / coarse | " + " | ".join(
        f"ensemble_size={s}: fine (Δ) / coarse (Δ) / ECE / Unknown / novel AUROC, novel→Unk, known→Unk / train s"
        for s in sizes) + " |", "|" + "---|" * (2 + len(sizes))]
    delta: dict = {s: {"fine": [], "coarse": [], "ece": []} for s in sizes}
    for case in cases:
        m = by[case]
        levels = list(m["atlasmtl"]["levels"])
        fine, coarse = levels[-1], levels[0]
        bf = max(m[p]["levels"][fine]["macro_f1"] for p in PEERS if p in m)
        bc = max(m[p]["levels"][coarse]["macro_f1"] for p in PEERS if p in m) if len(levels) > 1 else None
        line = f"| {case} | {bf:.3f} / " + (f"{bc:.3f}" if bc is not None else "–") + " |"
        for s in sizes:
            rs = [r for r in rows if r["case"] == case and r["ensemble_size"] == s]
            mean = lambda f: st.mean(f(r[knn]) for r in rs)  # noqa: E731
            f1 = mean(lambda r: r["levels"][fine]["macro_f1"])
            delta[s]["fine"].append(f1 - bf)
            delta[s]["ece"].append(mean(lambda r: r["levels"][fine]["ece"]))
            cell = f" {f1:.3f} ({f1 - bf:+.3f}) / "
            if bc is not None:
                c1 = mean(lambda r: r["levels"][coarse]["macro_f1"])
                delta[s]["coarse"].append(c1 - bc)
                cell += f"{c1:.3f} ({c1 - bc:+.3f}) / "
            else:
                cell += "– / "
            cell += f"{delta[s]['ece'][-1]:.3f} / {mean(lambda r: 1 - r['levels'][fine]['coverage']):.3f}"
            if rs[0][knn]["novel"]:
                cell += " / " + ", ".join(f"{mean(lambda r, k=k: r['novel'][fine][k]):.3f}"
                                          for k in ("auroc", "novel_unknown_rate", "known_unknown_rate"))
            cell += f" / {st.mean(r['train_s'] for r in rs):.1f}"
            line += cell + " |"
        lines.append(line)
    lines.append("")
    for s in sizes:
        d = delta[s]
        lines.append(f"- ensemble_size={s}: finest mean Δ {st.mean(d['fine']):+.4f} (worst {min(d['fine']):+.3f}); "
                     f"coarse mean Δ {st.mean(d['coarse']):+.4f} (worst {min(d['coarse']):+.3f}, below the best peer "
                     f"on {sum(x < 0 for x in d['coarse'])}); finest ECE median {st.median(d['ece']):.3f}, "
                     f"max {max(d['ece']):.3f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/work/bench_work", help="benchmark work folder with prepared cases/")
    ap.add_argument("--results", default="benchmark/results/results.json", help="peers' figures")
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--sizes", default="1,auto")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", default="ensemble_study.json")
    ap.add_argument("--summarise", nargs="*", default=None)
    ap.add_argument("--knn", default="low_conf_only", help="which prediction --summarise tabulates")
    a = ap.parse_args()
    if a.summarise:
        print(summarise(a.summarise, a.results, a.knn))
        return 0
    run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
