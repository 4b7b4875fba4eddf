"""Plots of a reference mapping, scanpy style: ``atlasmtl.pl.<plot>(result, ...)``.

Every function takes a :class:`~atlasmtl.result.PredictionResult` (and, where
needed, the reference AnnData or the query's true labels) and returns a
:class:`matplotlib.figure.Figure`. Figures are created without pyplot, so
nothing is shown or kept open unless ``show=True``; in a notebook the returned
figure is displayed once as the cell's output. ``save="file.png"`` also
writes it to a file.

What each plot shows:

- :func:`composition`: predicted label fractions per level (Unknown in grey).
- :func:`confidence`: confidence and margin distributions per level, with the
  gate's thresholds (``confidence_high``, ``confidence_low``,
  ``margin_threshold``, taken from ``result.metadata["settings"]``) drawn.
- :func:`rates`: Unknown, low-confidence and KNN-confirmed rates per level.
- :func:`embedding` / :func:`umap`: query cells at their predicted
  coordinates drawn over the reference's coordinates (grey), coloured by
  predicted label, confidence or Unknown.
- :func:`training_history`: a model's training (and validation) loss per epoch.
- with true labels: :func:`confusion` (row-normalised), :func:`f1_scores`
  (per class) and :func:`reliability` (calibration of the network's
  confidence, with the expected calibration error).

True labels (``truth``) can be given as an AnnData (its ``obs``), a
DataFrame indexed by cell name, or a mapping ``level → array``;
``columns`` maps levels to column names when they differ
(``{"anno_lv2": "cell_type"}``) or lists one column per level in order.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._docs import fill_docs
from .exceptions import CoordinateError, LabelError, OutputError, ParameterError
from .calls import UNKNOWN, CallTable, decode_labels
from .calibration import calibration_bins, ece_if_calibrated
from .calibration import ece_of_bins as expected_calibration_error
from .truth import truth_by_level
from .validation import as_float, as_int

__all__ = [
    "composition",
    "confidence",
    "rates",
    "embedding",
    "umap",
    "training_history",
    "confusion",
    "f1_scores",
    "reliability",
    "truth_by_level",
    "calibration_bins",
    "expected_calibration_error",
    "label_colours",
]

#: Colour of reference cells drawn as background.
REFERENCE_GREY = "#d4d4d4"
#: Colour of Unknown (abstained) calls.
UNKNOWN_COLOUR = "#6e6e6e"
_EMBEDDING_COLOURS = ("label", "confidence", "margin", "unknown", "knn", "novelty", "neighbourhood_novelty")


# ---------------------------------------------------------------- shared parameter docs (as scanpy/plotting/_docs.py)
doc_result = """result
        The predictions: a :class:`~atlasmtl.result.PredictionResult` from :func:`atlasmtl.predict`."""
doc_reference = """reference
        The reference AnnData (its ``obsm`` entry for ``basis``: the key the model
        was trained on, else ``X_<basis>``) or a cells × 2 array; ``None`` draws the
        query alone."""
doc_truth = """truth, columns
        True labels: an AnnData (its ``obs``), a DataFrame indexed by cell name, or a
        mapping ``level → array`` in the result's cell order; ``columns`` names the
        column per level (see :func:`truth_by_level`)."""
doc_figure = """ax
        Draw into these matplotlib Axes instead of a new figure: one Axes per panel (a single
        Axes for one panel, a list or array for several), as with scanpy's ``ax=``.
    figsize
        Figure size in inches (default: scaled to the number of levels and classes); ignored with ``ax``.
    show
        Show the figure with pyplot (and return ``None``) instead of returning it.
    save
        Also write the figure to this file."""
_DOCS = {"doc_result": doc_result, "doc_reference": doc_reference, "doc_truth": doc_truth, "doc_figure": doc_figure}


def _shared_docs(func: Any) -> Any:
    """``func`` with the shared parameter descriptions (``{doc_result}``, ``{doc_reference}``, ``{doc_truth}``,
    ``{doc_figure}``) filled into its docstring."""
    return fill_docs(func, _DOCS)


def _public_plot(func: Any) -> Any:
    """A public plot: the shared parameter descriptions filled into its docstring (:func:`_shared_docs`), and
    its text drawn as written (class names such as ``"T$_{reg}$"`` or ``"cost $5"`` are names, not matplotlib
    math)."""
    import functools

    import matplotlib

    _shared_docs(func)

    @functools.wraps(func)
    def plot(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context({"text.parse_math": False}):
            return func(*args, **kwargs)

    return plot


# ---------------------------------------------------------------- helpers
def _check_result(result: Any) -> CallTable:
    if not isinstance(result, CallTable):
        raise ParameterError(
            f"Expected a PredictionResult (from atlasmtl.predict), got {type(result).__name__}."
        )
    return result


def _levels(result: CallTable, levels: str | Sequence[str] | None) -> list[str]:
    if levels is None:
        return result.label_columns
    levels = [levels] if isinstance(levels, str) else list(levels)
    unknown = [lv for lv in levels if lv not in result.levels]
    if unknown:
        raise ParameterError(f"Level(s) {unknown} are not in the result; its levels are {result.label_columns}.")
    if not levels:
        raise ParameterError(f"levels=[] names no level; give some of {result.label_columns}, or None for all.")
    return levels


def _levels_with_truth(result: CallTable, levels: str | Sequence[str] | None, truth: Mapping[str, Any]) -> list[str]:
    """The levels to draw that have true labels (:class:`~atlasmtl.exceptions.LabelError` when none has)."""
    chosen = _levels(result, levels)
    kept = [lv for lv in chosen if lv in truth]
    if not kept:
        raise LabelError(f"No true labels for level(s) {chosen}; the truth covers {list(truth)}: draw those, or pass "
                         "truth for these levels (columns=...).")
    return kept


def _new_figure(figsize: tuple[float, float], show: bool) -> Figure:
    try:
        width, height = (float(v) for v in figsize)
        valid = np.isfinite(width) and np.isfinite(height) and width > 0 and height > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ParameterError(f"figsize={figsize!r} must be (width, height) in inches, both positive, e.g. (6, 4).")
    if show:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=figsize, layout="constrained")
    return Figure(figsize=figsize, layout="constrained")


def _panels(ax: Any, n: int, figsize: tuple[float, float], show: bool, what: str, **grid: Any) -> tuple[Figure, np.ndarray]:
    """``n`` Axes to draw into: the user's (``ax=``) or a new figure's grid (``nrows``, ``ncols``, ...).

    A new grid larger than ``n`` has its extra Axes hidden.
    """
    if ax is None:
        fig = _new_figure(figsize, show)
        grid.setdefault("nrows", 1)
        grid.setdefault("ncols", n)
        axes = np.asarray(fig.subplots(squeeze=False, **grid), dtype=object).ravel()
        for extra in axes[n:]:
            extra.set_visible(False)
        return fig, axes[:n]
    axes = np.asarray(ax, dtype=object).ravel()
    if len(axes) != n or not all(isinstance(a, Axes) for a in axes):
        raise ParameterError(
            f"ax: this plot draws {n} panel(s) ({what}); pass {n} matplotlib Axes, got "
            f"{len(axes)} {'Axes' if all(isinstance(a, Axes) for a in axes) else 'object(s) that are not all Axes'}."
        )
    return axes[0].get_figure(), axes


def _finish(fig: Figure, show: bool, save: str | os.PathLike | None) -> Figure | None:
    if save is not None:
        save_figure(fig, save)
    if show:
        import matplotlib.pyplot as plt

        plt.show()
        return None
    return fig


#: Resolutions a figure may be drawn at (dots per inch): below 10 matplotlib's font renderer fails on the text.
DPI_RANGE = (10.0, 1200.0)


def check_dpi(dpi: Any) -> float:
    """``dpi`` as a float in :data:`DPI_RANGE` (:class:`~atlasmtl.exceptions.ParameterError` otherwise)."""
    return as_float("dpi", dpi, *DPI_RANGE)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: float = 150) -> None:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (``.png``, ``.pdf``, ``.svg`` ...);
    a name without a format matplotlib writes, or a path that cannot be written, is an
    :class:`~atlasmtl.exceptions.OutputError` (missing folders are created); ``dpi`` lies in :data:`DPI_RANGE`."""
    from .io import atomic_path

    dpi = check_dpi(dpi)
    if not isinstance(path, (str, os.PathLike)):
        raise ParameterError(f"save={path!r} must be a file name such as 'figure.png'.")
    formats = fig.canvas.get_supported_filetypes()
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if suffix not in formats:
        raise OutputError(f"save={os.fspath(path)!r}: name the file with a figure format's suffix, one of "
                             f"{', '.join('.' + f for f in sorted(formats))} (e.g. 'figure.png').")
    with atomic_path(path, "figure") as tmp:
        fig.savefig(tmp, dpi=dpi, format=suffix)


def _settings(result: CallTable) -> dict[str, Any]:
    import dataclasses

    from .gating import GatingConfig

    return {**dataclasses.asdict(GatingConfig()), **(result.metadata.get("settings", {}) or {})}


def _palette(n: int) -> list:
    from matplotlib import colormaps

    # the greys of tab10 / tab20 are left out: grey means Unknown and the reference
    if n <= 9:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(10) if i != 7][:n]
    if n <= 18:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(20) if i not in (14, 15)][:n]
    cmap = colormaps["turbo"]
    return [cmap(x) for x in np.linspace(0.05, 0.95, n)]


@_shared_docs
def label_colours(result: CallTable, level: str) -> dict[str, Any]:
    """A fixed colour per class of ``level`` (Unknown in grey), shared by all plots.

    The classes take the colours of ``tab10`` (up to 9 classes), ``tab20`` (up to 18) or
    evenly spaced ``turbo`` colours, in the order of ``result.classes[level]``, without
    the palettes' greys: grey means Unknown (:data:`UNKNOWN_COLOUR`) and reference cells.

    Parameters
    ----------
    {doc_result}
    level
        The level whose classes are coloured.

    Returns
    -------
    ``class name → matplotlib colour``: an RGBA tuple per class, and ``"Unknown"`` → :data:`UNKNOWN_COLOUR` (a hex string).

    Raises
    ------
    ParameterError
        ``result`` is not a result, or ``level`` not one of its levels.
    """
    result = _check_result(result)
    if not isinstance(level, str) or level not in result.levels:
        raise ParameterError(f"level={level!r} is not a level of the result; its levels are {result.label_columns}.")
    classes = [c for c in result.classes[level] if c != UNKNOWN]
    colours = dict(zip(classes, _palette(len(classes))))
    colours[UNKNOWN] = UNKNOWN_COLOUR
    return colours


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return int(np.ceil(n / cols)), cols


def _pred_strings(result: CallTable, level: str, raw: bool = False) -> np.ndarray:
    calls = result.levels[level]
    return np.asarray(decode_labels(calls.raw if raw else calls.pred, result.classes[level]), dtype=object)


# ---------------------------------------------------------------- plots without truth
@_public_plot
def composition(
    result: CallTable,
    levels: str | Sequence[str] | None = None,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Fraction of query cells given each label, one panel per level (Unknown in grey).

    Parameters
    ----------
    {doc_result}
    levels
        Levels to draw (default: all, coarse to fine).
    {doc_figure}

    Returns
    -------
    The figure (``None`` when ``show=True``).
    """
    result = _check_result(result)
    levels = _levels(result, levels)
    n_rows, n_cols = _grid(len(levels))
    height = max(2.5, 0.28 * max(len(result.classes[lv]) + 1 for lv in levels) + 1.0)
    fig, axes = _panels(ax, len(levels), figsize or (4.6 * n_cols, height * n_rows), show, "one per level",
                        nrows=n_rows, ncols=n_cols)
    for ax, level in zip(axes, levels):
        labels = pd.Series(_pred_strings(result, level))
        frac = labels.value_counts(normalize=True)
        names = [c for c in result.classes[level] if c != UNKNOWN] + [UNKNOWN]
        frac = frac.reindex(names, fill_value=0.0)
        colours = label_colours(result, level)
        y = np.arange(len(names))[::-1]
        ax.barh(y, frac.to_numpy(), color=[colours[n] for n in names])
        ax.set_yticks(y, names, fontsize=8)
        for yy, v in zip(y, frac.to_numpy()):
            ax.text(v, yy, f" {v:.1%}", va="center", fontsize=7)
        ax.set_xlim(0, min(1.0, frac.max() * 1.3 + 0.05))
        ax.set_xlabel("fraction of query cells")
        ax.set_title(f"{level}: predicted labels", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    return _finish(fig, show, save)


@_public_plot
def confidence(
    result: CallTable,
    levels: str | Sequence[str] | None = None,
    *,
    bins: int = 40,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Distributions of confidence (calibrated probability of the call) and margin per level.

    The margin is the call's probability minus the best other class's. Where levels are decoded jointly the
    call is the best reference path's class, not always the level's top class, so a margin can be negative;
    its axis then starts below 0.

    The gate's thresholds are drawn as vertical lines: ``confidence_high`` and
    ``margin_threshold`` (below either: low-confidence, sent to KNN) and
    ``confidence_low`` (below: Unknown unless the KNN vote rescues the cell).

    Parameters
    ----------
    {doc_result}
    levels
        Levels to draw (default: all); one row per level.
    bins
        Histogram bins over [0, 1] (the margin's from its lowest value when that is negative).
    {doc_figure}

    Returns
    -------
    The figure (``None`` when ``show=True``).
    """
    result = _check_result(result)
    levels = _levels(result, levels)
    bins = as_int("bins", bins, minimum=1)
    s = _settings(result)
    fig, axes = _panels(ax, 2 * len(levels), figsize or (9.0, 2.4 * len(levels) + 0.4), show,
                        "confidence and margin per level", nrows=len(levels), ncols=2)
    axes = axes.reshape(len(levels), 2)
    for row, level in zip(axes, levels):
        r = result.levels[level]
        for ax, field, colour in ((row[0], "conf", "#3b75af"), (row[1], "margin", "#519e3e")):
            values = np.asarray(r[field], dtype=float)
            finite = values[np.isfinite(values)]
            low = min(0.0, float(finite.min())) if field == "margin" and finite.size else 0.0
            ax.hist(values, bins=np.linspace(low, 1, bins + 1), color=colour, alpha=0.85)
            ax.set_xlim(low, 1)
            ax.set_title(f"{level}: {'confidence' if field == 'conf' else 'margin'} (median {np.median(values):.2f})",
                         fontsize=10)
            ax.spines[["top", "right"]].set_visible(False)
            if field == "conf":
                ax.axvline(s["confidence_high"], color="#e08a00", ls="--", lw=1.5,
                           label=f"confidence_high {s['confidence_high']:g} (low-confidence below)")
                ax.axvline(s["confidence_low"], color="#c0282d", ls="-", lw=1.5,
                           label=f"confidence_low {s['confidence_low']:g} (Unknown below)")
            else:
                ax.axvline(s["margin_threshold"], color="#e08a00", ls="--", lw=1.5,
                           label=f"margin_threshold {s['margin_threshold']:g} (low-confidence below)")
            ax.legend(fontsize=7, loc="upper left", frameon=False)
            ax.set_ylabel("cells")
    axes[-1][0].set_xlabel("confidence (probability of the call)")
    axes[-1][1].set_xlabel("margin (call − best other class)")
    return _finish(fig, show, save)


@_public_plot
def rates(
    result: CallTable,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Per level: the share of cells that are Unknown, low-confidence, and KNN-confirmed (the vote kept the call).

    Parameters
    ----------
    {doc_result}
    {doc_figure}

    Returns
    -------
    The figure (``None`` when ``show=True``).
    """
    result = _check_result(result)
    levels = result.label_columns
    fields = (("is_low_conf", "low-confidence", "#e08a00"), ("used_knn", "KNN-confirmed", "#3b75af"),
              ("is_unknown", "Unknown", UNKNOWN_COLOUR))
    fig, (ax,) = _panels(ax, 1, figsize or (max(4.0, 1.4 * len(levels) + 2.2), 3.2), show, "one chart")
    x = np.arange(len(levels))
    width = 0.26
    top = 0.0
    for i, (field, name, colour) in enumerate(fields):
        values = np.array([np.mean(result.levels[lv][field]) for lv in levels])
        top = max(top, values.max())
        bars = ax.bar(x + (i - 1) * width, values, width, label=name, color=colour)
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1%}", ha="center", va="bottom", fontsize=7,
                    clip_on=False)
    ax.set_xticks(x, levels)
    ax.set_ylim(0, min(1.0, max(0.05, top * 1.2)))  # a fraction: the axis never runs past 100%
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_ylabel("fraction of query cells")
    ax.set_title("Gate outcome per level", fontsize=10, pad=10)
    ax.legend(fontsize=8, frameon=False, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below the bars
    ax.spines[["top", "right"]].set_visible(False)
    return _finish(fig, show, save)


def _reference_coords(reference: Any, result: CallTable, basis: str) -> np.ndarray | None:
    if reference is None:
        return None
    if isinstance(reference, ad.AnnData):
        keys = []
        target = (result.metadata.get("coord_targets") or {}).get(basis)
        if isinstance(target, str):
            keys.append(target)
        keys += [f"X_{basis}", basis]
        for key in keys:
            if key in reference.obsm:
                values = np.asarray(reference.obsm[key], dtype=float)
                break
        else:
            raise CoordinateError(
                f"The reference has none of the obsm keys {keys} for basis {basis!r}; "
                f"available: {list(reference.obsm.keys())}."
            )
    else:
        values = np.asarray(reference, dtype=float)
    if values.ndim != 2 or values.shape[1] < 2:
        raise CoordinateError(f"Reference coordinates must be cells × ≥2 dims, got shape {values.shape}.")
    return values[:, :2]


@_public_plot
def embedding(
    result: CallTable,
    reference: ad.AnnData | np.ndarray | None = None,
    *,
    basis: str = "umap",
    color: str | Sequence[str] = ("label", "confidence", "unknown"),
    level: str | None = None,
    point_size: float | None = None,
    max_points: int = 200_000,
    random_state: int = 0,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Query cells at their predicted coordinates, over the reference drawn in grey.

    Cells ``predict`` left unplaced (coordinates NaN: no signal) are not drawn.

    Parameters
    ----------
    result
        The predictions; ``result.coords[basis]`` must exist (train with
        ``coord_targets={basis: ...}``).
    {doc_reference}
    basis
        Coordinate head to draw (first two dimensions).
    color
        One panel per entry: ``"label"`` (predicted label), ``"confidence"``,
        ``"margin"``, ``"unknown"`` (abstained cells highlighted), ``"knn"``
        (cells whose call a KNN vote confirmed, ``used_knn``: the vote never replaces a call), ``"novelty"`` or
        ``"neighbourhood_novelty"`` (the z-scores, from 0 to the result's
        novelty threshold, highest drawn on top; cells without a score in grey).
    level
        Level whose labels/scores colour the cells (default: the finest).
    point_size
        Marker size (default: scaled to the number of cells).
    max_points
        Draw at most this many query and reference cells (a random subset above it).
    random_state
        Seed of that subset.
    {doc_figure}

    Returns
    -------
    The figure (``None`` when ``show=True``).
    """
    result = _check_result(result)
    if basis not in result.coords:
        raise CoordinateError(
            f"The result has no {basis!r} coordinates (it has {list(result.coords) or 'none'}); "
            f"train with coord_targets={{{basis!r}: 'X_{basis}'}}."
        )
    colors = [color] if isinstance(color, str) else list(color)
    bad = [c for c in colors if c not in _EMBEDDING_COLOURS]
    if bad or not colors:
        raise ParameterError(f"color={bad or colors!r}: use any of {_EMBEDDING_COLOURS}.")
    level = level or result.label_columns[-1]
    _levels(result, level)
    max_points = as_int("max_points", max_points, minimum=1)
    point_size = None if point_size is None else as_float("point_size", point_size, 0.0, low_open=True)
    query = np.asarray(result.coords[basis], dtype=float)[:, :2]
    ref = _reference_coords(reference, result, basis)
    rng = np.random.default_rng(random_state)
    placed = np.flatnonzero(np.isfinite(query).all(axis=1))  # predict leaves cells without signal unplaced (NaN)
    q_idx = placed if len(placed) <= max_points else np.sort(rng.choice(placed, max_points, replace=False))
    if ref is not None and len(ref) > max_points:
        ref = ref[np.sort(rng.choice(len(ref), max_points, replace=False))]
    size = point_size or float(np.clip(12000 / max(len(q_idx), 1), 0.5, 18))
    fig, axes = _panels(ax, len(colors), figsize or (4.9 * len(colors) + (1.6 if "label" in colors else 0), 4.4),
                        show, "one per color")
    r = result.levels[level]
    labels = _pred_strings(result, level)
    xy = query[q_idx]
    for ax, what in zip(axes, colors):
        if ref is not None:
            ax.scatter(ref[:, 0], ref[:, 1], s=size, c=REFERENCE_GREY, lw=0, rasterized=True, label="reference")
        order = q_idx
        if what == "label":
            colours = label_colours(result, level)
            for name in [c for c in result.classes[level] if c != UNKNOWN] + [UNKNOWN]:
                sel = labels[order] == name
                if sel.any():
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=colours[name], lw=0, rasterized=True,
                               label=f"{name} ({int(sel.sum())})")
            ax.legend(fontsize=7, markerscale=max(1.0, 16 / size) ** 0.5, frameon=False,
                      loc="center left", bbox_to_anchor=(1.0, 0.5))
            title = f"{level}: predicted label"
        elif what in ("confidence", "margin"):
            values = r["conf" if what == "confidence" else "margin"][order]
            sort = np.argsort(-values)  # least confident drawn last, on top
            sc = ax.scatter(xy[sort, 0], xy[sort, 1], s=size, c=values[sort], cmap="viridis", vmin=0, vmax=1,
                            lw=0, rasterized=True)
            fig.colorbar(sc, ax=ax, shrink=0.75, label=what)
            title = f"{level}: {what}"
        elif what in ("novelty", "neighbourhood_novelty"):
            values = np.asarray(r[what], dtype=float)[order]
            scored = np.isfinite(values)
            top = _settings(result).get("novelty_threshold") or (float(np.max(values[scored])) if scored.any() else 1.0)
            ax.scatter(xy[~scored, 0], xy[~scored, 1], s=size, c="#bdbdbd", lw=0, rasterized=True)
            sort = np.flatnonzero(scored)[np.argsort(values[scored])]  # the most novel drawn last, on top
            sc = ax.scatter(xy[sort, 0], xy[sort, 1], s=size, c=values[sort], cmap="magma_r", vmin=0, vmax=top,
                            lw=0, rasterized=True)
            fig.colorbar(sc, ax=ax, shrink=0.75, label=f"{what.replace('_', ' ')} (z)")
            title = f"{level}: {what.replace('_', ' ')}"
        else:
            flag = r["is_unknown" if what == "unknown" else "used_knn"][order].astype(bool)
            name = "Unknown" if what == "unknown" else "KNN-confirmed"
            colour = "#c0282d" if what == "unknown" else "#3b75af"
            ax.scatter(xy[~flag, 0], xy[~flag, 1], s=size, c="#9ab8d6", lw=0, rasterized=True,
                       label=f"labelled ({int((~flag).sum())})" if what == "unknown" else f"other ({int((~flag).sum())})")
            ax.scatter(xy[flag, 0], xy[flag, 1], s=size * 1.6, c=colour, lw=0, rasterized=True,
                       label=f"{name} ({int(flag.sum())})")
            ax.legend(fontsize=7, frameon=False, loc="best", markerscale=max(1.0, 16 / size) ** 0.5)
            title = f"{level}: {name} ({flag.mean():.1%})"
        ax.set_title(title + ("" if ref is not None else " (no reference given)"), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{basis} 1")
        ax.set_ylabel(f"{basis} 2")
        ax.set_aspect("equal", adjustable="datalim")
    return _finish(fig, show, save)


@_shared_docs
def umap(result: CallTable, reference: ad.AnnData | np.ndarray | None = None, **kwargs: Any) -> Figure | None:
    """:func:`embedding` with ``basis="umap"``: query cells on the reference UMAP.

    Parameters
    ----------
    result
        The predictions; ``result.coords["umap"]`` must exist (train with
        ``coord_targets={"umap": "X_umap"}``).
    {doc_reference}
    **kwargs
        :func:`embedding`'s other keyword arguments (``color``, ``level``, ``point_size``,
        ``max_points``, ``random_state``, ``ax``, ``figsize``, ``show``, ``save``); not ``basis``.

    Returns
    -------
    The figure (``None`` when ``show=True``).

    Raises
    ------
    ParameterError
        ``basis`` is given (call :func:`embedding` for another basis), or an option :func:`embedding` refuses.
    CoordinateError
        The result has no ``"umap"`` coordinates, or ``reference`` has none for it.
    """
    if "basis" in kwargs:
        raise ParameterError("pl.umap draws basis='umap'; for another basis call pl.embedding(result, basis=...).")
    return embedding(result, reference, basis="umap", **kwargs)


@_public_plot
def training_history(
    model: Any,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Training loss (and validation loss, when a validation split was held out) per epoch.

    Parameters
    ----------
    model
        A :class:`~atlasmtl.model.TrainedModel`.
    {doc_figure}

    Returns
    -------
    The figure (``None`` when ``show=True``).
    """
    from .model import TrainedModel

    if not isinstance(model, TrainedModel):
        raise ParameterError(f"Expected a TrainedModel, got {type(model).__name__}.")
    history = pd.DataFrame(model.train_config.get("history") or [])
    if history.empty:
        raise ParameterError("This model has no training history to plot.")
    fig, (ax,) = _panels(ax, 1, figsize or (5.0, 3.2), show, "one chart")
    ax.plot(history["epoch"], history["train_loss"], marker="o", ms=3, label="training loss")
    if "val_loss" in history:
        ax.plot(history["epoch"], history["val_loss"], marker="o", ms=3, label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (sum over heads)")
    ax.set_title(f"Training: {len(history)} epochs, {model.train_config.get('train_seconds', float('nan')):.1f} s",
                 fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _finish(fig, show, save)


# ---------------------------------------------------------------- plots with truth
@_public_plot
def confusion(
    result: CallTable,
    truth: ad.AnnData | pd.DataFrame | Mapping[str, Any],
    levels: str | Sequence[str] | None = None,
    *,
    columns: Mapping[str, str] | Sequence[str] | None = None,
    annotate: bool | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Row-normalised confusion matrix (true label × predicted label, Unknown included), one per level.

    Each row sums to 1: the fraction of cells of that true type given each label.

    Parameters
    ----------
    {doc_result}
    {doc_truth}
    levels
        Levels to draw (default: every level with truth).
    annotate
        Write the fractions into the cells (default: when there are at most 20 classes).
    {doc_figure}

    Returns
    -------
    The figure (``None`` when ``show=True``).
    """
    from .metrics import accuracy

    result = _check_result(result)
    t = truth_by_level(result, truth, columns)
    levels = _levels_with_truth(result, levels, t)
    sizes = [len(result.classes[lv]) + 1 for lv in levels]
    fig, axes = _panels(ax, len(levels), figsize or (sum(max(4.0, 0.42 * s + 2.4) for s in sizes),
                                                     max(3.8, 0.42 * max(sizes) + 2.2)), show, "one per level",
                        width_ratios=[max(4.0, 0.42 * s + 2.4) for s in sizes])
    for ax, level in zip(axes, levels):
        y_true, has = t[level], np.array([v is not None for v in t[level]])
        y_pred = _pred_strings(result, level)[has]
        y_true = y_true[has].astype(str)
        cols = [c for c in result.classes[level] if c != UNKNOWN] + [UNKNOWN]
        rows = [c for c in cols if c in set(y_true)] + sorted(set(y_true) - set(cols))
        table = pd.crosstab(pd.Categorical(y_true, categories=rows), pd.Categorical(y_pred, categories=cols),
                            dropna=False)
        counts = table.to_numpy(dtype=float)
        norm = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(np.arange(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(np.arange(len(rows)), [f"{r} ({int(n)})" for r, n in zip(rows, counts.sum(axis=1))], fontsize=7)
        if annotate if annotate is not None else max(len(rows), len(cols)) <= 20:
            for i in range(len(rows)):
                for j in range(len(cols)):
                    if counts[i, j]:
                        ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if norm[i, j] > 0.6 else "black")
        acc = accuracy(y_true, y_pred) if len(y_true) else float("nan")  # Unknown is a miss, as in evaluate
        ax.set_title(f"{level}: accuracy {acc:.1%} ({len(y_true)} cells)", fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true (cells)")
    fig.colorbar(im, ax=list(axes), shrink=0.7, label="fraction of the true type")
    return _finish(fig, show, save)


@_public_plot
def f1_scores(
    result: CallTable,
    truth: ad.AnnData | pd.DataFrame | Mapping[str, Any],
    levels: str | Sequence[str] | None = None,
    *,
    columns: Mapping[str, str] | Sequence[str] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Per-class F1 of the final labels, one panel per level (macro-F1 in the title).

    Unknown counts as a wrong call (it lowers recall); true types the model
    does not know are included (their F1 is 0 unless nothing else is called that).

    Parameters
    ----------
    {doc_result}
    {doc_truth}
    levels
        Levels to draw (default: every level with truth).
    {doc_figure}

    Returns
    -------
    The figure (``None`` when ``show=True``).
    """
    from .metrics import class_f1

    result = _check_result(result)
    t = truth_by_level(result, truth, columns)
    levels = _levels_with_truth(result, levels, t)
    n_rows, n_cols = _grid(len(levels))
    height = max(2.5, 0.28 * max(len(result.classes[lv]) for lv in levels) + 1.2)
    fig, axes = _panels(ax, len(levels), figsize or (4.6 * n_cols, height * n_rows), show, "one per level",
                        nrows=n_rows, ncols=n_cols)
    for ax, level in zip(axes, levels):
        has = np.array([v is not None for v in t[level]])
        y_true = t[level][has].astype(str)
        y_pred = _pred_strings(result, level)[has].astype(str)
        names = [c for c in result.classes[level] if c in set(y_true)] + sorted(set(y_true) - set(result.classes[level]))
        scores = class_f1(y_true, y_pred, names)
        support = pd.Series(y_true).value_counts().reindex(names).to_numpy()
        colours = label_colours(result, level)
        y = np.arange(len(names))[::-1]
        ax.barh(y, scores, color=[colours.get(n, "#999999") for n in names])
        ax.set_yticks(y, [f"{n} ({s})" for n, s in zip(names, support)], fontsize=8)
        for yy, v in zip(y, scores):
            ax.text(v, yy, f" {v:.2f}", va="center", fontsize=7, clip_on=False)
        ax.set_xlim(0, 1)  # F1 is at most 1; the value labels may run past the axis
        ax.set_xlabel("F1")
        ax.set_title(f"{level}: macro-F1 {np.mean(scores):.3f}", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    return _finish(fig, show, save)


@_public_plot
def reliability(
    result: CallTable,
    truth: ad.AnnData | pd.DataFrame | Mapping[str, Any],
    levels: str | Sequence[str] | None = None,
    *,
    columns: Mapping[str, str] | Sequence[str] | None = None,
    n_bins: int = 15,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Reliability diagram: accuracy of the network's call against its confidence, per level.

    Uses the network's own (pre-gate, pre-KNN) label and confidence. A
    calibrated model lies on the diagonal; the title gives the expected
    calibration error (ECE) over ``n_bins`` equal-width bins and, after it, the ECE a
    perfectly calibrated confidence would show on the same cells on average
    (:func:`atlasmtl.metrics.ece_if_calibrated`); marker areas and the bars at the bottom
    show how many cells fall in each bin (bins of a few cells are noisy).

    Parameters
    ----------
    {doc_result}
    {doc_truth}
    levels
        Levels to draw (default: every level with truth).
    n_bins
        Equal-width confidence bins over [0, 1] (15, as in :func:`atlasmtl.evaluate`).
    {doc_figure}

    Returns
    -------
    The figure (``None`` when ``show=True``).
    """
    result = _check_result(result)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 2:
        raise ParameterError(f"n_bins={n_bins!r} must be an integer ≥ 2.")
    t = truth_by_level(result, truth, columns)
    levels = _levels_with_truth(result, levels, t)
    own_figure = ax is None
    fig, axes = _panels(ax, len(levels), figsize or (3.6 * len(levels) + 0.4, 4.2), show, "one per level",
                        sharey=True)
    for ax, level in zip(axes, levels):
        has = np.array([v is not None for v in t[level]])
        correct = _pred_strings(result, level, raw=True)[has] == t[level][has]
        table = calibration_bins(result.levels[level].conf[has], correct, n_bins)
        ece = expected_calibration_error(table)
        ok = table["cells"] > 0
        ax.plot([0, 1], [0, 1], color="#999999", ls="--", lw=1, label="perfect calibration")
        ax.bar(table["lower"], table["cells"] / max(table["cells"].max(), 1) * 0.25, width=1 / n_bins, align="edge",
               color="#cfdced", edgecolor="white", label="cells per bin (scaled)")
        ax.plot(table.loc[ok, "confidence"], table.loc[ok, "accuracy"], color="#3b75af", lw=1, alpha=0.5)
        sizes = 12 + 150 * np.sqrt(table.loc[ok, "cells"] / table["cells"].max())
        ax.scatter(table.loc[ok, "confidence"], table.loc[ok, "accuracy"], s=sizes, color="#3b75af", zorder=3,
                   label="accuracy (marker area ~ cells)")
        ax.set_xlim(0, 1.03)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("confidence")
        floor = ece_if_calibrated(result.levels[level].conf[has], n_bins)
        ax.set_title(f"{level}: ECE {ece:.3f} ({floor:.3f} if calibrated)", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("accuracy of the network's call")
    # the legend goes below the panels, never over the points (which may lie anywhere in the square)
    handles, names = axes[0].get_legend_handles_labels()
    if own_figure:
        fig.legend(handles, names, fontsize=7, frameon=False, loc="outside lower center", ncols=3)
    else:
        axes[0].legend(handles, names, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(0.0, -0.18),
                       ncols=1)
    return _finish(fig, show, save)
