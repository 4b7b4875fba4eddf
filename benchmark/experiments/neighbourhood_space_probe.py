"""Issue 9: in which space should the neighbourhood novelty find a cell's query neighbours?

Research probe for ``predict``'s ``neighbourhood_novelty`` (API contract, "Neighbourhood novelty: evidence").
Per removed-type case and seed, the default model (``MODELS/<case>_<seed>.pth``, e.g. those
``study_scores.default_models`` saves) predicts at the defaults; the AUROC, novel vs known cells, of the
finest level's scores:

- ``cell``: the per-cell novelty z (``novelty``; NaN set to the median);
- ``shipped``: ``neighbourhood_novelty`` as shipped (``neighbourhood_k`` = 30 neighbours in the input view's
  PCA of the network input, which prediction already computes for every cell);
- ``query_pca``: the same mean over 30 neighbours found in a PCA of the query alone
  (``query_vote_study.query_neighbours``: 50 components on its log1p CP10k values), which needs a pass of
  its own over the whole query (the sixteenth session's probe, ``novelty_query_smoothing_probe.py``).

    PYTHONPATH=$PWD python benchmark/experiments/neighbourhood_space_probe.py <case,case,...> 0,1 MODELS [WORK]
"""
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import open_set_truth  # noqa: E402
from query_vote_study import query_neighbours  # noqa: E402
from study_scores import default_models  # noqa: E402
import atlasmtl  # noqa: E402

K = 30


def main() -> None:
    warnings.filterwarnings("ignore")
    cases, seeds, models = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3])
    work = Path(sys.argv[4]) if len(sys.argv) > 4 else Path("/work/bench_work")
    print("case,seed,cell,shipped,query_pca")
    own: dict[str, np.ndarray] = {}
    for case, seed, spec, _, query, truth, model in default_models(cases, seeds, work=work, models=models,
                                                                   train=False, reference=False):
        novel = open_set_truth(spec, truth)[0]
        fine = spec["levels"][-1]
        if case not in own:  # once per case (only the current case's is kept)
            own = {case: query_neighbours(query, [K])[K]}
        calls = atlasmtl.predict(model, query, show_progress=False, show_summary=False).levels[fine]
        z = np.asarray(calls.novelty, dtype=np.float64)
        z = np.nan_to_num(z, nan=float(np.nanmedian(z)))
        around = np.asarray(calls.neighbourhood_novelty, dtype=np.float64)
        around = np.nan_to_num(around, nan=float(np.nanmedian(around)))
        print(f"{case},{seed},{roc_auc_score(novel, z):.3f},{roc_auc_score(novel, around):.3f},"
              f"{roc_auc_score(novel, z[own[case]].mean(axis=1)):.3f}", flush=True)


if __name__ == "__main__":
    main()
