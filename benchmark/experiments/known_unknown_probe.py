"""Issue 9: when atlasmtl calls a cell of a known type ``Unknown``, was the network's call right?

Research probe. Issue 9 asks for at most 5% of known cells ``Unknown``. An abstention costs nothing where the
call it withholds was wrong; it costs a right label where the call was right. Per case and seed, the saved
default model (``MODELS/<case>_<seed>.pth``) predicts the query at the defaults; for every level, the query cells
whose true type the reference holds (at that level) and that end ``Unknown`` are counted by why (a novelty
flag, else low confidence without a KNN vote that confirms the call, else the hierarchy or no signal) and by
whether the network's own call (``raw``) was right. Prints one line per case and level (summed over seeds) and
writes the rows as CSV.

    PYTHONPATH=$PWD python benchmark/experiments/known_unknown_probe.py <case,case,...> 0,1,2 out.csv MODELS [WORK]
"""
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import probe_arguments  # noqa: E402
from study_scores import default_models  # noqa: E402
import atlasmtl  # noqa: E402


def main() -> None:
    cases, seeds, out, models, work = probe_arguments(sys.argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = []
    for case, seed, spec, _, query, truth, model in default_models(cases, seeds, work=work, models=models,
                                                                   train=False, reference=False):
        res = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        for level in spec["levels"]:
            calls, classes = res.levels[level], list(res.classes[level])
            t = truth[level].astype(str).to_numpy()
            known = np.isin(t, classes)
            raw = np.array([classes[c] for c in calls.raw])
            unknown = calls.is_unknown & known
            novel = unknown & calls.is_novel
            low = unknown & ~calls.is_novel & ~(calls.conf >= 0.4)  # below confidence_low, no vote confirmed it
            right = raw == t
            rows.append({"case": case, "seed": seed, "level": level, "fine": level == spec["levels"][-1],
                         "known": int(known.sum()), "unknown": int(unknown.sum()),
                         "unknown_raw_right": int((unknown & right).sum()),
                         "novel": int(novel.sum()), "novel_raw_right": int((novel & right).sum()),
                         "low": int(low.sum()), "low_raw_right": int((low & right).sum()),
                         "accuracy_known": float(right[known].mean()) if known.any() else float("nan")})
    df = pd.DataFrame(rows)
    df.to_csv(out, index=False)
    agg = df.groupby(["case", "level"], sort=False).sum(numeric_only=True)
    for (case, level), r in agg.iterrows():
        if not r["known"]:
            continue
        print(f"{case:34s} {level:18s} known→Unknown {r['unknown'] / r['known']:.3f}; of them raw right "
              f"{r['unknown_raw_right'] / max(r['unknown'], 1):.2f} (novel flag {int(r['novel'])}, right "
              f"{int(r['novel_raw_right'])}; low confidence {int(r['low'])}, right {int(r['low_raw_right'])}); "
              f"raw accuracy on known {r['accuracy_known'] / len(seeds):.3f}")


if __name__ == "__main__":
    main()
