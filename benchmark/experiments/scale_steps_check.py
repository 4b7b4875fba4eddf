"""Issue 13, item 4: is the finest macro-F1 at 1M reference cells below 100k's because of the optimiser steps?

Research script. The semi-synthetic scale references resample the same ~1,000 real Kang cells (binomial thinning),
so 1M cells hold no more distinct profiles than 100k; at a fixed number of epochs the 1M model takes ten times
the optimiser steps over them. Each item ``case:epochs:seed[:weight_decay]`` trains one model at the defaults
otherwise (two threads) and predicts the scale query with ``knn_correction`` = ``low_conf_only`` (the default),
``off`` and ``all``; prints training time and finest macro-F1. Cases are read from
``$ATLASMTL_SCALE_WORK/cases`` (default ``/work/bench_scale``, where ``benchmark/scale.py --work`` writes them).

    PYTHONPATH=$PWD python benchmark/experiments/scale_steps_check.py synthetic_1m:4:0,synthetic_100k:400:0,synthetic_100k:40:0
"""
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atlasmtl  # noqa: E402
from atlasmtl.metrics import macro_f1  # noqa: E402
from common import read_study_case  # noqa: E402

warnings.filterwarnings("ignore")
for item in sys.argv[1].split(","):
    case, epochs, seed, wd = (item.split(":") + ["0"])[:4]
    spec, ref, query, truth = read_study_case(Path(os.environ.get("ATLASMTL_SCALE_WORK", "/work/bench_scale")) / "cases" / case)
    levels = spec["levels"]
    y = truth.loc[query.obs_names, levels[-1]].astype(str).to_numpy()
    start = time.perf_counter()
    model = atlasmtl.build_model(ref, levels, num_epochs=int(epochs), weight_decay=float(wd), random_state=int(seed),
                                 num_threads=2, show_progress=False, show_summary=False)
    seconds = time.perf_counter() - start
    f1 = {}
    for knn in ("low_conf_only", "off", "all"):
        res = atlasmtl.predict(model, query, knn_correction=knn, show_progress=False, show_summary=False)
        f1[knn] = round(macro_f1(y, np.asarray(res.labels(levels[-1])).astype(str)), 4)
    print(case, "epochs", epochs, "weight_decay", wd, "seed", seed, "n_ref", ref.n_obs, "train %.1f s" % seconds,
          "finest macro-F1", f1, flush=True)
    del model, ref, query
