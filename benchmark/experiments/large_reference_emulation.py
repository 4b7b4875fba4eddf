"""Issue 9: the query-only check on models trained as a large reference would be, on each case's real cells.

Research study (2026-12-06, forty-third session; API contract, "Measured 2026-12-06, forty-third session"). The
benchmark's references hold at most 1,200 cells, so the input view's PCA sample (``novelty.INPUT_VIEW_PCA_CELLS``,
5,000) holds every training cell and the calibration split holds a fifth of each class. A reference of 100,000+
cells differs in both: the PCA sample leaves most training cells out, and the split holds ``5,000 / N`` of each
class. Here each case's default model is trained with the PCA sample a quarter of the reference (at least 200
cells) and the split's fraction 0.05 (``calibration_split``'s ``max_cells`` = 5% of the labelled cells), saved
under MODELS, and scored post hoc:

- ``off``: no query-only check; ``shipped``: the check of the forty-second session (no guard, the calibration
  cells alone); ``guard``: ``QUERY_ONLY_MIN_HELD`` = 3, the calibration cells alone; ``guard_sup``: the guard
  and the small classes' training cells outside the PCA sample (``QUERY_ONLY_SMALL_CLASS_CELLS``, training
  stores them after the calibration cells); ``sup``: those cells without the guard.

The emulation also starves every other use of the split (the temperatures, the novelty nulls: 9-56 cells here
against 5,000 in a real large reference), so compare the labels with each other, not with the shipped rows.

    PYTHONPATH=$PWD python benchmark/experiments/large_reference_emulation.py <case,case,...> 0 out.json MODELS
    PYTHONPATH=$PWD:$PWD/benchmark python benchmark/experiments/threshold_table.py --tradeoff out.json
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
import atlasmtl.prediction as prediction  # noqa: E402
import atlasmtl.training as training  # noqa: E402
from atlasmtl.calibration import calibration_split  # noqa: E402

SPLIT_FRACTION = 0.05
LABELS = {"off": (None, None, False), "shipped": (0.95, None, False), "guard": (0.95, 3, False),
          "guard_sup": (0.95, 3, True), "sup": (0.95, None, True)}  # share, guard, small classes' training cells


def train_as_large(ref, levels, seed):
    """The default model, its PCA sample a quarter of ``ref`` and its calibration split at fraction 0.05."""
    pca_cells, split = novelty.INPUT_VIEW_PCA_CELLS, training.calibration_split
    novelty.INPUT_VIEW_PCA_CELLS = max(200, ref.n_obs // 4)
    training.calibration_split = lambda codes, fraction, rng, max_cells=5000: calibration_split(
        codes, fraction, rng, max_cells=max(1, int(SPLIT_FRACTION * (codes >= 0).sum())))
    try:
        return atlasmtl.build_model(ref, levels, random_state=seed, show_progress=False, show_summary=False,
                                    num_threads=1)
    finally:
        novelty.INPUT_VIEW_PCA_CELLS, training.calibration_split = pca_cells, split


def main() -> None:
    cases, seeds, out, models = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3]), Path(sys.argv[4])
    models.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rows = json.loads(out.read_text()) if out.exists() else []
    for case, seed, spec, ref, query, truth in study_cases(cases, seeds, list(rows), work=Path("/work/bench_work")):
        path = models / f"{case}_{seed}.pth"
        if path.exists():
            model = atlasmtl.TrainedModel.load(path)
        else:
            model = train_as_large(ref, spec["levels"], seed)
            model.save(path)
        view = model.metadata["novelty"]["input_view"]
        held = view["held"]
        n_calibration = int((~np.asarray(model.reference["training_cell"], bool)).sum())  # stored first
        calibration = {"points": held["points"][:n_calibration], "calls": held["calls"][:n_calibration]}
        row, flagged = {"case": case, "seed": seed, "K": "auto"}, {}
        for label, (share, guard, small_class_cells) in LABELS.items():
            prediction.QUERY_ONLY_SHARE, prediction.QUERY_ONLY_MIN_HELD = share, guard
            view["held"] = held if small_class_cells else calibration
            result = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
            row[label] = score_result(result, truth, spec)
            flagged[label] = (result.metadata.get("query_only") or {}).get("flagged")
        prediction.QUERY_ONLY_SHARE, prediction.QUERY_ONLY_MIN_HELD = novelty.QUERY_ONLY_SHARE, novelty.QUERY_ONLY_MIN_HELD
        view["held"] = held
        print_progress(case, seed, row, spec["levels"][-1])
        row["flagged"] = json.dumps({"calibration_cells": n_calibration,
                                     "small_class_cells": len(held["calls"]) - n_calibration, **flagged})
        rows.append(row)
        out.write_text(json.dumps(rows))

if __name__ == "__main__":
    main()
