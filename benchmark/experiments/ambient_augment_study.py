"""Issue 10: does training on cells with ambient RNA added make the calls hold on queries that carry it?

Research script. A droplet query's cells carry ambient RNA: counts of the free-floating transcripts of the
whole sample, so a monocyte's LYZ and S100A8 appear in its T cells (``benchmark/cases._add_ambient`` adds 10–30%
to the six ``*_ambient`` queries of ``benchmark/run.py``'s ``AMBIENT_CASES``). The training augmentation
(``atlasmtl.augment.ShiftAugmentation``) thins cells and drops genes but adds nothing; here a share of each
batch's cells also gains ambient RNA from the batch's own pool (``ambient_fraction``, ``max_ambient``;
:func:`atlasmtl.augment.add_ambient`), in the training batches and in the calibration's shifted copies alike.

Per case and seed: the default model (``--models``, trained there when missing) and a model trained the same way
with the ambient augmentation on (``AMB_FRACTION``, default 0.5; ``AMB_MAX``, default 0.3; ``AMB_WHERE``: ``both``, or
``calibration`` for the temperatures' shifted copies only; one thread) predict
the case's query (row ``case``) and, where ``<case>_ambient`` is prepared under ``--work``'s ``cases``, that
query too (row ``<case>_ambient``). Columns ``default`` and ``amb``; rows in ``threshold_table.py``'s format.
``SHIFT_FIELDS`` (JSON, e.g. ``'{"gene_scale_sd": 0.5}'``) replaces the ambient fields with other
:class:`~atlasmtl.augment.ShiftAugmentation` fields, so other shifts can be put into the training or the calibration
copies the same way. Cases that share a reference (and seed) share the variant's model within one run.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmark/experiments/ambient_augment_study.py <case,case,...> 0,1,2 out.json --work W --models DIR
    python benchmark/experiments/threshold_table.py out.json
"""

import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import read_study_case  # noqa: E402
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402

import atlasmtl  # noqa: E402
import atlasmtl.training as training  # noqa: E402
from atlasmtl.augment import ShiftAugmentation  # noqa: E402

AMB_FRACTION = float(os.environ.get("AMB_FRACTION", "0.5"))
AMB_MAX = float(os.environ.get("AMB_MAX", "0.3"))
#: ``both``: training batches and calibration copies; ``calibration``: only the shifted copies the temperatures are
#: fitted on (the network is the default's, so its calls are too; the confidences, gate and Unknown may move).
AMB_WHERE = os.environ.get("AMB_WHERE", "both")
SHIFT_FIELDS = json.loads(os.environ.get("SHIFT_FIELDS", "null")) or {"ambient_fraction": AMB_FRACTION,
                                                                      "max_ambient": AMB_MAX}


def _ambient_model(ref, levels, seed):
    """The default recipe with ``SHIFT_FIELDS`` (the ambient augmentation) on where ``AMB_WHERE`` says."""
    ambient = functools.partial(ShiftAugmentation, **SHIFT_FIELDS)
    original, original_shifted = training.ShiftAugmentation, training.shifted_logits

    def shifted_logits(*args, **kwargs):  # the calibration copies: ShiftAugmentation() inside is the ambient one
        training.ShiftAugmentation = ambient
        try:
            return original_shifted(*args, **kwargs)
        finally:
            training.ShiftAugmentation = original

    if AMB_WHERE == "both":
        training.ShiftAugmentation = ambient
    elif AMB_WHERE == "calibration":
        training.shifted_logits = shifted_logits
    else:
        raise ValueError(f"AMB_WHERE={AMB_WHERE!r}: 'both' or 'calibration'")
    try:
        return atlasmtl.build_model(ref, levels, random_state=seed, num_threads=1, show_progress=False, show_summary=False)
    finally:
        training.ShiftAugmentation, training.shifted_logits = original, original_shifted


def _scores(models, query, truth, spec):
    return {name: score_result(atlasmtl.predict(m, query, show_progress=False, show_summary=False), truth, spec)
            for name, m in models.items()}


def study(models, work):
    built, built_for = {}, None  # seed -> the variant's model of the last reference: cases sharing it share them
    for case, seed, spec, ref, query, truth, model in models:
        levels = spec["levels"]
        key = (tuple(ref.obs_names), tuple(ref.var_names), tuple(levels))
        if key != built_for:
            built, built_for = {}, key
        if seed not in built:
            built[seed] = _ambient_model(ref, levels, seed)
        pair = {"default": model, "amb": built[seed]}
        row = {"case": case, "seed": seed, "K": "auto", **_scores(pair, query, truth, spec)}
        print_progress(case, seed, row, levels[-1])
        yield row
        shifted = work / "cases" / f"{case}_ambient"
        if (shifted / "case.json").exists():
            spec_a, _, query_a, truth_a = read_study_case(shifted, reference=False)
            row = {"case": f"{case}_ambient", "seed": seed, "K": "auto", **_scores(pair, query_a, truth_a, spec_a)}
            print_progress(f"{case}_ambient", seed, row, levels[-1])
            yield row


if __name__ == "__main__":
    work = Path(sys.argv[sys.argv.index("--work") + 1]) if "--work" in sys.argv else Path("/work/bench_work")
    posthoc_main(lambda models: study(models, work), lambda *a: "use threshold_table.py", "/work/bench_models")
