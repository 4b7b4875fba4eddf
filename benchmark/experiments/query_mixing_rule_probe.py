"""Issue 9: the query-mixing share (``query_mixing_probe.py``) as a flag, on every case.

Research probe (2026-12-06, forty-second session; not built: API contract, "Measured 2026-12-06, forty-second
session"). Per case and seed, with the default model: the smoothed mixing share ``s`` of each query cell (its
30 nearest pooled cells, the held-out reference cells on the other side; averaged over its 30 nearest query
cells), and the query's location ``L``, the median over the called finest classes with at least 20 query
cells of each class's 25th percentile of ``s`` (as the novelty scores are located, so that a query that mixes
with nothing is not flagged wholesale). With ``--composition``, each held-out reference cell counts ``w_c``
times in the share, ``w_c`` = (share of the query's cells called ``c``) / (share of the held-out cells of true class
``c``), capped to [0.1, 10] and scaled to mean 1, so that a known class the query holds more of than the
reference mixes again. A rule ``<which>_<threshold>_<Lmax>`` would make a labelled finest call
Unknown where ``s > threshold`` and ``L < Lmax``, for calls into a class the input view does not score
(``unscored``, under 50 kept cells) or into any class (``any``). Written per case, seed and rule (CSV): the
novel cells, those already Unknown, those the rule adds (``new_novel``), and the known cells it would make
Unknown (``new_known``; ``new_known_right``: of them, calls that were right).

    PYTHONPATH=$PWD python benchmark/experiments/query_mixing_rule_probe.py <case,case,...> 0 out.csv [MODELS] [--composition]
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import query_mixing_probe as mixing  # noqa: E402
from study_scores import default_models, keep_view_points  # noqa: E402
import atlasmtl  # noqa: E402
from atlasmtl import novelty  # noqa: E402

RULES = [(which, threshold, l_max) for which in ("unscored", "any") for threshold in (0.9, 0.95) for l_max in (0.7, 0.8)]


def main() -> None:
    composition = "--composition" in sys.argv
    args = [a for a in sys.argv if a != "--composition"]
    cases, seeds, out = args[1].split(","), [int(s) for s in args[2].split(",")], Path(args[3])
    models = Path(args[4]) if len(args) > 4 else Path("/work/bench_models")
    state: dict = {}
    keep_view_points(state)
    rows = []
    for case, seed, spec, ref, query, truth, model in default_models(cases, seeds, work=Path("/work/bench_work"),
                                                                    models=models):
        result = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        frame = result.to_dataframe(mode="full")
        query_points = state["points"].copy()
        held = ref[~np.asarray(model.reference["training_cell"], bool)]
        atlasmtl.predict(model, held, show_progress=False, show_summary=False)
        n = novelty.InputView(model.metadata["novelty"]["input_view"]).n_components
        fine = spec["levels"][-1]
        weights = None
        if composition:
            held_labels = held.obs[fine].astype(str).to_numpy()
            called = frame[f"pred_{fine}_raw"].astype(str).value_counts(normalize=True)
            own = pd.Series(held_labels).value_counts(normalize=True)
            weights = np.clip(np.array([called.get(c, 0.0) / own[c] for c in held_labels]), 0.1, 10.0)
            weights /= weights.mean()
        _, smooth = mixing.mixing_share(query_points[:, :n], state["points"][:, :n], reference_weights=weights)
        scored = result.metadata["reference_classes"][fine]["input_view"]
        unscored = [c for c, v in zip(model.classes[fine], scored) if not v]
        raw = frame[f"pred_{fine}_raw"].astype(str).to_numpy()
        pred = frame[f"pred_{fine}"].astype(str).to_numpy()
        labels = truth.loc[query.obs_names, fine].astype(str).to_numpy()
        novel = np.isin(labels, (spec.get("novel") or {}).get(fine, []))
        quartiles = [np.quantile(smooth[raw == c], 0.25) for c in np.unique(raw) if (raw == c).sum() >= 20]
        location = float(np.median(quartiles)) if quartiles else float(np.median(smooth))
        for which, threshold, l_max in RULES:
            into = np.isin(raw, unscored) if which == "unscored" else np.ones(len(raw), bool)
            flag = into & (smooth > threshold) & (location < l_max) & (pred != "Unknown")
            rows.append({"case": case, "seed": seed, "rule": f"{which}_{threshold}_{l_max}", "L": round(location, 3),
                         "n_novel": int(novel.sum()), "novel_unknown": int(((pred == "Unknown") & novel).sum()),
                         "new_novel": int((flag & novel).sum()), "n_known": int((~novel).sum()),
                         "new_known": int((flag & ~novel).sum()),
                         "new_known_right": int((flag & ~novel & (pred == labels)).sum())})
        print(case, seed, "L", round(location, 3), flush=True)
    pd.DataFrame(rows).to_csv(out, index=False)


if __name__ == "__main__":
    main()
