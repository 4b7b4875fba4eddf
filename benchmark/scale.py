"""The scale table (issue 13): atlasmtl beside CellTypist SGD and logistic regression, in one run.

Usage (from the repository root; peers' environment from ``benchmark/setup_peers.sh``)::

    python benchmark/scale.py --out /tmp/scale                            # 100k and 1M, disk RSS at 100k/1M/5M
    python benchmark/scale.py --sizes 100k --disk-sizes 100k --out /tmp/s # a short trial

For each semi-synthetic size (``benchmark/cases.py``: Kang PBMC profiles resampled to
100k / 1M reference cells, or 10k / 20k with ``--sizes 10k,20k``; 10k query cells, 3,000 genes) and each method, one
process (``runner.py``, via :func:`run.run_one`) trains and predicts, and every
prediction is scored with ``atlasmtl.evaluate``:

- ``atlasmtl``: ``build_model`` at its defaults (all 40 epochs unless ``--atlasmtl-epochs``), then the
  model is saved and loaded again and the 10k query is predicted with the loaded model
  (default KNN, timed after loading; load time reported apart). Also the KNN vote alone for
  every cell (``atlasmtl_knn_vote``: its macro-F1 at 1M against 100k) and recall@15 of the
  stored neighbour index against exact search on 2,000 query cells.
- ``celltypist``: CellTypist 1.7.1 SGD mini-batch, as ``run.py`` runs it on the scale cases
  (1M: ``with_mean=False``), capped by ``--celltypist-timeout`` (recorded as a timeout).
- ``logreg``: logistic regression on 100 PCs.
- ``atlasmtl_disk``: training from the ``.h5ad`` path (streamed; one epoch by default: the
  figure is peak memory, which does not grow with epochs) at ``--disk-sizes``. Needs a
  ``build_model`` that takes a path (issue 13 item 2); otherwise recorded as not run.

Writes ``scale.json`` (every record) and ``scale.md`` (the tables, with ratios to CellTypist and
to the smallest size) into ``--out``. Times are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's atlasmtl, as runner.py does

import cases as case_mod  # noqa: E402
from common import WORK_DIR, load_case, write_json  # noqa: E402
from run import CT_SGD, add_ratios, code_version, evaluate_output, machine_info, run_one  # noqa: E402

SIZES = {tag: f"synthetic_{tag}" for tag in case_mod.SYNTH_SIZES}  # size tag → case name (the cases define the sizes)

#: Written above the tables: what the semi-synthetic cases' macro-F1 can and cannot say.
LABELS_CAVEAT = (
    "Macro-F1 here is a sanity check, not an accuracy comparison: the semi-synthetic cases' labels are "
    "k-means clusters on 50 principal components of the real cells (`benchmark/cases.py`), so a linear "
    "model on principal components (logreg) fits them by construction. Accuracy is compared on the real "
    "cases of `benchmark/results/summary.md`.")


def plan(size: str, args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """method → settings and timeout for one size."""
    case = SIZES[size]
    train = {} if args.atlasmtl_epochs is None else {"num_epochs": args.atlasmtl_epochs}
    ct = dict(CT_SGD, with_mean=False) if size in ("1m", "5m") else dict(CT_SGD)
    return {
        "atlasmtl": {"settings": {"train": train, "save_load": str(work / "runs" / case / "atlasmtl_model"),
                                  "knn_vote_output": True, "knn_recall": 2000,
                                  "variants": {"atlasmtl": "low_conf_only", "atlasmtl_knn_all": "all"}},
                     "timeout": args.atlasmtl_timeout},
        "celltypist": {"settings": {"train": ct}, "timeout": args.celltypist_timeout},
        "logreg": {"settings": {}, "timeout": args.logreg_timeout},
    }


def measure(case: str, method: str, entry: dict[str, Any], work: Path, score: bool = True) -> list[dict[str, Any]]:
    """Run one method on one case in its own process; one row per output, scored."""
    case_dir = case_mod.prepare(case, root=work / "cases")
    spec = load_case(case_dir)
    out_dir = work / "runs" / case / method
    log = work / "logs" / f"{case}__{method}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  {case} / {method} ...", flush=True)
    record = run_one(method, case_dir, out_dir, entry["settings"], entry["timeout"], log)
    write_json(out_dir / "run.json", record)
    base = {"case": case, "runner": method, "n_ref": spec["n_ref"], "wall_seconds": record.get("wall_seconds"),
            "peak_rss_mb": record.get("peak_rss_mb"), "scale": record.get("scale", {}),
            "train_seconds": record.get("train_seconds"), "settings": entry["settings"]}
    if record.get("status") != "ok":
        reason = record.get("reason") or record.get("error") or "unknown"
        print(f"    {record.get('status')}: {reason}", flush=True)
        return [{**base, "method": method, "status": record.get("status", "error"), "reason": reason}]
    rows = []
    for name, out in (record.get("outputs") or {"": None}).items():
        if out is None:  # no predictions (training-only runs)
            rows.append({**base, "method": method, "status": "ok"})
            continue
        metrics = evaluate_output(case_dir, spec, out_dir, name) if score else None
        fine = spec["levels"][-1]
        rows.append({**base, "method": name, "status": "ok", "predict_seconds": out["predict_seconds"],
                     "macro_f1": metrics["levels"][fine]["macro_f1"] if metrics else None,
                     "accuracy": metrics["levels"][fine]["accuracy"] if metrics else None,
                     "metrics": metrics})
    for r in rows:
        print(f"    {r['method']:<18} train {r.get('train_seconds') or float('nan'):.1f} s  predict "
              f"{r.get('predict_seconds') or float('nan'):.2f} s  peak RSS {r.get('peak_rss_mb') or 0:.0f} MB  "
              f"macro-F1 {r.get('macro_f1') if r.get('macro_f1') is not None else float('nan'):.3f}", flush=True)
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def tables(rows: list[dict[str, Any]]) -> str:
    """The scale tables in markdown."""
    out = ["| reference cells | method | train s | predict s (10k, after loading) | peak RSS MB | fine macro-F1 | "
           "train ÷ CT | predict ÷ CT | RSS ÷ CT |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["runner"] == "atlasmtl_disk":
            continue
        ratio = r.get("ratio_to_celltypist") or {}
        if r["status"] != "ok":
            out.append(f"| {r['n_ref']:,} | {r['method']} | **{r['status']}**: {r.get('reason')} | | | | | | |")
            continue
        out.append(f"| {r['n_ref']:,} | {r['method']} | {_fmt(r.get('train_seconds'))} | "
                   f"{_fmt(r.get('predict_seconds'), 2)} | {_fmt(r.get('peak_rss_mb'), 0)} | "
                   f"{_fmt(r.get('macro_f1'), 3)} | {_fmt(ratio.get('train_seconds'), 2)} | "
                   f"{_fmt(ratio.get('predict_seconds'), 2)} | {_fmt(ratio.get('peak_rss_mb'), 2)} |")
    out += ["", "| reference cells | KNN search | recall@15 vs exact (2,000 query cells) | index query s | "
                "exact query s | model load s | model files MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "atlasmtl" and r["status"] == "ok":
            rec, sc = r["scale"].get("knn_recall", {}), r["scale"]
            out.append(f"| {r['n_ref']:,} | {rec.get('search', '–')} | {_fmt(rec.get('recall'), 4)} | "
                       f"{_fmt(rec.get('index_query_seconds'), 2)} | {_fmt(rec.get('exact_query_seconds'), 2)} | "
                       f"{_fmt(sc.get('load_seconds'), 2)} | {_fmt((sc.get('model_bytes') or 0) / 2**20, 0)} |")
    disk = [r for r in rows if r["runner"] == "atlasmtl_disk"]
    if disk:
        out += ["", "| reference cells | training from disk: peak RSS MB | train s | settings |", "|---|---|---|---|"]
        for r in disk:
            if r["status"] != "ok":
                out.append(f"| {r['n_ref']:,} | **{r['status']}**: {r.get('reason')} | | |")
            else:
                out.append(f"| {r['n_ref']:,} | {_fmt(r.get('peak_rss_mb'), 0)} | {_fmt(r.get('train_seconds'))} | "
                           f"{r['settings'].get('train')} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for scale.json and scale.md")
    parser.add_argument("--work", type=Path, default=None, help="work folder (cases, runs, logs; default benchmark/work)")
    parser.add_argument("--sizes", default="100k,1m", help="reference sizes for the table (of 10k, 20k, 100k, 1m)")
    parser.add_argument("--disk-sizes", default="100k,1m,5m", help="sizes for training-from-disk memory ('' = none)")
    parser.add_argument("--methods", default="atlasmtl,celltypist,logreg")
    parser.add_argument("--atlasmtl-epochs", type=int, default=None, help="override num_epochs (default: 40)")
    parser.add_argument("--disk-epochs", type=int, default=1, help="epochs of the training-from-disk runs")
    parser.add_argument("--disk-threads", type=int, default=None,
                        help="num_threads of the training-from-disk runs (default: build_model's)")
    parser.add_argument("--atlasmtl-timeout", type=float, default=3600)
    parser.add_argument("--celltypist-timeout", type=float, default=1800)
    parser.add_argument("--logreg-timeout", type=float, default=1800)
    parser.add_argument("--disk-timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    work = args.work or WORK_DIR
    args.out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for size in [s for s in args.sizes.split(",") if s]:
        print(f"== {SIZES[size]}", flush=True)
        for method, entry in plan(size, args, work).items():
            if method in methods:
                rows += measure(SIZES[size], method, entry, work)
    for size in [s for s in args.disk_sizes.split(",") if s]:
        print(f"== {SIZES[size]}: training from disk", flush=True)
        train = {"num_epochs": args.disk_epochs}
        if args.disk_threads is not None:
            train["num_threads"] = args.disk_threads
        entry = {"settings": {"train": train}, "timeout": args.disk_timeout}
        rows += measure(SIZES[size], "atlasmtl_disk", entry, work, score=False)
    add_ratios([r for r in rows if r["runner"] != "atlasmtl_disk"])
    record = {"generated": dt.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmark/scale.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "code": code_version(), "total_seconds": round(time.perf_counter() - t0, 1),
              "load_average_at_end": list(os.getloadavg()), "rows": rows}
    write_json(args.out / "scale.json", record)
    text = (f"# Scale (issue 13)\n\n`{record['command']}` at {record['code']['commit']} "
            f"({record['generated']}; {record['machine']['cpu_count']} CPUs, load average at start "
            f"{record['machine']['load_average_at_start'][0]:.1f}, at end {record['load_average_at_end'][0]:.1f}).\n\n"
            + LABELS_CAVEAT + "\n\n" + tables(rows))
    (args.out / "scale.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
