"""Open-set detection: is a cell far from every reference cell of the type it was given?

The score is the mean distance, in the encoder's L2-normalised embedding, from
a query cell to the ``k`` nearest *training* reference cells of its predicted
class at a level. Its null distribution comes from held-out reference cells
(scored the same way against the training cells), summarised by the median and
the MAD of the log distance. A query cell's novelty is the robust z-score

    z = (log d - location) / (1.4826 · MAD_null)

where ``location`` is the larger of the null median and the median over the
query's own cells: a whole query that sits further from the reference than
held-out reference cells do (another platform or chemistry) shifts the
location, so its known cells are not called novel; cells that stand out from
the rest of the query are. A cell with ``z`` above the threshold is ``Unknown``
at that level, and the KNN vote cannot relabel it, unless the calibrated
probability of its call is at least :data:`NOVELTY_CONFIDENCE_GUARD`: distance
alone does not overrule a call the heads are that sure of. (On the benchmark's
15 cases × 6 seeds, the flags this removes were on known cells of the CellBench
Drop-seq and CEL-seq2 queries, all called right, and on 0.2% of the cells of a
type removed from the reference (H1975, 78.6% → 78.4% Unknown); see the API
contract.)

This was chosen by measurement over 15 real cases (see
``benchmark/experiments/trust_study.py``) against the energy score,
class-conditional Mahalanobis distance, (1 − calibrated confidence), distance
to any reference cell, and class-conditional distance in a reference PCA space.
Per-class locations, input-space (reference PCA) scores located per class,
and their combinations with this score were measured against the issue-9
targets in ``benchmark/experiments/novelty_scores_study.py`` and not adopted.
"""

from __future__ import annotations

import numpy as np

#: Reference neighbours of the predicted class averaged into the distance.
NOVELTY_K = 10
#: Default robust z-score above which a cell is novel at a level.
NOVELTY_THRESHOLD = 3.5
#: Calibrated probability of a call at or above which the cell is not called novel at that level.
NOVELTY_CONFIDENCE_GUARD = 0.9
_MAD_TO_SD = 1.4826
_MIN_SCALE = 1e-3


def log_distance(distance: np.ndarray) -> np.ndarray:
    """log of the distance, floored (identical points) so it stays finite."""
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(distance, 1e-6))


def null_summary(log_d: np.ndarray) -> dict[str, float]:
    """Median and scale (1.4826 · MAD) of held-out reference log distances."""
    log_d = log_d[np.isfinite(log_d)]
    if len(log_d) == 0:
        return {"median": float("nan"), "scale": float("nan"), "n": 0}
    med = float(np.median(log_d))
    scale = max(_MAD_TO_SD * float(np.median(np.abs(log_d - med))), _MIN_SCALE)
    return {"median": med, "scale": scale, "n": int(len(log_d))}


def novelty_z(log_d: np.ndarray, null: dict[str, float]) -> tuple[np.ndarray, float]:
    """Robust z-score of each query cell's log distance; returns ``(z, location)``.

    The location is the larger of the null median and the median over the
    query cells with a finite distance. NaN distances (no prediction) give NaN.
    """
    finite = np.isfinite(log_d)
    location = float(null["median"])
    if finite.any():
        location = max(location, float(np.median(log_d[finite])))
    z = (log_d - location) / float(null["scale"])
    return z, location
