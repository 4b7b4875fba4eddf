"""Gating: confidence/margin thresholds decide which calls are kept, sent to KNN, or abstained."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .exceptions import ParameterError
from .validation import as_choice, as_float, as_int

KNN_MODES = ("off", "low_conf_only", "all")


@dataclass(frozen=True)
class GatingConfig:
    """Thresholds of the gate.

    A call is *low-confidence* when ``confidence < confidence_high`` or
    ``margin < margin_threshold``; it is *Unknown* when
    ``confidence < confidence_low``. With KNN on, a covered cell's vote is
    accepted when its fraction is at least ``knn_conf_low`` and it names the
    network's own call: the neighbours then confirm the call, which stands even
    below ``confidence_low``. A vote for another class, or one that falls
    short, changes nothing (the network's call stands or abstains as without
    KNN): on shifted queries the embedding's neighbours were measured to be
    wrong more often than the calibrated network where the two disagree.
    """

    confidence_high: float = 0.7
    confidence_low: float = 0.4
    margin_threshold: float = 0.2
    knn_correction: str = "low_conf_only"
    knn_k: int = 15
    knn_conf_low: float = 0.6

    def validate(self) -> "GatingConfig":
        """Check the thresholds; returns a copy holding plain Python numbers (NumPy scalars accepted)."""
        checked = {name: as_float(name, getattr(self, name), 0.0, 1.0)
                   for name in ("confidence_high", "confidence_low", "margin_threshold", "knn_conf_low")}
        if checked["confidence_low"] > checked["confidence_high"]:
            raise ParameterError(
                f"confidence_low={checked['confidence_low']} is above confidence_high={checked['confidence_high']}; "
                "cells below confidence_low are abstained, so it must not exceed confidence_high."
            )
        knn_correction = as_choice("knn_correction", self.knn_correction, KNN_MODES)
        knn_k = as_int("knn_k", self.knn_k)
        return dataclasses.replace(self, knn_correction=knn_correction, knn_k=knn_k, **checked)


def top_two(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top class, its probability, and the top1 − top2 margin per row."""
    if probs.shape[1] == 1:
        return np.zeros(len(probs), dtype=np.int64), probs[:, 0], probs[:, 0]
    part = np.partition(probs, -2, axis=1)
    top1, top2 = part[:, -1], part[:, -2]
    return probs.argmax(axis=1), top1, top1 - top2


def call_confidence(probs: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probability of the called class and its margin over the best other class, per row."""
    rows = np.arange(len(codes))
    conf = probs[rows, codes]
    if probs.shape[1] == 1:
        return conf, conf
    other = probs.copy()
    other[rows, codes] = -np.inf
    return conf, conf - other.max(axis=1)


def low_confidence(conf: np.ndarray, margin: np.ndarray, cfg: GatingConfig) -> np.ndarray:
    # written as "not at least" so that a NaN confidence or margin is low, never confident
    return ~(conf >= cfg.confidence_high) | ~(margin >= cfg.margin_threshold)


def apply_gate(
    raw_code: np.ndarray,
    conf: np.ndarray,
    margin: np.ndarray,
    knn_code: np.ndarray,
    knn_frac: np.ndarray,
    knn_covered: np.ndarray,
    cfg: GatingConfig,
    low: np.ndarray | None = None,
    abstain: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Combine the network's call and the KNN vote for one level.

    ``low`` is the low-confidence mask when the caller has it already
    (:func:`low_confidence` of ``conf`` and ``margin``). ``abstain`` marks cells
    that end Unknown whatever the vote says (novel cells, cells without signal,
    cells whose parent level is Unknown). A NaN confidence is never confident:
    such a cell is Unknown and no vote can label it. A vote is accepted
    (``used_knn``) when it reaches ``knn_conf_low`` and names the network's
    call; it then keeps a call below ``confidence_low`` from abstaining. Returns
    the final class code (-1 = Unknown) and the per-cell flags.
    """
    if low is None:
        low = low_confidence(conf, margin, cfg)
    usable = np.isfinite(conf)
    if abstain is not None:
        usable = usable & ~abstain
    unknown = ~(conf >= cfg.confidence_low)  # NaN → Unknown
    final = raw_code.copy()
    accepted = knn_covered & (knn_code >= 0) & (knn_code == raw_code) & (knn_frac >= cfg.knn_conf_low) & usable
    is_unknown = (unknown & ~accepted) | ~usable
    final[is_unknown] = -1
    return {"code": final, "is_unknown": is_unknown, "is_low_conf": low, "used_knn": accepted}
