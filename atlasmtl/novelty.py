"""Open-set detection: is a cell far from every reference cell of the type it was given?

The score is the mean distance, in the encoder's L2-normalised embedding, from
a query cell to the ``k`` nearest *training* reference cells of its predicted
class at a level. Its null distribution comes from held-out reference cells
(scored the same way against the training cells), summarised by the median and
the MAD of the log distance. A query cell's novelty is the robust z-score

    z = (log d - location) / (1.4826 · MAD_null)

where ``location`` is the null median, raised when the query as a whole sits
further from the reference than held-out reference cells do (another platform
or chemistry), so its known cells are not called novel; cells that stand out
from the rest of the query are. The query's location is robust to a type the
reference lacks making up much of it (:func:`query_location_z`): per called
class, the lower quartile of its cells' z matched to the null's, and the median
of that over the classes, since a shift of the whole query moves every class
and a novel type only the few it is called as. A cell with ``z`` above the
threshold is ``Unknown`` at that level, and the KNN vote cannot relabel it,
unless the calibrated probability of its call is at least
:data:`NOVELTY_CONFIDENCE_GUARD`: distance
alone does not overrule a call the heads are that sure of. (On the benchmark's
15 cases × 6 seeds, the flags this removes were on known cells of the CellBench
Drop-seq and CEL-seq2 queries, all called right, and on 0.2% of the cells of a
type removed from the reference (H1975, 78.6% → 78.4% Unknown); see the API
contract.)

The embedding only holds what the network learned to tell the reference's
types apart, so a type it never saw can land inside a known type's cloud
there (NK cells among T cells). A second view looks at the input itself
(:class:`InputView`): the same class-conditional distance in a principal
component space of the reference's network input, located per class against
the class's own leave-one-out distances and scaled by the held-out cells.
A cell's novelty is the larger of the two z-scores.

Where a type the reference lacks forms its own group of query cells, the
group's mean score ranks it more surely than any one cell's score does. Each
cell's *neighbourhood novelty* (:func:`neighbourhood_novelty`) is the mean of
its level's z over its :data:`NEIGHBOURHOOD_K` nearest query cells (itself
included) in the input view's PCA. At the finest level a cell whose
neighbourhood's mean exceeds the same threshold is novel: the typical cell of
its group is far from the reference. A mean of 30 scores varies less than
one score, so known cells reach the threshold this way more rarely than one
by one, while a missing type whose cells mostly stay just under it is caught
(see the API contract, "Neighbourhood novelty").

A type the reference lacks that the network calls as a class too small for
the input view (under :data:`INPUT_VIEW_MIN_MEMBERS` kept cells) escapes both
views: the embedding puts it inside that class. What still gives it away is
that no reference cell lies among its cells. The model keeps its held-out
reference cells' PCA coordinates (with, in a reference larger than the PCA's
sample, the small classes' training cells outside that sample), and each
query cell's *query-only share*
(:func:`query_only_share`: the query cells among its nearest query and
held-out cells, the held-out cells weighted for the query's composition),
averaged over its query neighbourhood, near 1 in a query that otherwise mixes
with the reference (:func:`query_only_location`), makes such a call Unknown
at the finest level (see the API contract, "Query-only groups").

This was chosen by measurement over 15 real cases (see
``benchmark/experiments/trust_study.py`` and ``novelty_scores_study.py``)
against the energy score, class-conditional Mahalanobis distance,
(1 − calibrated confidence), distance to any reference cell, ensemble
disagreement, and each view alone; the evidence is in the API contract
("Novelty: the input view").
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtri  # the standard normal's quantile (scipy.stats, ~0.7 s to import, is not needed)

from .knn import nearest_rows

#: Reference neighbours of the predicted class averaged into the distance.
NOVELTY_K = 10
#: Default robust z-score above which a cell is novel at a level.
NOVELTY_THRESHOLD = 3.5
#: Calibrated probability of a call at or above which the cell is not called novel at that level.
NOVELTY_CONFIDENCE_GUARD = 0.9
#: A KNN vote keeps a low-confidence call labelled only for a cell whose novelty z-score at that level is at
#: most this (infinite: any cell the novelty score did not flag).
KNN_VOTE_MAX_Z = float("inf")
#: ... and only for a cell whose calibrated confidence is at most this far below the median confidence of
#: the query's cells given the same call at that level (infinite: any).
KNN_VOTE_MAX_CONFIDENCE_DROP = float("inf")
#: Above the finest level the embedding's novelty flag stands only where the input view, scoring the same
#: call at that level, also puts the cell above ``novelty_threshold`` plus this offset: both views must find
#: the cell far from its coarse class before its coarse call is withdrawn. A call into a class the view does
#: not score (fewer than :data:`INPUT_VIEW_MIN_MEMBERS` kept cells; a model without a view) keeps its flag.
#: ``None``: the embedding alone decides (until 2026-12-05). See the API contract, "Coarse flags need both
#: views".
COARSE_FLAG_VIEW_OFFSET: float | None = 0.0
#: The query is located by this quantile of its scores, matched to the same quantile of the null (a
#: normal one in robust-z units: −0.674 at 0.25). Under a pure shift every quantile gives the same
#: location; a lower one is not moved by novel cells until they are more than ``1 − q`` of the query
#: (0.5, the median, until 2026-12-01: a query half made of a type the reference lacks hid it; see the
#: API contract's "Where the query is located").
QUERY_LOCATION_QUANTILE = 0.25
#: Locate the query by the median, over its called classes, of each class's own location (classes with
#: at least :data:`QUERY_LOCATION_MIN_CELLS` query cells; the cells' quantile when fewer than two such
#: classes): a shift of the whole query moves every class, a novel type only those it is called as.
QUERY_LOCATION_BY_CLASS = True
QUERY_LOCATION_MIN_CELLS = 10
#: Query cells whose novelty z-scores are averaged into a cell's neighbourhood novelty (the cell included).
NEIGHBOURHOOD_K = 30
#: Most query cells the neighbourhood search compares with (exactly): a larger query is searched against a
#: random sample of this many of its usable cells, so the search costs at most ~55 µs per query cell on 2
#: cores (a 100,000-cell query: ~6 s). A type keeps ~k cells in the sample from 0.3% of the query up; a
#: rarer one has its neighbourhood mean diluted by other types' cells.
NEIGHBOURHOOD_MAX_CELLS = 10_000
#: A finest call into a class the input view does not score (fewer than :data:`INPUT_VIEW_MIN_MEMBERS` kept
#: cells) is novel where the cell's neighbourhood is made of query cells alone: the mean, over its
#: ``neighbourhood_k`` nearest query cells, of their *query-only share* (:func:`query_only_share`) above this.
#: ``None``: no such flag (until 2026-12-06). See the API contract, "Query-only groups".
QUERY_ONLY_SHARE: float | None = 0.95
#: ... and only where the query as a whole mixes with the reference: its location (:func:`query_only_location`)
#: below this. A query from another platform or species mixes with nothing, and then this flag says nothing.
QUERY_ONLY_MAX_LOCATION = 0.7
#: ... and only as a group: at least this many cells called as the same class pass the share. One or two cells of
#: a rare known type in a shifted query can sit apart from every held-out cell; a type the reference lacks
#: comes as a population (a lone novel cell is the per-cell scores' to find).
QUERY_ONLY_MIN_CELLS = 10
#: ... and only into a class the model's held-out reference cells represent: at least this many of them called so.
#: The calibration split holds ``floor(fraction * n)`` cells of an ``n``-cell class, ``fraction`` = 5,000 / the
#: reference's cells past 25,000: a 40-cell class has 1-2 past 100,000 cells and none past ~250,000. Query cells of
#: such a class mix with nothing, right or wrong, and one or two held-out cells cover only part of them (measured:
#: API contract, "Measured 2026-12-06, forty-third session"). ``None``: no such condition.
QUERY_ONLY_MIN_HELD: int | None = 3
#: The held-out cells the query-only share reads include, for each class the view does not score, its training
#: cells outside the view's PCA sample (:data:`INPUT_VIEW_PCA_CELLS`): out of the PCA's sample as held-out cells
#: are, so a small class of a reference past ~5,000 cells keeps its cells there although the calibration split
#: holds few or none of them (:data:`QUERY_ONLY_MIN_HELD`). ``False``: the calibration cells alone.
QUERY_ONLY_SMALL_CLASS_CELLS = True
#: Held-out reference cells weigh in proportion to how much more (or less) of their call the query holds,
#: within these bounds, so that a known class the query is rich in still mixes.
QUERY_ONLY_WEIGHT_BOUNDS = (0.1, 10.0)
#: Query cells searched at once by the neighbourhood search (bounds its neighbour lists).
_SEARCH_CHUNK = 65_536
_MAD_TO_SD = 1.4826
_MIN_SCALE = 1e-3


def query_location_z(z: np.ndarray, calls: np.ndarray | None = None) -> float:
    """How far, in null standard deviations, the query's finite robust z-scores ``z`` sit above the
    null: the :data:`QUERY_LOCATION_QUANTILE` quantile of ``z`` less the normal's same quantile (with
    :data:`QUERY_LOCATION_BY_CLASS` and the cells' ``calls``, the median of that over the called classes)."""
    q = QUERY_LOCATION_QUANTILE
    offset = float(ndtri(q))
    if QUERY_LOCATION_BY_CLASS and calls is not None:
        classes, counts = np.unique(calls, return_counts=True)
        per_class = [float(np.quantile(z[calls == c], q)) - offset
                     for c, n in zip(classes, counts) if n >= QUERY_LOCATION_MIN_CELLS]
        if len(per_class) >= 2:
            return float(np.median(per_class))
    return float(np.quantile(z, q)) - offset


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


def novelty_z(log_d: np.ndarray, null: dict[str, float], calls: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Robust z-score of each query cell's log distance; returns ``(z, location)``.

    The location is the null median, raised by :func:`query_location_z` of the
    query cells with a finite distance (``calls``: their called classes at this
    level) when that is positive. NaN distances (no prediction) give NaN.
    """
    finite = np.isfinite(log_d)
    location = float(null["median"])
    if finite.any():
        z0 = (log_d[finite] - location) / float(null["scale"])
        location += max(0.0, query_location_z(z0, None if calls is None else calls[finite])) * float(null["scale"])
    z = (log_d - location) / float(null["scale"])
    return z, location


# ---------------------------------------------------------------- the input view
#: Principal components of the input view (fewer when the reference has fewer training cells or genes).
INPUT_VIEW_COMPONENTS = 50
#: Most training cells the input view's PCA is fitted on (a random sample) ...
INPUT_VIEW_PCA_CELLS = 5_000
#: ... and most values (cells × genes) of that dense sample, so wide references take fewer cells.
INPUT_VIEW_PCA_VALUES = 20_000_000
#: Training cells per class and level the view keeps as that class's neighbours (a random sample).
INPUT_VIEW_MEMBERS = 500
#: A class with fewer kept training cells gets no input-view score: its own distances are too few to
#: locate it (rare known types, and whole classes another species shifts, would otherwise be called
#: novel: at 5 and 20 the brain mouse → human query lost finest macro-F1; see the API contract's evidence).
INPUT_VIEW_MIN_MEMBERS = 50
#: A called class with at least this many query cells is located at least at its own low quantile ...
INPUT_VIEW_MIN_QUERY = 20
#: ... this one: a class that the query shifts as a whole (another species) is not called novel wholesale.
INPUT_VIEW_CLASS_QUANTILE = 0.05
#: Calibrated probability of the finest call at or above which the input view does not call the cell
#: novel: none (infinite). The network's probability for a type it never saw is no evidence (NK cells
#: without NK in the reference are called T with probability ~1); 0.9 was measured and flags almost none.
INPUT_VIEW_CONFIDENCE_GUARD = float("inf")
#: The view also scores distances with each cell's distance from the PCA's subspace (the norm of its
#: residual) as one more coordinate (the last of ``points``): a type the reference lacks varies in
#: genes the reference's components do not span.
INPUT_VIEW_RESIDUAL = True
#: Divide each class's deviations by that class's own spread (1.4826 · MAD of its kept cells'
#: leave-one-out log distances) before the held-out offset and scale.
INPUT_VIEW_CLASS_SCALE = True
#: A query cell whose view coordinates lie within this fraction of their norm (``1 + |x|``) of a kept
#: training cell of its call is that reference cell (a reference cell mapped again, or its exact copy):
#: its distance leaves itself out and is judged against its class's own leave-one-out distances, not the
#: held-out cells'. A cell the PCA was fitted on sits further from its class in that PCA than a cell it
#: was not (the components fit part of its noise), so the held-out null called 12-28% of a small
#: reference's own cells novel when mapped back onto it. ``None``: no such matching (until 2026-12-07).
SELF_MATCH_TOLERANCE: float | None = 1e-4


def mean_neighbour_distance(points: np.ndarray, members: np.ndarray, k: int, skip_self: bool = False,
                            split: int | None = None, matched: np.ndarray | None = None) -> Any:
    """Mean Euclidean distance from each point to its ``k`` nearest ``members`` (exact, in blocks).

    With ``skip_self``, the points are the members themselves and each one's nearest (itself) is left out.
    With ``matched`` (a boolean per point, filled in), a point that coincides with a member (within
    :data:`SELF_MATCH_TOLERANCE` of its norm, over the first ``split`` coordinates) is that member: its
    nearest is left out, as with ``skip_self``, and its entry set ``True``.
    With ``split``, returns two arrays from one pass: the distance over the first ``split`` coordinates
    and over all of them.
    """
    members = np.asarray(members, dtype=np.float64)
    kk = min(k + int(skip_self or matched is not None), len(members))
    out = [np.full(len(points), np.nan) for _ in range(1 if split is None else 2)]
    if kk - int(skip_self) < 1:
        return out[0] if split is None else tuple(out)
    head = members[:, :split]  # all columns without a split
    sq_head = np.einsum("ij,ij->i", head, head)
    rest = members[:, split:] if split is not None else None
    sq_rest = None if rest is None else np.einsum("ij,ij->i", rest, rest)
    step = max(1, (1 << 22) // max(len(members), 1))  # at most ~32 MB of distances at a time
    for start in range(0, len(points), step):
        block = np.asarray(points[start : start + step], dtype=np.float64)
        d2 = np.einsum("ij,ij->i", block[:, :split], block[:, :split])[:, None] + sq_head[None, :] \
            - 2.0 * (block[:, :split] @ head.T)
        np.maximum(d2, 0.0, out=d2)
        own = None
        for i, result in enumerate(out):
            if i:  # the remaining coordinates' squared distances, added to the first ones'
                tail = block[:, split:]
                d2 += np.maximum(np.einsum("ij,ij->i", tail, tail)[:, None] + sq_rest[None, :] - 2.0 * (tail @ rest.T), 0.0)
            nearest = np.sort(np.partition(d2, kk - 1, axis=1)[:, :kk], axis=1)
            if skip_self:
                nearest = nearest[:, 1:]
            elif matched is not None:
                if own is None:  # judged on the first coordinates (all of them without a split)
                    norm2 = np.einsum("ij,ij->i", block[:, :split], block[:, :split])
                    own = nearest[:, 0] <= SELF_MATCH_TOLERANCE**2 * (1.0 + norm2)
                    matched[start : start + len(block)] = own
                # a matched point averages the members after itself, any other its k nearest
                with np.errstate(invalid="ignore"):
                    others = np.sqrt(nearest[:, 1:]).mean(axis=1) if kk > 1 else np.full(len(nearest), np.nan)
                result[start : start + len(block)] = np.where(own, others, np.sqrt(nearest[:, : min(k, kk)]).mean(axis=1))
                continue
            result[start : start + len(block)] = np.sqrt(nearest).mean(axis=1)
    return out[0] if split is None else tuple(out)


class InputView:
    """The input view of the novelty score: class-conditional distances in a PCA of the network input.

    Built at training (:func:`fit_input_view`) and stored in ``metadata["novelty"]["input_view"]``
    as plain arrays: the PCA (``components``: components × genes, ``mean``: genes), the kept
    training cells' coordinates (``points``) with their class per level (``members``; -1 where a
    cell is not kept at that level) and, per level, each class's ``location`` (median
    leave-one-out log distance of its kept cells) and the held-out cells' ``offset`` and
    ``scale`` (median and 1.4826 · MAD of their log distance minus their called class's
    location). Classes with fewer than :data:`INPUT_VIEW_MIN_MEMBERS` kept cells get no score
    (NaN): the embedding view judges their cells, and a group of them with no held-out reference cell
    among them is caught by the query-only share (``held``: the held-out cells' PCA coordinates and finest
    calls, then those of the small classes' training cells outside the PCA sample, with their labels;
    :func:`query_only_share`).

    Its score at any level makes only the *finest* call Unknown (prediction reports, at the finest
    level, the larger of the embedding's z there and the input view's z at every level): far from
    the reference cells of its coarse call in the input, a cell may be a type the reference lacks
    or a new subtype of a known parent (tumour-specific neutrophil states), which the input
    cannot tell apart, so its coarse call stays; its finest call is doubtful either way. The
    embedding view judges each level, as before.

    A query cell's score at a level is ``z0 = (log d - location[call] - offset) / scale``, ``d``
    the mean distance to the :data:`NOVELTY_K` nearest kept cells of its call. Like the
    embedding view it is located at the query: less ``max(0, query_location_z(z0, calls))``, and a
    called class with at least :data:`INPUT_VIEW_MIN_QUERY` query cells less at least its own
    :data:`INPUT_VIEW_CLASS_QUANTILE` quantile.

    A view fitted with ``residual`` (:data:`INPUT_VIEW_RESIDUAL`, the default since 2026-12-01)
    keeps each cell's distance from the PCA's subspace as one more coordinate of ``points`` and
    scores the same distance a second time with it (its own locations, offset and scale under
    ``levels[level]["residual"]``); the view's z is the larger of the two. A type the reference
    lacks often differs in genes that do not vary in the reference, which its components do not
    span (the tumour-only neutrophil states of Zilionis), while a type the reference's genes do
    separate stands out more in the PCA alone (NK cells without NK in the reference).

    A view fitted with ``class_scale`` (:data:`INPUT_VIEW_CLASS_SCALE`, the default since
    2026-12-01) also stores each class's ``spread`` (1.4826 · MAD of its kept cells' leave-one-out
    log distances) and divides a cell's deviation by its call's spread before the held-out offset
    and scale: ``z0 = ((log d - location[call]) / spread[call] - offset) / scale``. A loose class
    (a heterogeneous cluster such as pbmc68k's "Dendritic") no longer looks novel in its tail.
    """

    def __init__(self, stored: Mapping[str, Any]) -> None:
        # fresh float64 copies: arrays read from a file may sit at other memory alignments, which changes
        # BLAS's summation order; a saved and reloaded model must score exactly as the one it was saved from
        self.components = np.array(stored["components"], dtype=np.float64, order="C")
        self.mean = np.array(stored["mean"], dtype=np.float64, order="C")
        self.points = np.array(stored["points"], dtype=np.float64, order="C")
        self.members = {lv: np.asarray(v) for lv, v in stored["members"].items()}
        self.levels = {lv: v for lv, v in stored["levels"].items() if v is not None}
        self.k = int(stored.get("k", NOVELTY_K))
        self.residual = bool(stored.get("residual", False))
        self.class_scale = bool(stored.get("class_scale", False))
        self.n_components = self.components.shape[0]
        held = stored.get("held")  # absent from views fitted before 2026-12-06: no query-only share
        self.held_points = None if held is None else np.array(held["points"], dtype=np.float64, order="C")
        self.held_calls = None if held is None else np.asarray(held["calls"])
        self.counts = {lv: np.bincount(v[v >= 0], minlength=len(self.levels[lv]["location"]) if lv in self.levels else 0)
                       for lv, v in self.members.items()}

    def scores(self, level: str, n_classes: int) -> np.ndarray:
        """Per class of ``level`` (``n_classes`` of them), whether the view scores the calls into it: at
        least :data:`INPUT_VIEW_MIN_MEMBERS` kept training cells. All ``False`` for a level the view
        does not hold."""
        scored = np.zeros(n_classes, dtype=bool)
        if level in self.levels:
            counts = self.counts[level][:n_classes]
            scored[: len(counts)] = counts >= INPUT_VIEW_MIN_MEMBERS
        return scored

    def project(self, rows: Any, zero_input: np.ndarray | None = None) -> np.ndarray:
        """Coordinates of network-input rows: a dense array, or a sparse CSR *offset* input
        ``f(x) - f(0)`` with ``zero_input = f(0)`` (:class:`~atlasmtl.network.SparseInput`); float64."""
        if sp.issparse(rows):
            rows = rows.astype(np.float64)
            centre = -self.mean if zero_input is None else np.asarray(zero_input, dtype=np.float64) - self.mean
            coords = np.asarray(rows @ self.components.T) + centre @ self.components.T
            if not self.residual:
                return coords
            # |offset + centre|² without densifying: |offset|² + 2 offset·centre + |centre|²
            squared = np.asarray(rows.multiply(rows).sum(axis=1)).ravel() + 2.0 * np.asarray(rows @ centre).ravel() \
                + float(centre @ centre)
        else:
            centred = np.asarray(rows, dtype=np.float64) - self.mean
            coords = centred @ self.components.T
            if not self.residual:
                return coords
            squared = np.einsum("ij,ij->i", centred, centred)
        residual = np.sqrt(np.maximum(squared - np.einsum("ij,ij->i", coords, coords), 0.0))
        return np.hstack([coords, residual[:, None]])

    def log_distances(self, points: np.ndarray, calls: np.ndarray, level: str, match: bool = True,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log mean distance of each point to the nearest kept cells of its call at ``level`` in the PCA,
        and with the residual coordinate (NaN for a view without it); NaN without a call, or when the
        class keeps fewer than two cells. Third, whether each point is one of those kept cells
        (:data:`SELF_MATCH_TOLERANCE`; its distances then leave it out; ``match=False``: none is, as for
        the held-out cells the view is fitted on)."""
        out = (np.full(len(points), np.nan), np.full(len(points), np.nan))
        matched = np.zeros(len(points), dtype=bool)
        if level not in self.levels:
            return (*out, matched)
        members = self.members[level]
        for c in np.unique(calls[calls >= 0]):
            own = members == c
            if own.sum() < 2:
                continue
            at = np.flatnonzero(calls == c)
            found = None if not match or SELF_MATCH_TOLERANCE is None or not self.class_scale \
                else np.zeros(len(at), dtype=bool)
            distances = mean_neighbour_distance(points[at], self.points[own], self.k,
                                                split=self.n_components if self.residual else None, matched=found)
            for o, d in zip(out, distances if self.residual else (distances,)):
                o[at] = log_distance(d)
            if found is not None:
                matched[at] = found
        return (*out, matched)

    def z(self, log_d: np.ndarray, calls: np.ndarray, level: str, located: bool = True,
          space: str = "pca", matched: np.ndarray | None = None) -> np.ndarray:
        """Query-located robust z-score of each cell at ``level`` (see the class docstring) from its
        :meth:`log_distances` (the PCA's, ``space="pca"``, or with the residual, ``"residual"``);
        ``located=False``: ``z0``, before the query's location. A cell ``matched`` to a kept reference
        cell (:meth:`log_distances`) is scored against its class's own leave-one-out distances:
        ``z0 = (log d - location[call]) / spread[call]``, those distances' robust z."""
        z = np.full(len(log_d), np.nan)
        stats = self.levels.get(level)
        if stats is not None and space == "residual":
            stats = stats.get("residual")
        if stats is None:
            return z
        location = np.where(self.scores(level, len(stats["location"])), np.asarray(stats["location"], dtype=np.float64), np.nan)
        called = calls >= 0
        deviation = log_d[called] - location[calls[called]]
        if self.class_scale:
            deviation = deviation / np.asarray(stats["spread"], dtype=np.float64)[calls[called]]
        z[called] = (deviation - stats["offset"]) / stats["scale"]
        if matched is not None and self.class_scale:  # a kept cell itself: the class's own null, in-sample
            own = called & np.asarray(matched, dtype=bool)
            z[own] = deviation[own[called]]
        finite = np.isfinite(z)
        if not finite.any() or not located:
            return z
        shift = max(0.0, query_location_z(z[finite], calls[finite]))
        out = z - shift
        for c in np.unique(calls[finite]):
            rows = finite & (calls == c)
            if rows.sum() >= INPUT_VIEW_MIN_QUERY:
                out[rows] = z[rows] - max(shift, float(np.quantile(z[rows], INPUT_VIEW_CLASS_QUANTILE)))
        return out

    def score(self, log_d: np.ndarray, log_d_residual: np.ndarray, calls: np.ndarray, level: str,
              matched: np.ndarray | None = None) -> np.ndarray:
        """The view's z at ``level``: the larger of the located z-scores in the two spaces."""
        return np.fmax(self.z(log_d, calls, level, matched=matched),
                       self.z(log_d_residual, calls, level, space="residual", matched=matched))


def fit_input_view(
    read_dense: Callable[[np.ndarray], np.ndarray],
    read_offset: Callable[[np.ndarray], sp.csr_matrix],
    zero_input: np.ndarray | None,
    n_genes: int,
    train_cells: np.ndarray,
    train_codes: Mapping[str, np.ndarray],
    n_classes: Mapping[str, int],
    held_out_cells: np.ndarray,
    held_out_calls: Mapping[str, np.ndarray],
    random_state: int,
) -> dict[str, Any] | None:
    """Fit the :class:`InputView` of a reference; returns what the model stores (``None`` when the
    reference has too few training cells for a PCA).

    Parameters
    ----------
    read_dense, read_offset
        Sorted reference rows → their dense network input / their sparse offset input
        (:meth:`~atlasmtl.genes.GeneAligner.sparse_input`); read in blocks, so only a bounded
        sample is ever dense.
    zero_input
        The network input of a gene with no counts (``None`` for 0).
    n_genes
        Network input width.
    train_cells, train_codes
        Training cells (sorted row numbers) and their class code per level (-1 = unlabelled).
    n_classes
        Classes per level.
    held_out_cells, held_out_calls
        The calibration cells (sorted row numbers) and their decoded calls per level.
    random_state
        Seeds the PCA's sample, its solver and the kept cells.
    """
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(random_state)
    sample_size = min(len(train_cells), INPUT_VIEW_PCA_CELLS, max(2, INPUT_VIEW_PCA_VALUES // max(n_genes, 1)))
    n_comps = min(INPUT_VIEW_COMPONENTS, sample_size - 1, n_genes)
    if n_comps < 1 or len(held_out_cells) == 0:
        return None
    sample = np.sort(rng.choice(train_cells, size=sample_size, replace=False))
    dense = np.vstack([read_dense(sample[i : i + 4096]) for i in range(0, len(sample), 4096)])
    pca = PCA(n_comps, random_state=random_state % 2**32).fit(dense)
    del dense
    stored: dict[str, Any] = {"components": pca.components_.astype(np.float32),
                              "mean": pca.mean_.astype(np.float32), "k": NOVELTY_K, "residual": bool(INPUT_VIEW_RESIDUAL),
                              "class_scale": bool(INPUT_VIEW_CLASS_SCALE)}
    n_coords = n_comps + int(stored["residual"])
    view = InputView({**stored, "points": np.zeros((0, n_coords)), "members": {}, "levels": {}})  # to project

    def project(rows: np.ndarray) -> np.ndarray:
        return np.vstack([view.project(read_offset(rows[i : i + 4096]), zero_input) for i in range(0, len(rows), 4096)]
                         or [np.zeros((0, n_coords))])

    kept_at: dict[str, np.ndarray] = {}
    for lv, codes in train_codes.items():
        kept = np.full(len(train_cells), -1, dtype=np.int32)
        for c in np.unique(codes[codes >= 0]):
            own = np.flatnonzero(codes == c)
            if len(own) > INPUT_VIEW_MEMBERS:
                own = rng.choice(own, size=INPUT_VIEW_MEMBERS, replace=False)
            kept[own] = c
        kept_at[lv] = kept
    keep = np.flatnonzero(np.any(np.stack(list(kept_at.values())) >= 0, axis=0))
    points = project(train_cells[keep]).astype(np.float32)  # as stored: fit and prediction see the same points
    members = {lv: kept[keep] for lv, kept in kept_at.items()}
    held_points = project(held_out_cells)
    levels: dict[str, Any] = {}
    for lv in train_codes:
        location = np.full(int(n_classes[lv]), np.nan)  # median leave-one-out log distance per class
        residual_location = np.full(int(n_classes[lv]), np.nan)  # the same with the residual coordinate
        spread, residual_spread = np.full_like(location, np.nan), np.full_like(location, np.nan)  # 1.4826 · MAD
        for c in np.unique(members[lv][members[lv] >= 0]):
            own = members[lv] == c
            if own.sum() >= 2:
                loo = mean_neighbour_distance(points[own], points[own], NOVELTY_K, skip_self=True,
                                              split=n_comps if stored["residual"] else None)
                for centre, width, d in zip((location, residual_location), (spread, residual_spread),
                                            loo if stored["residual"] else (loo,)):
                    summary = null_summary(log_distance(d))
                    centre[c], width[c] = summary["median"], summary["scale"]
        # the level's view before its offsets and scales: z0 is then the held-out cells' residual
        unit = {"offset": 0.0, "scale": 1.0}
        pca = {"location": location, **({"spread": spread} if stored["class_scale"] else {})}
        with_residual = {"location": residual_location, **({"spread": residual_spread} if stored["class_scale"] else {})}
        unscaled = InputView({**stored, "points": points, "members": {lv: members[lv]},
                              "levels": {lv: {**pca, **unit, "residual": {**with_residual, **unit}}}})
        calls = np.asarray(held_out_calls[lv])
        held_d, held_d_residual, _ = unscaled.log_distances(held_points, calls, lv, match=False)
        summary = null_summary(unscaled.z(held_d, calls, lv, located=False))
        levels[lv] = None if not summary["n"] else {**pca, "offset": summary["median"],
                                                    "scale": summary["scale"], "n": summary["n"]}
        if levels[lv] is not None and stored["residual"]:
            summary = null_summary(unscaled.z(held_d_residual, calls, lv, located=False, space="residual"))
            levels[lv]["residual"] = None if not summary["n"] else {
                **with_residual, "offset": summary["median"], "scale": summary["scale"], "n": summary["n"]}
    # the held-out cells' PCA coordinates and finest calls: the other side of the query-only share (query_only_share)
    finest = list(train_codes)[-1]
    held_calls = np.asarray(held_out_calls[finest], dtype=np.int32)
    if QUERY_ONLY_SMALL_CLASS_CELLS:  # ... and the small classes' training cells the PCA was not fitted on
        codes = np.asarray(train_codes[finest])
        small = np.bincount(codes[codes >= 0], minlength=int(n_classes[finest])) < INPUT_VIEW_MIN_MEMBERS
        extra = np.flatnonzero((codes >= 0) & small[np.maximum(codes, 0)] & ~np.isin(train_cells, sample))
        held_points = np.vstack([held_points, project(train_cells[extra])])
        held_calls = np.r_[held_calls, codes[extra]].astype(np.int32)
    held = {"points": held_points[:, :n_comps].astype(np.float32), "calls": held_calls}
    return {**stored, "points": points.astype(np.float32), "members": members, "levels": levels, "held": held}


def neighbourhood_novelty(
    points: np.ndarray,
    scores: Mapping[str, np.ndarray],
    usable: np.ndarray,
    k: int = NEIGHBOURHOOD_K,
    max_cells: int = NEIGHBOURHOOD_MAX_CELLS,
    random_state: int = 0,
) -> dict[str, np.ndarray]:
    """Mean novelty z of each query cell's ``k`` nearest query cells, per level.

    Parameters
    ----------
    points
        The query cells' coordinates (cells × dims; the input view's PCA of the network input).
    scores
        Per level, every query cell's novelty z (NaN where it has none).
    usable
        Cells with signal: only these are searched and indexed.
    k
        Neighbours averaged, the cell itself included when it is indexed.
    max_cells
        Most cells indexed: above it, a random sample of this many usable cells (``random_state``),
        and each cell's neighbours are its ``k`` nearest sampled cells.
    random_state
        Seed of that sample.

    Returns
    -------
    dict
        Per level, float32 per cell: the mean of the finite z-scores among its neighbours (NaN for
        cells without signal, or with no neighbour scored).
    """
    n = len(points)
    out = {lv: np.full(n, np.nan, dtype=np.float32) for lv in scores}
    cells = np.flatnonzero(np.asarray(usable, dtype=bool))
    if len(cells) == 0 or k < 1 or not scores:
        return out
    pool = neighbourhood_pool(usable, max_cells, random_state)
    pooled = {lv: np.asarray(z, dtype=np.float64)[pool] for lv, z in scores.items()}
    sample = np.ascontiguousarray(points[pool], dtype=np.float32)
    for start in range(0, len(cells), _SEARCH_CHUNK):
        rows = cells[start : start + _SEARCH_CHUNK]
        neighbours = nearest_rows(points[rows], sample, k)
        for lv, z in pooled.items():
            values = z[neighbours]
            finite = np.isfinite(values)
            count = finite.sum(axis=1)
            total = np.where(finite, values, 0.0).sum(axis=1)
            out[lv][rows] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


def neighbourhood_pool(usable: np.ndarray, max_cells: int = NEIGHBOURHOOD_MAX_CELLS,
                       random_state: int = 0) -> np.ndarray:
    """The query cells a neighbourhood search indexes (sorted row numbers): every usable cell, or a random
    sample of ``max_cells`` of them (``random_state``), as :func:`neighbourhood_novelty` draws it."""
    cells = np.flatnonzero(np.asarray(usable, dtype=bool))
    if len(cells) > max_cells:
        return np.sort(np.random.default_rng(random_state).choice(cells, size=max_cells, replace=False))
    return cells


def held_out_weights(held_calls: np.ndarray, query_calls: np.ndarray, n_classes: int,
                     bounds: tuple[float, float] = QUERY_ONLY_WEIGHT_BOUNDS) -> np.ndarray:
    """Per held-out reference cell, the weight :func:`query_only_share` gives it: the share of the query's
    cells called as its call over the share of the held-out cells called so, within ``bounds``, then scaled
    to mean 1. A class the query is rich in (a composition shift) keeps its query cells mixed."""
    held_calls, query_calls = np.asarray(held_calls), np.asarray(query_calls)

    def shares(calls: np.ndarray) -> np.ndarray:
        return np.bincount(calls[calls >= 0], minlength=n_classes) / max(int((calls >= 0).sum()), 1)

    held_share, query_share = shares(held_calls), shares(query_calls)
    ratio = np.divide(query_share, held_share, out=np.ones(n_classes), where=held_share > 0)
    weights = np.where(held_calls >= 0, np.clip(ratio[np.maximum(held_calls, 0)], *bounds), 1.0)
    return weights / weights.mean() if len(weights) else weights


def query_only_share(pool_points: np.ndarray, held_points: np.ndarray, held_weights: np.ndarray,
                     k: int = NEIGHBOURHOOD_K) -> np.ndarray:
    """Per indexed query cell, how much of its neighbourhood is query: among its ``k`` nearest cells of the
    query's indexed cells and the model's held-out reference cells together (itself excluded), the query
    cells' count over itself plus the held-out cells' weights (:func:`held_out_weights`) times
    ``n_query / n_held``. About 0.5 where the query mixes with the reference as their sizes predict; 1 in a
    group of query cells with no reference cell near it. Both sides are out of the view's PCA sample (the
    training cells' own coordinates sit further out, on the noise the PCA fitted)."""
    n_query, n_held = len(pool_points), len(held_points)
    out = np.ones(n_query, dtype=np.float64)
    if n_query < 2 or n_held == 0:
        return out
    pooled = np.vstack([pool_points, held_points]).astype(np.float32)
    weight = np.r_[np.zeros(n_query), np.asarray(held_weights, dtype=np.float64)] * (n_query / n_held)
    k = min(int(k), n_query + n_held - 1)
    for start in range(0, n_query, _SEARCH_CHUNK):
        rows = np.arange(start, min(start + _SEARCH_CHUNK, n_query))
        neighbours = nearest_rows(pooled[rows], pooled, k + 1)
        others = neighbours != rows[:, None]  # itself excluded (it is among its k + 1 nearest at distance 0)
        query = ((neighbours < n_query) & others).sum(axis=1)
        held = np.where(others, weight[neighbours], 0.0).sum(axis=1)
        out[rows] = query / np.maximum(query + held, 1e-12)
    return out


def query_only_location(share: np.ndarray, calls: np.ndarray, min_cells: int = 20) -> float:
    """Where the query as a whole sits on the query-only share: the median, over the called classes with at
    least ``min_cells`` cells, of each class's lower quartile (the cells' median when no class has that many),
    so that a type the reference lacks, called as one or two classes, does not move it."""
    finite = np.isfinite(share)
    share, calls = share[finite], np.asarray(calls)[finite]
    if not len(share):
        return float("nan")
    per_class = [float(np.quantile(share[calls == c], 0.25))
                 for c in np.unique(calls) if (calls == c).sum() >= min_cells]
    return float(np.median(per_class)) if per_class else float(np.median(share))
