"""Issue 9: the logistic-regression peer's probability as an extra Unknown flag.

Research script (the lead noted in ``linear_blend_study.py``'s results: the logreg peer gives the B cells
the Symphony reference lacks low confidence). Per case and seed, the default model (trained, or loaded from
``--models``) predicts at the defaults; then a call becomes Unknown where the ``logreg`` peer
(``linear_blend_study.peer_probs``) gives it probability below ``tau``:

- ``fine<tau>``: the finest level only;
- ``all<tau>``: every level, and a level nested under a flagged call is flagged too;

and ``default`` (no flag). The novelty score itself is not changed (its AUROC stays the default's). Rows in
``threshold_table.py``'s format.

    PYTHONPATH=$PWD python benchmark/experiments/linear_flag_probe.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import copy
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_scores import posthoc_main, score_result  # noqa: E402
from linear_blend_study import peer_probs  # noqa: E402
import atlasmtl  # noqa: E402

TAUS = (0.02, 0.05, 0.1, 0.2)

def flagged(res, levels, lr, tau, fine_only):
    """A copy of ``res`` with the calls whose logreg probability is under ``tau`` made Unknown."""
    res = copy.deepcopy(res)
    flag_parent = np.zeros(len(res.levels[levels[0]].pred), bool)
    for i, lv in enumerate(levels):
        o = res.levels[lv]
        pred = np.asarray(o.pred)
        p = np.where(pred >= 0, lr[lv][np.arange(len(pred)), np.maximum(pred, 0)], 1.0)
        flag = (p < tau) if (not fine_only or lv == levels[-1]) else np.zeros(len(pred), bool)
        if i > 0:
            flag |= flag_parent
        o.pred = np.where(flag, -1, pred).astype(o.pred.dtype)
        o.is_unknown = np.asarray(o.is_unknown) | flag
        flag_parent = flag
    return res

def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        levels = spec["levels"]
        lr = peer_probs(ref, query, levels, model.classes, seed)["lr"]
        res = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        row = {"case": case, "seed": seed, "K": "auto", "default": score_result(res, truth, spec)}
        for tau in TAUS:
            row[f"all{tau}"] = score_result(flagged(res, levels, lr, tau, False), truth, spec)
            row[f"fine{tau}"] = score_result(flagged(res, levels, lr, tau, True), truth, spec)
        print(case, seed, flush=True)
        yield row

if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
