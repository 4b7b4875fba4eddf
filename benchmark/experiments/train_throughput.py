"""Training throughput and memory: atlasmtl at its defaults beside CellTypist SGD, in one run.

Usage (from the repository root; a semi-synthetic case written by ``benchmark/cases.py``)::

    PYTHONPATH=$PWD python benchmark/experiments/train_throughput.py \
        --case /path/to/cases/synthetic_100k --threads 2 [--epochs 40] [--from-disk] [--celltypist] [--mixup-alpha A]

atlasmtl trains in this process (``build_model`` at its defaults; ``--from-disk`` passes the
file's path, so the matrix is streamed in blocks); CellTypist 1.7.1 trains in the peers'
environment (``benchmark/setup_peers.sh``) exactly as ``benchmark/run.py`` runs it on the scale
cases (one ``celltypist.train`` per level, ``n_jobs=2``, mini-batch SGD: ``CT_SGD``). Prints one JSON line: seconds, cells per
second per epoch, peak RSS (MB) of each, and the ratio of the training times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

CELLTYPIST = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import anndata as ad, numpy as np, celltypist
np.random.seed(0)
ref = ad.read_h5ad(sys.argv[1])
t0, c0 = time.perf_counter(), time.process_time()
for lv in sys.argv[2].split(","):
    celltypist.train(ref, labels=ref.obs[lv].astype(str).to_numpy(), n_jobs=2, check_expression=True,
                     use_SGD=True, mini_batch=True, batch_size=1000, batch_number=100, epochs=10)
print(json.dumps({"train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - c0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_atlasmtl(ref_path: Path, levels: list[str], epochs: int, threads: int, from_disk: bool,
                 calibration_fraction: float = 0.2, mixup_alpha: float | None = None) -> dict:
    import anndata as ad
    import psutil

    import atlasmtl

    warnings.filterwarnings("ignore")
    proc = psutil.Process()
    t0 = time.perf_counter()
    ref = str(ref_path) if from_disk else ad.read_h5ad(ref_path)
    read_seconds = time.perf_counter() - t0
    rss_before = proc.memory_info().rss / 2**20
    t0, c0 = time.perf_counter(), time.process_time()
    extra = {} if mixup_alpha is None else {"mixup_alpha": mixup_alpha}
    model = atlasmtl.build_model(ref, levels, num_epochs=epochs, num_threads=threads,
                                 calibration_fraction=calibration_fraction, show_progress=False, show_summary=False,
                                 **extra)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    tc = model.metadata["train_config"]
    n = tc["resource_summary"]["training cells"]
    epoch_seconds = [h["seconds"] for h in tc["history"] if "seconds" in h]
    epoch_cpu = [h["cpu_seconds"] for h in tc["history"] if "cpu_seconds" in h]
    return {
        "read_seconds": round(read_seconds, 2),
        "build_model_seconds": round(seconds, 2),
        "build_model_cpu_seconds": round(cpu_seconds, 2),
        "training_cells": n,
        "epochs": len(tc["history"]),
        "cells_per_second_per_epoch": (round(n / (sum(epoch_seconds) / len(epoch_seconds))) if epoch_seconds
                                       else round(n * len(tc["history"]) / seconds)),
        "epoch_seconds": epoch_seconds,
        "epoch_cpu_seconds": epoch_cpu,
        "cells_per_cpu_second_per_epoch": round(n / (sum(epoch_cpu) / len(epoch_cpu))) if epoch_cpu else None,
        "phase_seconds": tc.get("phase_seconds"),
        "rss_before_build_mb": round(rss_before),
        "peak_rss_mb": round(tc["runtime_summary"]["process_peak_rss_mb"]),
        "build_phase_peak_rss_mb": round(tc["runtime_summary"]["phase_peak_rss_mb"]),
        "calibration_fraction": calibration_fraction,
        "mixup_alpha": tc.get("mixup_alpha"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--from-disk", action="store_true")
    parser.add_argument("--celltypist", action="store_true")
    parser.add_argument("--calibration-fraction", type=float, default=0.2,
                        help="0 skips calibration and the novelty null (memory-only runs at 5M cells)")
    parser.add_argument("--no-atlasmtl", action="store_true")
    parser.add_argument("--mixup-alpha", type=float, default=None, help="build_model's mixup_alpha (default: its default)")
    args = parser.parse_args()
    spec = json.loads((args.case / "case.json").read_text())
    levels = spec["levels"]
    out: dict = {"case": args.case.name, "threads": args.threads, "from_disk": args.from_disk,
                 "cpus": len(os.sched_getaffinity(0)), "load_average_at_start": os.getloadavg()}
    if args.celltypist:
        from common import PEERS_PYTHON

        res = subprocess.run([str(PEERS_PYTHON), "-c", CELLTYPIST, str(args.case / "ref.h5ad"), ",".join(levels)],
                             capture_output=True, text=True, check=True)
        out["celltypist"] = json.loads(res.stdout.strip().splitlines()[-1])
    if not args.no_atlasmtl:
        out["atlasmtl"] = run_atlasmtl(args.case / "ref.h5ad", levels, args.epochs, args.threads, args.from_disk,
                                       args.calibration_fraction, args.mixup_alpha)
    if "celltypist" in out and "atlasmtl" in out:
        out["train_time_ratio_atlasmtl_to_celltypist"] = round(
            out["atlasmtl"]["build_model_seconds"] / out["celltypist"]["train_seconds"], 3)
        out["train_cpu_ratio_atlasmtl_to_celltypist"] = round(
            out["atlasmtl"]["build_model_cpu_seconds"] / out["celltypist"]["train_cpu_seconds"], 3)
    out["load_average_at_end"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
