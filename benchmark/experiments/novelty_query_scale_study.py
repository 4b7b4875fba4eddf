"""Issue 9: should the novelty z-score also take its scale from the query (as it takes its location)?

Research script (not adopted; see documents/design/api_contract.md, "Ensemble: evidence"). Under a
platform shift the known cells' log distances spread wider than the held-out reference cells' (the
null), so a shifted query's known cells pass the threshold (CellBench Drop-seq: every Unknown is a
correct call flagged novel). Variants of ``atlasmtl.novelty.novelty_z`` swapped into ``predict``:
``null`` (shipped: the null's scale), ``left16`` / ``left25``: scale = max(null scale, the query's
own spread below its median, (median − 15.87th percentile) or (median − 25th) / 0.6745, which a
right tail of novel cells does not inflate). Full pipeline at the defaults, ensemble_size 1 and auto.

    PYTHONPATH=$PWD python benchmark/experiments/novelty_query_scale_study.py <case,case,...> 0,1,2 out.json
"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_cells, read_truth
import atlasmtl, atlasmtl.prediction as P
torch.set_num_threads(1)
ORIG = P.novelty_z
def left(q):
    def fn(log_d, null):
        finite = np.isfinite(log_d)
        location, scale = float(null["median"]), float(null["scale"])
        if finite.any():
            med = float(np.median(log_d[finite]))
            location = max(location, med)
            lo = float(np.percentile(log_d[finite], q))
            z_q = {15.87: 1.0, 25: 0.6745}[q]
            scale = max(scale, (med - lo) / z_q)
        return (log_d - location) / scale, location
    return fn
VARIANTS = {"null": ORIG, "left16": left(15.87), "left25": left(25)}
WORK = Path("/work/bench_work")  # the benchmark work folder holding cases/
CASES, SEEDS, OUT = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3])
rows = json.loads(OUT.read_text()) if OUT.exists() else []
done = {(r["case"], r["seed"], r["K"]) for r in rows}
for case in CASES:
    cdir = WORK / "cases" / case
    spec = json.loads((cdir / "case.json").read_text()); levels = spec["levels"]
    ref, query, truth = read_cells(cdir / "ref.h5ad"), read_cells(cdir / "query.h5ad", obsm=False), read_truth(cdir)
    for seed in SEEDS:
        for K in (1, "auto"):
            if (case, seed, K) in done: continue
            t0 = time.perf_counter()
            model = atlasmtl.build_model(ref, label_columns=levels, random_state=seed, num_threads=1, show_progress=False, show_summary=False, ensemble_size=K)
            row = {"case": case, "seed": seed, "K": K, "train_s": time.perf_counter() - t0}
            for name, fn in VARIANTS.items():
                P.novelty_z = fn
                res = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
                met = atlasmtl.evaluate(res, truth, label_columns=levels, **({"novel_labels": spec["novel"]} if spec.get("novel") else {}))
                row[name] = {"levels": {lv: {k: v for k, v in met["levels"][lv].items() if isinstance(v, (int, float, type(None)))} for lv in levels},
                             "novel": {lv: {k: v.get(k) for k in ("auroc", "novel_unknown_rate", "known_unknown_rate")} for lv, v in met["novel"]["levels"].items()} if met.get("novel") else None}
            P.novelty_z = ORIG
            rows.append(row); OUT.write_text(json.dumps(rows))
            print(case, seed, K, {n: round(row[n]["levels"][levels[-1]]["macro_f1"], 3) for n in VARIANTS}, flush=True)
