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
:func:`probes_for` lists whose centroids are nearest (an inverted-file index, as in
FAISS' ``IndexIVFFlat``). Because every list holds cells of one label per level
and one training flag, the same index also answers "the nearest training cells
of class *c*" (the novelty score) by probing only that class's lists. The index
is a few plain arrays (centroids and list offsets, with the reference stored in
list order), built once at training and saved with the model; see
:mod:`atlasmtl.artifacts`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch

from .runtime import torch_threads

#: References up to this size use exact (brute-force) search; larger ones a :class:`ListIndex`. At
#: 100k cells the index gives the same calls as exact search (semi-synthetic 100k reference, 10k query:
#: finest macro-F1 0.7932 vs 0.7931, Unknown 3.00% vs 2.98%) in 1.25 s instead of 4.37 s (the novelty
#: score's class-restricted search dominates); the index's recall: :func:`probes_for`.
EXACT_SEARCH_MAX_CELLS = 20_000
#: Reference cells sampled for the neighbour-label-agreement diagnostic.
_AGREEMENT_POOL = 50_000
#: Query × reference scores held at once by exact search (16M floats = 64 MB).
_SCORE_BUDGET = 1 << 24
#: Target cells per list of a :class:`ListIndex`.
LIST_SIZE = 512
#: Fewest lists a :class:`ListIndex` query compares exactly (the nearest by centroid); more for
#: references of more lists, see :func:`probes_for`.
N_PROBE = 16
#: Probed lists per square root of the number of lists (:func:`probes_for`; a heuristic, set so recall@15
#: stays above 0.95 at 1M cells, where 16 probes gave 0.947).
PROBES_PER_SQRT_LIST = 0.6
#: Lists probed by the novelty score's class-restricted search (it needs the mean distance to the 10
#: nearest cells of one class, not the neighbours themselves): at 1M cells its log distance differs
#: from 32 probes' by 0.007 (sd), 2% of the novelty null's scale, for half the work of 16 probes.
N_PROBE_CLASS = 8
#: Dtype of the stored reference embedding (half the memory of float32; distances agree to ~1e-3).
EMBEDDING_DTYPE = np.float16
#: Query cells prediction gathers for one :meth:`ReferenceSearch.search` (one pass over the lists of a
#: :class:`ListIndex`; at 1M cells 8,192 took 1.67 s per 10k query, 16,384 1.14–1.34 s).
SEARCH_BLOCK = 16_384
#: Bytes of candidate buffers (a score and a row per probed list, point and neighbour) one pass over the
#: lists may hold; more points than fit are searched in several passes (at 1M cells, with the vote's 27
#: probes and two levels' 8 novelty probes, 13,000 points fit).
_CANDIDATE_BUDGET = 1 << 26
#: Points whose centroid scores (points × lists) are held at once when probes are chosen.
_PROBE_CHUNK = 4096
#: Most rows a list-index k-means is fitted on per group of cells (256 per list up to this; a group of
#: more than ~260k cells is fitted on a sample of this size, so building the index needs bounded memory).
KMEANS_MAX_FIT_ROWS = 1 << 17
#: Embedding rows read or written at once when an index is built (8,192 × 128 float32 = 4 MB).
_ROW_CHUNK = 8192
#: Row × centre scores held at once by the k-means of a list index (4M floats = 16 MB).
_ASSIGN_BUDGET = 1 << 22


def normalise_rows(z: np.ndarray) -> np.ndarray:
    """L2-normalise rows (zero rows stay zero)."""
    z = np.asarray(z, dtype=np.float32)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)


class EmbeddingFile:
    """A float16 (:data:`EMBEDDING_DTYPE`) embedding written row chunk by row chunk, in memory or on disk.

    On disk the rows go to an unlinked temporary file (:func:`tempfile.TemporaryFile`, in the
    system's temporary folder) through plain file writes and are read back with positioned
    reads, never through a memory map (a map would keep every page it faults in, and the
    kernel faults in runs of pages around each row read), so neither writing nor reading
    holds the embedding in memory: what a process keeps does not grow with the number of rows.

    Parameters
    ----------
    n_rows, width
        Shape of the finished embedding.
    on_disk
        Keep the rows in a temporary file instead of a numpy array.
    """

    def __init__(self, n_rows: int, width: int, on_disk: bool) -> None:
        self.shape = (int(n_rows), int(width))
        self.dtype = np.dtype(EMBEDDING_DTYPE)
        self.on_disk = bool(on_disk) and self.shape[0] * self.shape[1] > 0
        self.n_written = 0
        self._file = tempfile.TemporaryFile(prefix="atlasmtl-embedding-") if self.on_disk else None
        self._array = None if self.on_disk else np.empty(self.shape, dtype=self.dtype)

    def close(self) -> None:
        """Close the temporary file (its space is freed once no :meth:`finish` map uses it)."""
        file = getattr(self, "_file", None)  # absent when __init__ failed before opening it
        if file is not None and not file.closed:
            file.close()

    def __del__(self) -> None:
        # closed here, not left to the file object's finaliser, which warns "unclosed file" (ResourceWarning)
        self.close()

    @classmethod
    def for_reference(cls, n_rows: int, width: int) -> "EmbeddingFile":
        """On disk for references over :data:`EXACT_SEARCH_MAX_CELLS` cells (the ones given a :class:`ListIndex`)."""
        return cls(n_rows, width, on_disk=n_rows > EXACT_SEARCH_MAX_CELLS)

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (cells × width; cast to float16)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.ndim != 2 or rows.shape[1] != self.shape[1] or self.n_written + len(rows) > self.shape[0]:
            raise ValueError(f"rows of shape {rows.shape} do not fit an embedding of shape {self.shape} "
                             f"with {self.n_written} rows written")
        if self._file is not None:
            self._file.write(memoryview(rows).cast("B"))
        else:
            self._array[self.n_written : self.n_written + len(rows)] = rows
        self.n_written += len(rows)

    def __getitem__(self, rows: Any) -> np.ndarray:
        """A copy of the rows ``rows`` (slice, row numbers or boolean mask) of the written embedding."""
        if self._file is None:
            return self._array[rows]
        self._file.flush()
        n, row_bytes = self.shape[0], self.shape[1] * self.dtype.itemsize
        if isinstance(rows, slice) and rows.indices(n)[2] == 1:
            start, stop, _ = rows.indices(n)
            out = np.empty((max(stop - start, 0), self.shape[1]), dtype=self.dtype)
            self._read(memoryview(out).cast("B"), start * row_bytes)
            return out
        rows = np.arange(n)[rows] if isinstance(rows, slice) else np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = np.where(rows < 0, rows + n, rows).astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row numbers out of range for an embedding of {n} rows")
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        view = memoryview(out).cast("B")
        for i, row in enumerate(rows.tolist()):  # one read per row: no pages of the file are mapped
            self._read(view[i * row_bytes : (i + 1) * row_bytes], row * row_bytes)
        return out

    def _read(self, buffer: memoryview, offset: int) -> None:
        """Fill ``buffer`` with the file's bytes from ``offset`` (``pread``: the file is not mapped, so a
        read leaves nothing in the process's memory; reading through a map would fault in whole runs of pages)."""
        done = 0
        while done < len(buffer):
            if hasattr(os, "preadv"):
                got = os.preadv(self._file.fileno(), [buffer[done:]], offset + done)
            else:  # pragma: no cover - platforms without preadv
                self._file.seek(offset + done)
                got = self._file.readinto(buffer[done:])
            if not got:
                raise OSError("the temporary embedding file ended early")
            done += got

    def finish(self) -> np.ndarray:
        """The whole embedding: the array, or on disk a read-only :class:`numpy.memmap` of the temporary file."""
        if self.n_written != self.shape[0]:
            raise ValueError(f"{self.n_written} of {self.shape[0]} embedding rows were written")
        if self._file is None:
            return self._array
        self._file.flush()
        return np.memmap(self._file, dtype=self.dtype, mode="r", shape=self.shape)


def probes_for(n_lists: int) -> int:
    """Lists an index of ``n_lists`` lists compares per query point: ``max(N_PROBE, ceil(0.6 * sqrt(n_lists)))``.

    16 up to ~700 lists (~360,000 cells); 27 at 1M cells (1,960 lists). Measured on the semi-synthetic 1M
    reference (2,000 query cells, recall@15 against exact search): 16 probes 0.947, 24 0.969, 32 0.979,
    48 0.990, at 1.0 / 1.4 / 1.5 / 2.0 s; at 100k (202 lists) 16 probes give 0.996.
    """
    return max(N_PROBE, int(np.ceil(PROBES_PER_SQRT_LIST * np.sqrt(max(int(n_lists), 1)))))


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


def nearest_rows(points: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the ``k`` nearest rows of ``ref`` for every point (exact Euclidean, in no particular
    order): the lean search for callers that need the neighbour set alone (no distances, no ranking),
    in chunks that bound the score matrix to :data:`_SCORE_BUDGET` floats."""
    ref_t = _as_float32(ref)
    ref_sq = (ref_t**2).sum(dim=1)
    k = min(int(k), ref_t.shape[0])
    out = np.empty((len(points), k), dtype=np.int64)
    chunk = max(1, min(2048, _SCORE_BUDGET // max(ref_t.shape[0], 1)))
    for start in range(0, len(points), chunk):
        q = _as_float32(points[start : start + chunk])
        # the largest 2 q·r − ||r||² is the nearest row
        score = torch.addmm(ref_sq, q, ref_t.T, beta=-1.0, alpha=2.0)
        out[start : start + len(q)] = torch.topk(score, k, dim=1, sorted=False).indices.numpy()
    return out


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


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    """One search answered by :meth:`ListIndex.query_many`: the ``k`` nearest rows of the points
    ``rows`` (positions in the searched points), within ``lists`` (boolean per list; all when
    ``None``), comparing each point with its ``n_probe`` nearest allowed lists (the index's own
    :attr:`ListIndex.n_probe` when ``None``)."""

    rows: np.ndarray
    k: int
    lists: np.ndarray | None = None
    n_probe: int | None = None


def _each_list(work: Callable[[range], None], n_lists: int) -> None:
    """Run ``work`` over the list numbers ``0 .. n_lists - 1``, split between as many Python threads as
    torch may use (:func:`torch.get_num_threads`, set by the caller), each torch operation on one thread.

    Each list's product is small (~500 rows): several torch threads per product only add their start-up
    to it, which costs milliseconds per list when the cores are busy (measured at 1M cells on a loaded
    2-core machine: 150 s for 2,000 query cells on 2 threads, 2 s on one), so the cores share the lists
    instead (torch releases the GIL inside each operation).
    """
    workers = max(1, min(torch.get_num_threads(), n_lists))
    with torch_threads(1):
        if workers == 1:
            work(range(n_lists))
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, [range(w, n_lists, workers) for w in range(workers)]))


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
        return cls(np.asarray(embedding)[order], centroids, offsets, row_ids=order.astype(np.int64),
                   n_probe=probes_for(len(centroids)))

    # ------------------------------------------------------------------ search
    def query(self, points: np.ndarray, k: int, lists: np.ndarray | None = None,
              n_probe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, distances)`` of the ``k`` nearest rows, searching only ``lists`` (boolean per list) if given,
        in the ``n_probe`` (default :attr:`n_probe`) nearest of them.

        Rows are ranked exactly within the probed lists; when those hold fewer
        than ``k`` rows for a point, that point is searched exactly over all
        allowed rows instead, so every answer has ``min(k, allowed rows)`` neighbours.
        """
        everyone = np.arange(len(points))
        return self.query_many(points, [SearchRequest(everyone, k, lists, n_probe)])[0]

    def query_many(self, points: np.ndarray, requests: list["SearchRequest"]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Answer several searches of the same points in one pass over the lists.

        Each :class:`SearchRequest` asks for the ``k`` nearest rows of some of the
        points within some of the lists, as :meth:`query` would answer it; a list
        probed by several requests for the same point is compared with it once.
        Returns one ``(ids, distances)`` per request, a row per requested point.
        """
        points = np.ascontiguousarray(points, dtype=np.float32)
        rows_of = [np.asarray(r.rows, dtype=np.int64) for r in requests]
        probes_of = [self.n_probe if r.n_probe is None else int(r.n_probe) for r in requests]
        ks = [min(int(r.k), self.n_cells if r.lists is None else int(self.sizes[r.lists].sum())) for r in requests]
        answers = [(np.zeros((len(rows), k), dtype=np.int64), np.zeros((len(rows), k), dtype=np.float32))
                   for rows, k in zip(rows_of, ks)]
        probes_per_point = sum(len(rows) * p for rows, p in zip(rows_of, probes_of)) / max(len(points), 1)
        chunk = max(1024, int(_CANDIDATE_BUDGET // max(probes_per_point * max(ks, default=1) * 8, 1)))
        for start in range(0, len(points), chunk):
            stop = min(start + chunk, len(points))
            q = torch.from_numpy(points[start:stop])
            specs, owners = [], []
            for j, (r, rows, k, n_probe) in enumerate(zip(requests, rows_of, ks, probes_of)):
                where = np.flatnonzero((rows >= start) & (rows < stop))
                if len(where) and k > 0:
                    specs.append((rows[where] - start, k, r.lists, n_probe))
                    owners.append((j, where))
            if not specs:
                continue
            for (j, where), (local, k, lists, _), (i, d) in zip(owners, specs, self._search(q, specs)):
                short = np.flatnonzero((i < 0).any(axis=1))
                if len(short):
                    i[short], d[short] = self._search_all(q[torch.from_numpy(local[short])], k, lists)
                answers[j][0][where], answers[j][1][where] = i, d
        if self.row_ids is not None:
            answers = [(np.asarray(self.row_ids)[i], d) for i, d in answers]
        return answers

    def _probes(self, q: torch.Tensor, lists: np.ndarray | None, n_probe: int) -> np.ndarray:
        """The ``n_probe`` allowed lists nearest to each point by centroid (points × probes), scored in
        chunks of at most :data:`_PROBE_CHUNK` points and :data:`_SCORE_BUDGET` scores."""
        usable = self.sizes > 0 if lists is None else lists & (self.sizes > 0)
        n_probe = int(min(n_probe, usable.sum()))
        blocked = torch.from_numpy(~usable) if not usable.all() else None
        out = np.empty((q.shape[0], n_probe), dtype=np.int64)
        step = max(1, min(_PROBE_CHUNK, _SCORE_BUDGET // max(len(self.sizes), 1)))
        for s in range(0, q.shape[0], step):
            score = 2.0 * (q[s : s + step] @ self.centroids.T) - self._centroid_sq
            if blocked is not None:
                score[:, blocked] = -torch.inf
            out[s : s + step] = torch.topk(score, n_probe, dim=1).indices.numpy()
        return out

    def _search(self, q: torch.Tensor, specs: list[tuple[np.ndarray, int, np.ndarray | None, int]]
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(rows, distances)`` per spec ``(points, k, lists, n_probe)`` (positions in ``q``); a point
        whose probed lists hold fewer than ``k`` rows gets ``-1`` rows (the caller searches it exactly)."""
        m = q.shape[0]
        points = [q[torch.from_numpy(local)] for local, *_ in specs]
        probes = [self._probes(p, lists, n_probe) for p, (_, _, lists, n_probe) in zip(points, specs)]
        # every (list, point) pair any spec probes, once: list-major keys, so each list's points are contiguous
        keys = np.concatenate([(p * m + local[:, None]).ravel() for p, (local, *_) in zip(probes, specs)])
        pairs, pair_of = np.unique(keys, return_inverse=True)
        pair_list, pair_point = pairs // m, pairs % m
        touched, first = np.unique(pair_list, return_index=True)
        last = np.append(first[1:], len(pairs))
        k_max = max(k for _, k, _, _ in specs)
        best = torch.full((len(pairs), k_max), -torch.inf)
        best_row = torch.full((len(pairs), k_max), -1, dtype=torch.int32 if self.n_cells < 2**31 else torch.int64)

        def compare(span: list[int]) -> None:
            for t in span:
                lst, a, b = int(touched[t]), int(first[t]), int(last[t])
                lo, hi = int(self.offsets[lst]), int(self.offsets[lst + 1])
                rows = _as_float32(self.embedding[lo:hi])
                score = 2.0 * (q[torch.from_numpy(pair_point[a:b])] @ rows.T) - (rows * rows).sum(dim=1)
                kk = min(k_max, hi - lo)
                top, where = torch.topk(score, kk, dim=1)
                best[a:b, :kk] = top
                best_row[a:b, :kk] = where + lo

        _each_list(compare, len(touched))
        out, at = [], 0
        for p, qs, (local, k, _, _) in zip(probes, points, specs):
            ids = torch.from_numpy(pair_of[at : at + p.size].reshape(p.shape))
            at += p.size
            top, where = torch.topk(best[ids][:, :, :k].reshape(len(local), -1), k, dim=1)
            idx = best_row[ids][:, :, :k].reshape(len(local), -1).gather(1, where)
            missing = ~torch.isfinite(top)  # too few rows in the probed lists: the caller searches these points exactly
            idx[missing] = int(self.offsets[np.argmax(self.sizes > 0)])  # any row, to keep the shapes
            chosen = np.unique(idx.numpy())
            rows = _as_float32(self.embedding[chosen])[torch.from_numpy(np.searchsorted(chosen, idx.numpy()))]
            i, d = _distances(qs, rows, idx)
            i[missing.any(dim=1).numpy()] = -1
            out.append((i, d))
        return out

    def _search_all(self, q: torch.Tensor, k: int, lists: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over every allowed row (the fallback for points whose probed lists are too small)."""
        chosen = np.flatnonzero(self.sizes > 0) if lists is None else np.flatnonzero(lists & (self.sizes > 0))
        rows = np.concatenate([np.arange(self.offsets[c], self.offsets[c + 1]) for c in chosen])
        whole = len(rows) == self.n_cells and isinstance(self.embedding, np.ndarray)
        ref = _as_float32(self.embedding if whole else self.embedding[rows])
        i, d = _exact_search(q, ref, (ref**2).sum(dim=1), k)
        return rows[i], d


def _lloyd(x: torch.Tensor, n_clusters: int, rng: np.random.Generator, n_iter: int = 15,
           scores: torch.Tensor | None = None) -> torch.Tensor:
    """Centroids of ``n_clusters`` by Lloyd's k-means from randomly chosen rows (matrix products in torch).

    scikit-learn's ``KMeans`` spends minutes in its k-means++ seeding at a
    million cells; for an inverted-file index a random start and a few Lloyd
    steps partition as well (the lists only need to be compact, not optimal).
    An emptied cluster is restarted at a random row. ``scores``: a buffer for
    :func:`_nearest_centre`.
    """
    centres = x[torch.from_numpy(rng.choice(len(x), n_clusters, replace=False))].clone()
    for _ in range(n_iter):
        assign = _nearest_centre(x, centres, scores)
        counts = torch.bincount(assign, minlength=n_clusters)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        empty = counts == 0
        centres = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
        if empty.any():
            centres[empty] = x[torch.from_numpy(rng.choice(len(x), int(empty.sum()), replace=False))]
    return centres


def _nearest_centre(x: torch.Tensor, centres: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Index of each row's nearest centre, in row chunks whose rows × centres scores stay within
    :data:`_ASSIGN_BUDGET`, written into ``scores`` (a float32 buffer of at least that many values,
    reused across calls) when given.

    Reusing one buffer matters at millions of cells: a fresh 16 MB score matrix per chunk is carved
    from the C heap once glibc has raised its ``mmap`` threshold, and the heap then grows in steps
    (measured: the 5M-cell index build peaked 558 MB above its start with fresh matrices).
    """
    sq = (centres**2).sum(dim=1)
    chunk = max(64, _ASSIGN_BUDGET // max(len(centres), 1))
    if scores is None or scores.numel() < min(chunk, len(x)) * len(centres):
        scores = torch.empty(min(chunk, len(x)) * len(centres))
    parts = []
    for s in range(0, len(x), chunk):
        rows = x[s : s + chunk]
        score = torch.matmul(rows, centres.T, out=scores[: len(rows) * len(centres)].view(len(rows), len(centres)))
        parts.append(torch.argmax(score.mul_(2.0).sub_(sq), dim=1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def row_number_dtype(n: int) -> type:
    """int32 for row numbers (and numbers of row groups) of ``n`` rows when they fit, else int64:
    4 bytes per cell for the per-cell arrays kept while training and indexing."""
    return np.int32 if n < 2**31 else np.int64


def _dense_numbers(values: np.ndarray) -> np.ndarray:
    """Number the distinct values of an integer array 0, 1, ... in increasing order, as
    ``np.unique(values, return_inverse=True)[1]`` does, as :func:`row_number_dtype` integers.

    Non-negative values below twice the length (+ 65,536) are numbered through a table of that many
    entries, so no sorted copy of ``values`` is made; others go through :func:`numpy.unique` (its
    sort takes several 8-byte copies per value: ~200 MB at five million cells).
    """
    dtype = row_number_dtype(len(values))
    top = int(values.max(initial=-1))
    if np.issubdtype(values.dtype, np.integer) and (len(values) == 0 or int(values.min()) >= 0) \
            and top < 2 * len(values) + 65536:
        present = np.zeros(top + 1, dtype=bool)
        present[values] = True
        number = np.cumsum(present, dtype=dtype) - 1  # counts up to the distinct values (≤ len(values))
        return number[values]
    return np.unique(values, return_inverse=True)[1].ravel().astype(dtype)


def build_lists(embedding: np.ndarray | EmbeddingFile, groups: np.ndarray | None = None, list_size: int = LIST_SIZE,
                random_state: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partition rows into lists of about ``list_size`` rows, each inside one group.

    Each group (rows sharing a ``groups`` value; all rows when ``None``) is cut
    by k-means (:func:`_lloyd`, fitted on at most 256 rows per list and
    :data:`KMEANS_MAX_FIT_ROWS` in all) into ``round(size / list_size)`` lists;
    every row joins its nearest centroid and the centroids are then the means of
    their lists. Empty lists are dropped. ``embedding`` (an array or an
    :class:`EmbeddingFile`) is read in chunks of rows, so memory stays bounded
    beyond a few integers per row.

    Returns
    -------
    ``(order, centroids, offsets)``: row numbers in list order (int32 below 2**31 rows: 4 bytes
    per cell), the lists' centroids (float32) and their boundaries in ``order``.
    """
    n = int(embedding.shape[0])
    rows_dtype = row_number_dtype(n)
    group_of = np.zeros(n, dtype=rows_dtype) if groups is None else _dense_numbers(np.asarray(groups).ravel())
    by_group = np.argsort(group_of, kind="stable").astype(rows_dtype)
    members_of = np.split(by_group, np.cumsum(np.bincount(group_of))[:-1])
    del group_of
    rng = np.random.default_rng(random_state)
    order = np.empty(n, dtype=rows_dtype)  # filled group by group (no list of per-group copies to concatenate)
    filled, centroids, sizes = 0, [], []
    # buffers reused by every chunk of every group (see _nearest_centre): scores, rows as float32 and float64
    width = int(embedding.shape[1])
    lists_of = [max(1, int(round(len(members) / list_size))) for members in members_of]
    scores = torch.empty(max([min(max(64, _ASSIGN_BUDGET // k), len(m)) * k for m, k in zip(members_of, lists_of) if k > 1],
                             default=0))
    chunk_rows = min(_ROW_CHUNK, max((len(m) for m in members_of), default=0))
    rows32, rows64 = torch.empty((chunk_rows, width)), torch.empty((chunk_rows, width), dtype=torch.float64)
    for members, n_lists in zip(members_of, lists_of):
        if n_lists == 1:
            centres = None
        else:
            n_fit = min(256 * n_lists, KMEANS_MAX_FIT_ROWS)
            fit = members if len(members) <= n_fit else members[np.sort(rng.choice(len(members), n_fit, replace=False))]
            centres = _lloyd(_as_float32(embedding[fit]), n_lists, rng, scores=scores)
        # every row joins its nearest centre; the lists' sums, in chunks of rows read as needed
        assign = np.zeros(len(members), dtype=np.int32)
        sums = torch.zeros((n_lists, width), dtype=torch.float64)
        for s in range(0, len(members), _ROW_CHUNK):
            block = np.asarray(embedding[members[s : s + _ROW_CHUNK]])
            with warnings.catch_warnings():  # a read-only array: the tensor is only read, by copy_
                warnings.simplefilter("ignore", UserWarning)
                x = rows32[: len(block)].copy_(torch.from_numpy(block))
            part = torch.zeros(len(x), dtype=torch.int64) if centres is None else _nearest_centre(x, centres, scores)
            assign[s : s + len(x)] = part.numpy()
            sums.index_add_(0, part, rows64[: len(x)].copy_(x))
        counts = np.bincount(assign, minlength=n_lists)
        order[filled : filled + len(members)] = members[np.argsort(assign, kind="stable")]
        filled += len(members)
        keep = counts > 0
        centroids.append((sums.numpy()[keep] / counts[keep, None]).astype(np.float32))
        sizes.append(counts[keep])
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


#: Where :func:`atlasmtl.predict` takes query coordinates from (its ``coordinates`` option): ``"neighbours"``
#: (:func:`neighbour_coordinates`), ``"heads"`` (the coordinate heads' regression), or ``"auto"`` (neighbours
#: where the model stores its reference cells' coordinates, else the heads).
COORDINATE_SOURCES = ("auto", "neighbours", "heads")


def neighbour_coordinates(neighbour_idx: np.ndarray, reference_coords: np.ndarray) -> np.ndarray:
    """Each query cell's coordinates: the mean of its reference neighbours' coordinates.

    Parameters
    ----------
    neighbour_idx
        Reference rows, one row of ``k`` neighbours per query cell (``-1``: no neighbour, left out).
    reference_coords
        The reference cells' coordinates (reference cells × dims), in the rows' order.

    Returns
    -------
    Query cells × dims float32 (NaN for a cell without neighbours). A query cell sits among the
    reference cells nearest it in the KNN space, as scanpy's ``ingest`` starts it; unlike a
    regression head, the mean is not drawn toward the middle of the reference.
    """
    found = neighbour_idx >= 0
    values = np.asarray(reference_coords, dtype=np.float32)[np.maximum(neighbour_idx, 0)]  # a copy
    values[~found] = 0.0
    count = found.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values.sum(axis=1) / count).astype(np.float32)


def agreement_cells(codes: np.ndarray, k: int = 15, max_cells: int = 5000,
                    random_state: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """The cells :func:`neighbour_label_agreement` looks at: ``(pool, sample)``.

    ``pool``: sorted row numbers of up to 50,000 labelled cells (the searched set);
    ``sample``: positions in ``pool`` of up to ``max_cells`` cells whose neighbours are
    compared. ``None`` when there are too few labelled cells (``k + 1`` or fewer).
    """
    labelled = np.flatnonzero(codes >= 0)
    if len(labelled) <= k + 1:
        return None
    rng = np.random.default_rng(random_state)
    pool = np.sort(rng.choice(labelled, size=min(_AGREEMENT_POOL, len(labelled)), replace=False))
    sample = rng.choice(len(pool), size=min(max_cells, len(pool)), replace=False)
    return pool, sample


def neighbour_label_agreement(
    embedding: np.ndarray, codes: np.ndarray, k: int = 15, max_cells: int = 5000, random_state: int = 0,
    pool_only: bool = False,
) -> float | None:
    """Mean fraction of a reference cell's ``k`` neighbours (itself excluded) sharing its label.

    The cells are :func:`agreement_cells`' (same ``codes``, ``k``, ``max_cells`` and
    ``random_state``). ``embedding`` holds a row per cell, or with ``pool_only=True``
    only the rows of that pool (in its order), which is all this reads.
    """
    cells = agreement_cells(codes, k, max_cells, random_state)
    if cells is None:
        return None
    pool, sample = cells
    pool_embedding = np.asarray(embedding) if pool_only else embedding[pool]
    index: Any = NeighbourIndex(pool_embedding, random_state=random_state)
    idx, _ = index.query(pool_embedding[sample], k + 1)
    neighbour_codes = codes[pool][idx[:, 1:]]
    return float(np.mean(neighbour_codes == codes[pool[sample]][:, None]))


# ---------------------------------------------------------------- the model's reference
def _group_numbers(columns: list[np.ndarray]) -> np.ndarray:
    """Number the distinct rows of integer ``columns`` (each ≥ -1) in lexicographic order, as
    ``np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True)`` does, from one integer key per
    row (4 or 8 bytes per row instead of several copies of the stacked table)."""
    radices = [int(np.asarray(col).max(initial=-1)) + 2 for col in columns]  # digits 0 .. max + 1 (-1 → 0)
    room = int(np.prod([float(r) for r in radices]))
    if room >= 2**62:  # too many combinations for one int64 key
        stacked = np.stack([np.asarray(c, dtype=np.int64) for c in columns], axis=1)
        return np.unique(stacked, axis=0, return_inverse=True)[1].ravel().astype(row_number_dtype(len(stacked)))
    key = np.zeros(len(columns[0]), dtype=np.int32 if room < 2**31 else np.int64)
    for col, radix in zip(columns, radices):
        key *= radix
        key += np.asarray(col)
        key += 1
    return _dense_numbers(key)


def index_reference(reference: dict[str, Any], levels: list[str], random_state: int = 0) -> dict[str, Any]:
    """The KNN reference ready to search: embedding as :data:`EMBEDDING_DTYPE`, and above
    :data:`EXACT_SEARCH_MAX_CELLS` cells, reordered into the lists of a :class:`ListIndex`.

    ``reference["embedding"]`` may be an :class:`EmbeddingFile`. One on disk is indexed in
    chunks of rows into a new :class:`EmbeddingFile` on disk (the rows in list order), which
    the returned record holds: it can be searched as it is (:class:`ReferenceSearch` reads
    it list by list) and :meth:`EmbeddingFile.finish` gives the array a model keeps. So
    indexing a large reference needs bounded memory beyond a few integers per cell.

    Lists never mix labels (at any level) or training and held-out cells, so one
    index serves the vote over every cell and the novelty search over one class's
    training cells. Returns a new record (``embedding``, ``labels``,
    ``training_cell`` and ``coords`` in the new order, and ``index``: ``centroids``,
    ``offsets``, ``n_probe``, ``list_size``); the input is not changed.
    """
    embedding = reference["embedding"]
    if not isinstance(embedding, EmbeddingFile):
        embedding = np.ascontiguousarray(np.asarray(embedding), dtype=EMBEDDING_DTYPE)
    n = embedding.shape[0]
    if n <= EXACT_SEARCH_MAX_CELLS or reference.get("index") is not None:
        on_disk = isinstance(embedding, EmbeddingFile) and embedding.on_disk
        return dict(reference, embedding=embedding.finish() if isinstance(embedding, EmbeddingFile) and not on_disk
                    else embedding)
    out = dict(reference)
    training = reference.get("training_cell")
    columns = [np.asarray(reference["labels"][lv]) for lv in levels]
    columns.append(np.ones(n, dtype=np.int8) if training is None else np.asarray(training, dtype=np.int8))
    groups = _group_numbers(columns)
    del columns
    order, centroids, offsets = build_lists(embedding, groups, LIST_SIZE, random_state)
    del groups
    in_order = EmbeddingFile(n, embedding.shape[1], on_disk=getattr(embedding, "on_disk", False))
    for start in range(0, n, _ROW_CHUNK):
        in_order.write(embedding[order[start : start + _ROW_CHUNK]])
    out["embedding"] = in_order if in_order.on_disk else in_order.finish()
    out["labels"] = {lv: np.asarray(codes)[order] for lv, codes in reference["labels"].items()}
    if training is not None:
        out["training_cell"] = np.asarray(training, dtype=bool)[order]
    if reference.get("coords"):
        out["coords"] = {name: np.asarray(values)[order] for name, values in reference["coords"].items()}
    out["index"] = {"kind": "lists", "centroids": centroids, "offsets": offsets, "n_probe": probes_for(len(centroids)),
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

    def search(self, points: np.ndarray, vote_rows: np.ndarray | None, k: int,
               class_codes: dict[str, np.ndarray], k_class: int) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """The vote's neighbours and the novelty score's class distances of a block of points, in one search.

        Parameters
        ----------
        points
            L2-normalised embeddings (points × dims).
        vote_rows
            Positions of the points whose ``k`` nearest reference cells the vote needs (``None``: none).
        k
            Neighbours per voting point.
        class_codes
            Level → a class code per point (``-1``: skip the point at that level).
        k_class
            Training cells of the point's class averaged into its class distance.

        Returns
        -------
        ``(neighbours, distances)``: reference rows of the voting points' neighbours
        (``len(vote_rows)`` × ``k``; ``None`` without ``vote_rows``) and, per level, each
        point's mean distance to the ``k_class`` nearest training cells of its class
        (NaN for code ``-1``, infinite when the class has no training cells). With a
        :class:`ListIndex` every search shares one pass over the lists.
        """
        points = np.ascontiguousarray(points, dtype=np.float32)
        distances = {lv: np.full(len(points), np.nan, dtype=np.float64) for lv in class_codes}
        requests = [] if vote_rows is None or self.lists is None else [SearchRequest(np.asarray(vote_rows), k)]
        owners = []
        for lv, codes in class_codes.items():
            for c in np.unique(codes[codes >= 0]):
                rows = np.flatnonzero(codes == c)
                index = self.class_index(lv, int(c))
                if index is None:
                    distances[lv][rows] = np.inf
                elif self.lists is None:
                    distances[lv][rows] = index.query(points[rows], k_class)[1].mean(axis=1)
                else:
                    requests.append(SearchRequest(rows, k_class, index.allowed, index.n_probe))
                    owners.append((lv, rows))
        if self.lists is None:
            return (None if vote_rows is None else self._all.query(points[vote_rows], k)[0]), distances
        found = self.lists.query_many(points, requests)
        neighbours = None if vote_rows is None else found.pop(0)[0]
        for (lv, rows), (_, dist) in zip(owners, found):
            distances[lv][rows] = dist.mean(axis=1)
        return neighbours, distances

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
        self._lists, self.allowed, self.n_probe = lists, allowed, n_probe
        self.n_cells = int(lists.sizes[allowed].sum())

    def query(self, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._lists.query(points, k, lists=self.allowed, n_probe=self.n_probe)
