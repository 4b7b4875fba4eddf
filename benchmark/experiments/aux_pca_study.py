"""Issue 10 (accuracy under shifts): the reference's principal components as an auxiliary coordinate target
(research script).

atlasmtl's loss is discriminative only: the encoder keeps what separates the reference's labels and may drop
the rest. scVI-style models keep the whole expression profile through a reconstruction loss, which is part of
why scANVI travels across batches. A cheap stand-in for reconstruction is the reference's own principal
components as a coordinate head (``coord_targets``, already in the API): the encoder then has to keep the main
axes of expression variation, not only the label boundaries.

Per case and seed: ``n`` PCs (``sklearn`` ``PCA``, centred) of the reference's log1p CP10k values (the same
scaling ``input_transform="zscore"`` starts from, before the per-gene standardisation) become
``obsm["X_aux_pca"]``; the model is trained with ``coord_targets={"aux": "X_aux_pca"}`` (standardised targets,
MSE added to the loss as for any coordinate head) and everything else at the defaults, and predicts at the
defaults and with KNN off. Coordinate heads take PyTorch's autograd path in training. Variants ``pca10``,
``pca50`` (``n`` = 10, 50). Rows in ``threshold_table.py``'s format under ``<variant>`` and ``<variant>_off``.

    PYTHONPATH=$PWD python benchmark/experiments/aux_pca_study.py <case,case,...> 0,1,2 out.json pca10 [--work DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.decomposition import PCA

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_study_case  # noqa: E402
from study_scores import print_progress, score_model  # noqa: E402
import atlasmtl  # noqa: E402
from atlasmtl.genes import to_linear_values  # noqa: E402
from atlasmtl.inputs import detect_semantics, get_matrix_source  # noqa: E402


def reference_pcs(ref, n: int, seed: int) -> np.ndarray:
    """``n`` principal components of the reference's log1p CP10k values (cells × n)."""
    semantics = detect_semantics(get_matrix_source(ref))["semantics"]
    x = to_linear_values(ref.X, semantics, "zscore")
    x = (x.toarray() if sp.issparse(x) else np.asarray(x)).astype(np.float32)  # research script: small references
    np.log1p(x, out=x)
    return PCA(n_components=min(n, min(x.shape) - 1), random_state=seed).fit_transform(x).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases")
    ap.add_argument("seeds")
    ap.add_argument("out", type=Path)
    ap.add_argument("variant", help="pca<n>")
    ap.add_argument("--work", type=Path, default=Path("/work/bench_work"))
    a = ap.parse_args()
    n = int(a.variant.removeprefix("pca"))
    torch.set_num_threads(1)
    rows = json.loads(a.out.read_text()) if a.out.exists() else []
    done = {(r["case"], r["seed"]) for r in rows}
    for case in a.cases.split(","):
        spec, ref, query, truth = read_study_case(a.work / "cases" / case)
        for seed in (int(s) for s in a.seeds.split(",")):
            if (case, seed) in done:
                continue
            ref.obsm["X_aux_pca"] = reference_pcs(ref, n, seed)
            model = atlasmtl.build_model(ref, spec["levels"], {"aux": "X_aux_pca"}, random_state=seed, num_threads=1,
                                         show_progress=False, show_summary=False)
            scores = score_model(model, query, truth, spec)
            row = {"case": case, "seed": seed, "K": "auto", a.variant: scores["default"], a.variant + "_off": scores["off"],
                   "train_seconds": model.train_config["train_seconds"]}
            rows.append(row)
            a.out.write_text(json.dumps(rows))
            print_progress(case, seed, row, spec["levels"][-1])


if __name__ == "__main__":
    main()
