"""Issue 9 (ECE ≤ 0.05 on real cross-dataset queries): temperatures fitted on shifted held-out cells
(research script).

Why: each level's temperature is fitted on held-out reference cells as they are. A query from another
protocol or species sits further from the reference; there the network's logits shrink more than its
accuracy falls, so its calibrated confidence is too low (brain mouse → human: accuracy 0.83, mean
confidence 0.69; "Which way the finest confidence is off on the query"). The training augmentation
(:class:`atlasmtl.augment.ShiftAugmentation`: thinning, genes dropped) makes reference cells look like a
shifted query; a temperature fitted on the held-out cells so shifted would then match accuracy under shift.

Variants, post hoc on the default models (the network, the KNN index and the novelty nulls unchanged; only
the stored temperatures are replaced before :func:`atlasmtl.predict`):

``augmented``
    Each level's temperature fitted (:func:`atlasmtl.calibration.fit_temperature`) on ``REPEATS`` shifted
    copies of the held-out cells (the reference cells the model did not train on), each copy drawn by
    :func:`atlasmtl.augment.simulate_shift` with the training defaults.
``pooled``
    The same on the held-out cells as they are plus the shifted copies.
``half``
    The same with the cells as they are weighted as much as all the shifted copies together (each
    repeated ``REPEATS`` times): even odds that the query is shifted.
``augmented_cells``
    As ``augmented``, with the fit's prior on accuracy counting held-out cells, not rows (``copies=REPEATS``):
    the copies of one cell are not independent evidence (what ``build_model`` ships).
``augmented_cells_jeffreys``
    The same with Jeffreys' prior (``ACCURACY_PRIOR_COUNT = 0.5`` instead of Laplace's 1).

The held-out cells' logits are the model's own (the ensemble's mean logits), computed on the reference's
network input (:func:`atlasmtl.reference.prepare_reference` with the model's settings: the same genes and
statistics, checked).

    PYTHONPATH=$PWD python benchmark/experiments/augmented_calibration_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.calibration  # noqa: E402
from atlasmtl.augment import ShiftAugmentation, simulate_shift  # noqa: E402
from atlasmtl.calibration import fit_temperature  # noqa: E402
from atlasmtl.network import SparseInput  # noqa: E402
from atlasmtl.reference import prepare_reference  # noqa: E402

REPEATS = 5


def _logits(model, aligner, block, zero) -> list[np.ndarray]:
    with torch.no_grad():
        out = model.network(SparseInput(aligner.sparse_input(block), zero))
    return [lg.numpy().astype(np.float64) for lg in out.logits]


def shifted_temperatures(model, ref, levels, seed: int) -> dict[str, dict[str, float]]:
    """``{variant: {level: T}}`` (``augmented``, ``pooled``, ``half``) for ``model`` trained on ``ref``."""
    tc = model.train_config
    r = prepare_reference(ref, levels, None, layer=None, use_raw=False, input_transform=tc["input_transform"],
                          n_top_genes=tc.get("n_top_genes"), gene_selection=tc.get("gene_selection", "variable"))
    assert [str(g) for g in r.source.var_names[r.genes]] == list(model.genes), "the model's genes differ"
    held = r.cells[~model.reference["training_cell"]]
    zero = r.aligner.zero_input()
    zero = None if zero is None else torch.from_numpy(zero)
    block = r.source.rows(held)
    clean = _logits(model, r.aligner, block, zero)
    counts_aligner = dataclasses.replace(r.aligner, semantics="counts")  # shifted rows are pseudo-counts
    rng = np.random.default_rng(10_000 + seed)
    shifted = [[] for _ in levels]
    for _ in range(REPEATS):
        rows = simulate_shift(block, r.semantics["semantics"], rng, ShiftAugmentation())
        for j, lg in enumerate(_logits(model, counts_aligner, rows, zero)):
            shifted[j].append(lg)
    codes = r.codes[held]
    out = {"augmented": {}, "pooled": {}, "half": {}, "augmented_cells": {}, "augmented_cells_jeffreys": {}}
    for j, lv in enumerate(levels):
        aug = np.vstack(shifted[j])
        out["augmented"][lv] = fit_temperature(aug, np.tile(codes[:, j], REPEATS))
        out["pooled"][lv] = fit_temperature(np.vstack([clean[j], aug]), np.tile(codes[:, j], REPEATS + 1))
        out["augmented_cells"][lv] = fit_temperature(aug, np.tile(codes[:, j], REPEATS), copies=REPEATS)
        prior, atlasmtl.calibration.ACCURACY_PRIOR_COUNT = atlasmtl.calibration.ACCURACY_PRIOR_COUNT, 0.5
        try:
            out["augmented_cells_jeffreys"][lv] = fit_temperature(aug, np.tile(codes[:, j], REPEATS), copies=REPEATS)
        finally:
            atlasmtl.calibration.ACCURACY_PRIOR_COUNT = prior
        out["half"][lv] = fit_temperature(np.vstack([clean[j]] * REPEATS + [aug]), np.tile(codes[:, j], 2 * REPEATS))
    return out


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        row = {"case": case, "seed": seed, "K": "auto",
               "default": score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)}
        stored = copy.deepcopy(model.metadata["calibration"])
        temperatures = {"default": stored["temperatures"]}
        for name, temps in shifted_temperatures(model, ref, spec["levels"], seed).items():
            model.metadata["calibration"] = {**stored, "temperatures": temps}
            row[name] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)
            temperatures[name] = temps
        model.metadata["calibration"] = stored
        row["temperatures"] = json.dumps(temperatures)  # a string: threshold_table reads every dict as a setting
        print_progress(case, seed, {k: v for k, v in row.items() if k != "temperatures"}, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
