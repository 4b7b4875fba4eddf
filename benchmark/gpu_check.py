"""GPU check (issue 13 item 6): train, predict and train data-parallel on every visible GPU; write the figures.

Run on a machine with CUDA (the ``device`` tool's GPU machine), from the repository root::

    python benchmark/gpu_check.py --out "$OUT"                  # 1M reference cells, all GPUs
    python benchmark/gpu_check.py --device cpu --small --out /tmp/gpu_check   # the same steps on CPU, in ~2 minutes

Steps, each timed, with ``torch.cuda.max_memory_allocated`` per step (reset in between):

1. the reference: the ``synthetic_1m`` case of ``benchmark/cases.py`` when its files are found
   (``--case-dir``, or ``$ATLASMTL_BENCH_WORK``/``benchmark/work`` cases), otherwise a
   semi-synthetic set generated here from the embedded fixture
   ``tests/data/symphony_pbmc_small.h5ad`` (its 1,200 real PBMC profiles, binomially thinned to
   U(0.5, 0.9) of their counts, ``--n-ref`` cells; query ``--n-query`` cells from other draws);
2. ``build_model`` on the GPU (``--epochs``; cells/s = cells × epochs / seconds);
3. ``predict`` of the query with default KNN (cells/s), after saving and loading the model;
4. ``build_model(path, distributed=True)`` under ``torchrun --nproc_per_node=<GPUs>`` (NCCL on
   CUDA, gloo with ``--device cpu``), when this atlasmtl has distributed training.

Writes ``gpu_check.json`` into ``--out`` (default ``$OUT``, else ``./gpu_check_out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(ROOT))

FIXTURE = ROOT / "tests" / "data" / "symphony_pbmc_small.h5ad"
FIXTURE_LEVELS = ["cell_type_broad", "cell_type"]


def _gpu_peak_mb(dev: str) -> float | None:
    import torch

    if dev != "cuda" or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _reset_peak(dev: str) -> None:
    import torch

    if dev == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def generate(out: Path, n_ref: int, n_query: int, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """Semi-synthetic reference and query from the embedded fixture (counts thinned per cell), written in chunks."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from cases import thin_rows
    from common import H5adWriter, lognorm_cp10k

    src = ad.read_h5ad(FIXTURE)
    x = sp.csr_matrix(src.X, dtype=np.float32)
    counts = x.copy()
    counts.data = np.round(np.expm1(x.data) * np.repeat(src.obs["nUMI"].to_numpy(np.float32), np.diff(x.indptr)) / 1e4)
    counts.eliminate_zeros()
    rng = np.random.default_rng(seed)
    pools = rng.permutation(src.n_obs)
    ref_pool, query_pool = np.sort(pools[: int(0.7 * src.n_obs)]), np.sort(pools[int(0.7 * src.n_obs):])
    paths = []
    for name, pool, n, prefix in (("ref", ref_pool, n_ref, "r"), ("query", query_pool, n_query, "q")):
        path = out / f"{name}.h5ad"
        writer = H5adWriter(path, pd.DataFrame(index=src.var_names.astype(str)))
        for start in range(0, n, 50_000):
            stop = min(start + 50_000, n)
            rows = rng.choice(pool, size=stop - start, replace=True)
            obs = src.obs.iloc[rows][FIXTURE_LEVELS].astype(str)
            obs.index = [f"{prefix}{i:08d}" for i in range(start, stop)]
            writer.add(obs, {"X": lognorm_cp10k(thin_rows(counts, rows, rng))})
        writer.close()
        paths.append(path)
    return paths[0], paths[1], FIXTURE_LEVELS


def find_case(case_dir: str | None) -> Path | None:
    candidates = [Path(case_dir)] if case_dir else []
    work = Path(os.environ.get("ATLASMTL_BENCH_WORK", BENCH / "work"))
    candidates.append(work / "cases" / "synthetic_1m")
    for c in candidates:
        if (c / "ref.h5ad").exists() and (c / "query.h5ad").exists():
            return c
    return None


def ddp_worker(args: argparse.Namespace) -> int:
    """One torchrun process: distributed training from the file; rank 0 writes its figures."""
    import inspect

    import torch

    import atlasmtl
    from atlasmtl import distributed

    dev = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    levels = args.levels.split(",")
    _reset_peak(dev)
    t0 = time.perf_counter()
    model = atlasmtl.build_model(args.ref, levels, num_epochs=args.epochs, device=dev, distributed=True,
                                 show_progress=False, show_summary=False, num_threads=args.threads)
    seconds = time.perf_counter() - t0
    peak = _gpu_peak_mb(dev)
    if distributed.is_main_process():
        Path(args.ddp_out).write_text(json.dumps({
            "seconds": seconds, "world_size": distributed.world_size() if distributed.is_distributed() else
            int(os.environ.get("WORLD_SIZE", "1")), "gpu_peak_memory_mb_rank0": peak,
            "model_returned": model is not None,
            "build_model_has_distributed": "distributed" in inspect.signature(atlasmtl.build_model).parameters}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="20k reference / 2k query cells, 2 epochs (a CPU trial)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument("--case-dir", help="a case folder with ref.h5ad and query.h5ad (default: synthetic_1m if present)")
    parser.add_argument("--n-ref", type=int, default=1_000_000)
    parser.add_argument("--n-query", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    parser.add_argument("--levels", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(args)

    import anndata as ad
    import torch

    import atlasmtl

    if args.small:
        args.n_ref, args.n_query, args.epochs = 20_000, 2_000, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and dev != "cuda":
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    n_gpus = torch.cuda.device_count() if dev == "cuda" else 0
    report: dict[str, Any] = {
        "device": dev, "gpus": [torch.cuda.get_device_name(i) for i in range(n_gpus)],
        "torch": torch.__version__, "cuda": torch.version.cuda, "atlasmtl": atlasmtl.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "small": args.small, "steps": {},
    }

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    t0 = time.perf_counter()
    case = None if args.small else find_case(args.case_dir)
    if case is not None:
        ref_path, query_path = case / "ref.h5ad", case / "query.h5ad"
        levels = json.loads((case / "case.json").read_text())["levels"]
        report["data"] = f"case {case}"
    else:
        ref_path, query_path, levels = generate(out / "data", args.n_ref, args.n_query)
        report["data"] = (f"generated from {FIXTURE.name}: {args.n_ref:,} reference / {args.n_query:,} query cells "
                          "(binomial thinning to U(0.5, 0.9) of real profiles)")
    report["steps"]["data_seconds"] = round(time.perf_counter() - t0, 2)
    save()

    ref = ad.read_h5ad(ref_path)
    query = ad.read_h5ad(query_path)
    n_ref, n_query = ref.n_obs, query.n_obs
    report.update(n_ref=n_ref, n_query=n_query, n_genes=ref.n_vars, levels=levels, epochs=args.epochs)

    _reset_peak(dev)
    t = time.perf_counter()
    model = atlasmtl.build_model(ref, levels, num_epochs=args.epochs, device=dev, num_threads=args.threads,
                                 show_progress=False, show_summary=False)
    train_s = time.perf_counter() - t
    report["steps"]["train"] = {"seconds": round(train_s, 2), "cells_per_second": round(n_ref * args.epochs / train_s, 1),
                                "gpu_peak_memory_mb": _gpu_peak_mb(dev),
                                "fit_seconds": model.train_config.get("train_seconds"),
                                "knn_search": model.train_config.get("knn_space", {}).get("search")}
    del ref
    save()

    model.save(out / "model" / "model.pth")
    t = time.perf_counter()
    model = atlasmtl.TrainedModel.load(out / "model")
    report["steps"]["load_seconds"] = round(time.perf_counter() - t, 2)
    for run in ("first", "second"):  # the first call includes one-off work (CUDA context, kernels)
        _reset_peak(dev)
        t = time.perf_counter()
        result = atlasmtl.predict(model, query, device=dev, num_threads=args.threads, show_progress=False,
                                  show_summary=False)
        pred_s = time.perf_counter() - t
        report["steps"][f"predict_{run}"] = {
            "seconds": round(pred_s, 3), "cells_per_second": round(n_query / pred_s, 1),
            "gpu_peak_memory_mb": _gpu_peak_mb(dev),
            "knn_cells_searched": result.metadata["prediction_runtime"].get("knn_cells_searched"),
            "unknown_rate_finest": float(result.levels[levels[-1]]["is_unknown"].mean()),
        }
        truth = query.obs[levels[-1]].astype(str).to_numpy() if levels[-1] in query.obs else None
        if truth is not None:
            report["steps"][f"predict_{run}"]["accuracy_finest"] = float(np.mean(np.asarray(result.labels(levels[-1])) == truth))
    save()

    if not args.skip_ddp:
        import inspect

        if "distributed" not in inspect.signature(atlasmtl.build_model).parameters:
            report["steps"]["ddp"] = {"status": "not run: this atlasmtl's build_model has no distributed=True"}
        else:
            nproc = max(n_gpus, 1) if dev == "cuda" else 2
            ddp_out = out / "ddp.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(Path(__file__).resolve()), "--ddp-worker", "--ref", str(ref_path), "--levels", ",".join(levels),
                   "--epochs", str(args.epochs), "--device", dev, "--threads", str(max(1, args.threads // nproc)),
                   "--ddp-out", str(ddp_out)]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            t = time.perf_counter()
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            entry: dict[str, Any] = {"nproc_per_node": nproc, "returncode": run.returncode, "wall_seconds": round(wall, 2)}
            if run.returncode == 0 and ddp_out.exists():
                figures = json.loads(ddp_out.read_text())
                entry.update(figures, cells_per_second=round(n_ref * args.epochs / figures["seconds"], 1))
            else:
                entry["stderr_tail"] = run.stderr[-3000:]
            report["steps"]["ddp"] = entry
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    save()
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
