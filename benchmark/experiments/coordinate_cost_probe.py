"""Predict time with coordinates placed by the heads vs the nearest reference cells, same model, same run.

Semi-synthetic references (``benchmark.cases.make_synthetic``: 10k / 20k reference cells, 2,000 query cells),
a 2-D coordinate target (the reference's first two principal components, a stand-in: the cost does not depend
on the values), ``predict`` three times each way alternately on 2 threads; prints the times and the median
ratio.

    PYTHONPATH=$PWD python benchmark/experiments/coordinate_cost_probe.py 10000,20000 WORKDIR
"""
import sys
import time
import warnings
from pathlib import Path

import numpy as np, anndata as ad, scanpy as sc
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cases
import atlasmtl
warnings.filterwarnings("ignore")
for n in [int(a) for a in sys.argv[1].split(",")]:
    out = Path(sys.argv[2]) / f"synthetic_{n}"
    if not (out / "ref.h5ad").exists():
        cases.make_synthetic(out, n)
    ref = ad.read_h5ad(out / "ref.h5ad")
    query = ad.read_h5ad(out / "query.h5ad")
    x = ref.copy(); sc.pp.pca(x, n_comps=2)
    ref.obsm["X_umap"] = x.obsm["X_pca"]
    model = atlasmtl.build_model(ref, ["cluster_coarse", "cluster_fine"], coord_targets={"umap": "X_umap"}, random_state=0,
                                 num_threads=2, show_progress=False, show_summary=False)
    times = {"heads": [], "neighbours": []}
    for rep in range(3):
        for how in ("heads", "neighbours"):
            t = time.perf_counter()
            atlasmtl.predict(model, query, coordinates=how, num_threads=2, show_progress=False, show_summary=False)
            times[how].append(time.perf_counter() - t)
    print(n, query.n_obs, {k: [round(v, 3) for v in vs] for k, vs in times.items()},
          "median ratio", round(np.median(times["neighbours"]) / np.median(times["heads"]), 3), flush=True)
