"""How nested levels are decoded, measured on default models trained once (research script).

The default (:func:`atlasmtl.hierarchy.decode_paths`) calls the reference path with the largest product of the
levels' calibrated probabilities. Under that product as a joint distribution over paths, the Bayes call at a
coarse level is the argmax of its *marginal* (the sum over the paths through each coarse class), which the
best single path need not agree with when the fine head spreads its mass over several children of one parent.
Variants (each patches ``atlasmtl.prediction.decode_paths``):

- ``path``: the default.
- ``topdown``: level by level from the coarsest, the class with the largest marginal among the paths that
  agree with the levels already called; so the finest call is the best path under the called parents.
- ``pooled_*``: each coarse level's probabilities are the mean of its head's and the finest head's summed over
  each class's leaves, then ``path`` or ``topdown``.
- ``leaves_path``, ``pooled75_path`` (added 2026-12-04): the same with the finest head's sums alone (weight 1,
  the coarse head ignored) or weighted 0.75, then ``path``.

``ATLASMTL_STUDY_VARIANTS=path,leaves_path`` runs only those variants.

Rows in ``threshold_table.py``'s format:

    PYTHONPATH=$PWD python benchmark/experiments/hierarchy_decode_study.py <case,case,...> 0,1,2 out.json --models DIR
    python benchmark/experiments/threshold_table.py out.json
"""
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.prediction as prediction  # noqa: E402
from atlasmtl.hierarchy import decode_paths, path_log_scores  # noqa: E402


def decode_topdown(probs, runs):
    codes = [np.empty(0, dtype=np.int64)] * len(probs)
    for first, last, paths in runs:
        if first == last:
            codes[first] = probs[first].argmax(axis=1)
            continue
        score = path_log_scores(probs, first, last, paths)
        joint = np.exp(score - score.max(axis=1, keepdims=True))
        alive = np.ones_like(joint, dtype=bool)
        for m in range(first, last + 1):
            col = paths[:, m - first]
            n_cls = probs[m].shape[1]
            masked = np.where(alive, joint, 0.0)
            marginal = np.zeros((len(joint), n_cls))
            for c in range(n_cls):
                marginal[:, c] = masked[:, col == c].sum(axis=1)
            codes[m] = marginal.argmax(axis=1)
            alive &= col[None, :] == codes[m][:, None]
    return codes


def pool_coarse(probs, runs, weight=0.5):
    """Each non-finest level of a run: the mean of its head's probabilities and the finest head's summed over
    each class's leaves (two estimates of the same distribution; the leaves' weighted ``weight``), written in
    place so the calls' confidence uses them too."""
    for first, last, paths in runs:
        for m in range(first, last):
            leaves = np.zeros_like(probs[m])
            for c in range(probs[m].shape[1]):
                leaves[:, c] = probs[last][:, paths[:, m - first] == c].sum(axis=1)
            probs[m][:] = (1.0 - weight) * probs[m] + weight * leaves


def pooled(decoder, weight=0.5):
    def fn(probs, runs):
        pool_coarse(probs, runs, weight)
        return decoder(probs, runs)
    return fn


VARIANTS = {"path": decode_paths, "topdown": decode_topdown, "pooled_path": pooled(decode_paths),
            "pooled_topdown": pooled(decode_topdown), "leaves_path": pooled(decode_paths, 1.0),
            "pooled75_path": pooled(decode_paths, 0.75)}
if os.environ.get("ATLASMTL_STUDY_VARIANTS"):
    VARIANTS = {k: VARIANTS[k] for k in os.environ["ATLASMTL_STUDY_VARIANTS"].split(",")}


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        row = {"case": case, "seed": seed, "K": "auto"}
        for name, fn in VARIANTS.items():
            prediction.decode_paths = fn
            row[name] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)
        prediction.decode_paths = decode_paths
        print_progress(case, seed, row, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
