"""Issue 9: the query-only check (``novelty.QUERY_ONLY_SHARE``) where the held-out cells barely represent a small
class, as in a large reference, and the guard ``novelty.QUERY_ONLY_MIN_HELD`` against it.

Research probe (2026-12-06, forty-third session; API contract, "Measured 2026-12-06, forty-third session"). The
check reads the model's held-out reference cells (the calibration split: ``floor(fraction * n)`` cells of an
``n``-cell class, ``fraction`` = min(0.2, 5,000 / the reference's cells)). The benchmark's references hold at most
1,200 cells (fraction 0.2); a class the input view does not score (< 50 cells) keeps at most 9 held-out cells, 1-2
at 100,000 reference cells and none past ~250,000. On the stored default models (the held record added post hoc,
``query_only_posthoc.add_held_out``), the held-out cells of every class the view does not score are thinned as a
larger reference's split would hold them: ``full`` (as stored), ``quarter`` (``floor(h / 4)`` of a class's ``h``:
fraction 0.05, ~100,000 cells), ``none`` (fraction < 0.02, past ~250,000 cells); each under the guard
``QUERY_ONLY_MIN_HELD`` = None (the check of the forty-second session), 1, 2 and 3 (labels ``<thinning>_g<guard>``;
with ``none`` only None and 1, the others being equal to 1 there).

    PYTHONPATH=$PWD python benchmark/experiments/query_only_held_thinning_probe.py <case,case,...> 0,1,2 out.json [--models DIR]
    PYTHONPATH=$PWD:$PWD/benchmark python benchmark/experiments/threshold_table.py --tradeoff out.json
"""
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import query_only_posthoc  # noqa: E402
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.prediction as prediction  # noqa: E402
from atlasmtl.novelty import InputView  # noqa: E402

GUARDS = (None, 1, 2, 3)


def thinned(calls: np.ndarray, small: np.ndarray, thinning: str, rng: np.random.Generator) -> np.ndarray:
    """Which held-out cells stay: all of a scored class's; ``floor(h / 4)`` (``quarter``) or none of a small one's."""
    keep = np.ones(len(calls), dtype=bool)
    if thinning != "full":
        for c in np.flatnonzero(small):
            own = rng.permutation(np.flatnonzero(calls == c))
            keep[own[len(own) // 4 if thinning == "quarter" else 0:]] = False
    return keep


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        query_only_posthoc.add_held_out(model, ref)
        view = model.metadata["novelty"]["input_view"]
        held, fine = view["held"], model.label_columns[-1]
        small = ~InputView(view).scores(fine, len(model.classes[fine]))
        rng = np.random.default_rng(seed)
        row, flagged = {"case": case, "seed": seed, "K": "auto"}, {}
        for thinning in ("full", "quarter", "none"):
            keep = thinned(held["calls"], small, thinning, rng)
            view["held"] = {"points": held["points"][keep], "calls": held["calls"][keep]}
            for guard in GUARDS if thinning != "none" else GUARDS[:2]:
                prediction.QUERY_ONLY_MIN_HELD = guard
                result = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
                row[f"{thinning}_g{guard}"] = score_result(result, truth, spec)
                flagged[f"{thinning}_g{guard}"] = (result.metadata.get("query_only") or {}).get("flagged")
        prediction.QUERY_ONLY_MIN_HELD = GUARDS[-1]
        view["held"] = held
        print_progress(case, seed, row, spec["levels"][-1])
        row["flagged"] = json.dumps(flagged)  # a string: threshold_table reads every dict in a row as a label
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
