"""The unmeasured-gene check of ``predict`` (``genes.unmeasured_genes``) on the benchmark's queries (research script).

Models saved before the check have no ``metadata["gene_detection"]``; this gives each stored default model the
profile its training would have stored (``genes.detection_profile`` of the reference's pseudo-counts on the
model's genes, at most ``genes.DETECTION_SAMPLE_CELLS`` cells) and runs the query preparation of ``predict``
(``prediction.prepare_query``), printing the check's numbers and whether it warns. ``--zero-genes F`` first
sets a random share F of the query's genes to zero (a query zero-padded to the reference's genes);
``--single-class`` also checks each finest class of ≥ 20 query cells alone.

    PYTHONPATH=$PWD python benchmark/experiments/unmeasured_check_table.py <case,case,...> [--models DIR] [--work DIR]
"""
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_study_case  # noqa: E402
import atlasmtl  # noqa: E402
from atlasmtl import genes, prediction  # noqa: E402
from atlasmtl.inputs import get_matrix_source, pseudo_counts  # noqa: E402


def profile_for(model, ref) -> dict:
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(ref.n_obs, min(ref.n_obs, genes.DETECTION_SAMPLE_CELLS), replace=False))
    counts = pseudo_counts(ref.X[cells], "lognorm")  # the prepared cases hold log1p CP10k
    columns = ref.var_names.get_indexer(model.genes)
    return genes.detection_profile(sp.csr_matrix(counts)[:, columns])


def check(model, query) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prediction.prepare_query(model, get_matrix_source(query), None, 0.0)[2]["unmeasured"]


def line(name, r) -> str:
    return (f"{name:48s} {r['cells_sampled']:5d} cells | expected {r['genes_expected']:5d} | unexpectedly zero "
            f"{r['genes_unexpectedly_zero']:5d} ({r['share_unexpectedly_zero']:.3f}) | warns {r['lacks_genes']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases")
    ap.add_argument("--models", type=Path, default=Path("/work/bench_models"))
    ap.add_argument("--work", type=Path, default=Path("/work/bench_work"))
    ap.add_argument("--zero-genes", type=float, default=0.0)
    ap.add_argument("--single-class", action="store_true")
    a = ap.parse_args()
    for case in a.cases.split(","):
        spec, ref, query, truth = read_study_case(a.work / "cases" / case)
        model = atlasmtl.TrainedModel.load(a.models / f"{case}_0.pth")
        model.metadata["gene_detection"] = profile_for(model, ref)
        if a.zero_genes:
            lost = np.random.default_rng(1).random(query.n_vars) < a.zero_genes
            x = sp.csr_matrix(query.X, copy=True)
            x.data[lost[x.indices]] = 0
            x.eliminate_zeros()
            query.X = x
        print(line(case, check(model, query)), flush=True)
        if a.single_class:
            finest = truth.loc[query.obs_names, spec["levels"][-1]].astype(str).to_numpy()
            for cls in sorted(set(finest)):
                if (finest == cls).sum() >= 20:
                    print(line(f"    only {cls}", check(model, query[finest == cls].copy())), flush=True)


if __name__ == "__main__":
    main()
