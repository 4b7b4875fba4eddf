"""The calls: one typed record per annotation level, and the table of all levels.

:class:`LevelCalls` is the single vocabulary for a level's per-cell fields. Its
field names are the keys of :data:`COLUMNS`, which gives each field's writeback
column, what kind of values it holds and the smallest writeback mode that
includes it. Writing (``to_dataframe``, ``to_adata``, CSV), reading back
(:meth:`CallTable.from_frame`), the report, :func:`atlasmtl.evaluate` and
:mod:`atlasmtl.pl` all derive their columns from this one table.

:class:`CallTable` holds every level's calls for the query cells plus their
coordinates and metadata; :class:`~atlasmtl.result.PredictionResult` is its
public face (writeback, report). Consumers that only read calls (metrics, plots,
the report) depend on this module, not on :mod:`atlasmtl.result`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Self, Sequence

import numpy as np
import pandas as pd

from .exceptions import InputError, ParameterError

#: Label of abstained calls.
UNKNOWN = "Unknown"
#: Writeback modes, smallest first; each adds columns to the previous one.
MODES = ("minimal", "standard", "full")


class Column(NamedTuple):
    """How one :class:`LevelCalls` field is written."""

    #: Column name with ``{level}`` for the level's name.
    template: str
    #: ``"label"`` (class codes written as class names), ``"float"`` or ``"flag"``.
    kind: str
    #: Smallest writeback mode that writes it.
    mode: str


#: Field of :class:`LevelCalls` → how it is written, in column order.
COLUMNS: dict[str, Column] = {
    "pred": Column("pred_{level}", "label", "minimal"),
    "conf": Column("conf_{level}", "float", "standard"),
    "margin": Column("margin_{level}", "float", "standard"),
    "is_unknown": Column("is_unknown_{level}", "flag", "standard"),
    "raw": Column("pred_{level}_raw", "label", "full"),
    "knn": Column("pred_{level}_knn", "label", "full"),
    "knn_vote_frac": Column("knn_vote_frac_{level}", "float", "full"),
    "is_low_conf": Column("is_low_conf_{level}", "flag", "full"),
    "used_knn": Column("used_knn_{level}", "flag", "full"),
    "novelty": Column("novelty_{level}", "float", "full"),
    "is_novel": Column("is_novel_{level}", "flag", "full"),
    "neighbourhood_novelty": Column("neighbourhood_novelty_{level}", "float", "full"),
}
#: Fields added after the first release: tables written before them still read back (NaN / False).
_OPTIONAL = {"novelty": np.nan, "is_novel": False, "neighbourhood_novelty": np.nan}

#: Older names of the label-code fields, still accepted by ``calls[name]``.
_ALIASES = {"code": "pred", "raw_code": "raw", "knn_code": "knn"}


def column_names(level: str) -> dict[str, str]:
    """Writeback column names for one level, by field.

    Parameters
    ----------
    level
        The level's name (a label column of the reference).

    Returns
    -------
    dict of str to str
        :class:`LevelCalls` field → column, in column order: ``{"pred": "pred_<level>", "conf":
        "conf_<level>", ..., "neighbourhood_novelty": "neighbourhood_novelty_<level>"}``, every
        field whatever the writeback mode (see :data:`COLUMNS` for the mode that writes each).
    """
    return {name: col.template.format(level=level) for name, col in COLUMNS.items()}


def levels_in_table(columns: Any) -> list[str]:
    """The levels of a prediction table: every ``pred_<level>`` column that is not another level's
    ``pred_<level>_raw`` / ``pred_<level>_knn`` column, in column order."""
    prefix, _, suffix = COLUMNS["pred"].template.partition("{level}")
    stems = [str(c)[len(prefix):] for c in columns if str(c).startswith(prefix) and str(c).endswith(suffix)]
    derived = set()
    for field in ("raw", "knn"):
        tail = COLUMNS[field].template.partition("{level}")[2]
        derived |= {s for s in stems if s.endswith(tail) and s[: -len(tail)] in stems}
    return [s for s in stems if s not in derived]


def check_writeback_names(levels: list[str], coord_names: list[str] = ()) -> None:
    """Refuse level and coordinate names whose writeback would collide or could not be stored in ``.h5ad``.

    Every column written for every level must be distinct (``lineage`` and
    ``lineage_raw`` collide: both would write ``pred_lineage_raw``), and names
    must be non-empty and free of ``/`` (HDF5 keys, so ``obs`` columns and
    ``obsm`` entries in ``.h5ad`` files, cannot hold it).
    """
    from .exceptions import CoordinateError, LabelError

    for kind, names, error in (("level", levels, LabelError), ("coordinate", coord_names, CoordinateError)):
        for name in names:
            if not name or "/" in name:
                raise error(
                    f"The {kind} name {name!r} cannot be written to .h5ad files (names must be non-empty and "
                    "free of '/', which HDF5 keys cannot hold); rename it"
                    + (" (e.g. rename the obs column)." if kind == "level" else " in coord_targets.")
                )
    if len(set(coord_names)) != len(coord_names):
        raise CoordinateError(f"Coordinate names {list(coord_names)} repeat a name; give each head its own name.")
    owner: dict[str, str] = {}
    for level in levels:
        for column in column_names(level).values():
            if column in owner and owner[column] != level:
                raise LabelError(
                    f"The levels {owner[column]!r} and {level!r} would both write the column {column!r} "
                    "(atlasmtl writes pred_<level>, pred_<level>_raw, conf_<level>, ...). Rename one of the "
                    "label columns, e.g. with adata.obs.rename(columns=...)."
                )
            owner[column] = level
    for name in coord_names:  # a table holds each head's dimensions as <name>_1, <name>_2 ... (to_csv)
        taken = [c for c in owner if c.startswith(f"{name}_") and c[len(name) + 1:].isdigit()]
        if taken:
            raise CoordinateError(
                f"The coordinate name {name!r} would write the table column {taken[0]!r} (a head's dimensions are "
                f"written as {name}_1, {name}_2, ...), which level {owner[taken[0]]!r} writes too. Rename the "
                "coordinate head in coord_targets."
            )


def mode_fields(mode: str) -> list[str]:
    """Fields written in ``mode`` (``"minimal"``, ``"standard"`` or ``"full"``)."""
    if mode not in MODES:
        raise ParameterError(f"mode={mode!r} must be one of {MODES}.")
    rank = MODES.index(mode)
    return [name for name, col in COLUMNS.items() if MODES.index(col.mode) <= rank]


def decode_labels(codes: np.ndarray, classes: list[str]) -> pd.Categorical:
    """Class codes → labels (code -1 → ``Unknown``), as a categorical over the classes plus Unknown."""
    names = list(classes) + ([UNKNOWN] if UNKNOWN not in classes else [])
    unknown_code = names.index(UNKNOWN)
    return pd.Categorical.from_codes(np.where(codes < 0, unknown_code, codes), categories=names)


def encode_labels(values: Any, classes: list[str], what: str) -> np.ndarray:
    """Labels → class codes (``Unknown`` and missing → -1); :class:`InputError` for labels not in ``classes``."""
    values = pd.Series(values).astype(str).to_numpy()
    lookup = {c: i for i, c in enumerate(classes)}
    lookup[UNKNOWN] = -1
    lookup["nan"] = -1
    bad = sorted(set(values) - set(lookup))
    if bad:
        raise InputError(f"{what} holds labels the model does not know: {bad[:5]}.")
    return np.array([lookup[v] for v in values], dtype=np.int32)


#: Written values of a flag column, as read back from a table (lower case).
_FLAG_TEXT = {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}
#: Float columns whose values are probabilities or shares (the margin may be negative: see LevelCalls).
_UNIT_INTERVAL = ("conf", "knn_vote_frac")


def _flags(values: pd.Series, what: str) -> np.ndarray:
    """A flag column read back: booleans, or the text / numbers ``True`` / ``False`` / 1 / 0; else an InputError."""
    if values.dtype == bool:
        return values.to_numpy()
    text = values.astype(str).str.strip().str.lower()
    bad = sorted(set(text) - set(_FLAG_TEXT))
    if bad:
        raise InputError(f"{what} holds values that are not True / False: {bad[:5]}.")
    return text.map(_FLAG_TEXT).to_numpy(dtype=bool)


def numbers_and_text(values: pd.Series) -> tuple[pd.Series, list[str]]:
    """A column of a prediction table as numbers (float64; empty text, ``"nan"`` and NaN → NaN), and up to five of
    its distinct values that are text, not numbers (``"high"``, another locale's ``"0,93"``), which coercion alone
    would silently make NaN."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.astype(np.float64), []  # numbers already: no text to look for
    blank = values.isna() | values.astype(str).str.strip().isin(["", "nan", "NaN"])
    numbers = pd.to_numeric(values.where(~blank), errors="coerce")
    return numbers, sorted(set(map(str, values[numbers.isna() & ~blank])))[:5]


def numeric_column(values: pd.Series, what: str, unit_interval: bool) -> np.ndarray:
    """A float column read back (empty text and NaN → NaN); an InputError for text that is not a number
    and, with ``unit_interval``, for numbers outside [0, 1]."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        out = values.to_numpy(dtype=np.float32)  # an AnnData's or a DataFrame's column: numbers already
    else:  # a table read as text
        numbers, bad = numbers_and_text(values)
        if bad:
            raise InputError(f"{what} holds text, not numbers: {bad}. atlasmtl writes "
                             "numbers there: write the predictions again (result.to_csv(path, mode='full'), or "
                             "atlasmtl predict --mode full) or put the numbers back in that column.")
        out = numbers.to_numpy(dtype=np.float32)
    outside = (out < -1e-6) | (out > 1 + 1e-6)  # float32 rounding of a probability of 0 or 1 aside
    if unit_interval and outside.any():
        raise InputError(f"{what} holds values outside [0, 1] (e.g. {out[outside][0]:g}); "
                         "it is a probability or a share.")
    return out


@dataclass
class LevelCalls:
    """One annotation level's calls for every query cell (field names = :data:`COLUMNS` keys).

    Attributes
    ----------
    pred
        Final class code (-1 = Unknown).
    conf
        Confidence: the network's calibrated probability of its call (the
        class on the jointly decoded path when levels nest).
    margin
        Top-1 minus top-2 probability; for a jointly decoded call, the called class's probability less the
        best other class's, negative where the decoded path's class is not the level's most probable.
    is_unknown
        The call was abstained.
    raw
        The network's own class code, before the gate and the KNN vote.
    knn
        The KNN vote's class code (-1 where the cell was not searched or no neighbour voted).
    knn_vote_frac
        Fraction of the ``k`` neighbours voting for ``knn`` (NaN where not searched).
    is_low_conf
        Confidence below ``confidence_high`` or margin below ``margin_threshold``.
    used_knn
        The final call is the KNN vote.
    novelty
        Novelty score: robust z-score of the distance to the reference cells of
        the called class in the embedding; at the finest level, the larger of that
        and the input view's z (see :class:`~atlasmtl.novelty.InputView`). NaN where
        not computed, e.g. no signal or an uncalibrated model.
    is_novel
        Far from every reference cell of its class (``novelty`` above the
        threshold, or novel at the parent level; at the finest level also
        ``neighbourhood_novelty`` above it): Unknown, and KNN may not relabel it.
    neighbourhood_novelty
        Mean ``novelty`` of the cell's nearest query cells (itself included; see
        :func:`atlasmtl.novelty.neighbourhood_novelty`): high where a whole group
        of query cells is far from the reference. At the finest level, above the
        novelty threshold, the cell is novel. NaN where not computed.
    """

    pred: np.ndarray
    conf: np.ndarray
    margin: np.ndarray
    is_unknown: np.ndarray
    raw: np.ndarray
    knn: np.ndarray
    knn_vote_frac: np.ndarray
    is_low_conf: np.ndarray
    used_knn: np.ndarray
    novelty: np.ndarray | None = None
    is_novel: np.ndarray | None = None
    neighbourhood_novelty: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.pred)
        if self.novelty is None:
            self.novelty = np.full(n, np.nan, dtype=np.float32)
        if self.is_novel is None:
            self.is_novel = np.zeros(n, dtype=bool)
        if self.neighbourhood_novelty is None:
            self.neighbourhood_novelty = np.full(n, np.nan, dtype=np.float32)

    def __getitem__(self, name: str) -> np.ndarray:
        """``calls["conf"]``; the older names ``code``, ``raw_code`` and ``knn_code`` are accepted too."""
        name = _ALIASES.get(name, name)
        if name not in COLUMNS:
            raise KeyError(name)
        return getattr(self, name)

    @classmethod
    def coerce(cls, calls: "LevelCalls | Mapping[str, np.ndarray]") -> "LevelCalls":
        """A :class:`LevelCalls` from itself or from a mapping of field names (older names accepted).

        Parameters
        ----------
        calls
            A :class:`LevelCalls` (returned as is) or a mapping field name → array per cell; the
            older names ``code``, ``raw_code`` and ``knn_code`` are read as ``pred``, ``raw`` and ``knn``.

        Returns
        -------
        LevelCalls
            The calls; fields the mapping lacks among ``novelty``, ``is_novel`` and
            ``neighbourhood_novelty`` are filled (NaN, False, NaN).

        Raises
        ------
        TypeError
            The mapping lacks a required field or names an unknown one.
        """
        if isinstance(calls, LevelCalls):
            return calls
        return cls(**{_ALIASES.get(k, k): v for k, v in calls.items()})

    def column(self, name: str, classes: list[str]) -> Any:
        """The written values of one field: labels for label fields, the array otherwise.

        Parameters
        ----------
        name
            A field name (a key of :data:`COLUMNS`, e.g. ``"pred"`` or ``"conf"``).
        classes
            The level's class names, which the codes of label fields index.

        Returns
        -------
        pandas.Categorical or numpy.ndarray
            For ``pred``, ``raw`` and ``knn``: the class names, code -1 as ``Unknown``
            (:func:`decode_labels`); for the other fields, the field's array itself.
        """
        values = getattr(self, name)
        return decode_labels(values, classes) if COLUMNS[name].kind == "label" else values

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, level: str, classes: list[str], where: str) -> "LevelCalls":
        """Read one level's calls back from columns written with ``mode="full"``.

        Parameters
        ----------
        frame
            The prediction table, one row per cell.
        level
            The level to read (its columns are :func:`column_names`).
        classes
            The level's class names: label columns must hold these, ``Unknown`` or nothing (both read as -1).
        where
            The table's name in error messages (e.g. its file name).

        Returns
        -------
        LevelCalls
            The level's calls; the columns added after the first release (``novelty_``, ``is_novel_``,
            ``neighbourhood_novelty_``) read as NaN / False / NaN when the table lacks them.

        Raises
        ------
        InputError
            A column ``mode="full"`` writes is missing, a label column holds a name not in ``classes``,
            a number column holds text (or a confidence or share outside [0, 1]), or a flag column
            holds something other than true / false.
        """
        names = column_names(level)
        missing = [names[f] for f in COLUMNS if names[f] not in frame.columns and f not in _OPTIONAL]
        if missing:
            raise InputError(
                f"{where} lacks column(s) {missing}; write the predictions with mode='full' "
                "(atlasmtl predict --mode full) to build a report from them."
            )
        values: dict[str, np.ndarray] = {}
        for name, col in COLUMNS.items():
            if names[name] not in frame.columns:
                continue  # an optional field of an older table: its default
            series = frame[names[name]]
            what = f"{where}: column {names[name]!r}"
            if col.kind == "label":
                values[name] = encode_labels(series, classes, what)
            elif col.kind == "float":
                values[name] = numeric_column(series, what, name in _UNIT_INTERVAL)
            else:
                values[name] = _flags(series, what)
        return cls(**values)


class CallTable:
    """Every level's calls for the query cells, with coordinates and metadata.

    Attributes
    ----------
    obs_names
        Query cell names, in order.
    classes
        Class names per level.
    levels
        Per level: its :class:`LevelCalls`.
    coords
        Predicted coordinates per coordinate target (cells × dims).
    metadata
        Settings, gene overlap, input checks, versions and ``prediction_runtime``.
    hierarchy
        For each level that nests in the previous one: child label → parent label.
    """

    def __init__(
        self,
        obs_names: np.ndarray,
        classes: dict[str, list[str]],
        levels: Mapping[str, LevelCalls],
        coords: dict[str, np.ndarray],
        metadata: dict[str, Any],
        hierarchy: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.obs_names = pd.Index(obs_names).astype(str)  # as AnnData and every table written store them
        self.classes = classes
        self.levels = {lv: LevelCalls.coerce(c) for lv, c in levels.items()}
        self.coords = coords
        self.metadata = metadata
        self.hierarchy = hierarchy or {}

    @property
    def label_columns(self) -> list[str]:
        """The levels, coarse to fine (a new list each time)."""
        return list(self.levels)

    @property
    def n_obs(self) -> int:
        """Number of query cells."""
        return len(self.obs_names)

    def has_cells(self, obs_names: Any) -> bool:
        """Whether ``obs_names`` are this result's cells, in order (compared as text, as AnnData stores them).

        Parameters
        ----------
        obs_names
            Cell names: an ``obs_names`` Index, a list or an array.

        Returns
        -------
        bool
            True when they are as many as the result's cells and equal them one by one, as text.
        """
        return len(obs_names) == self.n_obs and pd.Index(obs_names).astype(str).equals(self.obs_names)

    def labels(self, level: str) -> pd.Categorical:
        """Final labels of one level (``Unknown`` where abstained).

        Parameters
        ----------
        level
            One of :attr:`label_columns`.

        Returns
        -------
        pandas.Categorical
            One label per cell, in cell order; its categories are the level's classes plus ``Unknown``.

        Raises
        ------
        ParameterError
            ``level`` is not a level of these predictions.
        """
        if not isinstance(level, str) or level not in self.levels:
            raise ParameterError(f"level={level!r} is not a level of these predictions; they have {self.label_columns}.")
        return decode_labels(self.levels[level].pred, self.classes[level])

    def to_dataframe(self, mode: str = "minimal") -> pd.DataFrame:
        """The prediction table, one row per query cell.

        Parameters
        ----------
        mode
            ``"minimal"`` (``pred_<level>``), ``"standard"`` (also ``conf_``,
            ``margin_``, ``is_unknown_``) or ``"full"`` (also the network's raw
            label, the KNN label and vote fraction, the low-confidence / KNN-used flags, the novelty
            z-score, the novel flag and the neighbourhood novelty).

        Returns
        -------
        pandas.DataFrame
            Indexed by cell name; per level, in level order, the mode's columns
            (:func:`column_names`), labels as categoricals (``Unknown`` a category).

        Raises
        ------
        ParameterError
            ``mode`` is not ``"minimal"``, ``"standard"`` or ``"full"``.
        """
        fields = mode_fields(mode)
        columns: dict[str, Any] = {}
        for level, calls in self.levels.items():
            names = column_names(level)
            for name in fields:
                columns[names[name]] = calls.column(name, self.classes[level])
        return pd.DataFrame(columns, index=self.obs_names.copy())

    def own_columns(self) -> set[str]:
        """Every column atlasmtl writes for these levels (replaced on writeback).

        Returns
        -------
        set of str
            The columns of every mode for every level (:func:`column_names`).
        """
        return {c for level in self.levels for c in column_names(level).values()}

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        classes: dict[str, list[str]],
        *,
        coords: dict[str, np.ndarray] | None = None,
        metadata: dict[str, Any] | None = None,
        hierarchy: dict[str, dict[str, str]] | None = None,
        where: str = "the predictions",
    ) -> Self:
        """Rebuild the calls from a table written with ``mode="full"`` (index = cell names).

        Parameters
        ----------
        frame
            The prediction table, indexed by cell name, with every level's ``mode="full"`` columns.
        classes
            Class names per level; its keys are the levels read, coarse to fine.
        coords
            Predicted coordinates per coordinate target (cells × dims), in the table's cell order.
        metadata
            The prediction's metadata (settings, genes, ...), when known.
        hierarchy
            For each level that nests in the previous one: child label → parent label.
        where
            The table's name in error messages (e.g. its file name).

        Returns
        -------
        CallTable
            An instance of the class it is called on (a :class:`~atlasmtl.result.PredictionResult` from it).

        Raises
        ------
        InputError
            The table holds no cells, names a cell twice, or a level's columns are missing or
            unreadable (see :meth:`LevelCalls.from_frame`).
        """
        if len(frame) == 0:
            raise InputError(f"{where} holds no cells.")
        cells = pd.Index(frame.index.astype(str))
        if not cells.is_unique:
            raise InputError(f"{where} names some cells twice (e.g. {cells[cells.duplicated()][0]!r}); "
                             "each cell has one row in a prediction table.")
        levels = {lv: LevelCalls.from_frame(frame, lv, list(names), where) for lv, names in classes.items()}
        return cls(
            obs_names=cells,
            classes={lv: list(names) for lv, names in classes.items()},
            levels=levels,
            coords=coords or {},
            metadata=metadata or {},
            hierarchy=hierarchy,
        )

    def placement(self) -> str | None:
        """Where the query cells' coordinates came from, in words (``predict(coordinates=)``).

        Returns
        -------
        str or None
            ``"the mean of each cell's k nearest reference cells"`` or ``"the coordinate heads"``;
            ``None`` when the settings do not say (no coordinate heads, or a result read back
            from a table).
        """
        settings = self.metadata.get("settings") or {}
        return {"neighbours": f"the mean of each cell's {settings.get('knn_k')} nearest reference cells",
                "heads": "the coordinate heads"}.get(settings.get("coordinates"))

    def summary(self) -> dict[str, dict[str, Any]]:
        """Sections of the compact prediction summary (see ``show_resource_usage``).

        Returns
        -------
        dict
            Section → ``{line name: value}``, in print order: ``query`` (cells, input semantics,
            coordinates, ``batches`` with ``batch_key`` (the batches with the most finest-level Unknown), and
            ``mostly one call`` where :func:`dominant_calls` finds one), ``genes``
            (matched, mapped by), ``levels`` (per level its low-confidence,
            KNN-confirmed, Unknown and novel rates) and ``runtime``.
        """
        rt = self.metadata.get("prediction_runtime", {})
        genes = self.metadata.get("genes", {})
        per_level = {}
        for level, c in self.levels.items():
            per_level[level] = (
                f"low-confidence {c.is_low_conf.mean():.1%}, KNN-confirmed {c.used_knn.mean():.1%}, "
                f"Unknown {c.is_unknown.mean():.1%} (novel {c.is_novel.mean():.1%})"
            )
        from .runtime import runtime_section  # imports torch: reading and scoring calls need it not

        unrecorded = "not recorded (predictions read back from a table)"
        query = {"cells": self.n_obs, "input": (self.metadata.get("input") or {}).get("semantics", unrecorded)}
        if self.coords:
            query["coordinates"] = f"{', '.join(self.coords)} from {self.placement() or 'a source not recorded'}"
        batches = self.metadata.get("batches") or {}
        if batches:
            finest = self.label_columns[-1]
            shares = {name: (rec.get("unknown") or {}).get(finest) for name, rec in batches.items()}
            shown = sorted(shares.items(), key=lambda kv: -1.0 if kv[1] is None else -kv[1])[:BATCHES_SHOWN]
            query["batches"] = (f"{len(batches)} (batch_key); Unknown at {finest}: "
                                + ", ".join(f"{name} {'?' if v is None else format(v, '.1%')}" for name, v in shown)
                                + (", ..." if len(batches) > BATCHES_SHOWN else ""))
        for batch, dominant in dominant_calls(self):
            level, label, share, of_reference = dominant
            query["mostly one call" + ("" if batch is None else f" (batch {batch})")] = (
                f"{share:.0%} called {label!r} at {level}"
                + ("" if of_reference is None else f" ({of_reference:.0%} of the reference)")
                + ": a type the reference lacks is seldom Unknown in such a query (the report's findings)")
        return {
            "query": query,
            "genes": {
                "matched": f"{genes.get('n_matched')} / {genes.get('n_model_genes')} ({genes.get('overlap_fraction', 0):.1%})",
                "mapped by": genes.get("mapped_by"),
            } if genes else {"matched": unrecorded},
            "levels": per_level,
            "runtime": runtime_section(rt, unit="cells"),
        }


#: The prediction summary lists the batches (``predict(..., batch_key=...)``) with the most finest-level Unknown,
#: at most this many.
BATCHES_SHOWN = 5

#: A query whose largest network call at a level takes this share of its called cells or more is read as one
#: population (sorted cells, a sample made of one type), where the novelty scores, located at the query, cannot
#: tell a type the reference lacks (:func:`dominant_call`). The 28 benchmark queries reach 0.66 at most (seeds
#: 0-2); their true types mapped one at a time 0.54-1.00, 357 of 360 at 0.7 or more (API contract, "Measured
#: 2026-12-07, fifty-third session").
DOMINANT_CALL_SHARE = 0.7
#: ... in a query of at least this many called cells.
DOMINANT_CALL_MIN_CELLS = 20


def dominant_call(result: CallTable) -> tuple[str, str, float, float | None] | None:
    """The coarsest level whose largest network call (before any Unknown) takes at least
    :data:`DOMINANT_CALL_SHARE` of the called cells, as ``(level, label, share, share of the reference's cells)``
    (the last ``None`` where the result does not record the reference's classes); ``None`` when no level does
    or fewer than :data:`DOMINANT_CALL_MIN_CELLS` cells are called. With ``predict(..., batch_key=...)`` each
    batch's own is in ``result.metadata["batches"][batch]["mostly_one_call"]`` (:func:`dominant_of`)."""
    return dominant_of({lv: c.raw for lv, c in result.levels.items()}, result.classes,
                       result.metadata.get("reference_classes"))


def dominant_of(raw: Mapping[str, np.ndarray], classes: Mapping[str, Sequence[str]],
                reference_classes: Mapping[str, Any] | None) -> tuple[str, str, float, float | None] | None:
    """:func:`dominant_call` of the network calls ``raw`` (level → class code per cell, -1: none), the classes'
    names and the result's ``metadata["reference_classes"]`` (or ``None``)."""
    for level, codes in raw.items():
        codes = np.asarray(codes)
        codes = codes[codes >= 0]
        if len(codes) < DOMINANT_CALL_MIN_CELLS:
            continue
        counts = np.bincount(codes, minlength=len(classes[level]))
        top = int(np.argmax(counts))
        share = float(counts[top] / len(codes))
        if share >= DOMINANT_CALL_SHARE:
            known = (reference_classes or {}).get(level)
            reference = None if known is None else np.asarray(known["cells"], dtype=np.float64)
            reference_share = (None if reference is None or reference.sum() <= 0
                               else float(reference[top] / reference.sum()))
            return level, str(classes[level][top]), share, reference_share
    return None


def dominant_calls(result: CallTable) -> list[tuple[str | None, tuple[str, str, float, float | None]]]:
    """``[(None, dominant_call(result))]`` where the whole query is called mostly as one class, else each batch's
    ``(batch, its dominant call)`` recorded by ``predict(..., batch_key=...)``; empty when there is none."""
    whole = dominant_call(result)
    if whole is not None:
        return [(None, whole)]
    found = []
    for batch, record in (result.metadata.get("batches") or {}).items():
        one = record.get("mostly_one_call")
        if one:
            found.append((str(batch), (str(one["level"]), str(one["label"]), float(one["share"]),
                                       None if one.get("reference_share") is None else float(one["reference_share"]))))
    return found


def field_names() -> list[str]:
    """The :class:`LevelCalls` fields, in column order."""
    return [f.name for f in dataclasses.fields(LevelCalls)]


def whole_number_text(values: np.ndarray) -> np.ndarray | None:
    """Float labels that are all whole numbers as integer text (``1.0`` → ``"1"``: integer codes read back as
    floats because the column also holds NaN), else ``None``. ``values`` holds no missing value."""
    values = np.asarray(values)
    if values.dtype.kind != "f" or not values.size or not np.all(np.isfinite(values)) \
            or not np.all(values == np.round(values)) or np.abs(values).max() >= 2**53:
        return None
    return values.astype(np.int64).astype(str).astype(object)


def check_same_model(metadata: Mapping[str, Any], model: Any, where: str, error: type[Exception] = InputError) -> None:
    """Raise ``error`` when predictions' ``metadata`` records the ``model_id`` of another model than ``model``.

    Predictions made since 2026-12-07 record it (``result.metadata["model_id"]``, kept in ``uns["atlasmtl"]`` by a
    writeback); a CSV/TSV table keeps no metadata, so it cannot be checked.
    """
    made_by = metadata.get("model_id")
    given = ((getattr(model, "metadata", None) or {}).get("model_id"))
    if made_by and given and str(made_by) != str(given):
        what = where if where.startswith(("the ", "these ")) else f"the predictions in {where!r}"
        raise error(f"{what[0].upper()}{what[1:]} were made by the model {made_by}, not by this one ({given}: "
                    "another training run, even on the same reference and labels). Pass the model that made them.")
