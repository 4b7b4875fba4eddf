"""The novelty input view without the genes a query detects far more broadly than its reference (research
script; patches atlasmtl in this process only; post-hoc, the default models).

Another protocol or species detects some genes in a large share of the query's cells that the reference
rarely detects (``zscore_saturation_probe.py``: brain human → mouse, 142 inputs per query cell at the clip
against 11 per reference cell), and the input view then puts known cells far from their class. A type the
reference lacks raises its own markers only in its own cells. The switch tried: a gene detected in more than
``A`` of the query's cells and more than ``B`` times the share of reference cells that detect it is left out
of the view's projection of the query (its offset input set to 0, as in a cell that does not detect it, which
is what almost every reference cell of the view looks like there). The network, its calls and the embedding's
scores are unchanged.

    PYTHONPATH=$PWD python benchmark/experiments/view_shifted_genes_study.py <case,case,...> 0,1,2 out.json --models DIR [--rule 0.2,5]

Rows in ``threshold_table.py``'s format, label ``mask<A>_<B>`` (and ``_off``); compare with the default
models' own rows (``neighbourhood_flags_22cases_seeds0-5.json.gz``, label ``default``).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atlasmtl.prediction as pr  # noqa: E402
from atlasmtl.inputs import get_matrix_source  # noqa: E402
from atlasmtl.network import SparseInput  # noqa: E402
from study_scores import posthoc_main, print_progress, score_model  # noqa: E402

RULE = (0.2, 5.0)
if "--rule" in sys.argv:
    i = sys.argv.index("--rule")
    RULE = tuple(float(v) for v in sys.argv[i + 1].split(","))
    del sys.argv[i : i + 2]
LABEL = f"mask{RULE[0]:g}_{RULE[1]:g}"
STATE: dict[str, np.ndarray] = {}  # "reference": detection share per model gene; "mask": the genes left out


def detection(aligner, source, chunk: int = 4096) -> np.ndarray:
    """Share of a matrix's cells that detect each model gene (one streaming pass)."""
    counts = np.zeros(aligner.n_model_genes)
    for start in range(0, source.n_obs, chunk):
        x = aligner._sparse_values(source.rows(np.arange(start, min(start + chunk, source.n_obs))))
        counts += np.bincount(x.indices, minlength=x.shape[1])
    return counts / max(source.n_obs, 1)


prepare_query = pr.prepare_query
view_block = pr._input_view_block


def patched_prepare_query(model, source, gene_map, min_gene_overlap):
    aligner, semantics, report = prepare_query(model, source, gene_map, min_gene_overlap)
    q = detection(aligner, source)
    STATE["mask"] = np.flatnonzero((q > RULE[0]) & (q > RULE[1] * STATE["reference"]))
    return aligner, semantics, report


def patched_view_block(view, x, zero, buffers, rows):
    mask = STATE["mask"]
    if len(mask):
        if isinstance(x, SparseInput):
            m = x.rows.copy()
            m.data[np.isin(m.indices, mask)] = 0.0
            m.eliminate_zeros()
            x = x._replace(rows=m, rows_t=None)
        else:
            x = x.clone()
            x[:, mask] = 0.0 if zero is None else x.new_tensor(zero[mask])
    return view_block(view, x, zero, buffers, rows)


pr.prepare_query, pr._input_view_block = patched_prepare_query, patched_view_block


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        ref_aligner, _, _ = prepare_query(model, get_matrix_source(ref), None, 0.0)
        STATE["reference"] = detection(ref_aligner, get_matrix_source(ref))
        scores = score_model(model, query, truth, spec)
        row = {"case": case, "seed": seed, "K": "auto", LABEL: scores["default"], LABEL + "_off": scores["off"],
               "genes_left_out": int(len(STATE["mask"]))}
        print_progress(case, seed, row, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
