"""KNN stage: a neighbour index over the reference embedding and label votes.

The space is the encoder's output (L2-normalised, so Euclidean distance ranks
like cosine similarity). Because the encoder is trained to separate the labels,
this space keeps label neighbourhoods; how well is measured at training time
(``train_config["knn_space"]["neighbour_label_agreement"]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: References up to this size use exact (brute-force) search; larger ones pynndescent.
EXACT_SEARCH_MAX_CELLS = 100_000
#: Query × reference scores held at once by exact search (16M floats = 64 MB).
_SCORE_BUDGET = 1 << 24


def normalise_rows(z: np.ndarray) -> np.ndarray:
    """L2-normalise rows (zero rows stay zero)."""
    z = np.asarray(z, dtype=np.float32)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)


class NeighbourIndex:
    """Nearest-neighbour search over reference cells, built once and reused.

    Exact Euclidean search (a matrix-product top-k, in chunks) for references
    up to :data:`EXACT_SEARCH_MAX_CELLS` cells, approximate search
    (pynndescent) above that.
    """

    def __init__(self, embedding: np.ndarray, random_state: int = 0, n_jobs: int = 1) -> None:
        self.n_cells = int(embedding.shape[0])
        self.exact = self.n_cells <= EXACT_SEARCH_MAX_CELLS
        data = np.ascontiguousarray(embedding, dtype=np.float32)
        if self.exact:
            self._index = torch.from_numpy(data)
            self._sq_norms = (self._index**2).sum(dim=1)
        else:
            from pynndescent import NNDescent

            self._index = NNDescent(data, metric="euclidean", n_neighbors=30, random_state=random_state, n_jobs=n_jobs)
            self._index.prepare()

    def query(self, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(indices, distances)`` of the ``k`` nearest reference cells."""
        k = min(k, self.n_cells)
        points = np.ascontiguousarray(points, dtype=np.float32)
        if len(points) == 0:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        if self.exact:
            idx = np.empty((len(points), k), dtype=np.int64)
            dist = np.empty((len(points), k), dtype=np.float32)
            chunk = max(1, min(2048, _SCORE_BUDGET // max(self.n_cells, 1)))  # bound the score matrix
            for start in range(0, len(points), chunk):
                q = torch.from_numpy(points[start : start + chunk])
                # ||q - r||² = ||q||² − (2 q·r − ||r||²): the largest score is the nearest
                score = 2.0 * (q @ self._index.T) - self._sq_norms
                top, where = torch.topk(score, k, dim=1)
                sq = torch.clamp((q**2).sum(dim=1, keepdim=True) - top, min=0.0)
                idx[start : start + len(top)] = where.numpy()
                dist[start : start + len(top)] = torch.sqrt(sq).numpy()
        else:
            idx, dist = self._index.query(points, k=k)
        return idx, dist


def vote(
    neighbour_idx: np.ndarray,
    ref_codes: np.ndarray,
    n_classes: int,
    class_counts: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Vote of the neighbours' labels.

    Parameters
    ----------
    neighbour_idx
        Reference cell indices, one row of ``k`` neighbours per query cell.
    ref_codes
        Label code of every reference cell at this level (-1 = unlabelled: casts no vote).
    n_classes
        Classes at this level.
    class_counts
        Reference cells per class. When given, the vote is *class-balanced*: a
        neighbour's vote for class ``c`` weighs ``k / min(n_c, k)``, so a type
        with fewer than ``k`` reference cells can win when all of its cells are
        among the neighbours, and the fraction is the winner's share of the
        weighted votes. Without it, each neighbour casts one vote and the
        fraction is votes / ``k``.
    allowed
        Boolean ``cells × classes``: only these classes can win (e.g. the
        children of the cell's call at the parent level). Neighbours of other
        classes still count in the fraction's denominator, so a restriction to
        a single child cannot turn one neighbour into a unanimous vote.

    Returns
    -------
    The winning class code per row (-1 when no neighbour voted) and its vote
    fraction (0 when no neighbour voted). Ties go to the lower class code.
    """
    if neighbour_idx.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    n, k = neighbour_idx.shape
    codes = ref_codes[neighbour_idx]
    weight = (codes >= 0).astype(np.float64)
    safe = np.maximum(codes, 0)
    if class_counts is not None:
        weight *= (k / np.clip(np.minimum(class_counts, k), 1, None))[safe]
    scores = np.zeros((n, n_classes), dtype=np.float64)
    np.add.at(scores, (np.repeat(np.arange(n), k), safe.ravel()), weight.ravel())
    total = scores.sum(axis=1)
    if allowed is not None:
        scores = np.where(allowed, scores, 0.0)
    winner = scores.argmax(axis=1)
    best = scores[np.arange(n), winner]
    if class_counts is None:
        frac = best / k
    else:
        frac = np.divide(best, total, out=np.zeros_like(best), where=total > 0)
    winner = np.where(best > 0, winner, -1)
    return winner, frac.astype(np.float32)


def neighbour_label_agreement(
    embedding: np.ndarray, codes: np.ndarray, k: int = 15, max_cells: int = 5000, random_state: int = 0
) -> float | None:
    """Mean fraction of a reference cell's ``k`` neighbours (itself excluded) sharing its label."""
    labelled = np.flatnonzero(codes >= 0)
    if len(labelled) <= k + 1:
        return None
    rng = np.random.default_rng(random_state)
    pool = np.sort(rng.choice(labelled, size=min(EXACT_SEARCH_MAX_CELLS // 2, len(labelled)), replace=False))
    sample = rng.choice(len(pool), size=min(max_cells, len(pool)), replace=False)
    index: Any = NeighbourIndex(embedding[pool], random_state=random_state)
    idx, _ = index.query(embedding[pool[sample]], k + 1)
    neighbour_codes = codes[pool][idx[:, 1:]]
    return float(np.mean(neighbour_codes == codes[pool[sample]][:, None]))
