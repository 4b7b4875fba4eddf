"""Issue 9: does averaging each cell's novelty z-score over its neighbours *in the query* flag the novel types
the per-cell score misses?

Research probe (not built; API contract, "Measured 2026-12-02, sixteenth session"). A type the reference lacks
forms its own neighbourhood in the query, so the mean z over a cell's ``k`` nearest query cells (the cell
included; ``query_vote_study.query_neighbours``: a PCA of the query alone, 50 components on its log1p CP10k
values) keeps the type's shift and loses most of the per-cell noise. The default model (``MODELS/<case>_<seed>.pth``,
e.g. those ``study_scores.default_models`` saves) predicts at the defaults; its finest-level ``novelty``
(z, NaN set to the median) is smoothed into ``zs`` and put back on a null scale three ways, with ``m`` /
``s`` the median / left scale ``(median − 25th percentile) / 0.6745`` of a score over the query:

- ``A<k>``: ``zs · s(z) / s(zs)`` (the smoothing's variance reduction undone, the located z's centre kept);
- ``B<k>``: ``(zs − m(zs)) / s(zs)`` (the query's own centre and scale);
- ``C<q>_<k>``: as ``B``, but a called class with at least 20 query cells is centred at least at its own
  ``q``-quantile of ``zs`` (a known class a shift moves as a whole is not flagged wholesale).

A cell becomes Unknown where the default called it Unknown or its smoothed score exceeds 3.5. Per case and
seed: finest macro-F1 of the defaults (``f1``; truth of the novel cells set to Unknown, so abstaining on them
is right, Unknown counts as wrong elsewhere), its change under each rule (``f1<rule>``), known → Unknown
(``kU``) and, on removed-type cases, the AUROC of the score (``auc``: per-cell ``z``; ``auc_s<k>``: ``zs``)
and novel → Unknown (``nU``).

    PYTHONPATH=$PWD python benchmark/experiments/novelty_query_smoothing_probe.py <case,case,...> 0,1 out.csv MODELS [WORK]
"""
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import open_set_truth, probe_arguments  # noqa: E402
from query_vote_study import query_neighbours  # noqa: E402
from study_scores import default_models  # noqa: E402
import atlasmtl  # noqa: E402

KS, QUANTILES, THRESHOLD, MIN_CLASS = (10, 30), (0.05, 0.25), 3.5, 20


def centre_scale(v: np.ndarray) -> tuple[float, float]:
    """Median and left scale ((median − 25th percentile) / 0.6745, which a right tail does not widen)."""
    m = float(np.median(v))
    return m, max((m - float(np.quantile(v, 0.25))) / 0.6745, 1e-3)


def main() -> None:
    warnings.filterwarnings("ignore")
    cases, seeds, out, models, work = probe_arguments(sys.argv)
    rows = []
    nbr: dict[str, np.ndarray] = {}
    for case, seed, spec, _, query, truth, model in default_models(cases, seeds, work=work, models=models,
                                                                   train=False, reference=False):
        novel, t, labels = open_set_truth(spec, truth)
        fine = spec["levels"][-1]
        if case not in nbr:  # once per case (only the current case's is kept)
            nbr = {case: query_neighbours(query, [max(KS)])[max(KS)]}
        res = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        lc = res.levels[fine]
        unknown, calls = np.asarray(lc.is_unknown), np.asarray(lc.raw)
        pred = res.to_dataframe(mode="full")[f"pred_{fine}"].astype(str).to_numpy()
        z = np.asarray(lc.novelty, dtype=np.float64)
        z = np.nan_to_num(z, nan=float(np.nanmedian(z)))
        row = {"case": case, "seed": seed, "f1": f1_score(t, pred, labels=labels, average="macro"),
               "kU": unknown[~novel].mean()}
        if novel.any():
            row.update(auc=roc_auc_score(novel, z), nU=unknown[novel].mean())
        _, s_z = centre_scale(z)
        for k in KS:
            zs = z[nbr[case][:, :k]].mean(axis=1)
            m_s, s_s = centre_scale(zs)
            if novel.any():
                row[f"auc_s{k}"] = roc_auc_score(novel, zs)
            rules = {f"A{k}": zs * s_z / s_s, f"B{k}": (zs - m_s) / s_s}
            for q in QUANTILES:
                centre = np.full(len(zs), m_s)
                for c in np.unique(calls):
                    at = calls == c
                    if at.sum() >= MIN_CLASS:
                        centre[at] = max(m_s, float(np.quantile(zs[at], q)))
                rules[f"C{int(q * 100)}_{k}"] = (zs - centre) / s_s
            for name, score in rules.items():
                flagged = unknown | (score > THRESHOLD)
                row[f"f1{name}"] = f1_score(t, np.where(flagged, "Unknown", pred), labels=labels, average="macro") - row["f1"]
                row[f"kU{name}"] = flagged[~novel].mean()
                if novel.any():
                    row[f"nU{name}"] = flagged[novel].mean()
        rows.append(row)
        print(case, seed, flush=True)
        pd.DataFrame(rows).to_csv(out, index=False)
    pd.set_option("display.width", 400)
    pd.set_option("display.max_columns", 80)
    print(pd.DataFrame(rows).groupby("case").mean(numeric_only=True).round(3).to_string())


if __name__ == "__main__":
    main()
