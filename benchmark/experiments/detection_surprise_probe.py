"""Issue 9: would a class-conditional *detection surprise* flag the novel types the shipped views miss?

Research probe (not built). For a query cell called class ``c`` at the finest level (the network's raw call
of the default model, seed 0, loaded from ``MODELS/<case>_0.pth``, e.g. those ``study_scores.default_models``
saves), the score is the share of its detected genes that class ``c`` rarely detects: detection rates
``(k_cg + ALPHA · d_g) / (n_c + ALPHA)`` (``k_cg`` of the class's ``n_c`` reference cells detect gene ``g``;
``d_g`` = the whole reference's rate, so a small class borrows it) under ``tau``. Its null: each reference
cell's leave-one-out score in its own class, less the class median; a pooled robust scale; then located at the
query (less ``max(0, median z)``), as the shipped views are. A cell with ``z > 3.5`` would be Unknown. Printed
per case: on removed-type cases the AUROC and novel → Unknown / known → Unknown with the flag OR-ed with the
default calls' Unknown (``was``: the defaults alone); on known-type cases the Unknown share and how many
right calls the flag would take.

    PYTHONPATH=$PWD python benchmark/experiments/detection_surprise_probe.py <case,case,...> MODELS [WORK]
"""
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import default_models  # noqa: E402
import atlasmtl  # noqa: E402

ALPHA, TAUS = 5.0, (0.01, 0.02, 0.03)
MODELS = Path(sys.argv[2])
WORK = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/work/bench_work")
for case, _, spec, ref, q, truth, m in default_models(sys.argv[1].split(","), [0], work=WORK, models=MODELS, train=False):
    fine = spec['levels'][-1]
    r = atlasmtl.predict(m, q, show_progress=False, show_summary=False)
    df = r.to_dataframe(mode="full")
    call = df[f'pred_{fine}_raw'].astype(str).to_numpy()
    nov = spec.get('novel', {}).get(fine, []) if spec.get('novel') else []
    is_nov = np.isin(truth[fine].to_numpy(), nov)
    unk = df[f'is_unknown_{fine}'].to_numpy()
    R = (sp.csr_matrix(ref.X) > 0).astype(np.float32); Q = (sp.csr_matrix(q.X) > 0).astype(np.float32)
    lab = ref.obs[fine].astype(str).to_numpy()
    dg = np.asarray(R.mean(0)).ravel()
    nq = np.maximum(np.asarray(Q.sum(1)).ravel(), 1)
    line = f"{case:32s} nov={is_nov.sum():3d} "
    for tau in TAUS:
        s = np.full(q.n_obs, np.nan); dev_all = []; med = {}
        for c in np.unique(lab):
            rc = R[lab == c]; n = rc.shape[0]
            k = np.asarray(rc.sum(0)).ravel()
            rare_loo = ((k - 1 + ALPHA * dg) / (n - 1 + ALPHA) < tau).astype(np.float32)
            sl = (rc @ rare_loo) / np.maximum(np.asarray(rc.sum(1)).ravel(), 1)
            med[c] = np.median(sl); dev_all.append(sl - med[c])
            rows = call == c
            if rows.any():
                rare = ((k + ALPHA * dg) / (n + ALPHA) < tau).astype(np.float32)
                s[rows] = (Q[rows] @ rare) / nq[rows] - med[c]
        dev = np.concatenate(dev_all); scale = 1.4826 * np.median(np.abs(dev - np.median(dev)))
        if scale == 0:  # most reference cells detect no gene rare in their class: no z
            line += f"| t{tau:g} null scale 0 "
            continue
        z = (s - np.median(dev)) / scale
        z = z - max(0.0, np.nanmedian(z))
        flag = np.nan_to_num(z, nan=-9) > 3.5
        if is_nov.any():
            line += f"| t{tau:g} AUROC {roc_auc_score(is_nov, np.nan_to_num(z, nan=-9)):.2f} nov→U {np.mean(flag[is_nov] | unk[is_nov]):.2f} (was {unk[is_nov].mean():.2f}) known→U {np.mean(flag[~is_nov] | unk[~is_nov]):.3f} (was {unk[~is_nov].mean():.3f}) "
        else:
            right = call == truth[fine].to_numpy()
            line += f"| t{tau:g} U {np.mean(flag | unk):.3f} (was {unk.mean():.3f}) flagged-right {np.sum(flag & right & ~unk)} "
    print(line, flush=True)
