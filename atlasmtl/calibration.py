"""Calibration: a per-level temperature fitted on reference cells the network did not train on.

The network is trained with label smoothing, which keeps its probabilities
away from 0 and 1 (helpful for training, but the raw top probability then
understates accuracy: median 0.57 at 0.98 accuracy on Symphony PBMC). A single
temperature per level, fitted by maximum likelihood on held-out reference
cells, rescales the logits so that confidences match accuracy; it does not
change the ranking of classes within a cell.

A query from another protocol, lab or species sits further from the reference
than held-out reference cells do; there the logits shrink more than accuracy
falls, so a temperature fitted on the held-out cells as they are leaves the
query's confidence too low (brain mouse → human: accuracy 0.83, mean confidence
0.69). The temperature is therefore fitted on :data:`SHIFTED_COPIES` shifted
copies of each held-out cell, drawn by the training augmentation
(:func:`atlasmtl.augment.simulate_shift`: thinned depth, genes missing): the
confidence then matches accuracy on cells shifted as a query is. Measured on
22 real cases (API contract, "Temperatures fitted on shifted held-out cells").

On a small reference the held-out fifth is a few dozen cells, too few to fit a
temperature well (brain mouse → human: 36). Under :data:`CROSSFIT_BELOW_CELLS`
held-out cells the temperatures are cross-fitted: the other cells are dealt into
four more groups like the held-out one (:func:`crossfit_groups`), a network (of
at most :data:`CROSSFIT_MEMBERS` members) is trained with each group held out in turn, and the temperature is fitted on every
group's shifted copies under the network that did not train on them, so on every
reference cell (API contract, "Cross-fitted temperatures on small references").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import logsumexp

#: Confidence bins of the expected calibration error.
ECE_BINS = 15
#: Bounds of the fitted log-temperature (T in [e^-4, e^4]).
LOG_T_BOUNDS = (-4.0, 4.0)
#: Pseudo-count ``a`` of the prior on held-out accuracy: the fitted targets put ``a / (n + 2a)`` of
#: each cell's mass on the other classes (``a = 1``: Laplace's rule of succession).
ACCURACY_PRIOR_COUNT = 1.0
#: Classes with fewer cells than this keep all of them for training (besides the ``1 / fraction`` floor).
MIN_HELD_OUT_CLASS_CELLS = 0
#: Shifted copies of each held-out cell the temperatures are fitted on (0: the held-out cells as they
#: are, as before 2026-12-05) ...
SHIFTED_COPIES = 5
#: ... and at most this many shifted rows in all (a random sample of the held-out cells beyond it).
SHIFTED_MAX_ROWS = 25_000
#: A reference whose held-out set has fewer cells than this has its temperatures cross-fitted
#: (:func:`crossfit_groups`): a network is trained with each of ``round(1 / calibration_fraction) - 1``
#: more groups of cells held out instead, and the temperatures are fitted on every group's rows under the
#: network that did not train on them, so on every reference cell rather than on the fraction held out
#: (0: never; as before 2026-12-05). Costs that many more trainings, so only where they are short.
CROSSFIT_BELOW_CELLS = 500
#: Members of each cross-fitting network: the first ``min(members of the model, CROSSFIT_MEMBERS)`` members
#: of the model's recipe (``None``: as many as the model's). The further networks only supply held-out
#: logits for the temperature fit; three members fit it as well as ten (API contract, "Cheaper
#: cross-fitting networks"), and two as well as three (22 cases x seeds 0-5: every finest ECE within
#: 0.002, every call rate the same; "Two members per cross-fitting network").
CROSSFIT_MEMBERS: int | None = 2


def calibration_split(codes: np.ndarray, fraction: float, rng: np.random.Generator, max_cells: int = 5000) -> np.ndarray:
    """Choose held-out calibration cells, stratified by label.

    ``floor(fraction * n_c)`` cells of each class ``c`` are held out (so classes
    with fewer than ``1 / fraction`` cells keep all their cells for training),
    scaled down so that at most ``max_cells`` cells are held out in total.

    Parameters
    ----------
    codes
        Integer label per cell (finest level; -1 = unlabelled, never held out).
    fraction
        Target fraction held out.
    rng
        Random generator (the model's ``random_state``).
    max_cells
        Cap on held-out cells (enough for a temperature and a distance null).

    Returns
    -------
    Boolean mask of held-out cells.
    """
    held = np.zeros(len(codes), dtype=bool)
    if fraction <= 0:
        return held
    labelled = codes[codes >= 0]
    frac = min(fraction, max_cells / max(len(labelled), 1))
    for c in np.unique(labelled):
        idx = np.flatnonzero(codes == c)
        m = int(np.floor(frac * len(idx))) if len(idx) >= MIN_HELD_OUT_CLASS_CELLS else 0
        if m:
            held[rng.choice(idx, m, replace=False)] = True
    return held


def crossfit_groups(codes: np.ndarray, held: np.ndarray, fraction: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Groups of cells to hold out in turn besides ``held``, for cross-fitted temperatures.

    Parameters
    ----------
    codes
        Finest-level class code per cell (-1 = unlabelled, never held out).
    held
        Boolean mask of the cells held out already (:func:`calibration_split`).
    fraction
        The held-out fraction: ``round(1 / fraction) - 1`` groups are returned, so with ``held`` they
        cover every labelled cell of the classes ``held`` draws from, each once.
    rng
        Random generator.

    Returns
    -------
    One boolean mask per group: per class with cells in ``held`` (others are never held out), its
    other cells in a random order, dealt to the groups in turn (each group about the size of ``held``).
    """
    n_groups = max(int(round(1.0 / fraction)) - 1, 0) if fraction > 0 else 0
    groups = [np.zeros(len(codes), dtype=bool) for _ in range(n_groups)]
    if not n_groups:
        return groups
    for c in np.unique(codes[held & (codes >= 0)]):
        rest = rng.permutation(np.flatnonzero((codes == c) & ~held))
        for g in range(n_groups):
            groups[g][rest[g::n_groups]] = True
    return groups


def fit_temperature(logits: np.ndarray, codes: np.ndarray, copies: int = 1) -> float:
    """Temperature ``T`` minimising the held-out negative log-likelihood of ``softmax(logits / T)``.

    The targets are smoothed by a prior on accuracy (``a / (n + 2a)`` of the mass
    spread over the other classes, ``a`` = :data:`ACCURACY_PRIOR_COUNT`), so a held-out
    set the network classifies perfectly yields a finite, not an infinitely sharp, temperature.
    ``n`` counts cells: with ``copies`` rows per held-out cell (shifted copies), the labelled
    rows divided by ``copies``. Returns 1.0 when no cell is labelled.
    """
    keep = codes >= 0
    lg, y = np.asarray(logits, dtype=np.float64)[keep], codes[keep]
    if len(y) == 0 or lg.shape[1] < 2:
        return 1.0
    eps = ACCURACY_PRIOR_COUNT / (len(y) / max(int(copies), 1) + 2 * ACCURACY_PRIOR_COUNT)
    k = lg.shape[1]
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        lp = lg / np.exp(log_t)
        lp = lp - logsumexp(lp, axis=1, keepdims=True)
        true = lp[rows, y]
        return -float(np.mean((1 - eps) * true + eps / (k - 1) * (lp.sum(axis=1) - true)))

    from scipy.optimize import minimize_scalar  # ~0.4 s to import; prediction never fits a temperature

    return float(np.exp(minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded").x))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)`` (float32 or float64 in, same out)."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confidence_bins(conf: np.ndarray, n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray]:
    """``(edges, bin of each confidence)`` of ``n_bins`` equal-width, right-closed bins ``(lower, upper]``
    over [0, 1] (confidence 0 goes to the first bin)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return edges, np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)


def calibration_bins(conf: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Reliability-diagram table: per confidence bin, cells, mean confidence and accuracy.

    Bins are equal-width and right-closed, ``(lower, upper]`` (confidence 0 goes to
    the first); the expected calibration error is
    ``sum(cells * |accuracy - confidence|) / total`` (:func:`ece_of_bins`).

    Parameters
    ----------
    conf
        Confidence per cell, in [0, 1]. Values are not checked: one below 0 falls in the
        first bin, one above 1 or NaN in the last (a NaN makes that bin's mean confidence NaN).
    correct
        Whether each cell's call is right (booleans or 0/1), in the order of ``conf``.
    n_bins
        Number of equal-width bins over [0, 1].

    Returns
    -------
    pandas.DataFrame
        One row per bin, in order: ``lower``, ``upper`` (its edges), ``cells`` (how many cells
        fall in it), ``confidence`` (their mean confidence) and ``accuracy`` (the fraction
        correct); both means are NaN for an empty bin. Every bin has a row, also with no cells.

    See Also
    --------
    atlasmtl.pl.reliability : draws this table.
    """
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges, which = confidence_bins(conf, n_bins)
    rows = []
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        rows.append({
            "lower": edges[b],
            "upper": edges[b + 1],
            "cells": n,
            "confidence": float(conf[sel].mean()) if n else np.nan,
            "accuracy": float(correct[sel].mean()) if n else np.nan,
        })
    return pd.DataFrame(rows)


def ece_of_bins(table: pd.DataFrame) -> float:
    """Expected calibration error (ECE) of a :func:`calibration_bins` table.

    ``sum(cells * |accuracy - confidence|) / total`` over the bins that hold cells.

    Parameters
    ----------
    table
        A :func:`calibration_bins` table (columns ``cells``, ``accuracy`` and ``confidence``).

    Returns
    -------
    float
        The ECE, in [0, 1]; NaN when no bin holds a cell.
    """
    total, cells = 0.0, 0
    for n, acc, conf in zip(table["cells"], table["accuracy"], table["confidence"]):
        if n:
            total += n * abs(acc - conf)
            cells += n
    return float(total / cells) if cells else float("nan")


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (ECE) over ``n_bins`` equal-width bins ``(lo, hi]`` of confidence.

    ``sum_b n_b / n * |accuracy_b - mean confidence_b|``: :func:`ece_of_bins` of
    :func:`calibration_bins`. A finite sample's ECE is biased upward; compare it with
    :func:`ece_if_calibrated` on the same confidences.

    Parameters
    ----------
    conf
        Confidence per cell, in [0, 1] (binned as in :func:`calibration_bins`; NaN is not
        handled and makes the result NaN).
    correct
        Whether each cell's call is right (booleans or 0/1), in the order of ``conf``.
    n_bins
        Number of equal-width bins over [0, 1] (15, as :func:`atlasmtl.evaluate` uses).

    Returns
    -------
    float
        The ECE, in [0, 1]; NaN for no cells.
    """
    return ece_of_bins(calibration_bins(conf, correct, n_bins))


#: Bins with more cells than this use the normal approximation in :func:`ece_if_calibrated`.
EXACT_BIN_CELLS = 2000


def _mean_absolute_deviation_poisson_binomial(p: np.ndarray) -> float:
    """``E|S - sum(p)|`` for ``S`` a sum of independent Bernoulli(``p_i``) (exact up to
    :data:`EXACT_BIN_CELLS` terms, else the normal approximation ``sigma * sqrt(2 / pi)``)."""
    mu = float(p.sum())
    if len(p) > EXACT_BIN_CELLS:
        return float(np.sqrt(np.sum(p * (1.0 - p)) * 2.0 / np.pi))
    pmf = np.zeros(len(p) + 1)
    pmf[0] = 1.0
    for i, q in enumerate(p, start=1):  # distribution of the first i draws' sum
        pmf[1 : i + 1] = pmf[1 : i + 1] * (1.0 - q) + pmf[:i] * q
        pmf[0] *= 1.0 - q
    return float(np.dot(pmf, np.abs(np.arange(len(p) + 1) - mu)))


def ece_if_calibrated(conf: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE that a *perfectly calibrated* confidence would show on these cells, on average.

    On a finite query the ECE is biased upward: each bin's accuracy is a mean of few
    right/wrong outcomes, so even a confidence that is exactly right has an ECE above
    0 (about 0.06 for 200 cells whose confidences spread over 0.3–1 with 15 bins).
    This is the expectation of :func:`expected_calibration_error` when each cell is
    right with probability equal to its confidence, independently:
    ``sum_b E|S_b - sum_{i in b} conf_i| / n`` with ``S_b`` the number right in bin
    ``b`` (exact Poisson-binomial up to :data:`EXACT_BIN_CELLS` cells per bin, normal
    approximation above). Compare an observed ECE with it: the part above it is
    miscalibration, the rest is sampling noise. Non-finite confidences count as 0.

    Parameters
    ----------
    conf
        Confidence per cell, in [0, 1].
    n_bins
        Equal-width bins ``(lo, hi]``, as in :func:`expected_calibration_error`.

    Returns
    -------
    The expected ECE (NaN for no cells).
    """
    conf = np.clip(np.nan_to_num(np.asarray(conf, dtype=np.float64), nan=0.0), 0.0, 1.0)
    if len(conf) == 0:
        return float("nan")
    _, which = confidence_bins(conf, n_bins)
    total = sum(_mean_absolute_deviation_poisson_binomial(conf[which == b]) for b in np.unique(which))
    return float(total / len(conf))
