"""Issue 9 (calibrated confidence) at a lower training cost: how small can the cross-fitting networks be?
(research script).

Why: since 9bc4ac6 a reference with under :data:`atlasmtl.calibration.CROSSFIT_BELOW_CELLS` held-out cells
trains ``round(1 / calibration_fraction) - 1`` = 4 further networks of the model's own recipe, each with
another fifth of the cells held out, and fits each level's temperature on every reference cell. On these
references the recipe is a ten-member ensemble (``ensemble_size="auto"``), so cross-fitting trains 40
more members: the benchmark's atlasmtl training time went from 234 s to 764 s (22 cases), 4.3× CellTypist's.
The further networks only supply held-out logits for the temperature fit. This study measures cheaper ones.

The four further networks are trained once per row as ten-member ensembles (as the shipped cross-fitting
does; :func:`atlasmtl.build_model` with the fold's cells held out, as in ``crossfit_calibration_study.py``).
Members are trained in order from one generator, so the first ``m`` members of a ten-member ensemble are
the ``m``-member ensemble of the same call: every variant below comes from the same trainings. Each level's
temperature is fitted (:func:`atlasmtl.calibration.fit_temperature`, ``copies=5``) on the shifted copies of
the model's held-out fifth under the model (ten members) and of each further group under its network:

``cf_m10``
    All four further groups, ten members each (the shipped cross-fitting: 40 further members).
``cf_m5``, ``cf_m3``, ``cf_m2``, ``cf_m1``
    All four groups, the first 5 / 3 / 2 / 1 members of each further network (20 / 12 / 8 / 4 members).
``cf_g2_m10``, ``cf_g2_m3``
    Two further groups only (three fifths of the cells), 10 / 3 members (20 / 6 members).

``default`` is the model's stored temperature (the held-out fifth only, as before 9bc4ac6: the models must
be built with ``CROSSFIT_BELOW_CELLS = 0``; checked by refitting it).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmark/experiments/crossfit_cost_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    PYTHONPATH=$PWD:$PWD/benchmark python benchmark/experiments/threshold_table.py out.json
"""
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.calibration  # noqa: E402
import atlasmtl.training as T  # noqa: E402
from atlasmtl.calibration import SHIFTED_COPIES, fit_temperature  # noqa: E402
from atlasmtl.network import EnsembleNetwork, member_networks  # noqa: E402
from crossfit_calibration_study import check_stored_temperatures, fold_models, model_reference  # noqa: E402

# (crossfit_calibration_study sets CROSSFIT_BELOW_CELLS = 0: the further networks need no temperatures)
#: variant -> (further groups used, members per further network)
VARIANTS = {"cf_m10": (4, 10), "cf_m5": (4, 5), "cf_m3": (4, 3), "cf_m2": (4, 2), "cf_m1": (4, 1),
            "cf_g2_m10": (2, 10), "cf_g2_m3": (2, 3)}


def _shifted(net, r, cells, seed):
    return T.shifted_logits(net, r, torch.device("cpu"), cells, SHIFTED_COPIES, np.random.default_rng([seed % 2**32, 0xCA1]))


def _first(net, m):
    members = member_networks(net)[:m]
    return members[0] if len(members) == 1 else EnsembleNetwork(members).eval()


def cheaper_temperatures(model, ref, levels, seed):
    r = model_reference(model, ref, levels)
    held = ~model.reference["training_cell"]
    own = _shifted(model.network, r, r.cells[held], seed)
    check_stored_temperatures(model, r, own, levels)
    folds, seconds = [], []  # per further group: {members: (row cells, shifted logits per level)}
    for group, fold, fold_seconds in fold_models(model, r, ref, levels, seed):
        seconds.append(fold_seconds)
        n = len(member_networks(fold.network))
        folds.append({m: _shifted(_first(fold.network, m), r, r.cells[group], seed)
                      for m in sorted({m for _, m in VARIANTS.values()}) if m <= n})
    out = {}
    for name, (n_groups, m) in VARIANTS.items():
        parts = [own] + [f[m] for f in folds[:n_groups] if m in f]
        out[name] = {lv: fit_temperature(np.vstack([p[1][j] for p in parts]),
                                         np.concatenate([r.codes[p[0], j] for p in parts]), copies=SHIFTED_COPIES)
                     for j, lv in enumerate(levels)}
    return out, {"fold_seconds": round(sum(seconds), 1), "members": len(member_networks(model.network))}


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        row = {"case": case, "seed": seed, "K": "auto",
               "default": score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)}
        stored = copy.deepcopy(model.metadata["calibration"])
        temps, info = cheaper_temperatures(model, ref, spec["levels"], seed)
        for name, t in temps.items():
            model.metadata["calibration"] = {**stored, "temperatures": t}
            row[name] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)
        model.metadata["calibration"] = stored
        row["temperatures"] = json.dumps({"default": stored["temperatures"], **temps})  # a string: not a setting
        row.update(info)
        print_progress(case, seed, {k: v for k, v in row.items() if isinstance(v, dict)}, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
