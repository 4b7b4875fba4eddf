"""Issue 9 (calibrated confidence on real queries): temperatures cross-fitted on every reference cell
(research script).

Why: each level's temperature is fitted on the held-out cells (``calibration_fraction=0.2``) of one
training. On the small references of the benchmark that is few cells (brain mouse → human: 36,
Zilionis: 55, pbmc68k: 94, Symphony: 178), so the fit is noisy and its prior on accuracy (one cell's
worth each way, :data:`atlasmtl.calibration.ACCURACY_PRIOR_COUNT`) weighs against 36 cells: the known-type
ECE of those cases is the highest (brain mouse → human 0.108, pbmc68k 0.085). Cross-fitting holds every
reference cell out once: the cells the shipped model trained on are split into ``FOLDS - 1`` more groups
the size of the held-out set, a network is trained (the same :func:`atlasmtl.build_model` call) with each
group held out instead, and the temperature is fitted on the shifted copies of every group's cells under
the network that did not train on them (the shipped model's held-out cells under the shipped model).

Variants, post hoc on the default models (the network, KNN index and novelty nulls unchanged; only the
stored temperatures replaced before :func:`atlasmtl.predict`):

``crossfit``
    Each level's temperature fitted (:func:`atlasmtl.calibration.fit_temperature`, ``copies=5``, the prior
    counting cells) on the shifted copies (:func:`atlasmtl.training.shifted_logits`, the shipped draws) of
    all ``FOLDS`` groups' cells.
``crossfit_clean``
    The same on the cells as they are (no shifted copies): what cross-fitting alone does.

Classes under ``1 / calibration_fraction`` cells are never held out, as in
:func:`atlasmtl.calibration.calibration_split`. The shipped model's own temperatures are refitted from its
shifted copies first and must equal the stored ones (checked).

    PYTHONPATH=$PWD python benchmark/experiments/crossfit_calibration_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.calibration  # noqa: E402
import atlasmtl.training as T  # noqa: E402
from atlasmtl.calibration import SHIFTED_COPIES, crossfit_groups, fit_temperature  # noqa: E402
from atlasmtl.reference import prepare_reference  # noqa: E402

FOLDS = 5
# the further networks need no temperatures of their own: their models are built without cross-fitting
# (as every model was when the rows of seeds 0-2 were made, at c15db4a)
atlasmtl.calibration.CROSSFIT_BELOW_CELLS = 0


def _held_out_logits(model, r, cells, seed):
    """(clean logits per level, (row cells, shifted logits per level)) of ``cells`` under ``model``."""
    dev = torch.device("cpu")
    emb, kept, logits = T.embed_reference(model.network, r, dev, np.searchsorted(r.cells, cells))
    shifted = T.shifted_logits(model.network, r, dev, cells, SHIFTED_COPIES, np.random.default_rng([seed % 2**32, 0xCA1]))
    return logits, shifted


def model_reference(model, ref, levels):
    """The :class:`~atlasmtl.reference.Reference` of ``ref`` as ``model`` was trained on it (genes checked)."""
    tc = model.train_config
    r = prepare_reference(ref, levels, None, layer=None, use_raw=False, input_transform=tc["input_transform"],
                          n_top_genes=tc.get("n_top_genes"), gene_selection=tc.get("gene_selection", "variable"))
    assert [str(g) for g in r.source.var_names[r.genes]] == list(model.genes), "the model's genes differ"
    return r


def check_stored_temperatures(model, r, shifted, levels):
    """The model's stored temperatures must be those refitted on its held-out cells' ``shifted`` rows."""
    stored = model.metadata["calibration"]["temperatures"]
    for j, lv in enumerate(levels):
        refit = fit_temperature(shifted[1][j], r.codes[shifted[0], j], copies=SHIFTED_COPIES)
        assert abs(refit - stored[lv]) < 1e-3 * stored[lv], (lv, refit, stored[lv])


def fold_models(model, r, ref, levels, seed):
    """Per further group (:func:`atlasmtl.calibration.crossfit_groups`): ``(group mask, model built by the
    same call with that group held out, seconds)``."""
    held = ~model.reference["training_cell"]
    split = T.calibration_split
    # (the rows were made with a copy of crossfit_groups written here first: the same draws, the same groups)
    for group in crossfit_groups(r.codes[r.cells, -1], held, 1 / FOLDS, np.random.default_rng([seed, 0xF01D])):
        T.calibration_split = lambda c, f, rng, max_cells=5000, g=group: g.copy()
        t = time.perf_counter()
        try:
            fold = atlasmtl.build_model(ref, levels, random_state=seed, num_threads=1, show_progress=False, show_summary=False)
        finally:
            T.calibration_split = split
        assert list(fold.genes) == list(model.genes)
        assert (~fold.reference["training_cell"] == group).all()
        yield group, fold, time.perf_counter() - t


def crossfit_temperatures(model, ref, levels, seed):
    r = model_reference(model, ref, levels)
    held = ~model.reference["training_cell"]
    parts = [(r.cells[held], *_held_out_logits(model, r, r.cells[held], seed))]
    check_stored_temperatures(model, r, parts[0][2], levels)
    for group, fold, _ in fold_models(model, r, ref, levels, seed):
        parts.append((r.cells[group], *_held_out_logits(fold, r, r.cells[group], seed)))
    out = {"crossfit": {}, "crossfit_clean": {}}
    for j, lv in enumerate(levels):
        out["crossfit"][lv] = fit_temperature(np.vstack([p[2][1][j] for p in parts]),
                                              np.concatenate([r.codes[p[2][0], j] for p in parts]), copies=SHIFTED_COPIES)
        out["crossfit_clean"][lv] = fit_temperature(np.vstack([p[1][j] for p in parts]),
                                                    np.concatenate([r.codes[p[0], j] for p in parts]))
    return out, sum(len(p[0]) for p in parts)


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        row = {"case": case, "seed": seed, "K": "auto",
               "default": score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)}
        stored = copy.deepcopy(model.metadata["calibration"])
        temps, n_cells = crossfit_temperatures(model, ref, spec["levels"], seed)
        temperatures = {"default": stored["temperatures"], **temps}
        for name, t in temps.items():
            model.metadata["calibration"] = {**stored, "temperatures": t}
            row[name] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)
        model.metadata["calibration"] = stored
        row["temperatures"] = json.dumps(temperatures)  # a string: threshold_table reads every dict as a setting
        row["crossfit_cells"] = n_cells
        print_progress(case, seed, {k: v for k, v in row.items() if isinstance(v, dict)}, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
