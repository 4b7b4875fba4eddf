"""Hierarchy: decode nested annotation levels jointly, so every predicted path exists in the reference.

For a run of levels where each child label has one parent (the ``hierarchy``
stored in the model), the decoded path is the reference path (leaf label and
its ancestors) maximising the product of the levels' calibrated probabilities.
Levels that do not nest in their parent are decoded on their own.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def level_paths(levels: Sequence[str], classes: Mapping[str, Sequence[str]], hierarchy: Mapping[str, Mapping[str, str]]) -> list[tuple[int, int, np.ndarray]]:
    """Runs of nesting levels and their reference paths.

    Returns ``(first, last, paths)`` per run: ``paths[p, m]`` is the class code at
    level ``first + m`` of path ``p`` (one path per label of level ``last``).
    A single level forms a run of length one with the identity path table.
    """
    runs = []
    j = 0
    while j < len(levels):
        end = j
        while end + 1 < len(levels) and levels[end + 1] in hierarchy:
            end += 1
        leaves = np.arange(len(classes[levels[end]]))
        paths = np.zeros((len(leaves), end - j + 1), dtype=np.int64)
        paths[:, -1] = leaves
        for m in range(end, j, -1):
            parent_of = hierarchy[levels[m]]
            parent_code = {c: i for i, c in enumerate(classes[levels[m - 1]])}
            names = classes[levels[m]]
            paths[:, m - j - 1] = [parent_code[parent_of[names[c]]] for c in paths[:, m - j]]
        runs.append((j, end, paths))
        j = end + 1
    return runs


def decode_paths(probs: Sequence[np.ndarray], runs: list[tuple[int, int, np.ndarray]]) -> list[np.ndarray]:
    """Class code per level: the valid path maximising the product of the level probabilities.

    Parameters
    ----------
    probs
        Calibrated probabilities per level (cells × classes), coarse to fine.
    runs
        From :func:`level_paths`.
    """
    codes: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(probs)
    for first, last, paths in runs:
        if first == last:
            codes[first] = probs[first].argmax(axis=1)
            continue
        best = path_log_scores(probs, first, last, paths).argmax(axis=1)
        for m in range(first, last + 1):
            codes[m] = paths[best, m - first]
    return codes


def path_log_scores(probs: Sequence[np.ndarray], first: int, last: int, paths: np.ndarray) -> np.ndarray:
    """Cells × paths: the sum over the levels ``first..last`` of the log probability of each reference path
    (one run of :func:`level_paths`), probabilities floored at 1e-30."""
    score = np.zeros((probs[first].shape[0], len(paths)))
    for m in range(first, last + 1):
        score += np.log(np.clip(probs[m][:, paths[:, m - first]], 1e-30, None))
    return score


def parent_codes(child_classes: Sequence[str], parent_classes: Sequence[str], mapping: Mapping[str, str]) -> np.ndarray:
    """Parent class code of each child class code."""
    parent_code = {c: i for i, c in enumerate(parent_classes)}
    return np.array([parent_code[mapping[c]] for c in child_classes], dtype=np.int64)


def infer_hierarchy(label_columns: Sequence[str], classes: dict, codes: np.ndarray) -> dict[str, dict[str, str]]:
    """For each level whose labels nest in the previous level's, map child → parent label
    (pairs in order of first appearance). Cells are read in chunks of :data:`_HIERARCHY_CHUNK`
    (one int64 key per cell of a chunk), so the temporaries do not grow with the reference."""
    hierarchy: dict[str, dict[str, str]] = {}
    for j in range(1, len(label_columns)):
        n_parents = len(classes[label_columns[j - 1]])
        first: dict[int, tuple[int, int]] = {}  # pair key -> (chunk start, position in the chunk's labelled cells)
        for start in range(0, len(codes), _HIERARCHY_CHUNK):
            block = codes[start : start + _HIERARCHY_CHUNK]
            both = (block[:, j] >= 0) & (block[:, j - 1] >= 0)
            keys, at = np.unique(block[both, j].astype(np.int64) * n_parents + block[both, j - 1], return_index=True)
            for key, pos in zip(keys.tolist(), at.tolist()):
                first.setdefault(key, (start, pos))
        keys = np.array(sorted(first, key=first.__getitem__), dtype=np.int64)
        child, parent = keys // n_parents, keys % n_parents
        if len(keys) and len(np.unique(child)) == len(child):
            parent_names, child_names = classes[label_columns[j - 1]], classes[label_columns[j]]
            hierarchy[label_columns[j]] = {child_names[c]: parent_names[p] for c, p in zip(child.tolist(), parent.tolist())}
    return hierarchy


#: Cells per chunk when :func:`infer_hierarchy` reads the label codes.
_HIERARCHY_CHUNK = 262_144
