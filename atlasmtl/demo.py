"""A real reference mapping in one command: ``python -m atlasmtl.demo`` (or ``atlasmtl demo``).

It splits ``pbmc68k_reduced`` (700 real PBMCs that ship with scanpy) into a labelled
reference and a query whose labels are held back, trains one model for two label
levels and the reference's UMAP/PCA coordinates, predicts the query, scores it against
the held-back labels, and writes the model, the annotated query and an HTML report
into one folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_OUT_DIR = "atlasmtl_demo"


def run_demo(
    out_dir: str | Path = DEFAULT_OUT_DIR,
    num_epochs: int = 40,
    random_state: int = 0,
    quiet: bool = False,
    show_resources: bool = False,
) -> dict:
    """Train, save, load, predict, score and report on the pbmc68k_reduced split.

    Parameters
    ----------
    out_dir
        Folder for ``model/``, ``query_annotated.h5ad`` and ``report.html`` (created if needed).
    num_epochs
        Training epochs.
    random_state
        Seed of the split and the training.
    quiet
        Print nothing.
    show_resources
        Also print the time and memory summaries of training and prediction.

    Returns
    -------
    Per level: ``accuracy``, ``macro_f1``, ``coverage`` (fraction not Unknown),
    ``accuracy_covered``, ``low_confidence`` (fraction the gate flagged) and ``knn_confirmed``
    (fraction whose call the KNN vote confirmed).
    """
    import atlasmtl
    from atlasmtl.datasets import PBMC68K_COARSE, pbmc68k_reference_query

    from atlasmtl.io import prepare_output
    from atlasmtl.validation import as_int

    say = (lambda *a: None) if quiet else print
    out = Path(out_dir)
    as_int("num_epochs", num_epochs)
    prepare_output(out / "report.html", "demo's outputs")  # the folder, checked before the training it would waste
    ref, query = pbmc68k_reference_query(random_state=random_state)
    truth = query.obs.copy()
    query.obs = query.obs[[]]  # the query is unlabelled as far as atlasmtl knows
    levels = ["lineage", "bulk_labels"]
    say(f"atlasmtl {atlasmtl.__version__} demo: pbmc68k_reduced (700 PBMCs, ships with scanpy)\n")
    say(f"Reference {ref.n_obs} cells, query {query.n_obs} cells (a stratified 70/30 split; the query's labels "
        "are held back for scoring).")
    say(f"Levels: bulk_labels ({ref.obs['bulk_labels'].nunique()} types, from the data) and lineage "
        f"({len(set(PBMC68K_COARSE.values()))} groups: {', '.join(sorted(set(PBMC68K_COARSE.values())))}), "
        "which this demo derived from bulk_labels.")

    t0 = time.perf_counter()
    model = atlasmtl.build_model(ref, label_columns=levels, coord_targets={"latent": "X_ref_latent", "umap": "X_umap"},
                                 num_epochs=num_epochs, random_state=random_state, show_progress=False,
                                 show_summary=False)
    model.save(out / "model" / "model.pth")
    model = atlasmtl.TrainedModel.load(out / "model")
    t1 = time.perf_counter()
    result = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
    t2 = time.perf_counter()
    members = int(model.metadata["architecture"].get("ensemble_size", 1))
    trained = ("one network, predicting" if members == 1 else
               f"an ensemble of {members} networks from their own seeds (ensemble_size='auto' on a small reference), each predicting")
    say(f"Trained {trained} both levels and the UMAP/PCA coordinates, in {t1 - t0:.1f} s "
        f"({num_epochs} epochs); predicted the query in {t2 - t1:.1f} s.\n")

    scores = {}
    for level in levels:
        y, p = truth[level].astype(str).to_numpy(), np.asarray(result.labels(level)).astype(str)
        covered = p != "Unknown"
        scores[level] = {
            "accuracy": float(np.mean(p == y)),
            "macro_f1": _macro_f1(y, p),
            "coverage": float(covered.mean()),
            "accuracy_covered": float(np.mean(p[covered] == y[covered])) if covered.any() else float("nan"),
            "low_confidence": float(np.mean(result.levels[level].is_low_conf)),
            "knn_confirmed": float(np.mean(result.levels[level].used_knn)),
        }
    say(f"{'level':<13}{'accuracy':>9}{'macro-F1':>10}{'low-confidence':>16}{'KNN-confirmed':>15}{'Unknown':>9}")
    for level, s in scores.items():
        say(f"{level:<13}{s['accuracy']:>9.3f}{s['macro_f1']:>10.3f}{s['low_confidence']:>16.1%}"
            f"{s['knn_confirmed']:>15.1%}{1 - s['coverage']:>9.1%}")
    gate = result.metadata["settings"]
    say(f"\nLow-confidence: the call's calibrated probability is below {gate['confidence_high']} or its lead over the "
        f"best other class below {gate['margin_threshold']}.\nKNN-confirmed: such a cell's call was confirmed by its "
        f"{gate['knn_k']} nearest reference cells (at least {gate['knn_conf_low']:.0%} of their vote), which keeps "
        "it labelled even below the Unknown threshold; the vote never replaces the network's call.\n")

    query = result.to_adata(query, mode="standard", include_coords=True)
    query.write_h5ad(out / "query_annotated.h5ad")
    report = result.report(out / "report.html", model=model, adata=query, truth=truth[levels], reference=ref)
    say(f"Wrote to {out}/:")
    say(f"  model/                the trained model: atlasmtl.TrainedModel.load(\"{out / 'model'}\")")
    say("  query_annotated.h5ad  the query with pred_*/conf_* columns in obs and obsm['X_pred_umap']")
    say("  report.html           plots, per-level metrics, settings and input checks")
    say(f"Open the report:  python -m webbrowser {report.resolve().as_uri()}")
    if show_resources:
        say()
        model.show_resource_usage()
        say()
        result.show_resource_usage()
    return scores


def _macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, p, labels=np.unique(y), average="macro", zero_division=0))


def main(argv: list[str] | None = None) -> int:
    """``python -m atlasmtl.demo [options]`` (the options of ``atlasmtl demo``); a bad option or path is one error
    line and exit status 2, not a traceback."""
    from .exceptions import AtlasMTLError

    parser = argparse.ArgumentParser(prog="python -m atlasmtl.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help=f"folder for the model, the annotated query and the report (default: ./{DEFAULT_OUT_DIR})")
    parser.add_argument("--num-epochs", type=int, default=40, help="training epochs (default: 40)")
    parser.add_argument("--random-state", type=int, default=0, help="seed of the split and the training (default: 0)")
    parser.add_argument("--show-resources", action="store_true", help="also print time and memory summaries")
    args = parser.parse_args(argv)
    try:
        run_demo(args.out_dir, args.num_epochs, args.random_state, show_resources=args.show_resources)
    except AtlasMTLError as exc:
        from .validation import option_spelling

        print(f"{parser.prog}: error: {type(exc).__name__}: {option_spelling(str(exc), parser)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
