"""Issue 9: does a query cell's share of query cells among its neighbours in the input view's PCA (query and
reference pooled) tell a type the reference lacks?

Research probe (2026-12-06, forty-second session; not built: API contract, "Measured 2026-12-06, forty-second
session"). A type the reference lacks has no reference cells near it, so its cells' neighbours in a space shared
by the query and the reference should all be query cells, while a known type's should mix. The space is the
default model's input view (:class:`atlasmtl.novelty.InputView`: a PCA of the reference's network input; the
coordinates are those prediction computes, kept by ``study_scores.keep_view_points``). The reference side is the
model's held-out reference cells (``model.reference["training_cell"]`` false), predicted as a query: like the
query they are out of the PCA's sample (the training cells' own coordinates sit further out, on the noise the
PCA fitted; ``--training-points`` uses the view's stored training cells instead, with which not even
pbmc68k's random split mixes). Per query cell: among
its ``K`` = 30 nearest cells of the pooled set (itself excluded), the share of query cells with the reference
cells weighted by ``n_query / n_reference`` (0.5: mixed as the sizes predict; 1: query cells only), and that
share averaged over the cell's 30 nearest query cells. Printed per case: AUROC of both against novel vs known
(beside the shipped ``neighbourhood_novelty`` of the finest level) and how many known / novel cells have a
smoothed share above 0.9; on a known-type case the known cells' median, 95th percentile and share above 0.9.

    PYTHONPATH=$PWD python benchmark/experiments/query_mixing_probe.py <case,case,...> [SEED] [MODELS] [--training-points]
    (the default models MODELS/<case>_<seed>.pth, default /work/bench_models, seed 0; cases under /work/bench_work/cases)
"""
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import default_models, keep_view_points  # noqa: E402
import atlasmtl  # noqa: E402
from atlasmtl import novelty  # noqa: E402

K = 30


def mixing_share(query_points: np.ndarray, reference_points: np.ndarray, k: int = K,
                 reference_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per query cell: the size-weighted share of query cells among its ``k`` nearest pooled cells, and that
    share averaged over its ``k`` nearest query cells. ``reference_weights`` (one per reference cell, mean 1
    over the reference) count each reference neighbour that many times."""
    nq, nr = len(query_points), len(reference_points)
    pooled = np.vstack([query_points, reference_points])
    is_query = np.r_[np.ones(nq, bool), np.zeros(nr, bool)]
    weights = np.r_[np.zeros(nq), np.ones(nr) if reference_weights is None else reference_weights]
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(pooled).kneighbors(query_points)
    q = is_query[idx[:, 1:]].sum(axis=1)
    share = q / (q + weights[idx[:, 1:]].sum(axis=1) * nq / nr + 1e-12)
    _, near = NearestNeighbors(n_neighbors=k).fit(query_points).kneighbors(query_points)
    return share, share[near].mean(axis=1)


def main() -> None:
    training_points = "--training-points" in sys.argv
    args = [a for a in sys.argv if a != "--training-points"]
    cases = args[1].split(",")
    seed = int(args[2]) if len(args) > 2 else 0
    models = Path(args[3]) if len(args) > 3 else Path("/work/bench_models")
    state: dict = {}
    keep_view_points(state)
    for case, seed, spec, ref, query, truth, model in default_models(cases, [seed], work=Path("/work/bench_work"),
                                                                    models=models, train=False):
        result = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        frame = result.to_dataframe(mode="full")
        query_points = state["points"].copy()
        if training_points:
            held_points = np.asarray(model.metadata["novelty"]["input_view"]["points"], dtype=np.float64)
        else:
            atlasmtl.predict(model, ref[~np.asarray(model.reference["training_cell"], bool)], show_progress=False,
                             show_summary=False)
            held_points = state["points"].copy()
        fine = spec["levels"][-1]
        n = novelty.InputView(model.metadata["novelty"]["input_view"]).n_components
        share, smooth = mixing_share(query_points[:, :n], held_points[:, :n])
        labels = truth.loc[query.obs_names, fine].astype(str).to_numpy()
        novel = np.isin(labels, (spec.get("novel") or {}).get(fine, []))
        line = f"{case:40s} query {len(share)} {'training' if training_points else 'held-out'} reference {len(held_points)}"
        if novel.any():
            shipped = frame[f"neighbourhood_novelty_{fine}"].to_numpy()
            line += (f" AUROC share {roc_auc_score(novel, share):.2f} smoothed {roc_auc_score(novel, smooth):.2f}"
                     f" (neighbourhood novelty {roc_auc_score(novel, shipped):.2f}); smoothed > 0.9: known"
                     f" {np.mean(smooth[~novel] > 0.9):.3f}, novel {np.mean(smooth[novel] > 0.9):.2f}")
        else:
            line += (f" known smoothed share median {np.median(smooth):.2f}, 95th percentile"
                     f" {np.quantile(smooth, 0.95):.2f}, > 0.9 {np.mean(smooth > 0.9):.3f}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
