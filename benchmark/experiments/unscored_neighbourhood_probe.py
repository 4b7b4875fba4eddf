"""Issue 9: could a lower neighbourhood threshold flag a missing type called as a class the input view cannot judge?

Research probe (API contract, "Measured 2026-12-05, thirty-fourth session"). The input view scores only classes
with at least ``novelty.INPUT_VIEW_MIN_MEMBERS`` kept training cells; a query cell called as a smaller class is
judged by the embedding alone, whose z is compressed for a type the network never saw (Symphony B removed: called
DC / HSC, neighbourhood novelty 1–2, under the 3.5 that flags). Per case and seed, the default model
(``MODELS/<case>_<seed>.pth``) predicts at the defaults; for every query cell whose raw finest call is such a class,
one row: the case, seed, call, truth, whether the truth is a reference class (``known``), whether the call is right,
the cell's ``neighbourhood_novelty`` and ``novelty`` at the finest level, whether it ends Unknown, its confidence.
The question is whether any threshold on ``neighbourhood_novelty`` separates the novel rows from the known ones.

    PYTHONPATH=$PWD python benchmark/experiments/unscored_neighbourhood_probe.py <case,case,...> 0,1,2 out.csv MODELS

(cases are read from $ATLASMTL_STUDY_WORK/cases, default /work/bench_work/cases)
"""
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import default_models  # noqa: E402
import atlasmtl  # noqa: E402


WORK = Path(os.environ.get("ATLASMTL_STUDY_WORK", "/work/bench_work"))


def probe(cases: list[str], seeds: list[int], models: Path) -> pd.DataFrame:
    rows = []
    for case, seed, spec, _, query, truth, model in default_models(cases, seeds, work=WORK, models=models,
                                                                   train=False, reference=False):
        level = spec["levels"][-1]
        result = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        calls, classes = result.levels[level], result.classes[level]
        scored = result.metadata["reference_classes"][level]["input_view"]
        if scored is None:  # a model without an input view
            continue
        true = truth[level].astype(str).to_numpy()
        unscored = ~np.asarray(scored, dtype=bool)[calls.raw]
        for i in np.flatnonzero(unscored):
            rows.append({"case": case, "seed": seed, "call": classes[calls.raw[i]], "truth": true[i],
                         "known": bool(true[i] in classes), "right": bool(classes[calls.raw[i]] == true[i]),
                         "neighbourhood": float(calls.neighbourhood_novelty[i]), "z": float(calls.novelty[i]),
                         "unknown": bool(calls.is_unknown[i]), "conf": float(calls.conf[i])})
        print(case, seed, "calls into unscored classes:", int(unscored.sum()), flush=True)
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame, thresholds=(1.0, 1.25, 1.5, 2.0)) -> str:
    """Per case, novel / known rows: median and maximum neighbourhood novelty, share above each threshold."""
    groups = frame.groupby(["case", "known"])
    table = groups["neighbourhood"].agg(["size", "median", "max"]).round(2)
    for t in thresholds:
        table[f"> {t:g}"] = groups["neighbourhood"].apply(lambda v, t=t: float((v > t).mean())).round(3)
    return table.to_string()


if __name__ == "__main__":
    torch.set_num_threads(1)
    cases, seeds, out = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3])
    frame = probe(cases, seeds, Path(sys.argv[4]))
    frame.to_csv(out, index=False)
    print(summarise(frame))
