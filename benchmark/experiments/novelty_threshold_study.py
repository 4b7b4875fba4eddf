"""Issue 9: the novelty threshold with the ensemble default (ensemble_size="auto"): 3.5 / 4.0 / 4.5 / 5.0.

Research script. Per case and seed one model at the defaults, predicted at each ``novelty_threshold``
(full pipeline, default KNN), scored with ``atlasmtl.evaluate``; table in documents/design/api_contract.md
("Ensemble: evidence"). Cases are read from the benchmark work folder (``WORK/cases``).

    PYTHONPATH=$PWD python benchmark/experiments/novelty_threshold_study.py <case,case,...> 0,1,2 out.json [3.0,3.5,4.0,4.5]

(the optional fourth argument: the thresholds, default 3.5,4.0,4.5,5.0; an optional fifth: ``build_model``
keyword arguments as JSON, e.g. '{"mixup_alpha": 0}'; an optional sixth: prediction-time constants as JSON,
``{label: {"module.NAME": value}}`` with modules of ``atlasmtl``, e.g.
'{"g": {"prediction.INPUT_VIEW_CONFIDENCE_GUARD": 1.01}}': each threshold is then predicted under each
label's constants (the others at their defaults) and stored as ``threshold@label``).
"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_cells, read_truth
from study_scores import constant_patcher
import atlasmtl
torch.set_num_threads(1)
CASES, SEEDS, OUT = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3])
THR = [float(t) for t in sys.argv[4].split(",")] if len(sys.argv) > 4 else [3.5, 4.0, 4.5, 5.0]
SETTING = json.loads(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] else {}
PATCHES = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {None: {}}
_apply = constant_patcher(PATCHES)
WORK = Path("/work/bench_work")  # the benchmark work folder holding cases/
rows = json.loads(OUT.read_text()) if OUT.exists() else []
done = {(r["case"], r["seed"]) for r in rows}
for case in CASES:
    cdir = WORK / "cases" / case
    spec = json.loads((cdir / "case.json").read_text()); levels = spec["levels"]
    ref, query, truth = read_cells(cdir / "ref.h5ad"), read_cells(cdir / "query.h5ad", obsm=False), read_truth(cdir)
    for seed in SEEDS:
        if (case, seed) in done: continue
        model = atlasmtl.build_model(ref, levels, random_state=seed, num_threads=1, show_progress=False, show_summary=False,
                                     **SETTING)
        row = {"case": case, "seed": seed, "K": "auto"}
        for t, label in [(t, g) for t in THR for g in PATCHES]:
            _apply(PATCHES[label])
            key = str(t) if label is None else f"{t}@{label}"
            res = atlasmtl.predict(model, query, novelty_threshold=t, show_progress=False, show_summary=False)
            met = atlasmtl.evaluate(res, truth, label_columns=levels, **({"novel_labels": spec["novel"]} if spec.get("novel") else {}))
            row[key] = {"levels": {lv: {k: v for k, v in met["levels"][lv].items() if isinstance(v, (int, float, type(None)))} for lv in levels},
                           "novel": {lv: {k: v.get(k) for k in ("auroc", "novel_unknown_rate", "known_unknown_rate")} for lv, v in met["novel"]["levels"].items()} if met.get("novel") else None}
        rows.append(row); OUT.write_text(json.dumps(rows))
        print(case, seed, {k: round(v["levels"][levels[-1]]["macro_f1"], 3) for k, v in row.items() if isinstance(v, dict)}, flush=True)
