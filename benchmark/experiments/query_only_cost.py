"""What the query-only check costs at prediction, as a ratio in one process (research; forty-second session).

The default model of a case (``MODELS/<case>_<seed>.pth``, given the held-out record post hoc as
``query_only_posthoc.add_held_out`` does) predicts a query of ``N`` cells drawn with replacement from the case's
query (each drawn cell's counts binomially thinned to 90%, so no two are equal), alternately with the check
switched off (``prediction.QUERY_ONLY_SHARE = None``) and on, ``R`` times each; printed: the median seconds of
each and their ratio, and whether the calls of the two differ only where the check flags.

    PYTHONPATH=$PWD python benchmark/experiments/query_only_cost.py <case> <seed> <N> [R] [MODELS]
"""
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from query_only_posthoc import add_held_out  # noqa: E402
from study_scores import default_models  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.prediction as prediction  # noqa: E402


def main() -> None:
    case, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    models = Path(sys.argv[5]) if len(sys.argv) > 5 else Path("/work/bench_models")
    for _, _, spec, ref, query, _, model in default_models([case], [seed], work=Path("/work/bench_work"), models=models,
                                                           train=False):
        add_held_out(model, ref)
        full = ad.read_h5ad(Path("/work/bench_work/cases") / case / "query.h5ad")
        counts = sp.csr_matrix(full.layers["counts"])
        rng = np.random.default_rng(0)
        drawn = counts[rng.integers(0, counts.shape[0], size=n)].tocsr().astype(np.float32)
        drawn.data = rng.binomial(drawn.data.astype(np.int64), 0.9).astype(np.float32)
        drawn.eliminate_zeros()
        big = ad.AnnData(X=drawn, var=full.var[[]].copy())
        big.obs_names = [f"c{i}" for i in range(n)]
        times = {"off": [], "on": []}
        results = {}
        shipped = prediction.QUERY_ONLY_SHARE
        for _ in range(repeats):
            for label, value in (("off", None), ("on", shipped)):
                prediction.QUERY_ONLY_SHARE = value
                t = time.perf_counter()
                results[label] = atlasmtl.predict(model, big, show_progress=False, show_summary=False, num_threads=2)
                times[label].append(time.perf_counter() - t)
        prediction.QUERY_ONLY_SHARE = shipped
        fine = spec["levels"][-1]
        off, on = (float(np.median(times[k])) for k in ("off", "on"))
        changed = results["off"].levels[fine].pred != results["on"].levels[fine].pred
        print(f"{case} seed {seed}, {n} query cells, {repeats} runs each: off {off:.2f} s, on {on:.2f} s, ratio "
              f"{on / off:.3f}; calls changed {int(changed.sum())}, all of them withdrawn "
              f"{bool(np.all(results['on'].levels[fine].pred[changed] == -1))}; record {results['on'].metadata.get('query_only')}")


if __name__ == "__main__":
    main()
