"""A query's depth counted over the genes it measures, against the reference's (research probe).

A query that does not measure some of the reference's genes (or holds them as all-zero columns) is
normalised to 1e4 counts over the genes it has, so each measured gene's CP10k is larger than the same cell's
would be in the reference by ``1 / s``, ``s`` the share of a reference cell's counts in the measured genes.
The probe predicts each query as it is (``default``) and with every cell's linear values multiplied by ``s``
(``rescaled``; ``s`` is the mean over reference cells of their CP10k share in the genes some query cell
detects). On a thinned query the genes it misses by depth lower ``s`` too, wrongly: those rows show what
a rule that does not tell the two apart would cost. Rows in ``threshold_table.py``'s format:

    PYTHONPATH=$PWD python benchmark/experiments/measured_share_probe.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py --per-case out.json:rescaled
"""
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402


def measured_share(ref, query) -> float:
    """Mean over reference cells of the share of their CP10k in the genes some query cell detects."""
    detected = np.asarray((query.X != 0).sum(axis=0)).ravel() > 0
    keep = ref.var_names.isin(query.var_names[detected])
    lin = sp.csr_matrix(ref.X, dtype=np.float64)
    lin.data = np.expm1(lin.data)
    total = np.asarray(lin.sum(axis=1)).ravel()
    inside = np.asarray(lin[:, keep].sum(axis=1)).ravel()
    return float(np.mean(inside[total > 0] / total[total > 0]))


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        s = measured_share(ref, query)
        scaled = query.copy()
        x = sp.csr_matrix(scaled.X, dtype=np.float32, copy=True)
        x.data = np.log1p(np.expm1(x.data) * s).astype(np.float32)
        scaled.X = x
        kw = dict(show_progress=False, show_summary=False)
        row = {"case": case, "seed": seed, "K": "auto", "share": s,
               "default": score_result(atlasmtl.predict(model, query, **kw), truth, spec),
               "rescaled": score_result(atlasmtl.predict(model, scaled, **kw), truth, spec)}
        print_progress(case, seed, row, spec["levels"][-1])
        print(f"  share {s:.3f}", flush=True)
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
