"""Issue 9 probe (research script, seed 0, printed only): ensemble disagreement (mutual information of the members' finest-level probabilities) as a novelty signal:
AUROC novel vs known on the removed-type cases, and its level on known-type cases. Seed 0, the default (ten-member) ensemble.

    PYTHONPATH=$PWD python benchmark/experiments/ensemble_disagreement_probe.py <case,case,...>

(cases from /work/bench_work/cases; output quoted in documents/design/api_contract.md, "Ensemble: ten members").
"""
import sys, warnings
warnings.filterwarnings('ignore')
sys.path.insert(0, 'benchmark')
from pathlib import Path
import numpy as np, torch
from sklearn.metrics import roc_auc_score
from common import read_study_case
import atlasmtl
from atlasmtl import network as N
torch.set_num_threads(2)
store = []
orig = N.EnsembleNetwork.forward
def fwd(self, x, first_weight_t=None):
    out = orig(self, x, first_weight_t)
    outs = [m(x) for m in self.members]
    store.append(torch.stack([torch.softmax(o.logits[-1], dim=1) for o in outs]).detach().numpy())
    return out
N.EnsembleNetwork.forward = fwd
for case in sys.argv[1].split(','):
    spec, ref, query, truth = read_study_case(Path('/work/bench_work/cases') / case)
    levels = spec['levels']; fi = levels[-1]
    model = atlasmtl.build_model(ref, levels, random_state=0, show_progress=False, show_summary=False)
    store.clear()
    res = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
    P = np.concatenate(store, axis=1)  # members x cells x classes
    if P.shape[1] != query.n_obs: print(case, 'shape', P.shape); continue
    m = P.mean(0)
    ent = lambda p: -(p * np.log(np.clip(p, 1e-12, 1))).sum(-1)
    mi = ent(m) - ent(P).mean(0)
    agree = (P.argmax(-1) == m.argmax(-1)[None]).mean(0)
    t = truth.loc[query.obs_names, fi].astype(str).to_numpy()
    novel = set(spec['novel'].get(fi, [])) if spec.get('novel') else set()
    isn = np.isin(t, list(novel))
    nov = np.nan_to_num(np.asarray(res.levels[fi]['novelty'], float), nan=10)
    conf = np.asarray(res.levels[fi]['conf'])
    if isn.any():
        print(f"{case}: AUROC MI {roc_auc_score(isn, mi):.3f}, 1-agree {roc_auc_score(isn, 1-agree):.3f}, novelty {roc_auc_score(isn, nov):.3f}, 1-conf {roc_auc_score(isn, 1-conf):.3f}; MI median novel {np.median(mi[isn]):.3f} known {np.median(mi[~isn]):.3f} known q95 {np.quantile(mi[~isn], .95):.3f}", flush=True)
    else:
        raw = np.asarray(res.classes[fi])[res.levels[fi]['raw_code']]
        ok = raw == t
        print(f"{case}: MI median {np.median(mi):.3f} q95 {np.quantile(mi, .95):.3f}; AUROC MI for errors {roc_auc_score(~ok, mi) if (~ok).any() else float('nan'):.3f}", flush=True)
