"""The README's quick start: a real reference mapping on data that ships with scanpy.

Run ``python -m atlasmtl.demo``. It splits ``pbmc68k_reduced`` (700 real PBMCs)
into a stratified 70/30 reference/query, trains on two label levels plus the
UMAP and PCA coordinates, saves and reloads the model, predicts the query, and
prints per-level accuracy against the known labels plus the resource summaries.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def run_demo(out_dir: str | None = None, num_epochs: int = 40, random_state: int = 0, quiet: bool = False) -> dict:
    """Train, save, load and predict on the pbmc68k_reduced split; return per-level accuracy."""
    from sklearn.metrics import f1_score

    import atlasmtl
    from atlasmtl.datasets import pbmc68k_reference_query

    ref, query = pbmc68k_reference_query(random_state=random_state)
    truth = query.obs.copy()
    query.obs = query.obs[[]]  # the query is unlabelled as far as atlasmtl knows
    levels = ["lineage", "bulk_labels"]
    model = atlasmtl.build_model(
        ref,
        label_columns=levels,
        coord_targets={"latent": "X_ref_latent", "umap": "X_umap"},
        num_epochs=num_epochs,
        random_state=random_state,
        show_progress=False if quiet else None,
    )
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(out_dir or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        model.save(directory / "model.pth")
        model = atlasmtl.TrainedModel.load(directory / "model_manifest.json")
    result = atlasmtl.predict(model, query, show_progress=False if quiet else None)
    query = result.to_adata(query, mode="standard", include_coords=True)
    scores = {}
    for level in levels:
        y, p = truth[level].astype(str).to_numpy(), query.obs[f"pred_{level}"].astype(str).to_numpy()
        covered = p != "Unknown"
        scores[level] = {
            "accuracy": float(np.mean(p == y)),
            "macro_f1": float(f1_score(y, p, labels=np.unique(y), average="macro")),
            "coverage": float(covered.mean()),
            "accuracy_on_covered": float(np.mean(p[covered] == y[covered])) if covered.any() else float("nan"),
        }
    if not quiet:
        print(f"atlasmtl {atlasmtl.__version__} demo: pbmc68k_reduced, {ref.n_obs} reference → {query.n_obs} query cells\n")
        print(f"{'level':<14}{'accuracy':>10}{'macro-F1':>10}{'coverage':>10}{'acc@covered':>13}")
        for level, s in scores.items():
            print(
                f"{level:<14}{s['accuracy']:>10.3f}{s['macro_f1']:>10.3f}{s['coverage']:>10.3f}"
                f"{s['accuracy_on_covered']:>13.3f}"
            )
        print()
        model.show_resource_usage()
        print()
        result.show_resource_usage()
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", help="keep the saved model here (default: a temporary directory)")
    parser.add_argument("--num-epochs", type=int, default=40)
    parser.add_argument("--random-state", type=int, default=0)
    args = parser.parse_args(argv)
    run_demo(args.out_dir, args.num_epochs, args.random_state)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
