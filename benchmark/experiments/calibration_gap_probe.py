"""Issue 9 (calibration): is the finest-level confidence too high or too low on the query, and where?

Research probe, post hoc on the default models. Per case and seed, the known-type query cells (the case's
novel labels left out; cells without signal too): accuracy of the network's own finest call (``raw``) and its
mean calibrated confidence (``conf``), the ECE of the two (15 equal-width bins, as ``atlasmtl.evaluate``) and
the ECE an exactly calibrated confidence would show on the same cells (``ece_floor``,
:func:`atlasmtl.calibration.ece_if_calibrated`: a query of a few hundred cells cannot show less), the
AUROC with which an error is ranked by 1 − confidence, by the embedding novelty z (``novelty``) and by the
neighbourhood novelty, and the confidence − accuracy gap in each tercile of the novelty z (positive:
over-confident). A temperature that grows with the novelty z only helps where the upper tercile's gap is
positive.

    PYTHONPATH=$PWD python benchmark/experiments/calibration_gap_probe.py <case,case,...> 0,1 out.json MODELS [WORK]
"""
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import open_set_truth, probe_arguments  # noqa: E402
from study_scores import default_models  # noqa: E402
import atlasmtl  # noqa: E402
from atlasmtl.calibration import ece_if_calibrated, expected_calibration_error  # noqa: E402


def gap_row(case: str, seed: int, spec: dict, res, truth) -> dict:
    """The probe's figures for one prediction (see the module docstring)."""
    fine = spec["levels"][-1]
    calls, classes = res.levels[fine], np.asarray(res.classes[fine])
    true = truth[fine].astype(str).to_numpy()
    novel = open_set_truth(spec, truth)[0]
    conf = np.asarray(calls.conf, dtype=float)
    known = ~novel & np.isfinite(conf)
    raw = np.asarray(calls.raw)
    correct = (np.where(raw >= 0, classes[np.clip(raw, 0, None)], "Unknown") == true)[known]
    c, z = conf[known], np.asarray(calls.novelty, dtype=float)[known]
    nb = np.asarray(calls.neighbourhood_novelty, dtype=float)[known]
    row = {"case": case, "seed": seed, "n": int(known.sum()), "accuracy": float(correct.mean()), "confidence": float(c.mean()),
           "ece": float(expected_calibration_error(c, correct)), "ece_floor": float(ece_if_calibrated(c)),
           "z_median": float(np.nanmedian(z))}
    if 0 < correct.mean() < 1:
        row["auroc_error_conf"] = float(roc_auc_score(~correct, -c))
        for name, score in (("z", z), ("neighbourhood", nb)):
            ok = np.isfinite(score)
            row[f"auroc_error_{name}"] = float(roc_auc_score(~correct[ok], score[ok]))
        cuts = np.nanquantile(z, [1 / 3, 2 / 3])
        for name, m in (("low", z <= cuts[0]), ("mid", (z > cuts[0]) & (z <= cuts[1])), ("high", z > cuts[1])):
            row[f"gap_{name}"] = float(c[m].mean() - correct[m].mean())
    return row


def main() -> None:
    cases, seeds, out, models, work = probe_arguments(sys.argv)
    rows = []
    for case, seed, spec, _, query, truth, model in default_models(cases, seeds, work=work, models=models,
                                                                   train=False, reference=False):
        res = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        rows.append(gap_row(case, seed, spec, res, truth))
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
        out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
