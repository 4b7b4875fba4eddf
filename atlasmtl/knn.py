"""KNN stage: a neighbour index over the reference embedding and label votes.

The space is the encoder's output (L2-normalised, so Euclidean distance ranks
like cosine similarity). Because the encoder is trained to separate the labels,
this space keeps label neighbourhoods; how well is measured at training time
(``train_config["knn_space"]["neighbour_label_agreement"]``).

Search
------
References up to :data:`EXACT_SEARCH_MAX_CELLS` cells are searched exactly (a
matrix-product top-k in chunks). Larger ones use a :class:`ListIndex`: the
cells are partitioned into *lists* of about :data:`LIST_SIZE` cells (k-means
within each group of cells that share their labels and training flag), stored
list by list, and a query point is compared exactly with the cells of the
:data:`N_PROBE` lists whose centroids are nearest (an inverted-file index, as in
FAISS' ``IndexIVFFlat``). Because every list holds cells of one label per level
and one training flag, the same index also answers "the nearest training cells
of class *c*" (the novelty score) by probing only that class's lists. The index
is a few plain arrays (centroids and list offsets, with the reference stored in
list order), built once at training and saved with the model; see
:mod:`atlasmtl.artifacts`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

#: References up to this size use exact (brute-force) search; larger ones a :class:`ListIndex`. At
#: 100k cells the index gives the same calls as exact search (semi-synthetic 100k reference, 10k query:
#: finest macro-F1 0.7932 vs 0.7931, Unknown 3.00% vs 2.98%) in 1.25 s instead of 4.37 s (the novelty
#: score's class-restricted search dominates); recall@15 0.997 (100k) and 0.965 (1M).
EXACT_SEARCH_MAX_CELLS = 20_000
#: Reference cells sampled for the neighbour-label-agreement diagnostic.
_AGREEMENT_POOL = 50_000
#: Query × reference scores held at once by exact search (16M floats = 64 MB).
_SCORE_BUDGET = 1 << 24
#: Target cells per list of a :class:`ListIndex`.
LIST_SIZE = 512
#: Lists a :class:`ListIndex` query compares exactly (the nearest by centroid): recall@15 0.965 at 1M cells.
N_PROBE = 16
#: Lists probed by the novelty score's class-restricted search (it needs the mean distance to the 10
#: nearest cells of one class, not the neighbours themselves): at 1M cells its log distance differs
#: from 32 probes' by 0.007 (sd), 2% of the novelty null's scale, for half the work of 16 probes.
N_PROBE_CLASS = 8
#: Dtype of the stored reference embedding (half the memory of float32; distances agree to ~1e-3).
EMBEDDING_DTYPE = np.float16
#: Query rows per chunk of a list search (bounds the candidate buffers).
_QUERY_CHUNK = 4096


def normalise_rows(z: np.ndarray) -> np.ndarray:
    """L2-normalise rows (zero rows stay zero)."""
    z = np.asarray(z, dtype=np.float32)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)


def _as_float32(block: np.ndarray) -> torch.Tensor:
    """A float32 tensor of ``block`` (float16 rows are widened by torch: 10× numpy's conversion)."""
    block = np.asarray(block)
    if block.dtype == np.float16 and block.flags.c_contiguous:
        with warnings.catch_warnings():  # a read-only memory map: the tensor is only read, then copied by .float()
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(block).float()
    return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))


def _exact_search(points: torch.Tensor, ref: torch.Tensor, ref_sq: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest rows of ``ref`` for every point, in chunks that bound the score matrix."""
    n_ref = ref.shape[0]
    idx = np.empty((len(points), k), dtype=np.int64)
    dist = np.empty((len(points), k), dtype=np.float32)
    chunk = max(1, min(2048, _SCORE_BUDGET // max(n_ref, 1)))
    for start in range(0, len(points), chunk):
        q = points[start : start + chunk]
        # ||q - r||² = ||q||² − (2 q·r − ||r||²): the largest score is the nearest
        score = 2.0 * (q @ ref.T) - ref_sq
        where = torch.topk(score, k, dim=1).indices
        idx[start : start + len(where)], dist[start : start + len(where)] = _distances(q, ref[where], where)
    return idx, dist


def _distances(q: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each point to its chosen rows (points × k × dims), computed directly, nearest first.

    Direct differences, not ``||q||² − 2 q·r + ||r||²``: no cancellation, and each point's distances do not
    depend on which other points share its batch (so a query split across processes gives the same numbers).
    """
    d = torch.linalg.vector_norm(q.unsqueeze(1) - rows, dim=2)
    order = torch.argsort(d, dim=1, stable=True)
    return ids.gather(1, order).numpy(), d.gather(1, order).numpy()


class NeighbourIndex:
    """Nearest-neighbour search over the rows of any embedding, built once and reused.

    Exact Euclidean search for up to :data:`EXACT_SEARCH_MAX_CELLS` rows, a
    :class:`ListIndex` above that.
    """

    def __init__(self, embedding: np.ndarray, random_state: int = 0) -> None:
        self.n_cells = int(embedding.shape[0])
        self.exact = self.n_cells <= EXACT_SEARCH_MAX_CELLS
        if self.exact:
            self._index = _as_float32(embedding)
            self._sq_norms = (self._index**2).sum(dim=1)
        else:
            self._lists = ListIndex.build(embedding, random_state=random_state)

    def query(self, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(indices, distances)`` of the ``k`` nearest reference cells."""
        k = min(k, self.n_cells)
        points = np.ascontiguousarray(points, dtype=np.float32)
        if len(points) == 0:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        if self.exact:
            return _exact_search(torch.from_numpy(points), self._index, self._sq_norms, k)
        return self._lists.query(points, k)


class ListIndex:
    """Inverted-file index: exact search within the lists nearest to each query point.

    Parameters
    ----------
    embedding
        The indexed rows *in list order* (cells × dims; float16 or float32, a
        memory map is fine): list ``l`` is rows ``offsets[l]:offsets[l + 1]``.
    centroids
        Mean of each list's rows (lists × dims).
    offsets
        List boundaries (lists + 1 increasing integers from 0 to the number of rows).
    row_ids
        What to report for each row (default: the row number itself).
    n_probe
        Lists compared exactly per query point.
    """

    def __init__(self, embedding: np.ndarray, centroids: np.ndarray, offsets: np.ndarray,
                 row_ids: np.ndarray | None = None, n_probe: int = N_PROBE) -> None:
        self.embedding = embedding
        self.centroids = _as_float32(centroids)
        self._centroid_sq = (self.centroids**2).sum(dim=1)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.diff(self.offsets)
        self.row_ids = row_ids
        self.n_probe = int(n_probe)
        self.n_cells = int(embedding.shape[0])

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, embedding: np.ndarray, groups: np.ndarray | None = None, list_size: int = LIST_SIZE,
              random_state: int = 0) -> "ListIndex":
        """Partition ``embedding`` into lists (k-means within each group) and index it.

        The returned index holds the rows in list order and reports original row
        numbers (``row_ids``); :func:`build_lists` gives the order itself.
        """
        order, centroids, offsets = build_lists(embedding, groups, list_size, random_state)
        return cls(np.asarray(embedding)[order], centroids, offsets, row_ids=order)

    # ------------------------------------------------------------------ search
    def query(self, points: np.ndarray, k: int, lists: np.ndarray | None = None,
              n_probe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, distances)`` of the ``k`` nearest rows, searching only ``lists`` (boolean per list) if given,
        in the ``n_probe`` (default :attr:`n_probe`) nearest of them.

        Rows are ranked exactly within the probed lists; when those hold fewer
        than ``k`` rows for a point, that point is searched exactly over all
        allowed rows instead, so every answer has ``min(k, allowed rows)`` neighbours.
        """
        allowed_rows = self.n_cells if lists is None else int(self.sizes[lists].sum())
        k = min(int(k), allowed_rows)
        points = np.ascontiguousarray(points, dtype=np.float32)
        idx = np.zeros((len(points), k), dtype=np.int64)
        dist = np.zeros((len(points), k), dtype=np.float32)
        if len(points) == 0 or k == 0:
            return idx, dist
        for start in range(0, len(points), _QUERY_CHUNK):
            q = torch.from_numpy(points[start : start + _QUERY_CHUNK])
            i, d = self._search(q, k, lists, self.n_probe if n_probe is None else int(n_probe))
            short = np.flatnonzero((i < 0).any(axis=1))
            if len(short):
                i[short], d[short] = self._search_all(q[torch.from_numpy(short)], k, lists)
            idx[start : start + len(i)], dist[start : start + len(i)] = i, d
        if self.row_ids is not None:
            idx = np.asarray(self.row_ids)[idx]
        return idx, dist

    def _search(self, q: torch.Tensor, k: int, lists: np.ndarray | None, n_probe: int) -> tuple[np.ndarray, np.ndarray]:
        m = q.shape[0]
        centroid_score = 2.0 * (q @ self.centroids.T) - self._centroid_sq
        usable = self.sizes > 0 if lists is None else lists & (self.sizes > 0)
        if not usable.all():
            centroid_score[:, torch.from_numpy(~usable)] = -torch.inf
        n_probe = int(min(n_probe, usable.sum()))
        probes = torch.topk(centroid_score, n_probe, dim=1).indices.numpy()
        flat = probes.ravel()
        by_list = np.argsort(flat, kind="stable")
        touched, first = np.unique(flat[by_list], return_index=True)
        last = np.append(first[1:], len(flat))
        best = torch.full((m, n_probe, k), -torch.inf)
        best_row = torch.full((m, n_probe, k), -1, dtype=torch.int64)
        for lst, a, b in zip(touched.tolist(), first.tolist(), last.tolist()):
            pairs = torch.from_numpy(by_list[a:b])
            qi, slot = pairs // n_probe, pairs % n_probe
            lo, hi = int(self.offsets[lst]), int(self.offsets[lst + 1])
            rows = _as_float32(self.embedding[lo:hi])
            score = 2.0 * (q[qi] @ rows.T) - (rows * rows).sum(dim=1)
            kk = min(k, hi - lo)
            top, where = torch.topk(score, kk, dim=1)
            best[qi, slot, :kk] = top
            best_row[qi, slot, :kk] = where + lo
        top, where = torch.topk(best.reshape(m, -1), k, dim=1)
        idx = best_row.reshape(m, -1).gather(1, where)
        missing = ~torch.isfinite(top)  # too few rows in the probed lists: the caller searches these points exactly
        idx[missing] = int(self.offsets[np.argmax(self.sizes > 0)])  # any row, to keep the shapes
        chosen = np.unique(idx.numpy())
        rows = _as_float32(self.embedding[chosen])[torch.from_numpy(np.searchsorted(chosen, idx.numpy()))]
        ids, dist = _distances(q, rows, idx)
        ids[missing.any(dim=1).numpy()] = -1
        return ids, dist

    def _search_all(self, q: torch.Tensor, k: int, lists: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over every allowed row (the fallback for points whose probed lists are too small)."""
        chosen = np.flatnonzero(self.sizes > 0) if lists is None else np.flatnonzero(lists & (self.sizes > 0))
        rows = np.concatenate([np.arange(self.offsets[c], self.offsets[c + 1]) for c in chosen])
        ref = _as_float32(self.embedding[rows] if len(rows) < self.n_cells else self.embedding)
        i, d = _exact_search(q, ref, (ref**2).sum(dim=1), k)
        return rows[i], d


def _lloyd(x: torch.Tensor, n_clusters: int, rng: np.random.Generator, n_iter: int = 15) -> torch.Tensor:
    """Centroids of ``n_clusters`` by Lloyd's k-means from randomly chosen rows (matrix products in torch).

    scikit-learn's ``KMeans`` spends minutes in its k-means++ seeding at a
    million cells; for an inverted-file index a random start and a few Lloyd
    steps partition as well (the lists only need to be compact, not optimal).
    An emptied cluster is restarted at a random row.
    """
    centres = x[torch.from_numpy(rng.choice(len(x), n_clusters, replace=False))].clone()
    for _ in range(n_iter):
        assign = torch.argmax(2.0 * (x @ centres.T) - (centres**2).sum(dim=1), dim=1)
        counts = torch.bincount(assign, minlength=n_clusters)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        empty = counts == 0
        centres = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
        if empty.any():
            centres[empty] = x[torch.from_numpy(rng.choice(len(x), int(empty.sum()), replace=False))]
    return centres


def build_lists(embedding: np.ndarray, groups: np.ndarray | None = None, list_size: int = LIST_SIZE,
                random_state: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partition rows into lists of about ``list_size`` rows, each inside one group.

    Each group (rows sharing a ``groups`` value; all rows when ``None``) is cut
    by k-means (:func:`_lloyd`, fitted on at most 256 rows per list) into
    ``round(size / list_size)`` lists; every row joins its nearest centroid and
    the centroids are then the means of their lists. Empty lists are dropped.

    Returns
    -------
    ``(order, centroids, offsets)``: row numbers in list order, the lists' centroids
    (float32) and their boundaries in ``order``.
    """
    n = int(embedding.shape[0])
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    _, group_of = np.unique(groups, return_inverse=True)
    members_of = np.split(np.argsort(group_of, kind="stable"), np.cumsum(np.bincount(group_of))[:-1])
    rng = np.random.default_rng(random_state)
    orders, centroids, sizes = [], [], []
    for members in members_of:
        x = _as_float32(embedding[members])
        n_lists = max(1, int(round(len(members) / list_size)))
        if n_lists == 1:
            assign = np.zeros(len(members), dtype=np.int64)
        else:
            fit = members if len(members) <= 256 * n_lists else np.sort(rng.choice(len(members), 256 * n_lists, replace=False))
            sample = x if fit is members else x[torch.from_numpy(fit)]
            centres = _lloyd(sample, n_lists, rng)
            assign = np.concatenate([
                torch.argmax(2.0 * (x[s : s + 8192] @ centres.T) - (centres**2).sum(dim=1), dim=1).numpy()
                for s in range(0, len(members), 8192)
            ])
        by_list = np.argsort(assign, kind="stable")
        counts = np.bincount(assign, minlength=n_lists)
        sums = torch.zeros((n_lists, x.shape[1]), dtype=torch.float64).index_add_(
            0, torch.from_numpy(assign), x.double())
        keep = counts > 0
        orders.append(members[by_list])
        centroids.append((sums.numpy()[keep] / counts[keep, None]).astype(np.float32))
        sizes.append(counts[keep])
    order = np.concatenate(orders).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(sizes))]).astype(np.int64)
    return order, np.concatenate(centroids), offsets


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
    pool = np.sort(rng.choice(labelled, size=min(_AGREEMENT_POOL, len(labelled)), replace=False))
    sample = rng.choice(len(pool), size=min(max_cells, len(pool)), replace=False)
    index: Any = NeighbourIndex(embedding[pool], random_state=random_state)
    idx, _ = index.query(embedding[pool[sample]], k + 1)
    neighbour_codes = codes[pool][idx[:, 1:]]
    return float(np.mean(neighbour_codes == codes[pool[sample]][:, None]))


# ---------------------------------------------------------------- the model's reference
def index_reference(reference: dict[str, Any], levels: list[str], random_state: int = 0) -> dict[str, Any]:
    """The KNN reference ready to search: embedding as :data:`EMBEDDING_DTYPE`, and above
    :data:`EXACT_SEARCH_MAX_CELLS` cells, reordered into the lists of a :class:`ListIndex`.

    Lists never mix labels (at any level) or training and held-out cells, so one
    index serves the vote over every cell and the novelty search over one class's
    training cells. Returns a new record (``embedding``, ``labels``,
    ``training_cell`` in the new order, and ``index``: ``centroids``,
    ``offsets``, ``n_probe``, ``list_size``); the input is not changed.
    """
    embedding = np.asarray(reference["embedding"])
    out = dict(reference, embedding=np.ascontiguousarray(embedding, dtype=EMBEDDING_DTYPE))
    n = embedding.shape[0]
    if n <= EXACT_SEARCH_MAX_CELLS or reference.get("index") is not None:
        return out
    training = reference.get("training_cell")
    keys = np.stack([np.asarray(reference["labels"][lv], dtype=np.int64) for lv in levels]
                    + [np.ones(n, dtype=np.int64) if training is None else np.asarray(training, dtype=np.int64)], axis=1)
    _, groups = np.unique(keys, axis=0, return_inverse=True)
    order, centroids, offsets = build_lists(out["embedding"], groups.ravel(), LIST_SIZE, random_state)
    out["embedding"] = out["embedding"][order]
    out["labels"] = {lv: np.asarray(codes)[order] for lv, codes in reference["labels"].items()}
    if training is not None:
        out["training_cell"] = np.asarray(training, dtype=bool)[order]
    out["index"] = {"kind": "lists", "centroids": centroids, "offsets": offsets, "n_probe": N_PROBE,
                    "n_probe_class": N_PROBE_CLASS, "list_size": LIST_SIZE}
    return out


def needs_index(reference: dict[str, Any]) -> bool:
    """True when the reference is too large for exact search and carries no index (a model saved before indexes)."""
    return reference["embedding"].shape[0] > EXACT_SEARCH_MAX_CELLS and reference.get("index") is None


class ReferenceSearch:
    """Neighbour search over a model's KNN reference (see :func:`index_reference`).

    :meth:`query` searches every reference cell (the KNN vote);
    :meth:`class_index` gives a search over the *training* cells of one class at
    one level (the novelty score's reference), or ``None`` when it has none.
    """

    def __init__(self, reference: dict[str, Any], levels: list[str]) -> None:
        self.reference = reference
        self.levels = list(levels)
        self.n_cells = int(reference["embedding"].shape[0])
        index = reference.get("index")
        self._classes: dict[tuple[str, int], Any] = {}
        if index is None:
            self.lists = None
            self._all: Any = NeighbourIndex(reference["embedding"])
        else:
            self.lists = ListIndex(reference["embedding"], index["centroids"], index["offsets"],
                                   n_probe=int(index.get("n_probe", N_PROBE)))
            self.n_probe_class = int(index.get("n_probe_class", self.lists.n_probe))
            self._all = self.lists
            first = index["offsets"][:-1]
            training = reference.get("training_cell")
            self._list_training = np.ones(len(first), dtype=bool) if training is None else np.asarray(training)[first]
            self._list_codes = {lv: np.asarray(reference["labels"][lv])[first] for lv in self.levels}

    def query(self, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(reference rows, distances)`` of the ``k`` nearest reference cells of each point."""
        return self._all.query(points, k)

    def class_index(self, level: str, code: int) -> Any | None:
        """A search (``.query(points, k)``) over the training cells of class ``code`` at ``level``; cached."""
        key = (level, int(code))
        if key not in self._classes:
            if self.lists is not None:
                lists = (self._list_codes[level] == code) & self._list_training & (self.lists.sizes > 0)
                self._classes[key] = _ClassLists(self.lists, lists, self.n_probe_class) if lists.any() else None
            else:
                members = np.asarray(self.reference["labels"][level]) == code
                training = self.reference.get("training_cell")
                if training is not None:
                    members &= np.asarray(training, dtype=bool)
                emb = self.reference["embedding"][members]
                self._classes[key] = NeighbourIndex(emb) if len(emb) else None
        return self._classes[key]


class _ClassLists:
    """The lists of one class in a :class:`ListIndex`, searched like a :class:`NeighbourIndex`."""

    def __init__(self, lists: ListIndex, allowed: np.ndarray, n_probe: int) -> None:
        self._lists, self._allowed, self.n_probe = lists, allowed, n_probe
        self.n_cells = int(lists.sizes[allowed].sum())

    def query(self, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._lists.query(points, k, lists=self._allowed, n_probe=self.n_probe)
