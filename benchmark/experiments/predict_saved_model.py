"""Issue 13: time ``predict`` of a saved model on a case's query, after loading (optionally with another ``n_probe``).

Research script. Loads the model, optionally overrides the stored list index's ``n_probe`` (as a model
indexed by a later commit would store it), predicts the case's query twice at the defaults and scores
the finest level with ``atlasmtl.evaluate``.

    python benchmark/experiments/predict_saved_model.py WORK/runs/synthetic_1m/atlasmtl_model WORK/cases/synthetic_1m --n-probe 27
"""
import argparse, json, os, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import anndata as ad
import atlasmtl
from common import load_case, read_truth

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("case_dir", type=Path); ap.add_argument("--n-probe", type=int); ap.add_argument("--repeats", type=int, default=2)
args = ap.parse_args()
levels = load_case(args.case_dir)["levels"]
t = time.perf_counter(); model = atlasmtl.TrainedModel.load(args.model); load_s = time.perf_counter() - t
if args.n_probe and model.reference.get("index"):
    model.reference["index"]["n_probe"] = args.n_probe
query, truth = ad.read_h5ad(args.case_dir / "query.h5ad"), read_truth(args.case_dir)
for rep in range(args.repeats):
    t = time.perf_counter(); res = atlasmtl.predict(model, query, show_progress=False, show_summary=False); dt = time.perf_counter() - t
    fine = atlasmtl.evaluate(res, truth, label_columns=levels)["levels"][levels[-1]]
    print(json.dumps({"repeat": rep, "n_probe": (model.reference.get("index") or {}).get("n_probe"), "predict_s": round(dt, 2),
                      "load_s": round(load_s, 2), "fine_macro_f1": round(fine["macro_f1"], 4), "unknown": round(1 - fine["coverage"], 4),
                      "load_average": round(os.getloadavg()[0], 2)}), flush=True)
