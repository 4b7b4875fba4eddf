"""The atlasmtl benchmark: every (case, method) in its own process, scored with ``atlasmtl.evaluate``.

One command regenerates ``benchmark/results/``::

    bash benchmark/setup_peers.sh          # once: CellTypist, scANVI, symphonypy in benchmark/.envs/peers
    python benchmark/run.py --all          # every case and method (~1 h on 2 cores)

Other modes::

    python benchmark/run.py --smoke --out /tmp/smoke    # 300-cell Symphony PBMC subset; atlasmtl, kNN, logreg
    python benchmark/run.py --cases symphony_5p --methods atlasmtl,logreg --out /tmp/part
    python benchmark/run.py --report-only               # rebuild tables/figure from results/results.json

Each run writes its predictions under ``benchmark/work/runs/<case>/<method>/``;
evaluation, tables and the figure happen here, in the main environment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases as case_mod  # noqa: E402
from common import (  # noqa: E402
    BENCH_DIR,
    PEERS_PYTHON,
    WORK_DIR,
    load_case,
    read_cells,
    read_json,
    read_predictions,
    read_truth,
    write_json,
)

RESULTS_DIR = BENCH_DIR / "results"
MAIN_METHODS = ("atlasmtl", "knn", "logreg")
PEER_METHODS = ("celltypist", "scanvi", "symphonypy")
#: Output names of each runner (atlasmtl trains once and predicts with three KNN settings).
OUTPUTS = {"atlasmtl": ["atlasmtl", "atlasmtl_knn_off", "atlasmtl_knn_all"]}
METHOD_ORDER = ["atlasmtl", "atlasmtl_knn_off", "atlasmtl_knn_all", "celltypist", "scanvi", "logreg", "knn", "symphonypy"]
THREADS = 2
PSS_EVERY = 10  # the memory sampler reads PSS every 10th sample (1 s); see run_one
#: Every runner's ``--seed`` (``--seed`` sets it: peers' seed-to-seed spread, compared with atlasmtl's over seeds).
SEED = 0

REAL_CASES = ["symphony_3pv1", "symphony_3pv2", "symphony_5p", "symphony_5p_novel_NK", "symphony_5p_novel_B",
              "cellbench_celseq2_3line", "cellbench_dropseq_3line", "cellbench_novel_H1975", "pbmc68k_70_30",
              "ding2020_dropseq_indrops", "zilionis_healthy_tumour", "zilionis_novel_tumour_subsets", "brain_mouse_human",
              "symphony_5p_thin_query", "symphony_5p_missing_genes",
              # added 2026-12-01, after the defaults were chosen on the 15 above: an out-of-sample check
              "brain_human_mouse",
              # added 2026-12-02, the same: two natural splits reversed, and two more removed-type cases
              "ding2020_indrops_dropseq", "zilionis_tumour_healthy", "ding2020_novel_B", "zilionis_tumour_healthy_novel_NK",
              # added 2026-12-02, the same: immune cells across species and tissues, both ways
              "immune_mouse_lung_human_pbmc", "immune_human_pbmc_mouse_lung",
              # added 2026-12-06, the same: Symphony 5p's two simulated query shifts on three more natural splits
              "cellbench_celseq2_3line_thin_query", "cellbench_celseq2_3line_missing_genes",
              "ding2020_dropseq_indrops_thin_query", "ding2020_dropseq_indrops_missing_genes",
              "zilionis_healthy_tumour_thin_query", "zilionis_healthy_tumour_missing_genes"]
#: Run on their own (``--cases``; not in ``--all``), results in ``benchmark/results/interferon_queries/``: added
#: 2026-12-06 (fortieth session), after the defaults were chosen, an interferon-beta stimulation of three natural
#: splits' queries in silico (``cases._stimulate``).
STIMULATION_CASES = ["symphony_5p_interferon", "ding2020_dropseq_indrops_interferon", "zilionis_healthy_tumour_interferon",
                     # ... and three removed-type cases' queries, for the novelty score under the stimulation
                     "symphony_5p_novel_NK_interferon", "ding2020_novel_B_interferon",
                     "zilionis_tumour_healthy_novel_NK_interferon"]
#: Run on their own (``--cases``; not in ``--all``), results in ``benchmark/results/ambient_queries/``: added
#: 2026-12-07 (fifty-second session), after the defaults were chosen, ambient RNA added to the same six queries
#: (``cases._add_ambient``).
AMBIENT_CASES = ["symphony_5p_ambient", "ding2020_dropseq_indrops_ambient", "zilionis_healthy_tumour_ambient",
                 "symphony_5p_novel_NK_ambient", "ding2020_novel_B_ambient", "zilionis_tumour_healthy_novel_NK_ambient"]
SCALE_CASES = ["synthetic_20k", "synthetic_100k", "synthetic_1m"]
CT_SGD = {"use_SGD": True, "mini_batch": True, "batch_size": 1000, "batch_number": 100, "epochs": 10}


def plan(smoke: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """case → method → {"settings": ..., "timeout": s} or {"skip": reason}."""
    if smoke:
        return {"smoke_symphony_5p": {m: {"settings": {}, "timeout": 120} for m in MAIN_METHODS}}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for c in (*REAL_CASES, *STIMULATION_CASES, *AMBIENT_CASES):
        out[c] = {m: {"settings": {}, "timeout": 1200} for m in (*MAIN_METHODS, *PEER_METHODS)}
    out["pbmc68k_70_30"]["scanvi"] = {"skip": (
        "no raw counts: pbmc68k_reduced ships log-normalised values only, and scANVI's likelihoods model counts "
        "(rounding expm1 of log values would invent counts; a Gaussian likelihood on log values is not scANVI as published)")}
    for c in SCALE_CASES:
        out[c] = {
            "atlasmtl": {"settings": {}, "timeout": 1800},
            "knn": {"settings": {}, "timeout": 1800},
            "logreg": {"settings": {}, "timeout": 1800},
            "celltypist": {"settings": {"train": dict(CT_SGD)}, "timeout": 1800},
            "scanvi": {"settings": {}, "timeout": 1800},
            "symphonypy": {"settings": {}, "timeout": 1800},
        }
    out["synthetic_100k"]["scanvi"] = {"skip": "capped to the small cases: scVI + scANVI + surgery at 100k cells exceeds "
                                               "the ~1 h budget of a 2-core run"}
    out["synthetic_1m"]["scanvi"] = dict(out["synthetic_100k"]["scanvi"])
    out["synthetic_1m"]["symphonypy"] = {"skip": "capped: Harmony + Symphony mapping at 1M cells exceeds the 2-core budget "
                                                 "(symphonypy scales the dense HVG matrix: 1M x 2000 floats)"}
    # 1M: atlasmtl at its defaults (all 40 epochs: 458-493 s on 2 cores, api_contract.md "Training throughput");
    # CellTypist keeps the input sparse (with_mean=False, its documented large-data setting: the default densifies
    # 1M x 3000 floats = 12 GB).
    out["synthetic_1m"]["atlasmtl"] = {"settings": {}, "timeout": 1200}
    out["synthetic_1m"]["celltypist"] = {"settings": {"train": dict(CT_SGD, with_mean=False)}, "timeout": 900}
    out["synthetic_1m"]["knn"]["timeout"] = out["synthetic_1m"]["logreg"]["timeout"] = 900
    return out


# =========================================================================== subprocess
def run_one(method: str, case_dir: Path, out_dir: Path, settings: dict, timeout: float, log_path: Path) -> dict[str, Any]:
    """Run runner.py in a fresh process; return its record plus wall time and the process's peak RSS."""
    main_env = method in MAIN_METHODS or method.startswith("atlasmtl")
    python = sys.executable if main_env else str(PEERS_PYTHON)
    if not main_env and not Path(python).exists():
        return {"status": "not_run", "reason": f"peers environment missing ({python}); run bash benchmark/setup_peers.sh"}
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*"):
        old.unlink()
    cmd = [python, str(BENCH_DIR / "runner.py"), "--method", method, "--case-dir", str(case_dir),
           "--out-dir", str(out_dir), "--settings", json.dumps(settings), "--seed", str(SEED)]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(THREADS)
    env.pop("PYTHONPATH", None)
    env["PYTHONWARNINGS"] = "ignore"
    import psutil

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    sampled_peak = sampled_pss_peak = 0.0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=str(BENCH_DIR.parent))
        ps = psutil.Process(proc.pid)
        timed_out = False
        n_sample = 0
        while True:
            # RSS of the runner and all its descendants, summed, every 0.1 s (statm: cheap); PSS only every
            # PSS_EVERY-th sample and only while the tree has more than one process (a single process's peak is
            # its own VmHWM, recorded by the runner). Reading PSS walks the page tables of every mapping
            # (~8 ms a process for atlasmtl at 100k cells) and competes for the mm lock: at 10 Hz it slowed
            # atlasmtl's two-process training by ~4 s of 44 s while a one-process peer on a spare core paid
            # nothing, so the sampler measured itself unequally.
            try:
                tree = [ps, *ps.children(recursive=True)]
                read_pss = len(tree) > 1 and n_sample % PSS_EVERY == 0
                total = total_pss = 0
                for p in tree:
                    try:
                        if read_pss:
                            mem = p.memory_full_info()  # PSS (Linux): pages shared by forked processes counted once
                            total_pss += getattr(mem, "pss", mem.rss)
                        else:
                            mem = p.memory_info()
                        total += mem.rss
                    except psutil.Error:
                        pass
                sampled_peak = max(sampled_peak, total / 2**20)
                if read_pss:
                    sampled_pss_peak = max(sampled_pss_peak, total_pss / 2**20)
            except psutil.Error:
                pass
            n_sample += 1
            if proc.poll() is not None:
                break
            if time.perf_counter() - t0 > timeout and not timed_out:
                os.killpg(proc.pid, signal.SIGKILL)
                timed_out = True
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    rec_path = out_dir / "run.json"
    record = read_json(rec_path) if rec_path.exists() else {}
    # Peak memory: the runner's own high-water mark (VmHWM, exact), its finished children's, and the sampled
    # sum over the process tree (catches concurrent workers); the largest of the three. The sum is of PSS
    # (proportional set size): a forked worker (atlasmtl's minibatch process) shares the reference's pages
    # with the runner, and a sum of RSS would count them twice (kept as peak_rss_sampled_mb).
    peak = max(sampled_pss_peak, record.get("peak_rss_self_mb") or 0.0, record.get("peak_rss_children_mb") or 0.0)
    record.update(wall_seconds=wall, peak_rss_mb=peak, peak_rss_sampled_mb=sampled_peak,
                  peak_pss_sampled_mb=sampled_pss_peak,
                  returncode=proc.returncode, log=str(log_path),
                  load_average_1min={"before": load_before, "after": os.getloadavg()[0]})
    if timed_out:
        record.update(status="timeout", reason=f"killed after {timeout:.0f} s")
    elif proc.returncode != 0 and record.get("status") != "error":
        tail = log_path.read_text()[-2000:] if log_path.exists() else ""
        record.update(status="error", error=f"exit status {proc.returncode}", log_tail=tail)
    return record


# =========================================================================== evaluation
def evaluate_output(case_dir: Path, spec: dict, out_dir: Path, name: str) -> dict[str, Any]:
    """atlasmtl.evaluate on one predictions table (plus known-cell-only metrics for novel-type cases)."""
    import atlasmtl

    levels = spec["levels"]
    pred = read_predictions(out_dir / f"pred_{name}.csv.gz")
    truth = read_truth(case_dir)
    kwargs: dict[str, Any] = {}
    if spec.get("novel"):
        kwargs["novel_labels"] = spec["novel"]
    coords_file = out_dir / f"coords_{name}.npz"
    if spec.get("coords") and coords_file.exists():
        with np.load(case_dir / "truth_coords.npz") as t, np.load(coords_file) as p:
            pos = truth.index.get_indexer(pred.index)
            kwargs["coord_truth"] = {k: t[k][pos] for k in spec["coords"]}
            kwargs["coord_pred"] = {k: p[k] for k in spec["coords"]}
        ref = read_cells(case_dir / "ref.h5ad", obs=False)
        kwargs["reference_coords"] = {k: np.asarray(ref.obsm[key]) for k, key in spec["coords"].items()}
    metrics = atlasmtl.evaluate(pred, truth, label_columns=levels, **kwargs)
    if spec.get("novel"):
        novel = np.zeros(len(truth), dtype=bool)
        for lv, labs in spec["novel"].items():
            novel |= truth[lv].isin(labs).to_numpy()
        known_cells = truth.index[~novel]
        known = atlasmtl.evaluate(pred.loc[pred.index.isin(known_cells)], truth, label_columns=levels)
        metrics["known_only"] = {"n_cells": known["n_cells"], "levels": known["levels"]}
    return metrics


# =========================================================================== orchestration
def code_version() -> dict[str, Any]:
    """The repository commit the run used, and whether atlasmtl/ or benchmark/ had uncommitted changes."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=BENCH_DIR.parent, capture_output=True, text=True,
                                  timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    # porcelain lines are "XY path": not stripped, since X is a space for a change that is not staged
    return {"commit": git("rev-parse", "HEAD").strip() or None,
            "uncommitted_changes": sorted(line[3:] for line in git("status", "--porcelain", "--", "atlasmtl",
                                                                    "benchmark").splitlines() if line.strip())}


def machine_info() -> dict[str, Any]:
    import psutil

    return {
        "cpu_count": os.cpu_count(),
        "threads_per_run": THREADS,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
    }


def run_benchmark(case_names: list[str], methods: list[str] | None, smoke: bool, reuse: bool,
                  work: Path) -> dict[str, Any]:
    full_plan = plan(smoke)
    runs: list[dict[str, Any]] = []
    case_info: dict[str, Any] = {}
    t_start = time.perf_counter()
    for case in case_names:
        t0 = time.perf_counter()
        case_dir = case_mod.prepare(case, smoke=smoke, root=work / "cases")
        spec = load_case(case_dir)
        case_info[case] = {k: spec.get(k) for k in ("title", "levels", "n_ref", "n_query", "n_genes", "batch_key",
                                                     "has_counts", "novel", "coords", "semi_synthetic", "simulated_shift",
                                                     "source")}
        case_info[case]["prepare_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"\n== {case}: {spec['title']} ({spec['n_ref']} ref / {spec['n_query']} query cells, "
              f"{spec['n_genes']} genes)", flush=True)
        for method, entry in full_plan[case].items():
            if methods and method not in methods:
                continue
            names = OUTPUTS.get(method, [method])
            base = {"case": case, "runner": method, "seed": SEED}
            if "skip" in entry:
                for name in names:
                    runs.append({**base, "method": name, "status": "not_run", "reason": entry["skip"]})
                print(f"  {method:<12} not run: {entry['skip']}", flush=True)
                continue
            out_dir = work / "runs" / case / method
            log = work / "logs" / f"{case}__{method}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            record = None
            if reuse and (out_dir / "run.json").exists():
                prev = read_json(out_dir / "run.json")
                if prev.get("status") == "ok" and "peak_rss_mb" in prev:
                    record = prev
            if record is None:
                record = run_one(method, case_dir, out_dir, entry["settings"], entry["timeout"], log)
                write_json(out_dir / "run.json", record)
            status = record.get("status", "error")
            if status != "ok":
                reason = record.get("reason") or record.get("error") or "unknown"
                for name in names:
                    runs.append({**base, "method": name, "status": status, "reason": reason,
                                 "wall_seconds": record.get("wall_seconds"), "peak_rss_mb": record.get("peak_rss_mb"),
                                 "settings": entry["settings"]})
                print(f"  {method:<12} {status}: {reason}", flush=True)
                continue
            for name in names:
                out = record["outputs"][name]
                try:
                    metrics = evaluate_output(case_dir, spec, out_dir, name)
                    eval_error = None
                except Exception as exc:  # a broken table is a result too, never a silent gap
                    metrics, eval_error = None, f"{type(exc).__name__}: {exc}"
                runs.append({
                    **base, "method": name, "status": "ok" if eval_error is None else "eval_error",
                    "reason": eval_error,
                    "train_seconds": record["train_seconds"], "predict_seconds": out["predict_seconds"],
                    "peak_rss_mb": record["peak_rss_mb"], "peak_rss_after_train_mb": record.get("peak_rss_after_train_mb"),
                    "wall_seconds": record["wall_seconds"], "settings": {**record.get("settings", {}), **out.get("settings", {})},
                    "run_settings": entry["settings"], "extra": out.get("extra", {}), "versions": record.get("versions", {}),
                    "cpu_count": record.get("cpu_count"), "load_average_1min": record.get("load_average_1min"),
                    "metrics": metrics,
                    "shared_training": name != method,
                })
                fine = spec["levels"][-1]
                f1 = metrics["levels"][fine]["macro_f1"] if metrics else float("nan")
                print(f"  {name:<17} macro-F1 {f1:.3f}  train {record['train_seconds']:.1f} s  predict "
                      f"{out['predict_seconds']:.2f} s  peak RSS {record['peak_rss_mb']:.0f} MB", flush=True)
    add_ratios(runs)
    return {
        "generated": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmark/run.py", *sys.argv[1:]]),
        "smoke": smoke,
        "machine": machine_info(),
        "code": code_version(),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "cases": case_info,
        "runs": runs,
    }


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Each run's training / prediction time and peak RSS divided by CellTypist's on the same case."""
    ct = {r["case"]: r for r in runs if r["method"] == "celltypist" and r["status"] == "ok"}
    for r in runs:
        ref = ct.get(r["case"])
        if r["status"] != "ok" or ref is None:
            continue
        r["ratio_to_celltypist"] = {
            key: (r[key] / ref[key]) if ref.get(key) else None
            for key in ("train_seconds", "predict_seconds", "peak_rss_mb")
        }


def main(argv: list[str] | None = None) -> int:
    global SEED
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--all", action="store_true", help="every case and method; writes benchmark/results/")
    mode.add_argument("--smoke", action="store_true", help="tiny Symphony PBMC subset, main-environment methods only")
    mode.add_argument("--cases", help="comma-separated case names (see --list)")
    mode.add_argument("--report-only", action="store_true", help="rebuild tables and figure from results.json")
    mode.add_argument("--list", action="store_true", help="list cases and methods")
    parser.add_argument("--methods", help="comma-separated runner names (atlasmtl,knn,logreg,celltypist,scanvi,symphonypy)")
    parser.add_argument("--out", type=Path, help="results directory (default: benchmark/results for --all, "
                                                 "benchmark/work/results-<mode> otherwise)")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: benchmark/work)")
    parser.add_argument("--reuse", action="store_true", help="keep successful runs already in the work directory")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed of every runner (default 0); use a "
                                                             "separate --work per seed with --reuse")
    args = parser.parse_args(argv)
    SEED = args.seed

    from report import write_report

    if args.list:
        for case, methods in plan().items():
            print(case, ", ".join(f"{m}{' (skip)' if 'skip' in e else ''}" for m, e in methods.items()))
        return 0
    if args.report_only:
        out = args.out or RESULTS_DIR
        results = read_json(out / "results.json")
        print(write_report(results, out))
        return 0
    if args.smoke:
        case_names, default_out = ["smoke_symphony_5p"], WORK_DIR / "results-smoke"
        work = args.work or (args.out / "work" if args.out else WORK_DIR / "smoke")
    elif args.all:
        case_names, default_out, work = REAL_CASES + SCALE_CASES, RESULTS_DIR, args.work or WORK_DIR
    else:
        case_names = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = set(case_names) - set(plan())
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; see --list")
        default_out, work = WORK_DIR / "results-partial", args.work or WORK_DIR
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    out = args.out or default_out
    results = run_benchmark(case_names, methods, args.smoke, args.reuse, work)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    print(write_report(results, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
