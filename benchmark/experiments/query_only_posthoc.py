"""Issue 9: the query-only flag (``novelty.QUERY_ONLY_SHARE``) on models saved before it, post hoc.

Research helper (2026-12-06, forty-second session). Models trained before the flag hold no held-out cells in
their input view (``metadata["novelty"]["input_view"]["held"]``), so prediction skips it. :func:`add_held_out`
gives such a model what its training would have stored: the PCA coordinates of its held-out reference cells
(``model.reference["training_cell"]`` false; kept by ``study_scores.keep_view_points`` while the model predicts them)
and their finest calls (the network's decoded calls, ``pred_<finest>_raw``). A model trained with the flag
stores the same up to float rounding (checked: ``python benchmark/experiments/query_only_posthoc.py --check
<case> <seed>`` trains one and compares). Then ``posthoc_constants_study.py``-style labels are scored on the
stored default models:

    PYTHONPATH=$PWD python benchmark/experiments/query_only_posthoc.py <case,case,...> 0,1,2 out.json \\
        '{"off": {"prediction.QUERY_ONLY_SHARE": null}, "on": {}}' [--models DIR]
    python benchmark/experiments/threshold_table.py --tradeoff out.json
"""
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import read_study_case  # noqa: E402
from study_scores import constant_patcher, keep_view_points, posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402

_state: dict = {}
keep_view_points(_state)


def held_out_record(model, ref) -> dict:
    """The ``held`` record training stores, computed from a saved model and its reference."""
    held = ref[~np.asarray(model.reference["training_cell"], bool)]
    fine = model.label_columns[-1]
    result = atlasmtl.predict(model, held, show_progress=False, show_summary=False)
    n = np.asarray(model.metadata["novelty"]["input_view"]["components"]).shape[0]
    return {"points": _state["points"][:, :n].astype(np.float32),
            "calls": np.asarray(result.levels[fine].raw, dtype=np.int32)}


def add_held_out(model, ref) -> None:
    """Store :func:`held_out_record` in the model's input view (in memory), unless it holds one already."""
    view = (model.metadata.get("novelty") or {}).get("input_view")
    if view is not None and "held" not in view:
        view["held"] = held_out_record(model, ref)


def check(case: str, seed: int) -> None:
    """Train the default model of ``case`` and compare its stored ``held`` record with the post-hoc one."""
    spec, ref, _, _ = read_study_case(Path("/work/bench_work/cases") / case)
    model = atlasmtl.build_model(ref, spec["levels"], random_state=seed, show_progress=False, show_summary=False,
                                 num_threads=1)
    stored = model.metadata["novelty"]["input_view"]["held"]
    again = held_out_record(model, ref)
    print(case, seed, "cells", len(stored["calls"]), "calls equal", bool(np.array_equal(stored["calls"], again["calls"])),
          "largest coordinate difference", float(np.abs(stored["points"] - again["points"]).max()))


PATCHES = {}


def study(models):
    apply = constant_patcher({label: {k: v for k, v in patch.items()} for label, patch in PATCHES.items()})
    for case, seed, spec, ref, query, truth, model in models:
        add_held_out(model, ref)
        row = {"case": case, "seed": seed, "K": "auto"}
        for name, patch in PATCHES.items():
            apply(patch)
            row[name] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)
        apply({})
        print_progress(case, seed, row, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        check(sys.argv[2], int(sys.argv[3]))
    else:
        PATCHES.update(json.loads(sys.argv.pop(4)))
        posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
