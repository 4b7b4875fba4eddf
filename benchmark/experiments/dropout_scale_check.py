"""Issue 10: ``dropout_rate`` 0.3 against 0.5 on the semi-synthetic scale references (one network at 100k, six at 20k).

Research script. Per case, seeds 0 and 1: a model at the defaults with each dropout rate (two threads), predicted at
the defaults and with ``knn_correction="off"``; prints training time and macro-F1 per level. Cases are read from
``$ATLASMTL_SCALE_WORK/cases`` (default ``/work/bench_scale``, where ``benchmark/scale.py --work`` writes them).

    PYTHONPATH=$PWD python benchmark/experiments/dropout_scale_check.py synthetic_100k,synthetic_20k
"""
import os
import sys, time, warnings
warnings.filterwarnings('ignore')
sys.path.insert(0, 'benchmark')
from pathlib import Path
import numpy as np
import atlasmtl
from common import read_study_case
from atlasmtl.metrics import macro_f1
for case in sys.argv[1].split(','):
    spec, ref, query, truth = read_study_case(Path(os.environ.get('ATLASMTL_SCALE_WORK', '/work/bench_scale')) / 'cases' / case)
    levels = spec['levels']
    tt = {lv: truth.loc[query.obs_names, lv].astype(str).to_numpy() for lv in levels}
    for seed in (0, 1):
        for d in (0.3, 0.5):
            t = time.perf_counter()
            m = atlasmtl.build_model(ref, levels, dropout_rate=d, random_state=seed, num_threads=2, show_progress=False, show_summary=False)
            el = time.perf_counter() - t
            r = atlasmtl.predict(m, query, show_progress=False, show_summary=False)
            f = {lv: round(macro_f1(tt[lv], np.asarray(r.labels(lv)).astype(str)), 4) for lv in levels}
            off = atlasmtl.predict(m, query, knn_correction='off', show_progress=False, show_summary=False)
            fo = round(macro_f1(tt[levels[-1]], np.asarray(off.labels(levels[-1])).astype(str)), 4)
            print(case, 'seed', seed, 'dropout', d, 'members', m.metadata.get('architecture', {}).get('ensemble_size'), 'train %.1f s' % el, 'macro-F1', f, 'finest off', fo, flush=True)
