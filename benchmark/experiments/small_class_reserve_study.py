"""Issue 9: keep part of each small class out of the input view's PCA sample, so that a reference the sample
covers whole still has small-class cells outside it for the query-only check (research; not adopted).

Research study (2026-12-06, forty-third session; API contract, "Measured 2026-12-06, forty-third session").
Needs ``git apply benchmark/experiments/patches/small_class_pca_reserve.diff`` (adds
``novelty.QUERY_ONLY_SMALL_CLASS_RESERVE``: that share of each finest class under 50 training cells is kept out of
the PCA sample; training then stores those cells in the held record, ``QUERY_ONLY_SMALL_CLASS_CELLS``). Each
case's default model is trained with the share ``R`` and scored at the defaults (label ``reserve``); compare with
the ``full_g3`` rows of ``query_only_held_thinning_*`` (the defaults without it, the same seeds).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmark/experiments/small_class_reserve_study.py <case,case,...> 0,1,2 out.json 0.5
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from study_scores import print_progress, score_result, study_cases  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.novelty as novelty  # noqa: E402


def main() -> None:
    cases, seeds = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")]
    out, share = Path(sys.argv[3]), float(sys.argv[4])
    torch.set_num_threads(1)
    rows = json.loads(out.read_text()) if out.exists() else []
    for case, seed, spec, ref, query, truth in study_cases(cases, seeds, list(rows), work=Path("/work/bench_work")):
        novelty.QUERY_ONLY_SMALL_CLASS_RESERVE = share
        try:
            model = atlasmtl.build_model(ref, spec["levels"], random_state=seed, show_progress=False,
                                         show_summary=False, num_threads=1)
        finally:
            novelty.QUERY_ONLY_SMALL_CLASS_RESERVE = 0.0
        result = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        row = {"case": case, "seed": seed, "K": "auto", "reserve": score_result(result, truth, spec)}
        print_progress(case, seed, row, spec["levels"][-1])
        row["flagged"] = json.dumps({
            "record": result.metadata.get("query_only"),
            "held": int(len(model.metadata["novelty"]["input_view"]["held"]["calls"])),
            "calibration": int((~np.asarray(model.reference["training_cell"], bool)).sum())})
        rows.append(row)
        out.write_text(json.dumps(rows))

if __name__ == "__main__":
    main()
