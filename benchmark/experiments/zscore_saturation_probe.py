"""How many of a cell's z-score inputs sit at the clip, reference against query (research script).

The ``"zscore"`` input gives a gene detected in a fraction ``f`` of the reference's cells ``z ≈ 1/sqrt(f)`` in a
cell that expresses it, so the genes a reference rarely detects sit at the clip (±``genes.ZSCORE_CLIP``). A query
that detects more genes than the reference has many more such values per cell than any training cell. Per case,
with a saved model's own gene alignment and statistics (the exact network input), the median over cells of the
number of inputs at ``z ≥ 5`` and at the clip, for the reference and for the query:

    PYTHONPATH=$PWD python benchmark/experiments/zscore_saturation_probe.py <case,case,...> MODELS [WORK]

``MODELS`` holds ``<case>_0.pth`` (``study_scores.default_models``); ``WORK`` defaults to ``/work/bench_work``.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atlasmtl.genes import ZSCORE_CLIP  # noqa: E402
from atlasmtl.inputs import get_matrix_source  # noqa: E402
from atlasmtl.prediction import prepare_query  # noqa: E402
from study_scores import default_models  # noqa: E402


def per_cell_counts(model, adata) -> tuple[float, float]:
    """Median over cells of the inputs at z ≥ 5 and at the clip (model genes; zeros never reach either)."""
    source = get_matrix_source(adata)
    aligner, _, _ = prepare_query(model, source, None, 0.0)
    x = aligner.sparse_input(source.rows(np.arange(adata.n_obs)))  # offsets f(x) - f(0), non-zero where x is
    x.data += aligner.zero_input()[x.indices]  # back to f(x) on the detected genes
    row = np.repeat(np.arange(adata.n_obs), np.diff(x.indptr))
    big = np.bincount(row, weights=x.data >= 5.0, minlength=adata.n_obs)
    clipped = np.bincount(row, weights=x.data >= ZSCORE_CLIP - 1e-6, minlength=adata.n_obs)
    return float(np.median(big)), float(np.median(clipped))


def main() -> None:
    cases, models = sys.argv[1].split(","), Path(sys.argv[2])
    work = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/work/bench_work")
    print("| case | reference: z ≥ 5 / at the clip | query: z ≥ 5 / at the clip |\n|---|---|---|")
    for case, _, _, ref, query, _, model in default_models(cases, [0], work=work, models=models, train=False):
        r, q = per_cell_counts(model, ref), per_cell_counts(model, query)
        print(f"| {case} | {r[0]:.0f} / {r[1]:.0f} | {q[0]:.0f} / {q[1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
