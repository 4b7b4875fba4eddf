"""Issue 9: variants of the novelty score's input view, fitted on the same networks.

Research script. Per case and seed one model at the defaults; while it is built, its input view
is also fitted under each variant's ``atlasmtl.novelty`` constants (the same training and
held-out cells, so only the view differs), then the query is predicted with each variant's view
and prediction-time constants, at each threshold, and scored with ``atlasmtl.evaluate``. Rows as
``novelty_threshold_study.py``'s (keys ``threshold@variant``), so ``threshold_table.py`` reads them.

    PYTHONPATH=$PWD python benchmark/experiments/input_view_study.py <case,case,...> 0,1,2 out.json 3.5 \\
        '{"base": {"novelty.INPUT_VIEW_RESIDUAL": false}, "res": {"novelty.INPUT_VIEW_RESIDUAL": true}}'

Constants named in a variant apply while its view is fitted and while the query is predicted with it;
the others keep their defaults.
"""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_study_case
from study_scores import constant_patcher, score_result
import atlasmtl
import atlasmtl.training as training
from atlasmtl.model import TrainedModel
torch.set_num_threads(1)
CASES, SEEDS, OUT = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3])
THR = [float(t) for t in sys.argv[4].split(",")]
VARIANTS = json.loads(sys.argv[5])
_apply = constant_patcher(VARIANTS)

_real_fit = training.fit_input_view
views = {}


def _fit_variants(*args, **kwargs):
    for label, patch in VARIANTS.items():
        _apply(patch)
        views[label] = _real_fit(*args, **kwargs)
    _apply({})
    return _real_fit(*args, **kwargs)


training.fit_input_view = _fit_variants
WORK = Path("/work/bench_work")  # the benchmark work folder holding cases/
rows = json.loads(OUT.read_text()) if OUT.exists() else []
done = {(r["case"], r["seed"]) for r in rows}
for case in CASES:
    spec, ref, query, truth = read_study_case(WORK / "cases" / case)
    levels = spec["levels"]
    for seed in SEEDS:
        if (case, seed) in done: continue
        views.clear()
        model = atlasmtl.build_model(ref, levels, random_state=seed, num_threads=1, show_progress=False, show_summary=False)
        row = {"case": case, "seed": seed, "K": "auto"}
        for label, patch in VARIANTS.items():
            meta = {**model.metadata, "novelty": {**model.metadata["novelty"], "input_view": views[label]}}
            variant = TrainedModel(model.network, meta, model.reference)
            _apply(patch)
            for t in THR:
                res = atlasmtl.predict(variant, query, novelty_threshold=t, show_progress=False, show_summary=False)
                row[f"{t}@{label}"] = score_result(res, truth, spec)
        _apply({})
        rows.append(row); OUT.write_text(json.dumps(rows))
        print(case, seed, {k: round(v["levels"][levels[-1]]["macro_f1"], 3) for k, v in row.items() if isinstance(v, dict)}, flush=True)
