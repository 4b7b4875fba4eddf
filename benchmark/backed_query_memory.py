"""Peak memory of predicting a query straight from disk, as the query grows (SEMI-SYNTHETIC data).

Usage::

    python benchmark/backed_query_memory.py --sizes 50000 500000

Steps: resample real Kang PBMC count profiles (binomial thinning, see
``cases.kang_source``) into a 20,000-cell labelled reference and one query
``.h5ad`` per size, written in chunks; train atlasmtl on the reference; then,
for each query size, a fresh subprocess runs ``atlasmtl.predict(model,
"query.h5ad")`` (backed, streamed in chunks), writes the predictions to CSV
and an annotated ``.h5ad`` copy with ``result.write_h5ad``, and reports its own
peak RSS. Flat peak RSS across sizes means memory does not grow with the
number of query cells beyond the per-cell result arrays.
Results go to ``benchmark/results/backed_query_memory.json``.
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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

CHILD = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import atlasmtl
model_path, query_path, out_dir = sys.argv[1:4]
model = atlasmtl.TrainedModel.load(model_path)
t0 = time.perf_counter()
result = atlasmtl.predict(model, query_path, show_progress=False)
t_pred = time.perf_counter() - t0
result.to_csv(f"{out_dir}/predictions.csv", mode="standard")
result.write_h5ad(f"{out_dir}/annotated.h5ad", query_path, mode="standard")
t_all = time.perf_counter() - t0
print(json.dumps({
    "n_cells": result.n_obs,
    "predict_seconds": round(t_pred, 2),
    "predict_and_write_seconds": round(t_all, 2),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "rss_before_predict_mb": round(result.metadata["prediction_runtime"]["phase_peak_rss_mb"]
                                   - result.metadata["prediction_runtime"]["phase_rss_increase_mb"], 1),
    "rss_increase_during_predict_mb": result.metadata["prediction_runtime"]["phase_rss_increase_mb"],
    "throughput_cells_per_second": round(result.n_obs / t_pred, 1),
    "unknown_rate_fine": float(result.levels["cluster_fine"]["is_unknown"].mean()),
    "knn_cells_searched": result.metadata["prediction_runtime"]["knn_cells_searched"],
}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 500_000])
    parser.add_argument("--n-ref", type=int, default=20_000)
    parser.add_argument("--num-epochs", type=int, default=10)
    parser.add_argument("--work", type=Path, default=BENCH / "work" / "backed_query_memory")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "backed_query_memory.json")
    args = parser.parse_args(argv)

    import pandas as pd

    import atlasmtl
    from cases import SYNTH_LEVELS, _write_synth, kang_source

    args.work.mkdir(parents=True, exist_ok=True)
    source = kang_source(seed=0)
    ref_path = args.work / "ref.h5ad"
    if not ref_path.exists():
        _write_synth(ref_path, source, source["ref_pool"], args.n_ref, 1, "r", with_labels=True)
    model_path = args.work / "model" / "model.pth"
    if not model_path.exists():
        import anndata as ad

        ref = ad.read_h5ad(ref_path)
        model = atlasmtl.build_model(ref, SYNTH_LEVELS, layer="counts", num_epochs=args.num_epochs, show_progress=False)
        model.save(model_path)
        del ref, model
    rows = []
    for n in args.sizes:
        query_path = args.work / f"query_{n}.h5ad"
        if not query_path.exists():
            t0 = time.perf_counter()
            _write_synth(query_path, source, source["query_pool"], n, 2, "q", with_labels=False)
            print(f"wrote {query_path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        out_dir = args.work / f"out_{n}"
        out_dir.mkdir(exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(model_path.with_name("model_manifest.json")), str(query_path), str(out_dir)],
            capture_output=True, text=True, check=True,
        )
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["query_file_mb"] = round(query_path.stat().st_size / 2**20, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "what": "SEMI-SYNTHETIC: peak RSS of atlasmtl.predict on a backed .h5ad query, by query size",
        "command": "python benchmark/backed_query_memory.py " + " ".join(f"--sizes {s}" if i == 0 else str(s) for i, s in enumerate(args.sizes)),
        "reference_cells": args.n_ref,
        "num_epochs": args.num_epochs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "atlasmtl": atlasmtl.__version__,
        "rows": rows,
    }
    if len(rows) >= 2:
        report["peak_rss_ratio_largest_to_smallest"] = round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
