"""Issue 10 (accuracy under shifts): leave out of the network's input the genes the query detects far more
broadly than the reference (research script).

Another protocol or species detects some genes in many more cells than the reference does (capture biases,
orthologues that are expressed differently). The network weighs such a gene by what it meant in the
reference, so a query cell that expresses it leans toward the reference classes that did. Training zeroes a
random 0–30% of the genes of every minibatch (``augment=True``), so the network is used to genes that read
zero. Here the query's counts of the genes whose detection rate (share of cells with a count) is more than
``2^t`` times the reference's are set to zero before prediction (genes detected in under 5% of the query's
cells are kept). The novelty null and everything downstream are as shipped. Variants ``t1``, ``t2``, ``t3``
(``t`` = 1, 2, 3). Post hoc on the default models.

    PYTHONPATH=$PWD python benchmark/experiments/query_shifted_genes_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
from atlasmtl.genes import GeneAligner  # noqa: E402
from atlasmtl.inputs import get_matrix_source  # noqa: E402
from atlasmtl.prediction import prepare_query  # noqa: E402

VARIANTS = {"t1": 1.0, "t2": 2.0, "t3": 3.0}
MIN_QUERY_RATE = 0.05
STATE: dict = {"keep": None}
_sparse_values = GeneAligner._sparse_values


def sparse_values(self, block):
    out = _sparse_values(self, block)
    if STATE["keep"] is not None:
        out.data *= STATE["keep"][out.indices]
        out.eliminate_zeros()
    return out


GeneAligner._sparse_values = sparse_values


def detection_rate(model, adata, chunk: int = 4096) -> np.ndarray:
    """Per model gene, the share of ``adata``'s cells with a non-zero value."""
    aligner, _, _ = prepare_query(model, get_matrix_source(adata), None, 0.0)
    nnz = np.zeros(aligner.n_model_genes)
    for start in range(0, adata.n_obs, chunk):
        block = adata.X[start:start + chunk]
        nnz += aligner._sparse_values(block if sp.issparse(block) else sp.csr_matrix(block)).getnnz(axis=0)
    return nnz / adata.n_obs


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        row = {"case": case, "seed": seed, "K": "auto"}
        row["default"] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)
        q, r = detection_rate(model, query), detection_rate(model, ref)
        for name, t in VARIANTS.items():
            drop = (q >= MIN_QUERY_RATE) & (q > (2.0 ** t) * r)
            STATE["keep"] = (~drop).astype(np.float32)
            try:
                row[name] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False),
                                         truth, spec)
            finally:
                STATE["keep"] = None
            row[name]["genes_dropped"] = int(drop.sum())
        print_progress(case, seed, row, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
