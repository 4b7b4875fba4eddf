"""Prediction time and calls with exact search vs the list index on one saved model (the EXACT_SEARCH_MAX_CELLS choice).

Usage: python benchmark/experiments/exact_vs_index_predict.py THRESHOLD
(the model and case are the ones benchmark/scale.py writes under --work /work/bench_scale; 100000 = exact at
100k cells, 20000 = the list index, built on first use for a model saved without one).
"""
import sys, time, numpy as np, pandas as pd, anndata as ad, warnings
warnings.filterwarnings("ignore")
import atlasmtl, atlasmtl.knn as K
thr = int(sys.argv[1]); K.EXACT_SEARCH_MAX_CELLS = thr
m = atlasmtl.TrainedModel.load("/work/bench_scale/runs/synthetic_100k/atlasmtl_model/model.pth")
q = ad.read_h5ad("/work/bench_scale/cases/synthetic_100k/query.h5ad")
truth = pd.read_csv("/work/bench_scale/cases/synthetic_100k/truth.csv.gz", index_col=0).reindex(q.obs_names)
t=time.time(); atlasmtl.predict(m, q[:200].copy(), show_progress=False, show_summary=False); print("warmup(index build)", round(time.time()-t,1))
from sklearn.metrics import f1_score
for rep in range(2):
    t=time.time(); r = atlasmtl.predict(m, q, show_progress=False, show_summary=False); dt=time.time()-t
lv = m.label_columns[-1] if hasattr(m,"label_columns") else list(r.levels)[-1]
p = np.asarray(r.labels(lv)).astype(str); tr = truth[lv].astype(str).values
print(thr, "predict s", round(dt,2), "f1 %.4f"%f1_score(tr,p,labels=np.unique(tr),average="macro"), "unk %.4f"%(p=="Unknown").mean(), "novel %.4f"%np.mean(r.levels[lv].is_novel))
