"""Prediction-time constants of atlasmtl, measured on default models trained once (research script).

Per case and seed the default model (trained, or loaded from ``--models``) predicts the query once per
label of a JSON ``{label: {"module.NAME": value}}`` (modules of ``atlasmtl``; ``{}`` = the defaults), e.g.
the input view's smallest scored class (``novelty.INPUT_VIEW_MIN_MEMBERS``, read at prediction); a key
``"predict.<option>"`` is passed to :func:`atlasmtl.predict` instead (``{"predict.knn_correction": "off"}``);
``{"query.drop_undetected_genes": true}`` predicts the query without its genes no cell detects (as after
``scanpy.pp.filter_genes(query, min_cells=1)``); ``{"query.drop_unexpected_zero_genes": 20}`` predicts it
without the genes ``unmeasured_genes_probe.unexpected_zero_genes`` finds (expected in ≥ 20 query cells at the
query's depth, detected in none), so only those read as genes the query lacks.
Rows in ``threshold_table.py``'s format:

    PYTHONPATH=$PWD python benchmark/experiments/posthoc_constants_study.py <case,case,...> 0,1,2 out.json \\
        '{"m50": {}, "m20": {"novelty.INPUT_VIEW_MIN_MEMBERS": 20}}' [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import constant_patcher, posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
from unmeasured_genes_probe import unexpected_zero_genes  # noqa: E402

PATCHES = json.loads(sys.argv.pop(4)) if len(sys.argv) > 4 and sys.argv[1] != "--summarise" else {}
OPTION = "predict."
QUERY = "query."
#: Per label: the module constants it sets, and the options it passes to ``atlasmtl.predict``.
CONSTANTS = {label: {k: v for k, v in patch.items() if not k.startswith((OPTION, QUERY))}
             for label, patch in PATCHES.items()}
DROP_UNDETECTED = {label: bool(patch.get(QUERY + "drop_undetected_genes")) for label, patch in PATCHES.items()}
DROP_UNEXPECTED = {label: patch.get(QUERY + "drop_unexpected_zero_genes") for label, patch in PATCHES.items()}
OPTIONS = {label: {k[len(OPTION):]: v for k, v in patch.items() if k.startswith(OPTION)}
           for label, patch in PATCHES.items()}
apply = constant_patcher(CONSTANTS)


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        row = {"case": case, "seed": seed, "K": "auto"}
        detected, unexpected = None, {}
        for name in PATCHES:
            apply(CONSTANTS[name])
            q = query
            if DROP_UNDETECTED[name]:
                if detected is None:
                    detected = np.asarray((query.X != 0).sum(axis=0)).ravel() > 0
                q = query[:, detected].copy()
            elif DROP_UNEXPECTED[name] is not None:
                threshold = float(DROP_UNEXPECTED[name])
                if threshold not in unexpected:
                    unexpected[threshold] = unexpected_zero_genes(ref, query, threshold)
                q = query[:, ~unexpected[threshold]].copy()
            row[name] = score_result(atlasmtl.predict(model, q, show_progress=False, show_summary=False,
                                                      **OPTIONS[name]), truth, spec)
        apply({})
        print_progress(case, seed, row, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
