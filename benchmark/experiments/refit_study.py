"""Issues 9/10: calibrate on a held-out split, then refit on every cell (the calibration carried over).

Research script. The defaults hold 20% of each class out of training to fit the temperature and the
novelty null; on small references that costs accuracy (``build_setting_study.py``:
``calibration_fraction=0.1`` gains +0.006 finest macro-F1 but calibrates worse). Here, per case and
seed, model A is trained at the defaults and model B with ``calibration_fraction=0`` (every cell
trains; same seed); B is given A's temperatures and novelty null and predicted at the defaults and with
``knn_correction="off"``. Rows have the format of ``build_setting_study.py`` (setting "refit"), so its
``--summarise`` compares them with the defaults.

    PYTHONPATH=$PWD python benchmark/experiments/refit_study.py <case,case,...> 0,1,2 out.json
"""
import copy, json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_study_case
from study_scores import score_model
import atlasmtl

torch.set_num_threads(1)
CASES, SEEDS, OUT = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3])
WORK = Path("/work/bench_work")
rows = json.loads(OUT.read_text()) if OUT.exists() else []
done = {(r["case"], r["seed"]) for r in rows}
for case in CASES:
    spec, ref, query, truth = read_study_case(WORK / "cases" / case)
    levels = spec["levels"]
    for seed in SEEDS:
        if (case, seed) in done: continue
        kw = dict(random_state=seed, num_threads=1, show_progress=False, show_summary=False)
        a = atlasmtl.build_model(ref, levels, **kw)
        b = atlasmtl.build_model(ref, levels, calibration_fraction=0.0, **kw)
        b.metadata["calibration"] = copy.deepcopy(a.metadata["calibration"])
        b.metadata["novelty"] = copy.deepcopy(a.metadata["novelty"])
        row = {"case": case, "seed": seed, "setting": "refit", "results": score_model(b, query, truth, spec)}
        rows.append(row); OUT.write_text(json.dumps(rows))
        print(case, seed, {n: round(v["levels"][levels[-1]]["macro_f1"], 3) for n, v in row["results"].items()}, flush=True)
