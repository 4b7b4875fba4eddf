"""Issue 9: which threshold on the raw neighbourhood novelty should make the finest call Unknown?

Research probe behind the finest-level flag of ``neighbourhood_novelty`` (API contract, "Neighbourhood
novelty: evidence"). Per case and seed, the default model (``MODELS/<case>_<seed>.pth``, e.g. those
``study_scores.default_models`` saves) predicts twice: with ``neighbourhood_k=None`` (the calls without the
neighbourhood flag) and at the defaults (for the ``neighbourhood_novelty`` column). A cell is Unknown under
threshold ``T`` where the first prediction calls it Unknown or its finest ``neighbourhood_novelty`` exceeds
``T``. As in ``novelty_query_smoothing_probe.py``, the truth of the novel cells is set to Unknown (abstaining
on them is right; Unknown counts as wrong elsewhere). Per case and seed: finest macro-F1 without the flag
(``f1``), its change under each ``T`` (``d<T>``), known → Unknown (``kU``, ``kU<T>``) and novel → Unknown
(``nU``, ``nU<T>``).

    PYTHONPATH=$PWD python benchmark/experiments/neighbourhood_threshold_probe.py <case,case,...> 0,1,2 out.csv MODELS [WORK] [--k K]

``--k``: the neighbours averaged (``predict(neighbourhood_k=K)``; default: predict's own, 30).
"""
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import open_set_truth, probe_arguments  # noqa: E402
from study_scores import default_models  # noqa: E402
import atlasmtl  # noqa: E402

THRESHOLDS = (2.75, 3.0, 3.25, 3.5, 4.0)


def main() -> None:
    warnings.filterwarnings("ignore")
    argv = list(sys.argv)
    k = {}
    if "--k" in argv:
        at = argv.index("--k")
        k = {"neighbourhood_k": int(argv[at + 1])}
        del argv[at : at + 2]
    cases, seeds, out, models, work = probe_arguments(argv)
    rows = []
    for case, seed, spec, _, query, truth, model in default_models(cases, seeds, work=work, models=models,
                                                                   train=False, reference=False):
        novel, t, labels = open_set_truth(spec, truth)
        fine = spec["levels"][-1]
        base = atlasmtl.predict(model, query, neighbourhood_k=None, show_progress=False, show_summary=False)
        around = atlasmtl.predict(model, query, show_progress=False, show_summary=False, **k).levels[fine].neighbourhood_novelty
        around = np.nan_to_num(np.asarray(around, dtype=np.float64), nan=-np.inf)
        unknown = np.asarray(base.levels[fine].is_unknown)
        pred = base.to_dataframe(mode="minimal")[f"pred_{fine}"].astype(str).to_numpy()
        row = {"case": case, "seed": seed, "f1": f1_score(t, pred, labels=labels, average="macro"),
               "kU": unknown[~novel].mean(), "nU": unknown[novel].mean() if novel.any() else np.nan}
        for T in THRESHOLDS:
            flagged = unknown | (around > T)
            row[f"d{T}"] = f1_score(t, np.where(flagged, "Unknown", pred), labels=labels, average="macro") - row["f1"]
            row[f"kU{T}"] = flagged[~novel].mean()
            row[f"nU{T}"] = flagged[novel].mean() if novel.any() else np.nan
        rows.append(row)
        print(case, seed, flush=True)
        pd.DataFrame(rows).to_csv(out, index=False)
    table = pd.DataFrame(rows).groupby("case").mean(numeric_only=True)
    for T in THRESHOLDS:
        print(f"T={T}: finest change {table[f'd{T}'].mean():+.4f} (worst {table[f'd{T}'].min():+.3f}, {table[f'd{T}'].idxmin()}); "
              f"removed-type cases >= 50% novel -> Unknown: {(table[f'nU{T}'] >= 0.5).sum()}; "
              f"cases > 5% known -> Unknown: {(table[f'kU{T}'] > 0.05).sum()}")


if __name__ == "__main__":
    main()
