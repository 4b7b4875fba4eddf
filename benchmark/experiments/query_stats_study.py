"""Issue 10: standardise the query with its own gene statistics for the calls, but keep the novelty flags
of the reference-standardised pass.

Research script. ``acc_study.py`` found that standardising the query's values with the query's own per-gene
mean and std (or the mean of the reference's and the query's) raises the heads' accuracy but makes novel
cells look known. Here the two are decoupled. Per case and seed, the default model (trained, or loaded from
``--models``) predicts the query:

- ``default``: as shipped (the reference's statistics);
- ``<tta>``: with the query's statistics (``query``) or the mean of both (``blend``), everything else as
  shipped, novelty included (``acc_study.py``'s setting);
- ``<tta>_keepnovel``: the calls of ``<tta>`` predicted without novelty flags, then made Unknown wherever the
  ``default`` pass flagged the cell novel at that level (a level nested under an Unknown call is Unknown).

Statistics: ``acc_study.query_stats`` (genes the query lacks keep the reference's). Rows in
``threshold_table.py``'s format.

    PYTHONPATH=$PWD python benchmark/experiments/query_stats_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import copy
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
from acc_study import query_stats  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.prediction as P  # noqa: E402

ORIGINAL = P._gene_stats


def with_flags(res, flagged, levels, nested):
    """A copy of ``res`` with the cells ``flagged`` novel (per level, from another prediction) made Unknown;
    a level in ``nested`` is Unknown under an Unknown call of the level before it."""
    res = copy.deepcopy(res)
    parent_unknown = None
    for lv in levels:
        o = res.levels[lv]
        unknown = np.asarray(o.is_unknown) | np.asarray(flagged.levels[lv].is_novel)
        if parent_unknown is not None and lv in nested:
            unknown |= parent_unknown
        o.pred = np.where(unknown, -1, np.asarray(o.pred)).astype(o.pred.dtype)
        o.is_unknown = unknown
        o.is_novel = np.asarray(flagged.levels[lv].is_novel)
        parent_unknown = unknown
    return res


def study(models):
    kw = dict(show_progress=False, show_summary=False)
    for case, seed, spec, ref, query, truth, model in models:
        levels = spec["levels"]
        nested = {lv for lv in levels[1:] if lv in model.hierarchy}
        base = atlasmtl.predict(model, query, **kw)
        row = {"case": case, "seed": seed, "K": "auto", "default": score_result(base, truth, spec)}
        stats = dict(zip(("none", "query"), query_stats(model, query)))
        stats["blend"] = {k: (stats["none"][k] + stats["query"][k]) / 2 for k in stats["none"]}
        for tta in ("query", "blend"):
            P._gene_stats = lambda m, s=stats[tta]: s
            try:
                coupled = atlasmtl.predict(model, query, **kw)
                calls = atlasmtl.predict(model, query, novelty_threshold=None, **kw)
            finally:
                P._gene_stats = ORIGINAL
            row[tta] = score_result(coupled, truth, spec)
            row[f"{tta}_keepnovel"] = score_result(with_flags(calls, base, levels, nested), truth, spec)
        fine = levels[-1]
        print_progress(case, seed, row, fine)
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
