"""Issue 9: the doubt rule (a low-confidence finest call in a far neighbourhood is Unknown) with its threshold
raised to the query's own level (research probe, post hoc on the default models).

The twentieth session's rule (``patches/neighbourhood_doubt_flag.diff``) flags a finest call that
the gate names low-confidence (``is_low_conf``) when its neighbourhood novelty exceeds ``D``. Here the threshold
is ``max(D, baseline + delta)``, with ``baseline`` the median neighbourhood novelty of the query's usable cells
(``all``) or of its confident calls (``conf``), so a query that sits far from the reference as a whole needs a
further neighbourhood before a doubtful call is flagged. The flag is applied to a copy of the default
prediction (Unknown, novel, no accepted vote), as the patch does inside ``predict``. Rows in
``threshold_table.py``'s format (``baselines`` = ``[all, conf]``):

    PYTHONPATH=$PWD python benchmark/experiments/neighbourhood_doubt_relative_probe.py <case,case,...> 0,1 out.json MODELS [WORK]
    python benchmark/experiments/threshold_table.py out.json
"""
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import probe_arguments  # noqa: E402
from study_scores import default_models, score_result  # noqa: E402
import atlasmtl  # noqa: E402

#: label -> (D, baseline or None, delta); None = the defaults' prediction.
VARIANTS: dict = {"default": None}
for _d in (1.0, 1.25, 1.5):
    VARIANTS[f"D{_d}"] = (_d, None, 0.0)
    for _base in ("all", "conf"):
        for _delta in (0.5, 1.0):
            VARIANTS[f"D{_d}_{_base}{_delta}"] = (_d, _base, _delta)


def flagged_copy(res, fine: str, flag: np.ndarray):
    """A copy of ``res`` whose finest calls in ``flag`` are Unknown and novel, with no accepted vote."""
    out = copy.deepcopy(res)
    calls = out.levels[fine]
    calls.pred[flag] = -1
    calls.is_unknown[flag] = True
    calls.used_knn[flag] = False
    if calls.is_novel is not None:
        calls.is_novel[flag] = True
    return out


def probe_row(case: str, seed: int, spec: dict, res, truth) -> dict:
    """One row: the default prediction ``res`` scored as it is and with each of :data:`VARIANTS`' flags."""
    fine = spec["levels"][-1]
    calls = res.levels[fine]
    around = np.nan_to_num(np.asarray(calls.neighbourhood_novelty, dtype=float), nan=-np.inf)
    usable, doubtful = np.isfinite(around), np.asarray(calls.is_low_conf, dtype=bool)
    baselines = {"all": float(np.median(around[usable])) if usable.any() else 0.0,
                 "conf": float(np.median(around[usable & ~doubtful])) if (usable & ~doubtful).any() else 0.0}
    row = {"case": case, "seed": seed, "K": "auto", "baselines": [baselines["all"], baselines["conf"]]}
    for name, v in VARIANTS.items():
        if v is None:
            row[name] = score_result(res, truth, spec)
            continue
        d, base, delta = v
        threshold = d if base is None else max(d, baselines[base] + delta)
        flag = doubtful & (around > threshold) & (np.asarray(calls.pred) >= 0)
        row[name] = score_result(flagged_copy(res, fine, flag), truth, spec)
    return row


def main() -> None:
    cases, seeds, out, models, work = probe_arguments(sys.argv)
    torch.set_num_threads(1)
    rows = json.loads(out.read_text()) if out.exists() else []
    for case, seed, spec, _, query, truth, model in default_models(cases, seeds, rows, work=work, models=models,
                                                                   train=False, reference=False):
        res = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        rows.append(probe_row(case, seed, spec, res, truth))
        fine = spec["levels"][-1]
        print(json.dumps({"case": case, "seed": seed, **{n: round(rows[-1][n]["levels"][fine]["macro_f1"], 4)
                                                         for n in ("default", "D1.25", "D1.25_all1.0")}}), flush=True)
        out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
