"""Issue 10: does a majority vote among each query cell's neighbours *in the query* (as CellTypist's
``majority_voting`` does over query clusters) make the calls more accurate?

Research script. Per case and seed, the default model (trained, or loaded from ``--models``) predicts at the
defaults; the query's own neighbours come from a PCA of the query alone (``scanpy.pp.pca``, 50 components,
on its log1p CP10k values; sparse, implicitly centred), ``k`` nearest by Euclidean distance, the cell
included. Each cell's *path* of calls (one label per level, Unknown included, so the levels stay
consistent) is replaced by the most frequent path among its neighbourhood when that path holds more than
half of it (else the cell keeps its own):

- ``vote<k>``: every cell;
- ``vote<k>_doubtful``: only cells whose finest call is low-confidence or Unknown;

and ``default`` (the calls as predicted). Rows in ``threshold_table.py``'s format.

    PYTHONPATH=$PWD python benchmark/experiments/query_vote_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import copy
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import scanpy as sc
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402

KS = (10, 30)


def query_neighbours(query, ks):
    """Per ``k`` of ``ks``: each query cell's ``k`` nearest query cells (itself first) in one PCA of the query."""
    q = query.copy()
    sc.pp.pca(q, n_comps=min(50, min(q.shape) - 1), random_state=0)
    nn = NearestNeighbors(n_neighbors=min(max(ks), q.n_obs)).fit(q.obsm["X_pca"])
    nbr = nn.kneighbors(q.obsm["X_pca"], return_distance=False)
    return {k: nbr[:, :k] for k in ks}


def voted(result, levels, nbr, only=None):
    """``result`` with its per-level calls replaced by the neighbourhood's majority path."""
    codes = np.stack([np.asarray(result.levels[lv].pred) for lv in levels], axis=1)
    paths = [tuple(row) for row in codes]
    new = codes.copy()
    for i, row in enumerate(nbr):
        if only is not None and not only[i]:
            continue
        path, n = Counter(paths[j] for j in row).most_common(1)[0]
        if n > len(row) / 2:
            new[i] = path
    for j, lv in enumerate(levels):  # changed in place (the caller passes a copy)
        result.levels[lv].pred = new[:, j].astype(result.levels[lv].pred.dtype)
        result.levels[lv].is_unknown = new[:, j] < 0
    return result


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        levels = spec["levels"]
        row = {"case": case, "seed": seed, "K": "auto"}
        res = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        row["default"] = score_result(res, truth, spec)
        fine = levels[-1]
        doubtful = np.asarray(res.levels[fine].is_low_conf) | (np.asarray(res.levels[fine].pred) < 0)
        for k, nbr in query_neighbours(query, KS).items():
            for name, only in ((f"vote{k}", None), (f"vote{k}_doubtful", doubtful)):
                row[name] = score_result(voted(copy.deepcopy(res), levels, nbr, only), truth, spec)
        print_progress(case, seed, row, fine)
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
