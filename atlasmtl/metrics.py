"""Evaluation of predictions against known labels and coordinates: :func:`evaluate`.

``atlasmtl.evaluate(result, truth)`` scores a :class:`~atlasmtl.result.PredictionResult`
(or its prediction table) against the true labels of the same cells and returns a
JSON-serialisable nested dict::

    {"n_cells": ...,
     "levels":    {level: {accuracy, macro_f1, balanced_accuracy, coverage, accuracy_covered,
                           network_error, unknown_withheld_error, ece, ece_if_calibrated, brier, aurc, ...}},
     "hierarchy": {path_consistency, full_path_accuracy, pairs, ...},
     "novel":     {source, n_novel, n_known, levels: {level: {auroc, auroc_score, auroc_neighbourhood,
                                                              novel_unknown_rate, known_unknown_rate}}} or None,
     "coords":    {name: {rmse, trustworthiness, neighbour_overlap, ...}}}

Undefined values (no confidence column, a single class, too few cells) are
``None``. :func:`evaluation_table` turns a section into a tidy DataFrame. The
metric definitions are in :func:`evaluate`'s docstring and in
``documents/design/api_contract.md``; each metric is also a public function here.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ._docs import fill_docs
from .exceptions import CoordinateError, InputError, LabelError, ParameterError, user_stacklevel
from .calls import UNKNOWN, CallTable, column_names, levels_in_table, numbers_and_text
from .calibration import ECE_BINS, ece_if_calibrated, expected_calibration_error
from .truth import cell_positions, label_strings, true_labels, truth_table
from .io import read_prediction_table

__all__ = [
    "evaluate",
    "evaluation_table",
    "accuracy",
    "macro_f1",
    "balanced_accuracy",
    "coverage",
    "accuracy_covered",
    "network_error",
    "unknown_withheld_error",
    "expected_calibration_error",
    "ece_if_calibrated",
    "brier_score",
    "aurc",
    "pair_consistency",
    "path_consistency",
    "full_path_accuracy",
    "novel_auroc",
    "rmse",
    "trustworthiness_score",
    "neighbour_overlap",
]

#: Reference neighbours compared by ``neighbour_overlap``.
NEIGHBOURS = 15
#: Keys of each level's entry in ``evaluate(...)["levels"]`` (besides ``n``, ``n_excluded``, ...).
LEVEL_METRICS = (
    "accuracy", "macro_f1", "balanced_accuracy", "coverage", "accuracy_covered", "network_error",
    "unknown_withheld_error", "ece", "ece_if_calibrated", "brier", "aurc",
)


#: Shared parameter descriptions of the metrics, filled into their docstrings (as ``pl``'s plots share theirs).
doc_y_true = """y_true
        True label per cell (strings), without missing values: :func:`evaluate` leaves the
        cells without a true label out before scoring (here ``None`` or NaN is a
        :class:`ParameterError`)."""
doc_labels = doc_y_true + """
    y_pred
        Predicted label per cell, in the order of ``y_true``; ``"Unknown"`` (abstained) is never correct."""
doc_conf_correct = """conf
        Confidence per cell: the probability, in [0, 1], that the cell's call is right.
    correct
        Whether each cell's call is right (booleans or 0/1), in the order of ``conf``."""
_DOCS = {"doc_y_true": doc_y_true, "doc_labels": doc_labels, "doc_conf_correct": doc_conf_correct}


def _shared_docs(func: Any) -> Any:
    """``func`` with the shared parameter descriptions (``{doc_labels}``, ``{doc_y_true}``,
    ``{doc_conf_correct}``) filled into its docstring."""
    return fill_docs(func, _DOCS)


# ---------------------------------------------------------------------------- label metrics
def _label_pair(y_true: Any, y_pred: Any, what: str = "y_true and y_pred") -> tuple[np.ndarray, np.ndarray]:
    """``y_true`` and ``y_pred`` as 1-D object arrays of one length; a true label that is missing (``None``,
    NaN) is a :class:`ParameterError`: it would be compared as a label (``None == None`` scored right)."""
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    if y_true.ndim != 1 or y_pred.ndim != 1 or len(y_true) != len(y_pred):
        raise ParameterError(f"{what} must be one label per cell, of the same length; got shapes {y_true.shape} "
                             f"and {y_pred.shape}.")
    missing = pd.isna(y_true)
    if missing.any():
        raise ParameterError(f"y_true holds {int(missing.sum())} missing label(s) (None or NaN); leave those cells "
                             "out (y_pred[mask], y_true[mask] with mask = pandas.notna(y_true)), as evaluate does.")
    return y_true, y_pred


def _correct(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per-cell correctness; ``Unknown`` is never correct."""
    y_true, y_pred = _label_pair(y_true, y_pred)
    return (y_pred == y_true) & (y_pred != UNKNOWN)


def _mean(values: np.ndarray) -> float:
    """The mean, NaN (without numpy's warning) for no values."""
    return float(values.mean()) if len(values) else float("nan")


@_shared_docs
def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of cells whose prediction equals the truth (Unknown is wrong).

    Parameters
    ----------
    {doc_labels}

    Returns
    -------
    float
        The fraction correct, in [0, 1]; NaN for no cells. A cell whose true label
        itself reads ``"Unknown"`` is wrong too.

    See Also
    --------
    accuracy_covered : the same among the cells not called Unknown.
    """
    return _mean(_correct(y_true, y_pred))


def class_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[Any]) -> np.ndarray:
    """F1 of each class in ``labels``; an ``Unknown`` call is a miss, also where the truth itself reads
    ``Unknown`` (as :func:`accuracy` counts it)."""
    from sklearn.metrics import f1_score

    y_true, y_pred = _label_pair(y_true, y_pred)
    never = "\x00" + UNKNOWN  # matches no true label
    y_pred = np.where(y_pred == UNKNOWN, never, y_pred)
    return f1_score(y_true, y_pred, labels=list(labels), average=None, zero_division=0)


@_shared_docs
def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-averaged F1 over the classes present in ``y_true`` (an ``Unknown`` call is a miss).

    The unweighted mean of ``sklearn.metrics.f1_score`` per class, over the classes that occur in
    ``y_true``: a class found only in ``y_pred`` is not averaged (its calls are misses of the
    cells' true classes), and an Unknown call counts as a miss of the cell's true class.

    Parameters
    ----------
    {doc_labels}

    Returns
    -------
    float
        Macro-F1, in [0, 1]; NaN for no cells.
    """
    y_true, y_pred = _label_pair(y_true, y_pred)
    return _mean(class_f1(y_true, y_pred, np.unique(y_true))) if len(y_true) else float("nan")


@_shared_docs
def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (Unknown is a miss).

    Parameters
    ----------
    {doc_labels}

    Returns
    -------
    float
        The unweighted mean over the true classes of the fraction of each class's cells
        called right, in [0, 1]; NaN for no cells.
    """
    y_true, y_pred = _label_pair(y_true, y_pred)
    correct = _correct(y_true, y_pred)
    return _mean(np.array([correct[y_true == c].mean() for c in np.unique(y_true)]))


def coverage(y_pred: np.ndarray) -> float:
    """Fraction of cells not called Unknown.

    Parameters
    ----------
    y_pred
        Predicted label per cell; ``"Unknown"`` marks an abstained call.

    Returns
    -------
    float
        The fraction of cells with a label other than ``"Unknown"``, in [0, 1]; NaN for no cells.
    """
    return _mean(np.asarray(y_pred, dtype=object) != UNKNOWN)


@_shared_docs
def accuracy_covered(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    """Accuracy among the cells not called Unknown (``None`` when all are Unknown).

    Parameters
    ----------
    {doc_y_true}
    y_pred
        Predicted label per cell, in the order of ``y_true``; cells called ``"Unknown"`` are left out.

    Returns
    -------
    float or None
        The fraction correct among the cells with a label, in [0, 1]; ``None`` when every
        cell is Unknown or there are no cells.
    """
    correct = _correct(y_true, y_pred)
    covered = np.asarray(y_pred, dtype=object) != UNKNOWN
    return float(correct[covered].mean()) if covered.any() else None


@_shared_docs
def network_error(y_true: np.ndarray, y_raw: np.ndarray) -> float | None:
    """Share of the network's own calls that are wrong (before any KNN vote or ``Unknown``).

    The base rate :func:`unknown_withheld_error` is read against: an abstention that withholds errors no more
    often than this picks them at random.

    Parameters
    ----------
    {doc_y_true}
    y_raw
        The network's call per cell (the ``pred_<level>_raw`` column), in the order of ``y_true``; cells
        whose raw label is ``"Unknown"`` (no call: no usable signal) are left out.

    Returns
    -------
    float or None
        In [0, 1]; ``None`` when no cell has a network call.
    """
    y_true, y_raw = _label_pair(y_true, y_raw, "y_true and y_raw")
    called = y_raw != UNKNOWN
    return float((y_raw[called] != y_true[called]).mean()) if called.any() else None


@_shared_docs
def unknown_withheld_error(y_true: np.ndarray, y_pred: np.ndarray, y_raw: np.ndarray) -> float | None:
    """Among the cells called ``Unknown``, the share whose withheld network call was wrong.

    An abstention costs a label only where the call it withholds is right. This says how often it withheld an
    error instead; above :func:`network_error`, the abstentions pick errors better than chance.

    Parameters
    ----------
    {doc_labels}
    y_raw
        The network's call per cell (the ``pred_<level>_raw`` column), in the order of ``y_true``; cells
        whose raw label is ``"Unknown"`` (no call to withhold) are left out.

    Returns
    -------
    float or None
        In [0, 1]; ``None`` when no cell with a network call is ``Unknown``.
    """
    y_true, y_pred = _label_pair(y_true, y_pred)
    _, y_raw = _label_pair(y_true, y_raw, "y_true and y_raw")
    withheld = (y_pred == UNKNOWN) & (y_raw != UNKNOWN)
    return float((y_raw[withheld] != y_true[withheld]).mean()) if withheld.any() else None


# ---------------------------------------------------------------------------- confidence metrics
@_shared_docs
def brier_score(conf: np.ndarray, correct: np.ndarray) -> float:
    """Binary Brier score ``mean((conf - correct)**2)`` of confidence vs correctness.

    Parameters
    ----------
    {doc_conf_correct}

    Returns
    -------
    float
        The score, in [0, 1] (lower is better); NaN for no cells or where a confidence is NaN.

    Notes
    -----
    The multi-class Brier score would need every class's probability, which results do not keep.
    """
    conf, correct = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    return float(np.mean((conf - correct) ** 2))


@_shared_docs
def aurc(conf: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk–coverage curve (mean error rate of the top-``n`` most confident cells).

    Cells are sorted by confidence, highest first (ties keep their order); the risk at ``n``
    is the error rate among the first ``n`` cells, and the AURC the mean risk over
    ``n = 1 .. N``. Lower is better: a confidence that ranks every wrong call below every
    right one scores the least its error rate allows.

    Parameters
    ----------
    {doc_conf_correct}

    Returns
    -------
    float
        The AURC, in [0, 1]; NaN for no cells. A NaN confidence is sorted last, as the least confident.
    """
    order = np.argsort(-np.asarray(conf, dtype=np.float64), kind="stable")
    errors = np.cumsum(~np.asarray(correct, dtype=bool)[order])
    return float(np.mean(errors / np.arange(1, len(order) + 1)))


# ---------------------------------------------------------------------------- hierarchy metrics
def pair_consistency(parent_pred: np.ndarray, child_pred: np.ndarray, mapping: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell consistency of one parent → child level pair.

    Parameters
    ----------
    parent_pred
        Predicted label per cell at the coarser (parent) level.
    child_pred
        Predicted label per cell at the finer (child) level, in the same cell order.
    mapping
        ``{child label: parent label}``, the reference hierarchy between the two levels.

    Returns
    -------
    consistent : numpy.ndarray
        Boolean per cell: checkable, and either the child is Unknown (abstaining at the
        finer level is allowed) or the parent prediction is the child's mapped parent. A
        known child under an Unknown parent is inconsistent.
    checkable : numpy.ndarray
        Boolean per cell: false where the child prediction is a label ``mapping`` does not know.
    """
    parent_pred, child_pred = np.asarray(parent_pred, dtype=object), np.asarray(child_pred, dtype=object)
    child_unknown = child_pred == UNKNOWN
    expected = pd.Series(child_pred).map(dict(mapping))
    checkable = child_unknown | expected.notna().to_numpy()
    consistent = child_unknown | ((expected.to_numpy(dtype=object) == parent_pred) & (parent_pred != UNKNOWN))
    return consistent & checkable, checkable


def path_consistency(
    preds: Sequence[np.ndarray], mappings: Sequence[Mapping[str, str] | None]
) -> tuple[float | None, int, list[dict[str, Any]]]:
    """Fraction of cells consistent at every mapped pair of consecutive levels.

    Parameters
    ----------
    preds
        Predicted labels per level, coarse to fine, each one per cell in the same order.
    mappings
        One entry per level: ``mappings[j]`` maps level ``j`` labels to level ``j - 1`` labels
        (``None`` for ``j = 0`` and for pairs without a mapping, which are not checked).

    Returns
    -------
    consistency : float or None
        The fraction of cells consistent (:func:`pair_consistency`) at every mapped pair,
        among the cells checkable at all of them; ``None`` when no pair is mapped or no cell
        is checkable.
    n_checked : int
        The number of cells that fraction is taken over (0 when no pair is mapped).
    pairs : list of dict
        Per pair ``j = 1 ..``: ``{"consistency", "n", "n_unmapped"}`` (the pair's fraction
        consistent or ``None``, its checkable cells, its cells whose child label the mapping
        lacks; ``None`` / 0 / ``None`` for an unmapped pair).
    """
    n = len(preds[0]) if preds else 0
    all_ok, all_checkable = np.ones(n, dtype=bool), np.ones(n, dtype=bool)
    pairs, any_mapped = [], False
    for j in range(1, len(preds)):
        if mappings[j] is None:
            pairs.append({"consistency": None, "n": 0, "n_unmapped": None})
            continue
        any_mapped = True
        ok, checkable = pair_consistency(preds[j - 1], preds[j], mappings[j])
        all_ok &= ok
        all_checkable &= checkable
        pairs.append({
            "consistency": float(ok[checkable].mean()) if checkable.any() else None,
            "n": int(checkable.sum()),
            "n_unmapped": int((~checkable).sum()),
        })
    if not any_mapped or not all_checkable.any():
        return None, int(all_checkable.sum()) if any_mapped else 0, pairs
    return float(all_ok[all_checkable].mean()), int(all_checkable.sum()), pairs


def full_path_accuracy(truths: Sequence[np.ndarray], preds: Sequence[np.ndarray]) -> float:
    """Fraction of cells correct at every level (pass only cells with a true label at every level).

    Parameters
    ----------
    truths
        True labels per level, each one per cell, without missing values.
    preds
        Predicted labels per level, in the order of ``truths`` and of its cells; ``"Unknown"``
        is never correct. At least one level, each with the cells of ``truths`` (else a
        :class:`ParameterError`).

    Returns
    -------
    float
        The fraction of cells whose prediction is right at every level, in [0, 1]; NaN for no cells.
    """
    if len(truths) == 0 or len(truths) != len(preds):
        raise ParameterError(f"truths and preds must hold the same levels, at least one; got {len(truths)} and "
                             f"{len(preds)}.")
    correct = np.ones(len(preds[0]), dtype=bool)
    for y_true, y_pred in zip(truths, preds):
        if len(y_pred) != len(correct):
            raise ParameterError(f"Every level must hold the same cells; got {len(correct)} and {len(y_pred)} labels.")
        correct &= _correct(y_true, y_pred)
    return _mean(correct)


# ---------------------------------------------------------------------------- novel-type metric
def novel_auroc(conf: np.ndarray, is_novel: np.ndarray, score: np.ndarray | None = None) -> float | None:
    """AUROC of a novelty score, novel (positive) vs known cells; ``None`` if a group is empty.

    Parameters
    ----------
    conf
        Confidence per cell; ``1 - conf`` is the score when ``score`` is not given (a NaN
        confidence then ranks as most novel, as a NaN score does).
    is_novel
        Whether each cell is of a type the reference lacks (the positives).
    score
        Novelty score per cell, higher = more novel (e.g. ``result.levels[lv].novelty``);
        NaN, a cell without signal, ranks as most novel.

    Returns
    -------
    float or None
        ``sklearn.metrics.roc_auc_score`` of the score for novel vs known cells, in [0, 1]
        (0.5 = chance); ``None`` when every cell, or no cell, is novel.
    """
    from sklearn.metrics import roc_auc_score

    is_novel = np.asarray(is_novel, dtype=bool)
    if is_novel.all() or not is_novel.any():
        return None
    score = 1.0 - np.asarray(conf, dtype=np.float64) if score is None else np.asarray(score, dtype=np.float64)
    if score.shape != is_novel.shape:
        raise ParameterError(f"The score and is_novel must hold one value per cell; got shapes {score.shape} and "
                             f"{is_novel.shape}.")
    return float(roc_auc_score(is_novel, np.where(np.isnan(score), np.inf, score).clip(-1e300, 1e300)))


# ---------------------------------------------------------------------------- coordinate metrics
def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    """Root mean squared error over cells and dimensions.

    Parameters
    ----------
    pred
        Predicted coordinates, cells × dims.
    true
        True coordinates, the same shape and cell order.

    Returns
    -------
    float
        ``sqrt(mean((pred - true)**2))``; NaN for no cells or where a coordinate is NaN
        (:func:`evaluate` leaves unplaced cells out first).
    """
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    return float(np.sqrt(np.mean(diff**2)))


def trustworthiness_score(
    true: np.ndarray, pred: np.ndarray, max_cells: int = 5000, random_state: int = 0
) -> tuple[float | None, int, int]:
    """``sklearn.manifold.trustworthiness(true, pred, n_neighbors=min(15, n // 2 - 1))``.

    How well the predicted coordinates keep the true ones' neighbourhoods: 1 when every
    cell's nearest neighbours in ``pred`` are also near it in ``true``.

    Parameters
    ----------
    true
        True coordinates, cells × dims (finite).
    pred
        Predicted coordinates, the same cells in the same order (finite).
    max_cells
        Score at most this many randomly chosen cells (the score needs all pairwise distances).
    random_state
        Seed of that choice.

    Returns
    -------
    score : float or None
        The trustworthiness, in [0, 1]; ``None`` with fewer than 4 cells.
    n_cells : int
        The cells scored.
    n_neighbors : int
        The neighbours compared, ``min(15, n_cells // 2 - 1)`` (0 when not scored).
    """
    from sklearn.manifold import trustworthiness

    n = len(true)
    if n > max_cells:
        keep = np.sort(np.random.default_rng(random_state).choice(n, size=max_cells, replace=False))
        true, pred, n = true[keep], pred[keep], max_cells
    k = min(NEIGHBOURS, n // 2 - 1)
    if k < 1:
        return None, n, 0
    return float(trustworthiness(np.asarray(true), np.asarray(pred), n_neighbors=k)), n, k


def neighbour_overlap(pred: np.ndarray, true: np.ndarray, reference: np.ndarray, k: int = NEIGHBOURS) -> tuple[float, int]:
    """Mean fraction of a query cell's ``k`` nearest reference cells shared by its predicted and true positions.

    For each query cell, ``|P ∩ T| / k`` with ``P`` and ``T`` its ``k`` nearest reference
    cells around its predicted and its true position; the mean over cells.

    Parameters
    ----------
    pred
        Predicted query coordinates, cells × dims (finite).
    true
        True query coordinates, the same shape and cell order (finite).
    reference
        Reference coordinates in the same space, reference cells × dims.
    k
        Neighbours compared per cell; capped at the number of reference cells.

    Returns
    -------
    overlap : float
        The mean shared fraction, in [0, 1]; NaN for no query cells.
    k : int
        The ``k`` used.
    """
    from .knn import NeighbourIndex

    if len(pred) == 0:
        return float("nan"), min(k, len(reference))
    index = NeighbourIndex(np.asarray(reference), random_state=0)
    k = min(k, index.n_cells)
    near_pred, _ = index.query(pred, k)
    near_true, _ = index.query(true, k)
    shared = 0
    for start in range(0, len(near_pred), 10_000):  # bounded memory: chunk × k × k booleans
        a, b = near_pred[start : start + 10_000], near_true[start : start + 10_000]
        shared += int((a[:, :, None] == b[:, None, :]).any(axis=2).sum())
    return float(shared / (len(near_pred) * k)), k


# ---------------------------------------------------------------------------- inputs
def _prediction_table(prediction: Any) -> tuple[pd.DataFrame, dict[str, np.ndarray], list[str], dict | None]:
    """(table with pred_/conf_/pred_*_raw columns, predicted coords, levels, hierarchy) of the first argument."""
    if isinstance(prediction, CallTable):
        return prediction.to_dataframe("full"), dict(prediction.coords), prediction.label_columns, prediction.hierarchy
    if isinstance(prediction, (str, os.PathLike)):  # a file predict or to_csv / write_h5ad wrote
        prediction = read_prediction_table(prediction)
    if isinstance(prediction, pd.DataFrame):
        if not prediction.index.is_unique:
            raise InputError("The prediction table's index (cell names) has duplicates; make the cell names unique.")
        return prediction, {}, levels_in_table(prediction.columns), None
    if isinstance(prediction, ad.AnnData):
        fix = ("; for an AnnData annotated by to_adata, write_h5ad or atlasmtl predict --out x.h5ad, pass its obs "
               "(evaluate(annotated.obs, truth), and coord_pred={'umap': annotated.obsm['X_pred_umap']} for its "
               "coordinates)")
    else:
        fix = ""
    raise ParameterError(
        f"The first argument must be a PredictionResult or a DataFrame of pred_<level> columns, "
        f"not {type(prediction).__name__}{fix}."
    )


def _numbers_in(table: pd.DataFrame, col: str, holds: str, without: str) -> np.ndarray:
    """Column ``col`` of a prediction table as float64 (empty and ``"nan"`` → NaN); an :class:`InputError`
    naming the column when it holds text, such as a label or another locale's numbers (``"high"``, ``"0,93"``),
    which coercion would silently make NaN."""
    numbers, text = numbers_and_text(table[col])
    if text:
        raise InputError(
            f"Column {col!r} holds text, not numbers (e.g. {text}); it must hold "
            f"{holds}, as atlasmtl writes it (result.to_csv(path, mode='standard') or 'full'). Put the numbers "
            f"back in that column, or drop it to evaluate without {without}."
        )
    return numbers.to_numpy(dtype=np.float64)


def _level_columns(table: pd.DataFrame, level: str) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(final labels, confidence or None, which label the confidence is judged against)."""
    names = column_names(level)
    pred = label_strings(table[names["pred"]])
    conf_col, raw_col = names["conf"], names["raw"]
    if conf_col not in table.columns:
        return pred, None, None
    conf = _numbers_in(table, conf_col, "each cell's confidence, a number in [0, 1]", "the confidence metrics")
    empty, outside = int((~np.isfinite(conf)).sum()), int(((conf < 0) | (conf > 1)).sum())
    if empty or outside:
        raise InputError(f"Column {conf_col!r} must hold a confidence in [0, 1] for every cell (found {empty} empty, "
                         f"NaN or infinite and {outside} out-of-range values); put each cell's confidence back, or "
                         "drop the column to evaluate without the confidence metrics.")
    return pred, conf, ("raw" if raw_col in table.columns else "final")


# ---------------------------------------------------------------------------- sections
def _level_metrics(y_true: np.ndarray, pred: np.ndarray, conf: np.ndarray | None, target: np.ndarray,
                   raw: np.ndarray | None, n_bins: int) -> dict[str, Any]:
    """All per-level metrics on the cells with a true label (``raw``: the network's calls, or ``None``)."""
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "n_classes_true": int(len(np.unique(y_true))),
        "accuracy": accuracy(y_true, pred),
        "macro_f1": macro_f1(y_true, pred),
        "balanced_accuracy": balanced_accuracy(y_true, pred),
        "coverage": coverage(pred),
        "accuracy_covered": accuracy_covered(y_true, pred),
        "network_error": None if raw is None else network_error(y_true, raw),
        "unknown_withheld_error": None if raw is None else unknown_withheld_error(y_true, pred, raw),
        "ece": None,
        "ece_if_calibrated": None,
        "brier": None,
        "aurc": None,
    }
    if conf is not None:
        correct = _correct(y_true, target)
        out.update(
            ece=expected_calibration_error(conf, correct, n_bins),
            ece_if_calibrated=ece_if_calibrated(conf, n_bins),
            brier=brier_score(conf, correct),
            aurc=aurc(conf, correct),
        )
    return out


def _infer_hierarchy(truth: pd.DataFrame, levels: Sequence[str]) -> dict[str, dict[str, str]]:
    """child level → {child label: parent label} for consecutive truth levels that nest."""
    hierarchy = {}
    for parent, child in zip(levels[:-1], levels[1:]):
        pairs = truth[[parent, child]].dropna().astype(str).drop_duplicates()
        if len(pairs) and pairs[child].is_unique:
            hierarchy[child] = dict(zip(pairs[child], pairs[parent]))
    return hierarchy


def _pair_mappings(levels: Sequence[str], source_levels: Sequence[str], hierarchy: Mapping) -> list[dict | None]:
    """Mapping for each evaluated level to the one before it, composed over skipped ``source_levels``."""
    mappings: list[dict | None] = [None]
    for parent, child in zip(levels[:-1], levels[1:]):
        mapping = None
        if parent in source_levels and child in source_levels:
            i, j = source_levels.index(parent), source_levels.index(child)
            chain = [hierarchy.get(source_levels[k]) for k in range(j, i, -1)]
            if i < j and all(m is not None for m in chain):
                mapping = {str(c): str(p) for c, p in dict(chain[0]).items()}
                for step in chain[1:]:
                    mapping = {c: str(step[p]) for c, p in mapping.items() if p in step}
        mappings.append(mapping)
    return mappings


def _hierarchy_section(
    levels: list[str],
    preds: dict[str, np.ndarray],
    truths: dict[str, tuple[np.ndarray, np.ndarray]],
    hierarchy: Mapping | None,
    result_hierarchy: dict | None,
    result_levels: list[str],
    truth: pd.DataFrame,
) -> dict[str, Any]:
    if hierarchy is not None:
        if not isinstance(hierarchy, Mapping) or not all(isinstance(m, Mapping) for m in hierarchy.values()):
            raise ParameterError("hierarchy must be a dict {child_level: {child_label: parent_label}}.")
        unknown = sorted(set(hierarchy) - set(levels))
        if unknown:
            raise ParameterError(f"hierarchy names level(s) {unknown} that are not evaluated ({levels}); key it by the "
                                 "child level, e.g. {'fine': {'fine label': 'coarse label'}}.")
        source, mappings = "argument", _pair_mappings(levels, levels, hierarchy)
    elif result_hierarchy is not None:
        source, mappings = "result", _pair_mappings(levels, result_levels, result_hierarchy)
    else:
        source, mappings = "truth", _pair_mappings(levels, levels, _infer_hierarchy(truth, levels))
    consistency, n_checked, pairs = path_consistency([preds[lv] for lv in levels], mappings)
    all_true = np.logical_and.reduce([truths[lv][1] for lv in levels])
    return {
        "source": source,
        "path_consistency": consistency,
        "n_checked": n_checked,
        "pairs": {f"{p} -> {c}": info for p, c, info in zip(levels[:-1], levels[1:], pairs)},
        "full_path_accuracy": (
            full_path_accuracy([truths[lv][0][all_true] for lv in levels], [preds[lv][all_true] for lv in levels])
            if all_true.any() else None
        ),
        "n_full_path": int(all_true.sum()),
    }


def _boolean_mask(values: Any) -> np.ndarray:
    """``novel_mask``'s values as booleans: booleans, or numbers that are all 0 or 1; anything else (NaN, text,
    other numbers, which ``astype(bool)`` would read as True) is an :class:`InputError`."""
    raw = np.asarray(values)
    if raw.dtype == bool:
        return raw
    if raw.dtype.kind in "iuf" and np.isin(raw, (0, 1)).all():
        return raw.astype(bool)
    if raw.dtype == object and all(isinstance(v, (bool, np.bool_)) for v in raw.ravel()):
        return raw.astype(bool)
    shown = [str(v) for v in raw.ravel()[:200]
             if not (isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, float, np.number)) and v in (0, 1)))][:3]
    raise InputError(
        f"novel_mask must hold booleans (True for a cell of a type the reference lacks); it holds {raw.dtype} "
        f"values such as {shown}. Build it with a comparison, e.g. truth['cell_type'].isin(['B']).to_numpy()."
    )


def _novel_mask(
    cells: pd.Index, truth: pd.DataFrame, pos: np.ndarray, novel_labels: Mapping | None, novel_mask: Any
) -> tuple[np.ndarray, np.ndarray, str]:
    """(is_novel, usable) per predicted cell, and how novelty was given."""
    if novel_mask is not None:
        if isinstance(novel_mask, pd.Series):
            if not cells.isin(novel_mask.index).all():
                raise InputError("novel_mask (a Series) lacks some predicted cells; index it by every predicted cell name.")
            mask = _boolean_mask(novel_mask.reindex(cells).to_numpy())
        else:
            mask = _boolean_mask(novel_mask)
            if mask.shape != (len(cells),):
                raise InputError(f"novel_mask has shape {mask.shape}; it needs one boolean per predicted cell ({len(cells)}).")
        return mask, np.ones(len(cells), dtype=bool), "mask"
    is_novel, usable = np.zeros(len(cells), dtype=bool), np.ones(len(cells), dtype=bool)
    for level, labels in novel_labels.items():
        if level not in truth.columns:
            raise LabelError(f"novel_labels names level {level!r}, which is not a truth column; available: {list(truth.columns)[:20]}.")
        values, has = true_labels(truth[level].iloc[pos])
        listed = {labels} if isinstance(labels, str) else {str(x) for x in labels}  # "B", not the letters B
        absent = listed - set(values[has])
        if absent:
            warnings.warn(f"novel_labels[{level!r}] lists labels no evaluated cell has: {sorted(absent)}.", stacklevel=user_stacklevel())
        usable &= has
        is_novel |= has & np.isin(values, list(listed))
    return is_novel, usable, "labels"


def _novelty_scores(table: pd.DataFrame, level: str, field: str = "novelty") -> np.ndarray | None:
    """atlasmtl's own novelty score of a level (``novelty_<level>``; with ``field="neighbourhood_novelty"``,
    ``neighbourhood_novelty_<level>``), when the table has one with values."""
    col = column_names(level)[field]
    if col not in table.columns:
        return None
    score = _numbers_in(table, col, "each cell's novelty score, a number (empty where the cell has none)",
                        "the novelty AUROC from atlasmtl's own score")
    return score if np.isfinite(score).any() else None


def _novel_section(
    levels: list[str], preds: dict, confs: dict, scores: dict, is_novel: np.ndarray, usable: np.ndarray, source: str,
    neighbourhood: dict | None = None,
) -> dict[str, Any]:
    novel, known = is_novel & usable, ~is_novel & usable
    per_level = {}
    for lv in levels:
        unknown = preds[lv] == UNKNOWN
        score = scores.get(lv)
        around = (neighbourhood or {}).get(lv)
        per_level[lv] = {
            "auroc": (novel_auroc(None, is_novel[usable], score[usable]) if score is not None
                      else novel_auroc(confs[lv][usable], is_novel[usable]) if confs[lv] is not None else None),
            "auroc_score": "novelty" if score is not None else ("1 - confidence" if confs[lv] is not None else None),
            "auroc_neighbourhood": novel_auroc(None, is_novel[usable], around[usable]) if around is not None else None,
            "novel_unknown_rate": float(unknown[novel].mean()) if novel.any() else None,
            "known_unknown_rate": float(unknown[known].mean()) if known.any() else None,
        }
    return {"source": source, "n_novel": int(novel.sum()), "n_known": int(known.sum()), "levels": per_level}


def _coordinate_array(name: str, value: Any, cells: pd.Index, truth: Any, pos: np.ndarray, what: str,
                      unplaced: bool = False) -> np.ndarray:
    """Rows of ``value`` for the predicted cells: an obsm key, a DataFrame indexed by cell, or an array in cell order.
    With ``unplaced``, a row of NaN (a cell ``predict`` could not place) is allowed."""
    if isinstance(value, str):
        if not isinstance(truth, ad.AnnData):
            raise CoordinateError(f"{what}[{name!r}] = {value!r} is an obsm key, but the truth is not an AnnData; pass the array.")
        if value not in truth.obsm:
            raise CoordinateError(f"{what}[{name!r}] = {value!r} is not in the truth's obsm; available: {list(truth.obsm.keys())}.")
        array = np.asarray(truth.obsm[value], dtype=np.float64)[pos]
    elif isinstance(value, pd.DataFrame):
        if not cells.isin(value.index).all():
            raise CoordinateError(f"{what}[{name!r}] (a DataFrame) lacks some predicted cells; index it by cell name.")
        array = value.reindex(cells).to_numpy(dtype=np.float64)
    else:
        array = np.asarray(value, dtype=np.float64)
        if array.ndim != 2 or array.shape[0] != len(cells):
            raise CoordinateError(
                f"{what}[{name!r}] has shape {array.shape}; it needs one row per predicted cell ({len(cells)}), in their order."
            )
    finite = np.isfinite(array)
    if not finite.all() and not (unplaced and (finite.all(axis=1) | np.isnan(array).all(axis=1)).all()):
        raise CoordinateError(f"{what}[{name!r}] holds NaN or infinite values"
                              + (" other than whole rows of NaN (cells left unplaced)." if unplaced else "."))
    return array


def _coords_section(
    coord_truth: Mapping, predicted: dict, reference_coords: Mapping, cells: pd.Index, truth: Any, pos: np.ndarray,
    n_neighbors: int, max_trust: int, random_state: int,
) -> dict[str, Any]:
    out = {}
    for name, value in coord_truth.items():
        if name not in predicted:
            raise CoordinateError(
                f"No predicted coordinates named {name!r} (have: {sorted(predicted)}); "
                "pass them as coord_pred={name: array} or use a model with that coordinate head."
            )
        true = _coordinate_array(name, value, cells, truth, pos, "coord_truth")
        pred = _coordinate_array(name, predicted[name], cells, truth, pos, "coord_pred", unplaced=True)
        if pred.shape != true.shape:
            raise CoordinateError(f"Predicted {name!r} coordinates have shape {pred.shape}, the true ones {true.shape}.")
        placed = np.isfinite(pred).all(axis=1)  # predict leaves cells without signal unplaced (NaN)
        pred, true = pred[placed], true[placed]
        trust, n_trust, k_trust = trustworthiness_score(true, pred, max_trust, random_state)
        entry = {"n": int(len(true)), "unplaced": int((~placed).sum()), "dims": int(true.shape[1]),
                 "rmse": rmse(pred, true) if len(true) else None,
                 "trustworthiness": trust, "trustworthiness_cells": n_trust, "trustworthiness_neighbors": k_trust,
                 "neighbour_overlap": None, "neighbour_k": None}
        if name in reference_coords and len(true):
            ref = np.asarray(reference_coords[name], dtype=np.float64)
            if ref.ndim != 2 or ref.shape[1] != true.shape[1] or not np.isfinite(ref).all():
                raise CoordinateError(
                    f"reference_coords[{name!r}] must be a finite cells × {true.shape[1]} array, got shape {ref.shape}."
                )
            entry["neighbour_overlap"], entry["neighbour_k"] = neighbour_overlap(pred, true, ref, n_neighbors)
        out[name] = entry
    return out


# ---------------------------------------------------------------------------- public API
def evaluate(
    prediction: CallTable | pd.DataFrame | str | os.PathLike,
    truth: ad.AnnData | pd.DataFrame | pd.Series | Mapping[str, pd.Series],
    label_columns: str | Sequence[str] | None = None,
    *,
    hierarchy: Mapping[str, Mapping[str, str]] | None = None,
    novel_labels: Mapping[str, Sequence[str]] | None = None,
    novel_mask: np.ndarray | pd.Series | None = None,
    coord_truth: Mapping[str, str | np.ndarray | pd.DataFrame] | None = None,
    coord_pred: Mapping[str, np.ndarray | pd.DataFrame] | None = None,
    reference_coords: Mapping[str, np.ndarray] | None = None,
    n_bins: int = ECE_BINS,
    n_neighbors: int = NEIGHBOURS,
    max_trustworthiness_cells: int = 5000,
    random_state: int = 0,
) -> dict[str, Any]:
    """Score predictions against the true labels (and coordinates) of the same cells.

    Parameters
    ----------
    prediction
        A :class:`PredictionResult`, or a DataFrame indexed by cell name with
        ``pred_<level>`` columns and optional ``conf_<level>`` and
        ``pred_<level>_raw`` columns (e.g. ``result.to_dataframe("full")`` or a
        CSV written by ``result.to_csv``), or the path of a file ``predict`` / ``to_csv`` / ``write_h5ad``
        wrote (a CSV/TSV is read as text, an ``.h5ad`` only its ``obs``). Missing predictions count as Unknown.
    truth
        An AnnData (labels in ``.obs[level]``), a DataFrame, a Series (one level)
        or a dict ``{level: Series}``, indexed by cell name. Every predicted cell
        must be found by name (order and extra truth cells do not matter); cells
        with a missing (NaN) true label are left out of that level.
    label_columns
        Levels to evaluate, coarse to fine; default: every predicted level.
    hierarchy
        ``{child_level: {child_label: parent_label}}``, the parent level being the
        one before ``child_level`` in ``label_columns``. Default: the result's
        hierarchy, else inferred from the truth where its levels nest.
    novel_labels, novel_mask
        Novel-type cells, given either as ``{level: [true labels absent from the
        reference]}`` or as a boolean per predicted cell (array in cell order, or a
        Series indexed by cell name). Adds the ``"novel"`` section.
    coord_truth
        ``{name: obsm key of the truth AnnData, DataFrame indexed by cell, or an
        array in the predicted cells' order}``: true query coordinates.
    coord_pred
        Predicted coordinates by name, in the same forms as ``coord_truth`` (e.g.
        ``"X_pred_umap"`` written by ``result.to_adata(include_coords=True)``);
        needed for a DataFrame prediction, overrides a result's own.
    reference_coords
        ``{name: reference cells × dims array}`` for the neighbour overlap.
    n_bins
        Confidence bins of the expected calibration error.
    n_neighbors
        Reference neighbours compared by the neighbour overlap.
    max_trustworthiness_cells, random_state
        Trustworthiness is computed on at most this many randomly chosen cells.

    Returns
    -------
    dict
        JSON-serialisable: ``{"n_cells", "levels", "hierarchy", "novel", "coords"}``;
        undefined values are ``None``. See :func:`evaluation_table`.

    Notes
    -----
    *Correct* means the predicted label equals the true label; ``Unknown`` is never
    correct. Per level, cells whose true label is missing (NaN) are left out.

    - accuracy: fraction correct (Unknown counts as wrong).
    - macro_f1: ``sklearn.metrics.f1_score(average="macro")`` over the classes present
      in the truth (Unknown and classes found only in the predictions are not averaged;
      Unknown calls count as misses of their true class).
    - balanced_accuracy: mean recall over the classes present in the truth.
    - coverage: ``1 -`` fraction of Unknown calls; accuracy_covered: accuracy among
      the cells that are not Unknown.
    - network_error: the share of the network's own calls (``pred_<level>_raw``, cells with
      a call) that are wrong; unknown_withheld_error: among the cells called Unknown that
      had a network call, the share whose call was wrong (how often an abstention withheld
      an error; above network_error it picks errors better than chance). Both ``None``
      without a raw column (predictions written in ``mode="full"``, or a result).
    - Confidence metrics use ``conf_<level>`` (the calibrated probability of the network's
      call, its jointly decoded class) as the probability that the **network's own call**
      is right, so they judge it against the correctness of the raw network label ``pred_<level>_raw``; when
      the table has no raw column, the final label ``pred_<level>`` is used. Each level
      reports which in ``confidence_target`` (``"raw"`` / ``"final"``).

      - ece: expected calibration error, 15 equal-width confidence bins ``(lo, hi]``
        (confidence 0 goes to the first bin): ``sum_b n_b / n * |accuracy_b - mean conf_b|``.
      - ece_if_calibrated: the ECE a perfectly calibrated confidence would show on the
        same cells, on average (each cell right with probability ``conf``; exact
        Poisson-binomial per bin, :func:`ece_if_calibrated`). A finite query's ECE is
        biased upward (about 0.06 at 200 cells whose confidences spread over 0.3–1):
        the part of ``ece`` above this is miscalibration, the rest sampling noise.
      - brier: binary Brier score of confidence vs correctness, ``mean((conf - correct)**2)``
        (the multi-class score would need every class probability, which results do not keep).
      - aurc: area under the risk–coverage curve: cells sorted by confidence, highest
        first (ties keep cell order); the risk at ``n`` is the error rate among the top
        ``n`` cells; AURC is the mean risk over ``n = 1 .. N``. Lower is better.

    - Hierarchy: ``hierarchy[child_level][child_label] = parent_label``, the parent
      level being the level just before ``child_level``. It is taken from the
      ``hierarchy=`` argument, else from ``PredictionResult.hierarchy`` (composed
      across skipped levels), else inferred from the truth when every child label has
      one parent there. For a pair of consecutive levels a cell is consistent when its
      child prediction is Unknown (abstaining at the finer level is allowed; the coarser
      levels are checked by their own pairs) or when its parent prediction is the
      child's mapped parent. A known child under an Unknown parent is inconsistent.
      Cells with a predicted child label the mapping does not know cannot be checked:
      they are left out and counted in ``n_unmapped``. path_consistency is the fraction
      of checkable cells consistent at every mapped pair; full_path_accuracy the
      fraction of cells (with a true label at every level) correct at every level.
    - Novel types: a cell is novel when its true label at a level named in
      ``novel_labels`` is listed there (or where ``novel_mask`` is true). Per level:
      auroc of atlasmtl's novelty score (column ``novelty_<level>``, when the
      predictions hold it; ``auroc_score`` says which) or else of ``1 - conf``, for
      novel (positive) vs known cells; ``auroc_neighbourhood``, the same for the
      neighbourhood novelty (column ``neighbourhood_novelty_<level>``; None without
      it); and the fractions of
      novel and of known cells called Unknown. Cells whose true label is missing at a
      level named in ``novel_labels`` are left out of this section; novel cells stay in
      the per-level metrics (where no label but Unknown could be right for them).
    - Coordinates: rmse over cells and dimensions; trustworthiness
      (``sklearn.manifold.trustworthiness`` of the predicted query coordinates with
      respect to the true ones, ``n_neighbors = min(15, n // 2 - 1)``, on at most
      ``max_trustworthiness_cells`` randomly chosen cells); neighbour_overlap: the mean
      over query cells of ``|P ∩ T| / k``, where ``P`` and ``T`` are the cell's ``k``
      (15) nearest reference cells around its predicted and its true position. Cells
      ``predict`` left unplaced (a row of NaN: no signal) are left out of all three and
      counted in ``unplaced``.

    Raises
    ------
    InputError
        Predicted cells missing from the truth, duplicated cell names, confidence
        values that are text, NaN or outside [0, 1]. :class:`~atlasmtl.exceptions.LabelError` for a level missing from the
        predictions or the truth; :class:`~atlasmtl.exceptions.CoordinateError` for
        unusable coordinates.
    ParameterError
        Bad arguments: a ``prediction`` that is neither a result, a DataFrame nor a file path (an
        annotated AnnData: the message says to pass its ``obs``), both ``novel_labels`` and ``novel_mask``,
        a non-positive ``n_bins`` ...
    """
    if novel_labels is not None and novel_mask is not None:
        raise ParameterError("Give novel_labels or novel_mask, not both.")
    for name, value in (("n_bins", n_bins), ("n_neighbors", n_neighbors), ("max_trustworthiness_cells", max_trustworthiness_cells)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ParameterError(f"{name}={value!r} must be a positive integer.")
    table, predicted_coords, result_levels, result_hierarchy = _prediction_table(prediction)
    levels = list(result_levels) if label_columns is None else ([label_columns] if isinstance(label_columns, str) else list(label_columns))
    if not levels:
        raise LabelError("No levels to evaluate: the predictions have no pred_<level> column and label_columns is empty.")
    if len(set(levels)) != len(levels):
        raise ParameterError(f"label_columns={levels} names a level twice; name each level once, coarse to fine.")
    for lv in levels:
        if column_names(lv)["pred"] not in table.columns:
            raise LabelError(
                f"Level {lv!r} has no predictions (no column {column_names(lv)['pred']!r}); "
                f"predicted levels: {result_levels}."
            )
    truth_frame = truth_table(truth, levels)
    for lv in levels:
        if lv not in truth_frame.columns:
            raise LabelError(f"Level {lv!r} is not a column of the truth; available: {list(truth_frame.columns)[:20]}. "
                             f"Pass labels kept under another name by level, e.g. truth={{{lv!r}: "
                             "adata.obs['cell_type'], ...}, or score fewer levels with label_columns=.")
    cells = pd.Index(table.index)
    pos = cell_positions(cells, truth_frame.index)

    preds, confs, truths, level_out = {}, {}, {}, {}
    for lv in levels:
        pred, conf, target_kind = _level_columns(table, lv)
        y_true, has = true_labels(truth_frame[lv].iloc[pos])
        preds[lv], confs[lv], truths[lv] = pred, conf, (y_true, has)
        raw_col = column_names(lv)["raw"]
        raw = label_strings(table[raw_col]) if raw_col in table.columns else None
        target = raw if target_kind == "raw" else pred
        called = set(pred[pred != UNKNOWN].tolist())
        if has.any() and called and not called & set(y_true[has].tolist()):
            warnings.warn(f"No true label at {lv!r} is a label the predictions use (truth e.g. {y_true[has][0]!r}, "
                          f"predictions e.g. {sorted(called)[0]!r}): every cell scores as wrong. Check that the truth "
                          "column names the same classes as the reference (another column, other spellings or type).",
                          UserWarning, stacklevel=user_stacklevel())
        if has.any():
            metrics = _level_metrics(y_true[has], pred[has], None if conf is None else conf[has], target[has],
                                     None if raw is None else raw[has], n_bins)
        else:
            metrics = dict.fromkeys(LEVEL_METRICS, None) | {"n": 0, "n_classes_true": 0}
        level_out[lv] = {**metrics, "n_excluded": int((~has).sum()), "confidence_target": target_kind}

    novel = None
    if novel_labels is not None or novel_mask is not None:
        is_novel, usable, source = _novel_mask(cells, truth_frame, pos, novel_labels, novel_mask)
        scores = {lv: _novelty_scores(table, lv) for lv in levels}
        around = {lv: _novelty_scores(table, lv, "neighbourhood_novelty") for lv in levels}
        novel = _novel_section(levels, preds, confs, scores, is_novel, usable, source, around)

    coords = {}
    if coord_truth:
        predicted = {**predicted_coords, **dict(coord_pred or {})}
        unknown_refs = set(reference_coords or {}) - set(coord_truth)
        if unknown_refs:
            raise ParameterError(f"reference_coords names {sorted(unknown_refs)} have no entry in coord_truth.")
        coords = _coords_section(coord_truth, predicted, reference_coords or {}, cells, truth, pos,
                                 n_neighbors, max_trustworthiness_cells, random_state)
    elif reference_coords:
        raise ParameterError("reference_coords needs coord_truth (the true query coordinates) as well.")

    return {
        "n_cells": int(len(cells)),
        "levels": level_out,
        "hierarchy": _hierarchy_section(levels, preds, truths, hierarchy, result_hierarchy, result_levels, truth_frame),
        "novel": novel,
        "coords": coords,
    }


def evaluation_table(evaluation: Mapping[str, Any], section: str = "levels") -> pd.DataFrame:
    """One section of an :func:`evaluate` result as a tidy DataFrame.

    Parameters
    ----------
    evaluation
        The dict returned by :func:`evaluate`.
    section
        ``"levels"`` (one row per level), ``"novel"`` (one row per level) or
        ``"coords"`` (one row per coordinate set). ``None`` becomes NaN.

    Returns
    -------
    pandas.DataFrame
        One row per level (index ``level``) or coordinate set (index ``coords``), one column per
        metric; columns whose values are all numbers (or ``None``) are numeric. Empty when the
        section is (no ``"novel"`` or ``"coords"`` section was asked of :func:`evaluate`).

    Raises
    ------
    ParameterError
        ``section`` is not one of the three, or ``evaluation`` is not a dict :func:`evaluate` returned.
    """
    if section not in ("levels", "novel", "coords"):
        raise ParameterError(f"section={section!r} must be 'levels', 'novel' or 'coords'.")
    if not isinstance(evaluation, Mapping) or "levels" not in evaluation:
        raise ParameterError(f"evaluation_table takes the dict atlasmtl.evaluate returns, not {type(evaluation).__name__}"
                             + (" without its 'levels'" if isinstance(evaluation, Mapping) else "") + ".")
    rows = evaluation.get(section) or {}
    if section == "novel":
        rows = rows.get("levels", {}) if rows else {}
    frame = pd.DataFrame.from_dict(dict(rows), orient="index")
    for col in frame.columns:
        numeric = pd.to_numeric(frame[col], errors="coerce")
        if numeric.notna().sum() == frame[col].notna().sum():
            frame[col] = numeric
    frame.index.name = "level" if section != "coords" else "coords"
    return frame
