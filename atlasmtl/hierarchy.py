"""Hierarchy: decode nested annotation levels jointly, so every predicted path exists in the reference.

For a run of levels where each child label has one parent (the ``hierarchy``
stored in the model), the decoded path is the reference path (leaf label and
its ancestors) maximising the product of the levels' calibrated probabilities.
Levels that do not nest in their parent are decoded on their own.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

from .exceptions import user_stacklevel


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


def infer_hierarchy(label_columns: Sequence[str], classes: dict, codes: np.ndarray,
                    warn: bool = False) -> dict[str, dict[str, str]]:
    """For each level whose labels nest in the previous level's, map child → parent label
    (pairs in order of first appearance). Cells are read in chunks of :data:`_HIERARCHY_CHUNK`
    (one int64 key per cell of a chunk), so the temporaries do not grow with the reference.

    A level nests when every child class has exactly one parent class (among the cells labelled at
    both levels) and every parent class has a child; only then can every class be predicted on a
    reference path. With ``warn``, a pair that nearly nests says why it does not (a few cells with
    another parent, classes labelled at one level only, or the levels given fine → coarse).
    """
    hierarchy: dict[str, dict[str, str]] = {}
    for j in range(1, len(label_columns)):
        coarse, fine = label_columns[j - 1], label_columns[j]
        n_parents = len(classes[coarse])
        first: dict[int, tuple[int, int]] = {}  # pair key -> (chunk start, position in the chunk's labelled cells)
        counts: dict[int, int] = {}
        for start in range(0, len(codes), _HIERARCHY_CHUNK):
            block = codes[start : start + _HIERARCHY_CHUNK]
            both = (block[:, j] >= 0) & (block[:, j - 1] >= 0)
            keys, at, n = np.unique(block[both, j].astype(np.int64) * n_parents + block[both, j - 1],
                                    return_index=True, return_counts=True)
            for key, pos, c in zip(keys.tolist(), at.tolist(), n.tolist()):
                first.setdefault(key, (start, pos))
                counts[key] = counts.get(key, 0) + c
        keys = np.array(sorted(first, key=first.__getitem__), dtype=np.int64)
        child, parent = keys // n_parents, keys % n_parents
        parent_names, child_names = classes[coarse], classes[fine]
        orphans = sorted(set(range(len(child_names))) - set(child.tolist()))
        childless = sorted(set(range(n_parents)) - set(parent.tolist()))
        one_parent = len(np.unique(child)) == len(child)
        if len(keys) and one_parent and not orphans and not childless:
            hierarchy[fine] = {child_names[c]: parent_names[p] for c, p in zip(child.tolist(), parent.tolist())}
        elif len(keys) and warn:
            _why_not_nested(coarse, fine, parent_names, child_names, child, parent,
                            np.array([counts[k] for k in keys.tolist()]), orphans, childless, one_parent)
    return hierarchy


#: Largest share of the cells labelled at two levels whose labels may break the nesting for the levels to be
#: taken as meant to nest (label errors, said in a warning); above it they are taken as independent annotations.
NEARLY_NESTED_SHARE = 0.05


def _why_not_nested(coarse: str, fine: str, parent_names: Sequence[str], child_names: Sequence[str],
                    child: np.ndarray, parent: np.ndarray, n_cells: np.ndarray, orphans: list[int],
                    childless: list[int], one_parent: bool) -> None:
    """Warn, for a pair of levels that does not nest, when it looks meant to (see :func:`infer_hierarchy`)."""
    fix = (f"as given, {fine!r} is predicted on its own, not on the reference's {coarse!r} → {fine!r} paths (a "
           "call's levels may then contradict each other).")
    if one_parent:
        parts = []
        if orphans:
            parts.append(f"{fine} class(es) {[child_names[c] for c in orphans[:5]]} have no {coarse} label on any cell")
        if childless:
            parts.append(f"{coarse} class(es) {[parent_names[p] for p in childless[:5]]} have no {fine} label on any "
                         f"cell (give those cells a {fine} label, e.g. the {coarse} one)")
        warnings.warn(f"The levels {coarse!r} → {fine!r} nest except that " + "; ".join(parts) + f"; {fix}",
                      UserWarning, stacklevel=user_stacklevel())
        return
    reverse = len(np.unique(parent)) == len(parent)  # each coarse class has one fine class: given fine → coarse?
    if reverse and len(np.unique(child)) < len(parent_names):
        warnings.warn(f"label_columns look ordered fine → coarse: every {coarse!r} class lies inside one {fine!r} "
                      f"class. Pass them coarse → fine (e.g. [{fine!r}, {coarse!r}]): the last level is taken as the "
                      "finest (calibration, novelty and label genes use it), and the levels are decoded on their own.",
                      UserWarning, stacklevel=user_stacklevel())
        return
    majority = {}
    for c, p, n in zip(child.tolist(), parent.tolist(), n_cells.tolist()):
        majority.setdefault(c, []).append((n, p))
    breaking = sum(sum(n for n, _ in pairs) - max(pairs)[0] for pairs in majority.values())
    if 0 < breaking <= NEARLY_NESTED_SHARE * n_cells.sum():
        examples = [f"{child_names[c]!r}: " + ", ".join(f"{parent_names[p]!r} ({n})" for n, p in sorted(pairs, reverse=True))
                    for c, pairs in majority.items() if len(pairs) > 1][:3]
        warnings.warn(f"The levels {coarse!r} → {fine!r} nest except for {breaking} cell(s) whose {coarse} label "
                      f"differs from the rest of their {fine} class ({'; '.join(examples)}): label errors? Correct them "
                      f"to nest the levels; {fix}", UserWarning, stacklevel=user_stacklevel())


#: Cells per chunk when :func:`infer_hierarchy` reads the label codes.
_HIERARCHY_CHUNK = 262_144
