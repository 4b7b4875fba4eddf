"""Known labels: the truth helpers shared by :mod:`~atlasmtl.metrics`, :mod:`~atlasmtl.pl` and the report.

* reading true labels: :func:`truth_by_level` (aligned to a result's cells,
  ``None`` where unlabelled), :func:`truth_frame` (the same as a DataFrame, also
  from column names of the query), :func:`truth_table` / :func:`cell_positions` /
  :func:`true_labels` (any table matched by cell name, for :func:`atlasmtl.evaluate`);
* predicted labels as strings: :func:`label_strings`.

Calibration figures (the reliability table, the ECE and its finite-sample floor) live in
:mod:`~atlasmtl.calibration`, with the temperature that training fits.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .calls import UNKNOWN, CallTable, whole_number_text
from .exceptions import InputError, LabelError, ParameterError, user_stacklevel


# ---------------------------------------------------------------- true labels of a result's cells
def truth_by_level(
    result: CallTable,
    truth: ad.AnnData | pd.DataFrame | Mapping[str, Any],
    columns: Mapping[str, str] | Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """True labels per level, aligned to the result's cells (``None`` where unlabelled).

    Parameters
    ----------
    result
        The predictions.
    truth
        An AnnData (its ``obs`` is used), a DataFrame indexed by cell name, or a
        mapping ``level → array-like`` in the result's cell order.
    columns
        Which column holds each level's truth: a mapping ``level → column``, or a
        sequence with one column per level (coarse to fine). By default every
        level whose name is a column of ``truth`` is used.

    Returns
    -------
    ``level → object array`` of true labels (strings; ``None`` for missing values).
    Levels without truth are left out.

    Raises
    ------
    LabelError
        When a named column is missing, the cells do not match, or no level has truth.
    """
    if not isinstance(result, CallTable):
        raise ParameterError(f"Expected a PredictionResult (from atlasmtl.predict), got {type(result).__name__}.")
    levels = result.label_columns
    if isinstance(truth, ad.AnnData):
        truth = truth.obs
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    if columns is not None and not isinstance(columns, Mapping):
        columns = list(columns)
        if len(columns) != len(levels):
            raise LabelError(
                f"{len(columns)} truth column(s) {columns} given for {len(levels)} level(s) {levels}; "
                "give one per level (coarse to fine) or map them as {level: column}."
            )
        columns = dict(zip(levels, columns))
    if isinstance(truth, pd.DataFrame):
        if columns is None:
            columns = {lv: lv for lv in levels if lv in truth.columns}
        bad = {lv: c for lv, c in columns.items() if c not in truth.columns}
        if bad:
            raise LabelError(
                f"Truth column(s) {sorted(bad.values())} are not in the table; available: {list(truth.columns)[:20]}."
            )
        _check_unique_cells(truth.index)
        if not truth.index.equals(result.obs_names):
            missing = result.obs_names.difference(truth.index)
            if len(missing):
                raise LabelError(
                    f"{len(missing)} predicted cell(s) (e.g. {missing[0]!r}) are not in the truth table; "
                    "pass the query the predictions were made for."
                )
            truth = truth.loc[result.obs_names]
        series = {lv: truth[c] for lv, c in columns.items()}
    elif isinstance(truth, Mapping):
        keys = columns if columns is not None else {lv: lv for lv in levels if lv in truth}
        series = {}
        for lv, key in keys.items():
            if key not in truth:
                raise LabelError(f"No truth given for {key!r}; keys: {list(truth)}.")
            values = pd.Series(np.asarray(truth[key], dtype=object))
            if len(values) != result.n_obs:
                raise LabelError(
                    f"Truth for {lv!r} has {len(values)} values; the result has {result.n_obs} cells."
                )
            series[lv] = values
    else:
        raise LabelError(f"truth must be an AnnData, a DataFrame or a mapping, not {type(truth).__name__}.")
    unknown = [lv for lv in series if lv not in result.levels]
    if unknown:
        raise LabelError(f"Level(s) {unknown} are not predicted by this result; its levels are {levels}.")
    if not series:
        raise LabelError(
            f"None of the levels {levels} has a truth column; name them with columns=... "
            "(one per level, or {level: column})."
        )
    out, unlabelled = {}, []
    for lv in levels:
        if lv in series:
            s = pd.Series(series[lv]).reset_index(drop=True)
            if not s.notna().any():
                unlabelled.append(lv)
                continue
            values = s.astype(object).where(s.notna(), None).to_numpy(dtype=object)
            out[lv] = np.array([None if v is None else str(v) for v in values], dtype=object)
    if unlabelled:
        named = [columns[lv] if columns is not None else lv for lv in unlabelled]
        if not out:
            raise LabelError(f"The truth column(s) {named} hold no label at all (every value missing): nothing "
                             "to compare the predictions with; name columns that hold the query's labels.")
        warnings.warn(f"The truth column(s) {named} hold no label (every value missing); level(s) {unlabelled} "
                      "are left out of the comparison.", UserWarning, stacklevel=user_stacklevel())
    return out


def level_columns(levels: Sequence[str], columns: Sequence[str] | Mapping[str, str] | None,
                  available: Sequence[Any], where: str = "the truth", option: str = "truth") -> dict[str, str]:
    """The truth column of each level, from how a user named them.

    Parameters
    ----------
    levels
        The predicted levels, coarse to fine.
    columns
        ``None`` (the columns named as the levels), a list (names equal to levels, paired by name in any
        order; otherwise one column per level, coarse to fine) or a mapping ``level → column``.
    available
        The columns the truth holds.
    where
        The truth, as named in messages (a file name, "the query's obs").
    option
        The argument the columns came from, as named in messages (``truth``, ``--truth-columns``).

    Returns
    -------
    dict of str to str
        ``level → column``, coarse to fine, only the levels given a column.

    Raises
    ------
    ParameterError
        A column named twice, a list that neither gives one column per level nor names levels, or a mapping
        naming a level the predictions lack.
    LabelError
        A named column the truth lacks, or (by default) no column named as a level.
    """
    levels, present = list(levels), [str(c) for c in available]

    def listed(names: Sequence[Any]) -> str:
        return ", ".join(map(repr, names[:20])) + (" ..." if len(names) > 20 else "")

    if columns is None:
        used = {lv: lv for lv in levels if lv in present}
        if not used:
            raise LabelError(f"{where} has no column named as a predicted level ({listed(levels)}); its columns are "
                             f"{listed(present)}. Name the truth columns with {option} (one per level, coarse to "
                             "fine, or level=column).")
    elif isinstance(columns, Mapping):
        unknown = [lv for lv in columns if lv not in levels]
        if unknown:
            raise ParameterError(f"{option} maps level(s) {listed(unknown)} that the predictions do not have (their "
                                 f"levels: {listed(levels)}); map each predicted level to a column.")
        used = {str(k): str(v) for k, v in columns.items()}
    else:
        columns = [str(c) for c in columns]
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise ParameterError(f"{option} names the column {twice[0]!r} twice; name each level's column once.")
        if all(c in levels for c in columns):  # level names pair by name in any order (by position they would
            used = {c: c for c in columns}      # pair fine with coarse when given fine first)
        elif len(columns) == len(levels):
            used = dict(zip(levels, columns))
        else:
            raise ParameterError(f"{option} names {len(columns)} column(s) ({listed(columns)}) for {len(levels)} "
                                 f"predicted level(s) ({listed(levels)}); give one per level (coarse to fine), names "
                                 "equal to the levels, or map them as level=column.")
    missing = [c for c in used.values() if c not in present]
    if missing:
        raise LabelError(f"{where} has no column {listed(missing)}; its columns are {listed(present)}. Name the truth "
                         f"columns with {option}.")
    return {lv: used[lv] for lv in levels if lv in used}


def truth_frame(result: CallTable, truth: Any, columns: Any, adata: ad.AnnData | None) -> tuple[pd.DataFrame, dict]:
    """True labels as a DataFrame (index = the result's cells, one column per level) and which column fed each level.

    ``truth`` may also name columns of ``adata`` (a list, a comma-separated string or ``{level: column}``;
    :func:`level_columns`).
    """
    source = truth
    if isinstance(truth, str):
        truth = [c.strip() for c in truth.split(",") if c.strip()]
    if isinstance(truth, (list, tuple)) and all(isinstance(c, str) for c in truth):
        if adata is None:
            raise ParameterError("truth names columns, so pass the query AnnData as adata= as well.")
        columns = level_columns(result.label_columns, list(truth), adata.obs.columns, "The query's obs")
        source = adata
    elif isinstance(truth, Mapping) and adata is not None and all(isinstance(v, str) for v in truth.values()):
        unknown = [k for k in truth if k not in result.levels]
        if unknown:  # {level: column} naming a level the result lacks (was read as {level: labels}, one "label")
            raise LabelError(f"truth maps level(s) {unknown} that the predictions do not have (their levels: "
                             f"{result.label_columns}); map each predicted level to a column, e.g. "
                             f"{{{result.label_columns[-1]!r}: 'cell_type'}}.")
        columns, source = dict(truth), adata
    by_level = truth_by_level(result, source, columns)
    frame = pd.DataFrame({lv: pd.Series(v, dtype=object) for lv, v in by_level.items()})
    frame.index = result.obs_names.copy()
    used = columns if isinstance(columns, Mapping) else (
        dict(zip(result.label_columns, columns)) if columns is not None else {lv: lv for lv in by_level})
    return frame, {lv: used.get(lv, lv) for lv in by_level}



# ---------------------------------------------------------------- true labels matched by cell name
def truth_table(truth: Any, levels: Sequence[str]) -> pd.DataFrame:
    """The true labels as a DataFrame indexed by cell name."""
    if isinstance(truth, ad.AnnData):
        frame = truth.obs
    elif isinstance(truth, pd.DataFrame):
        frame = truth
    elif isinstance(truth, pd.Series):
        name = truth.name if truth.name is not None else (levels[0] if len(levels) == 1 else None)
        if name is None:
            raise InputError("The truth is an unnamed Series but several levels are evaluated; name it after its level.")
        frame = truth.to_frame(name)
    elif isinstance(truth, Mapping):
        for level, values in truth.items():
            if not isinstance(values, pd.Series):
                raise InputError(
                    f"truth[{level!r}] is a {type(values).__name__}; give a pandas Series indexed by cell name "
                    "so the labels can be matched to the predicted cells."
                )
        frame = pd.DataFrame(dict(truth))
    else:
        raise InputError(
            f"The truth must be an AnnData (labels in .obs), a DataFrame, a Series or a dict of Series, "
            f"not {type(truth).__name__}."
        )
    _check_unique_cells(frame.index)
    return frame


def _check_unique_cells(index: pd.Index) -> None:
    """An :class:`~atlasmtl.exceptions.InputError` when the truth names a cell twice (its labels cannot be matched)."""
    if not index.is_unique:
        raise InputError("The truth's cell names (index / obs_names) have duplicates; make them unique.")


def cell_positions(cells: pd.Index, truth_index: pd.Index) -> np.ndarray:
    """Row of each predicted cell in the truth; raise when some are missing."""
    pos = truth_index.get_indexer(cells)
    missing = pos < 0
    if missing.any():
        examples = ", ".join(map(str, cells[missing][:3]))
        raise InputError(
            f"{int(missing.sum())} of {len(cells)} predicted cells are not in the truth (e.g. {examples}); "
            "pass the labels of the query the predictions were made for (matched by cell name)."
        )
    return pos


def label_strings(values: pd.Series | np.ndarray) -> np.ndarray:
    """String labels; missing predictions become Unknown."""
    series = pd.Series(np.asarray(values, dtype=object))
    return series.where(series.notna(), UNKNOWN).astype(str).to_numpy(dtype=object)


def true_labels(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(string labels, has-label mask) of a truth column."""
    values = series.astype(object)
    has = values.notna().to_numpy()
    text = values.where(has, "").astype(str).to_numpy(dtype=object)
    whole = whole_number_text(series.to_numpy()[has]) if series.dtype.kind == "f" else None
    if whole is not None:  # integer codes read as floats because of a NaN, as the model's classes read them
        text[has] = whole
    return text, has
