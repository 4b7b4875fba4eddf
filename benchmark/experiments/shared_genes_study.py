"""A reference trained on only the genes the query detects, against the default model (research script).

A query that lacks many of the model's genes (or holds them as all-zero columns, as a query zero-padded to
the reference's genes does) reads them as unexpressed. The remedy a user has is to train on the genes the
query measures: here the reference is cut to the genes some query cell detects (as after
``scanpy.pp.filter_genes(query, min_cells=1)`` and intersecting), the default model is trained on it, and
the query is predicted. Rows in ``threshold_table.py``'s format, label ``shared_genes``:

    PYTHONPATH=$PWD python benchmark/experiments/shared_genes_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py --per-case out.json:shared_genes
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402


def study(models):
    # ``models`` is the post-hoc loop; its default models are not used, only its case list, seeds and folders
    for case, seed, spec, ref, query, truth, _ in models:
        detected = np.asarray((query.X != 0).sum(axis=0)).ravel() > 0
        genes = query.var_names[detected].intersection(ref.var_names)
        model = atlasmtl.build_model(ref[:, genes].copy(), spec["levels"], random_state=seed, num_threads=1,
                                     show_progress=False, show_summary=False)
        row = {"case": case, "seed": seed, "K": "auto",
               "shared_genes": score_result(atlasmtl.predict(model, query[:, genes].copy(), show_progress=False,
                                                             show_summary=False), truth, spec)}
        print_progress(case, seed, row, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
