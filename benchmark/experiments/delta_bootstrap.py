"""Issue 10: how far each case's finest macro-F1 Δ to the best peer can be trusted (research script).

Most of the benchmark's queries are small (180-1,200 cells, some classes of under 10), so one case's Δ moves
with the cells drawn as well as with the model's seed. Per case this script takes one benchmark run's
predictions (``WORK/runs/<case>/<method>/pred_<method>.csv.gz``) and resamples the query's cells with
replacement, the same draw for atlasmtl (defaults) and the run's best peer on that case: the 2.5-97.5%
interval of Δ over the draws is a paired percentile bootstrap. The score is the benchmark's (the macro-F1 of
``atlasmtl.evaluate``: scikit-learn's macro F1 over the labels the cells truly have, a missing type's label one
of them, Unknown a wrong call); the point Δ repeats the results.json figure.

    python benchmark/experiments/delta_bootstrap.py WORK benchmark/results/results.json [--draws 2000] [--level fine|coarse]
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_predictions, read_truth  # noqa: E402
from study_scores import PEERS, peer_levels  # noqa: E402


def macro_f1_draws(truth: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro-F1 per row of ``weights`` (draws × cells: how often each cell is drawn) over the true labels
    drawn at least once, as ``sklearn.metrics.f1_score(average="macro", zero_division=0)`` on the drawn cells."""
    classes = np.unique(truth)
    is_true = (truth[:, None] == classes[None, :]).astype(np.float64)
    is_pred = (pred[:, None] == classes[None, :]).astype(np.float64)
    n_true, n_pred = weights @ is_true, weights @ is_pred
    hits = weights @ (is_true * is_pred)
    denominator = n_true + n_pred
    f1 = np.divide(2 * hits, denominator, out=np.zeros_like(hits), where=denominator > 0)
    present = n_true > 0
    return (f1 * present).sum(axis=1) / present.sum(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("results", type=Path)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--level", choices=("fine", "coarse"), default="fine")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    scores = peer_levels(args.results)
    rng = np.random.default_rng(args.seed)
    print(f"| case | query cells | atlasmtl {args.level} | best peer | Δ | 95% interval of Δ (paired bootstrap, {args.draws} draws) | share of draws with Δ < -0.02 |")
    print("|---|---|---|---|---|---|---|")
    below = []
    for case, by_method in scores.items():
        levels = list(by_method["atlasmtl"])
        if args.level == "coarse" and len(levels) < 2:
            continue
        level = levels[-1] if args.level == "fine" else levels[0]
        peer = max((by_method[p][level]["macro_f1"], p) for p in PEERS if p in by_method)[1]
        truth = read_truth(args.work / "cases" / case)[level].astype(str)
        preds = {}
        for method in ("atlasmtl", peer):
            table = read_predictions(args.work / "runs" / case / method / f"pred_{method}.csv.gz")
            preds[method] = table.loc[truth.index, f"pred_{level}"].astype(str).to_numpy()
        y = truth.to_numpy()
        weights = rng.multinomial(len(y), np.full(len(y), 1.0 / len(y)), size=args.draws).astype(np.float64)
        ones = np.ones((1, len(y)))
        point = {m: float(macro_f1_draws(y, p, ones)[0]) for m, p in preds.items()}
        for m in preds:  # the same score as the run's own
            if abs(point[m] - by_method[m][level]["macro_f1"]) > 1e-9:
                raise SystemExit(f"{case} {m}: macro-F1 {point[m]:.6f} here, {by_method[m][level]['macro_f1']:.6f} in the results")
        delta = macro_f1_draws(y, preds["atlasmtl"], weights) - macro_f1_draws(y, preds[peer], weights)
        lo, hi = np.quantile(delta, [0.025, 0.975])
        d = point["atlasmtl"] - point[peer]
        below.append((d < 0, d < -0.02, hi < 0))
        print(f"| {case} | {len(y)} | {point['atlasmtl']:.3f} | {point[peer]:.3f} ({peer}) | {d:+.3f} | "
              f"{lo:+.3f} to {hi:+.3f} | {np.mean(delta < -0.02):.2f} |")
    n_below, n_floor, n_sure = (sum(b[i] for b in below) for i in range(3))
    print(f"{len(below)} cases: {n_below} below the best peer in this run, {n_floor} below it by more than 0.02, "
          f"{n_sure} whose whole 95% interval is below 0")


if __name__ == "__main__":
    main()
