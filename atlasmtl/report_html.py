"""The HTML mapping report (rendering); the public entry points are in :mod:`atlasmtl.report`.

This module reads calls (:class:`~atlasmtl.calls.CallTable`), plots
(:mod:`atlasmtl.pl`) and metrics (:mod:`atlasmtl.metrics`); it does not import
:mod:`atlasmtl.result`, so ``PredictionResult.report`` can call it without an
import cycle.

``atlasmtl.report.write_report(path, result, model=..., adata=..., truth=...)``
(also ``result.report(path, ...)`` and ``atlasmtl report`` on the command line)
writes a single ``.html`` file that opens in any browser without network access:
every plot of :mod:`atlasmtl.pl` is embedded as a base64 PNG, and there are no
external scripts, styles or fonts.

Sections: overview (cells, levels, per-level Unknown / low-confidence /
KNN-confirmed rates, accuracy and macro-F1 when truth is given, and findings worth a look), query cells on the reference
coordinates, predicted labels, confidence and margin with the gate's thresholds,
novelty (per called class: median novelty z, neighbourhood novelty and the share
called novel, most novel first; the two scores on the coordinates),
accuracy against known labels (metrics table from :func:`atlasmtl.evaluate`,
confusion matrices, per-class F1, reliability diagram) when ``truth`` is given,
gene overlap and input checks, settings, resource summaries of training and
prediction, and versions.

A small inline script sets ``data-images-loaded="yes"`` (and
``data-images="<loaded>/<total>"``) on ``<body>`` once every image has decoded,
so a headless browser can check the page.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ._docs import fill_docs
from ._version import __version__
from .exceptions import CoordinateError, InputError, OutputError, ParameterError
from .calls import UNKNOWN, CallTable, check_same_model, decode_labels, dominant_calls
from .novelty import INPUT_VIEW_MIN_MEMBERS, QUERY_ONLY_MIN_CELLS, QUERY_ONLY_SHARE
from .truth import truth_by_level, truth_frame as read_truth

__all__ = ["write_report", "render_report", "findings"]

_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --accent:#2f6fb0; --warn:#9a6700; --bad:#b42318; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg); margin: 0;
       line-height: 1.45; font-size: 14px; background: #fff; }
header { background: #16324f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; color: #c8d6e5; }
main { padding: 8px 32px 40px 32px; max-width: 1500px; }
nav { margin: 12px 0; font-size: 13px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
h2 { border-bottom: 1px solid var(--line); padding-bottom: 4px; margin-top: 30px; font-size: 18px; }
h3 { font-size: 15px; margin: 18px 0 6px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; min-width: 150px; background: var(--bg); }
.card .v { font-size: 20px; font-weight: 600; }
.card .k { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; margin: 6px 0 12px 0; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.kv th { width: 260px; }
.grid { display: flex; flex-wrap: wrap; gap: 18px 36px; align-items: flex-start; }
figure { margin: 8px 0 16px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eef1f4; }
figcaption { color: var(--muted); font-size: 12.5px; max-width: 1100px; }
.finding { border-left: 4px solid var(--warn); background: #fff8e5; padding: 6px 12px; margin: 6px 0; }
.finding.ok { border-left-color: #1a7f37; background: #eef8f0; }
.finding.bad { border-left-color: var(--bad); background: #fdeceb; }
.muted { color: var(--muted); }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
  document.body.setAttribute('data-images-loaded', ok === imgs.length ? 'yes' : 'no');
});
"""


# ---------------------------------------------------------------- small HTML helpers
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not np.isfinite(v):
            return "—"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:,.4f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        items = [_fmt(v) for v in value]
        text = ", ".join(items[:30]) + (f", … ({len(items)} in all)" if len(items) > 30 else "")
        return text or "—"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "—"
    return str(value)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _kv_table(values: Mapping[str, Any]) -> str:
    rows = []
    for key, value in values.items():
        cls = ' class="num"' if _is_num(value) else ""
        rows.append(f"<tr><th>{_e(key)}</th><td{cls}>{_e(_fmt(value))}</td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>' if rows else '<p class="muted">nothing recorded</p>'


def _sections_tables(sections: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for name, values in sections.items():
        if values:
            parts.append(f"<div><h3>{_e(name)}</h3>{_kv_table(values)}</div>")
    return f'<div class="grid">{"".join(parts)}</div>'


def _frame_table(frame: pd.DataFrame, index_name: str | None = None) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in [index_name or frame.index.name or ""] + list(frame.columns))
    body = []
    for idx, row in frame.iterrows():
        cells = [f"<th>{_e(idx)}</th>"]
        for value in row.tolist():
            cls = ' class="num"' if _is_num(value) else ""
            cells.append(f"<td{cls}>{_e(_fmt(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure_html(fig: Any, alt: str, caption: str, dpi: int = 100) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white", pil_kwargs={"compress_level": 4})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (
        f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


# ---------------------------------------------------------------- content
def findings(result: CallTable, model: Any = None) -> list[tuple[str, str]]:
    """Things in a mapping worth a look, as ``(severity, message)`` with severity ``ok``/``warn``/``bad``.

    The report's overview lists them. From the result: the gene overlap (``ok`` at 90% or more,
    ``warn`` at 70% or more, else ``bad``), the gene-matching warnings, a query whose input
    semantics differ from the model's, and per level 30% or more Unknown (``bad`` from 50%),
    30% or more low-confidence (``bad`` from 60%), 30% or more calls that stand because the
    KNN vote confirmed them (with ``knn_correction="low_conf_only"``) and 2% or more novel
    cells; a query, or a batch of it, the network calls mostly as one class
    (:func:`~atlasmtl.calls.dominant_calls`), where a type the reference lacks goes unflagged. From the model: no
    calibration temperatures, and (unless the KNN correction was off) a KNN space whose neighbour label agreement
    is below 80%.

    Parameters
    ----------
    result
        The predictions: a :class:`~atlasmtl.result.PredictionResult` from :func:`atlasmtl.predict`.
    model
        The :class:`~atlasmtl.model.TrainedModel` that made them, for the model's findings
        (``None``: the result's only).

    Returns
    -------
    list of (str, str)
        ``(severity, message)`` pairs, in the order above; empty when nothing is worth a look
        (the gene overlap, when recorded, is always listed).
    """
    out: list[tuple[str, str]] = []
    genes = result.metadata.get("genes", {}) or {}
    overlap = genes.get("overlap_fraction")
    if overlap is not None:
        msg = (f"{genes.get('n_matched')} of the model's {genes.get('n_model_genes')} genes were found in the query "
               f"({overlap:.1%}; matched by {genes.get('mapped_by', '?')}).")
        out.append(("ok" if overlap >= 0.9 else "warn" if overlap >= 0.7 else "bad", msg))
    for w in list(genes.get("warnings", []) or []):
        out.append(("warn", str(w)))
    q_sem = (result.metadata.get("input", {}) or {}).get("semantics")
    m_sem = (result.metadata.get("model_input", {}) or {}).get("semantics")
    if q_sem and m_sem and q_sem != m_sem:
        out.append(("warn", f"The query holds {q_sem} values while the model was trained on {m_sem}; "
                            f"atlasmtl transformed both the same way, but check that this is the matrix you meant."))
    knn_on = result.metadata.get("settings", {}).get("knn_correction") != "off"
    for level, calls in result.levels.items():
        unknown = float(np.mean(calls.is_unknown))
        if unknown >= 0.3:
            out.append(("bad" if unknown >= 0.5 else "warn",
                        f"{level}: {unknown:.1%} of the cells are Unknown — the query may hold types the reference "
                        "lacks, or differ from it (gene overlap, normalisation, batch)."))
        low = float(np.mean(calls.is_low_conf))
        if low >= 0.3:
            out.append(("bad" if low >= 0.6 else "warn",
                        f"{level}: {low:.1%} of the cells are low-confidence" + (" and were sent to the KNN vote" if knn_on else "")
                        + " (calibrated confidence below confidence_high or margin below margin_threshold); on a query "
                        "like the reference this share is near the error rate, so the query differs from the reference "
                        "or the level is hard to tell apart."))
        used = float(np.mean(calls.used_knn))
        if knn_on and used >= 0.3 and result.metadata.get("settings", {}).get("knn_correction") == "low_conf_only":
            out.append(("warn", f"{level}: {used:.1%} of the calls are low-confidence network calls that stand because "
                                "the KNN vote confirmed them; the network alone was unsure of them."))
        novel = float(np.mean(calls.is_novel))
        if novel >= 0.02:
            out.append(("warn", f"{level}: {novel:.1%} of the cells are far from every reference cell of the type "
                                "they resemble most (novel: Unknown) — a type the reference may lack, or cells of a "
                                "known type in an unusual state: on queries holding only the reference's types up to "
                                "~4% of the cells are (the README's Known limits). The novelty table below shows "
                                "whether they gather in one called class."))
    for batch, (level, label, share, reference_share) in dominant_calls(result):
        of_reference = "" if reference_share is None else f" ({reference_share:.0%} of the reference's cells)"
        of_query = "the query" if batch is None else f"batch {batch!r} (batch_key)"
        out.append(("warn", f"{level}: the network called {share:.0%} of {of_query} {label!r}{of_reference}. In a query "
                            "made mostly of one population (sorted cells, a sample dominated by one type) a type the "
                            "reference lacks is seldom called Unknown: novelty is judged against the query's own "
                            "cells, so that a whole query from another platform is not called novel (a missing type "
                            "mapped on its own ended 0-4% Unknown on nine cases; the README's Known limits). If these "
                            "cells may be of a type the reference lacks, check their marker genes."))
    if model is not None and not (model.metadata.get("calibration") or {}).get("temperatures"):
        out.append(("warn", "The model was trained without held-out calibration cells (calibration_fraction=0 and "
                            "val_fraction=0): confidences are uncalibrated and no cell can be called novel."))
    if model is not None:
        agreement = model.train_config.get("knn_space", {}).get("neighbour_label_agreement")
        if agreement is not None and agreement < 0.8 and result.metadata.get("settings", {}).get("knn_correction") != "off":
            out.append(("warn", f"Only {agreement:.1%} of reference cells share their finest label with their 15 "
                                "nearest neighbours in the KNN space, so the KNN rescue is weak evidence."))
    return out


#: A level's ECE this far above what an exact confidence would show on the same cells is reported as a finding.
CALIBRATION_EXCESS = 0.05


def calibration_findings(result: CallTable, truth_frame: pd.DataFrame, evaluation: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Levels whose confidence is miscalibrated on the labelled query cells, as ``("warn", message)``.

    Judged on the cells whose true label is one of the model's classes at that level: a cell of a type
    the model lacks cannot be called right, so it would make any confidence look over-confident (it is
    the novelty section's to judge). A level is reported when the ECE of those cells exceeds
    ``ece_if_calibrated`` (the ECE an exact confidence would show on as many cells) by
    :data:`CALIBRATION_EXCESS` or more (``evaluation``'s figures when every labelled cell is of a
    known type); the message says whether the network's calls were over- or under-confident (their
    mean confidence against their accuracy on these cells).
    """
    from .calibration import ece_if_calibrated, expected_calibration_error

    out: list[tuple[str, str]] = []
    truth = truth_by_level(result, truth_frame)
    for level, m in (evaluation.get("levels") or {}).items():
        if m.get("ece") is None or level not in truth:
            continue
        calls = result.levels[level]
        has = np.array([v is not None for v in truth[level]])
        of_model = np.isin(truth[level], np.asarray(result.classes[level], dtype=object))
        known = has & of_model
        conf = np.asarray(calls.conf, dtype=np.float64)
        known &= np.isfinite(conf)
        if not known.any():
            continue
        raw = np.asarray(decode_labels(calls.raw, result.classes[level]), dtype=object)
        correct = raw[known] == truth[level][known]
        ece, floor = expected_calibration_error(conf[known], correct), ece_if_calibrated(conf[known])
        if ece - floor < CALIBRATION_EXCESS:
            continue
        accuracy, confidence = float(np.mean(correct)), float(np.mean(conf[known]))
        side = "over-confident" if confidence > accuracy else "under-confident"
        lacking = int((has & ~of_model).sum())
        out.append(("warn", f"{level}: the confidences are {side} on these labelled cells — mean confidence "
                            f"{confidence:.2f} against {accuracy:.2f} accuracy of the network's calls (ECE {ece:.3f}; "
                            f"an exact confidence would show {floor:.3f} on {int(known.sum()):,} cells"
                            + (f"; the {lacking:,} cells of types the model lacks are left out" if lacking else "")
                            + "). Expect the same on unlabelled queries that differ from the reference in the same way."))
    return out


#: A level with at least this many ``Unknown`` cells that had a network call is judged by :func:`abstention_findings`.
ABSTENTION_MIN_CELLS = 20


def abstention_findings(result: CallTable, truth_frame: pd.DataFrame) -> list[tuple[str, str]]:
    """Levels whose ``Unknown`` calls withheld mostly right labels on the labelled query cells, as ``("warn", ...)``.

    An abstention costs a label where the network's call it withheld was right. A level is reported when at
    least :data:`ABSTENTION_MIN_CELLS` of its cells with a true label are ``Unknown`` with a network call, and
    more than half of those calls were right (``evaluate``'s ``unknown_withheld_error`` under 0.5); the
    message splits them by cause (a novelty flag, or low confidence and the other checks) and names the
    settings that keep such cells labelled.
    """
    from .metrics import network_error, unknown_withheld_error

    out: list[tuple[str, str]] = []
    truth = truth_by_level(result, truth_frame)
    for level, calls in result.levels.items():
        if level not in truth:
            continue
        has = np.array([v is not None for v in truth[level]])
        y_true = truth[level][has]
        raw = np.asarray(decode_labels(calls.raw, result.classes[level]), dtype=object)[has]
        pred = np.asarray(result.labels(level), dtype=object)[has]
        withheld = (pred == UNKNOWN) & (raw != UNKNOWN)
        share_wrong = unknown_withheld_error(y_true, pred, raw)
        if withheld.sum() < ABSTENTION_MIN_CELLS or share_wrong is None or share_wrong >= 0.5:
            continue
        right = withheld & (raw == y_true)
        novel = right & np.asarray(calls.is_novel, dtype=bool)[has]
        out.append(("warn", f"{level}: {int(right.sum()):,} of the {int(withheld.sum()):,} labelled cells called "
                            f"Unknown had a right network call ({int(novel.sum()):,} of them flagged novel, "
                            f"{int((right & ~novel).sum()):,} for low confidence or another check), while "
                            f"{network_error(y_true, raw):.1%} of all its calls are wrong: here the abstentions cost "
                            "more right labels than they hold back errors. If the query holds no type the reference "
                            "lacks, a higher novelty_threshold (for the flagged cells) or a lower confidence_low "
                            "keeps more of them labelled."))
    return out


#: The report's options, described once for :func:`write_report` and :func:`render_report`.
doc_report_options = '''model
        The :class:`~atlasmtl.model.TrainedModel` used: adds its training settings,
        loss curve and resource summary.
    adata
        The query AnnData the result was computed from (checked to hold the same
        cells); needed when ``truth`` names columns of its ``obs``.
    truth
        Known labels of the query cells, to add the accuracy section: column
        name(s) of ``adata.obs`` (one per level, coarse to fine, or names equal to
        the levels, paired by name), a mapping ``level → column``, an AnnData, a DataFrame
        indexed by cell name, or a mapping ``level → array``.
    truth_columns
        With an AnnData/DataFrame ``truth``: which column holds each level's labels
        (see :func:`atlasmtl.pl.truth_by_level`).
    reference
        The reference AnnData (or a cells × 2 array) whose coordinates are drawn
        in grey behind the query cells.
    title
        Page title (default: "atlasmtl mapping report: N query cells").
    basis
        Coordinate head to draw (default: ``"umap"`` when present, else the first).
    dpi
        Resolution of the embedded figures.'''
_DOCS = {"doc_report_options": doc_report_options}


def _shared_docs(func: Any) -> Any:
    """``func`` with ``{doc_report_options}`` filled into its docstring."""
    return fill_docs(func, _DOCS)


@_shared_docs
def render_report(
    result: CallTable,
    *,
    model: Any = None,
    adata: ad.AnnData | None = None,
    truth: Any = None,
    truth_columns: Mapping[str, str] | Sequence[str] | None = None,
    reference: ad.AnnData | np.ndarray | None = None,
    title: str | None = None,
    basis: str | None = None,
    dpi: int = 100,
) -> str:
    """The report as an HTML string, without writing a file.

    Parameters
    ----------
    result
        The predictions (:func:`atlasmtl.predict`).
    {doc_report_options}

    Returns
    -------
    str
        The whole self-contained HTML page, as :func:`write_report` writes it.

    Raises
    ------
    ParameterError, InputError, LabelError, CoordinateError
        As :func:`write_report` (all but its ``OutputError``, since nothing is written).
    """
    return _render(result, model=model, adata=adata, truth=truth, truth_columns=truth_columns, reference=reference,
                   title=title, basis=basis, dpi=dpi)[0]


def _render(
    result: CallTable,
    *,
    model: Any = None,
    adata: ad.AnnData | None = None,
    truth: Any = None,
    truth_columns: Mapping[str, str] | Sequence[str] | None = None,
    reference: ad.AnnData | np.ndarray | None = None,
    title: str | None = None,
    basis: str | None = None,
    dpi: int = 100,
) -> tuple[str, dict | None, dict]:
    """``(HTML, atlasmtl.evaluate's answer or None, truth column per level)``: :func:`render_report` with
    what it measured, so a caller that reports the metrics too does not evaluate again."""
    from .model import TrainedModel

    if not isinstance(result, CallTable):
        raise ParameterError(f"Expected a PredictionResult, got {type(result).__name__}.")
    if model is not None and not isinstance(model, TrainedModel):
        raise ParameterError(f"model must be a TrainedModel, not {type(model).__name__}.")
    if model is not None and (list(model.label_columns) != list(result.label_columns) or any(
            list(model.classes[lv]) != list(result.classes[lv]) for lv in result.label_columns)):
        raise ParameterError(
            f"model is not the one these predictions were made with: its levels are {list(model.label_columns)}, the "
            f"predictions' {list(result.label_columns)} (or their classes differ). Pass the model given to predict, "
            "or no model.")
    if model is not None:
        check_same_model(result.metadata, model, "these predictions", ParameterError)
    if adata is not None:
        if not isinstance(adata, ad.AnnData):
            raise ParameterError(f"adata must be the query AnnData, not {type(adata).__name__}.")
        if not result.has_cells(adata.obs_names):
            raise InputError(
                f"The AnnData ({adata.n_obs} cells) is not the query these predictions were made for "
                f"({result.n_obs} cells; same names and order required)."
            )
    from .pl import check_dpi

    dpi = check_dpi(dpi)
    if basis is not None and basis not in result.coords:
        raise CoordinateError(f"basis={basis!r} is not among the predicted coordinates "
                              f"({', '.join(map(repr, result.coords)) or 'none'}); pass one of them, or None.")
    truth_frame, truth_used = (None, {})
    if truth is not None:
        truth_frame, truth_used = read_truth(result, truth, truth_columns, adata)

    import matplotlib

    levels = result.label_columns
    title = title or f"atlasmtl mapping report: {result.n_obs:,} query cells"
    nav, body = [], []
    with matplotlib.rc_context({"font.size": 9}), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tight-layout notes on crowded legends
        evaluation = None
        if truth_frame is not None:
            from .metrics import evaluate

            evaluation = evaluate(result, truth_frame, [lv for lv in levels if lv in truth_frame.columns])
        page = _Page(result, model, reference, basis, dpi, truth_frame, truth_used, evaluation)
        for anchor, heading, render in _SECTIONS:
            content = render(page)
            if content is not None:
                nav.append(f'<a href="#{anchor}">{_e(heading)}</a>')
                body.append(f'<section id="{anchor}"><h2>{_e(heading)}</h2>{content}</section>')

    stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    subtitle = f"levels: {', '.join(levels)} · generated {stamp} by atlasmtl {__version__}"
    text = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head>"
        f"<body data-images-loaded=\"pending\"><header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header><main>"
        f"<nav>{''.join(nav)}</nav>{''.join(body)}"
        "<footer>Self-contained report: every figure is embedded; no network access is needed.</footer>"
        "</main></body></html>\n"
    )
    return text, evaluation, truth_used


# ---------------------------------------------------------------- sections
@dataclass
class _Page:
    """What the sections read: the result, optional model / reference / truth, and figure settings."""

    result: CallTable
    model: Any
    reference: Any
    basis: str | None
    dpi: int
    truth_frame: pd.DataFrame | None
    truth_used: dict
    evaluation: dict | None

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.result.metadata.get("settings", {}) or {})

    @property
    def genes(self) -> dict[str, Any]:
        return self.result.metadata.get("genes", {}) or {}

    @property
    def coordinate_basis(self) -> str | None:
        """The coordinates the figures draw on: ``basis`` when given, else ``umap`` when the model predicts it,
        else its first two-dimensional coordinates; ``None`` without coordinate heads."""
        bases = [b for b in self.result.coords if np.asarray(self.result.coords[b]).shape[1] >= 2]
        return self.basis or ("umap" if "umap" in bases else (bases[0] if bases else None))

    def fig(self, f: Any, alt: str, caption: str) -> str:
        try:
            return _figure_html(f, alt, caption, self.dpi)
        finally:
            f.clear()


def _overview(page: _Page) -> str:
    result, levels, genes = page.result, page.result.label_columns, page.genes
    cards = [("query cells", f"{result.n_obs:,}"), ("levels", str(len(levels)))]
    if genes.get("overlap_fraction") is not None:
        cards.append(("gene overlap", f"{genes['overlap_fraction']:.1%}"))
    for lv in levels:
        cards.append((f"{lv}: labelled (not Unknown)", f"{1 - float(np.mean(result.levels[lv].is_unknown)):.1%}"))
    if page.evaluation is not None:
        for lv, m in page.evaluation["levels"].items():
            if m.get("accuracy") is not None:
                cards.append((f"{lv}: accuracy", f"{m['accuracy']:.1%}"))
            if m.get("macro_f1") is not None:
                cards.append((f"{lv}: macro-F1", f"{m['macro_f1']:.3f}"))
    cards_html = "".join(f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
                         for k, v in cards)
    rows = []
    for lv in levels:
        c = result.levels[lv]
        rows.append({
            "level": lv,
            "classes": len(result.classes[lv]),
            "Unknown": float(np.mean(c.is_unknown)),
            "low-confidence": float(np.mean(c.is_low_conf)),
            "KNN-confirmed": float(np.mean(c.used_knn)),
            "median confidence": float(np.median(c.conf)),
            "median margin": float(np.median(c.margin)),
        })
    level_frame = pd.DataFrame(rows).set_index("level")
    for col in ("Unknown", "low-confidence", "KNN-confirmed"):
        level_frame[col] = [f"{v:.1%}" for v in level_frame[col]]
    found = findings(result, page.model)
    if page.evaluation is not None and page.truth_frame is not None:
        found += calibration_findings(result, page.truth_frame, page.evaluation)
        found += abstention_findings(result, page.truth_frame)
    found_html = "".join(f'<div class="finding {sev}">{_e(msg)}</div>' for sev, msg in found) or \
        '<p class="muted">Nothing unusual found.</p>'
    return f'<div class="cards">{cards_html}</div>{_frame_table(level_frame)}' + "<h3>Findings</h3>" + found_html


def _coordinates(page: _Page) -> str:
    from . import pl

    result = page.result
    basis = page.coordinate_basis
    if basis is None:
        if page.model is not None and page.model.coord_targets:  # rebuilt from a table that kept no coordinates
            return ('<p class="muted">These predictions hold no coordinates (the model predicts them: write the '
                    'predictions with include_coords=True, or --include-coords, as .h5ad or as a table, to draw '
                    'them).</p>')
        return '<p class="muted">The model has no coordinate heads (train with coord_targets=..., or --coords on the command line).</p>'
    ref_note = ("over the reference cells (grey)" if page.reference is not None
                else "(no reference given, so the reference cells are not drawn)")
    how = f", placed from {_e(result.placement())}" if result.placement() else ""
    unplaced = int((~np.isfinite(np.asarray(result.coords[basis], dtype=float)).all(axis=1)).sum())
    missing = f" {unplaced} cells without signal are not placed." if unplaced else ""
    return page.fig(pl.embedding(result, page.reference, basis=basis, color=("label", "confidence", "unknown")),
                    f"query cells on the reference {basis}",
                    f"Query cells at their predicted {_e(basis)} coordinates{how}, {ref_note}, coloured by the "
                    f"finest level's label ({_e(result.label_columns[-1])}), its confidence, and Unknown calls."
                    f"{missing}")


def _labels(page: _Page) -> str:
    from . import pl

    content = '<div class="grid">' + page.fig(
        pl.composition(page.result), "predicted label composition per level",
        "Fraction of query cells given each label at each level; Unknown (grey) marks abstentions.")
    content += page.fig(pl.rates(page.result), "Unknown, low-confidence and KNN-confirmed rates per level",
                        "Low-confidence cells (confidence below confidence_high or margin below margin_threshold) "
                        "are searched among the reference cells; KNN-confirmed cells kept their call because their neighbours' "
                        "vote agreed (the vote never replaces a call); "
                        "Unknown cells were abstained.") + "</div>"
    return content


def _confidence(page: _Page) -> str:
    from . import pl

    settings = page.settings
    return page.fig(
        pl.confidence(page.result), "confidence and margin distributions with the gating thresholds",
        "Confidence is the calibrated probability of the call, margin its lead over the best other class (negative "
        "where the levels' joint decoding chose another class than the level's top one). Gate: "
        f"low-confidence below confidence_high = {_e(_fmt(settings.get('confidence_high')))} or margin_threshold = "
        f"{_e(_fmt(settings.get('margin_threshold')))}; Unknown below confidence_low = "
        f"{_e(_fmt(settings.get('confidence_low')))} unless the KNN vote (≥ knn_conf_low = "
        f"{_e(_fmt(settings.get('knn_conf_low')))}) confirms the call and so rescues the cell.")


#: Rows of the report's novelty table: the called classes whose neighbourhoods stand furthest out.
NOVELTY_TABLE_ROWS = 15


def novelty_table(result: CallTable, level: str | None = None) -> pd.DataFrame | None:
    """Per class the network called at ``level`` (the finest by default): its query cells, the median
    novelty z and neighbourhood novelty of those cells, and the share called novel; the classes whose
    cells' neighbourhoods stand furthest from the reference first. With the result's
    ``metadata["reference_classes"]`` (results written before 2026-12-05 lack it), also the class's reference
    cells, the class's share of the called query cells over its share of the reference (``share vs
    reference``; a type the reference lacks called as the class raises it, and so does a change of
    composition), and whether the input view judges calls into it (``"no"``: fewer than
    :data:`~atlasmtl.novelty.INPUT_VIEW_MIN_MEMBERS` kept training cells, so the embedding and the
    query-only check, ``metadata["query_only"]``, judge such a cell). ``None`` when the level has no novelty
    score (a model without held-out calibration cells)."""
    level = level or result.label_columns[-1]
    calls = result.levels[level]
    z = np.asarray(calls.novelty, dtype=np.float64)
    if not np.isfinite(z).any():
        return None
    raw = np.asarray(calls.raw)
    called = raw >= 0
    cells = pd.DataFrame({"z": z, "around": np.asarray(calls.neighbourhood_novelty, dtype=np.float64),
                          "novel": np.asarray(calls.is_novel, dtype=np.float64)})[called]
    frame = cells.groupby(raw[called]).agg(**{  # pandas' median skips NaN (NaN where a class has none)
        "cells": ("z", "size"), "median novelty z": ("z", "median"),
        "median neighbourhood novelty": ("around", "median"), "called novel": ("novel", "mean")})
    known = (result.metadata.get("reference_classes") or {}).get(level)
    if known is not None:
        reference = np.asarray(known["cells"], dtype=np.float64)
        frame.insert(1, "reference cells", reference[frame.index].astype(int))
        # the class's share of the called query cells over its share of the reference cells
        frame.insert(2, "share vs reference", (frame["cells"] / max(int(called.sum()), 1))
                     / np.where(reference[frame.index] > 0, reference[frame.index] / max(reference.sum(), 1.0), np.nan))
        if known.get("input_view") is not None:
            frame.insert(3, "input view", np.where(np.asarray(known["input_view"], dtype=bool)[frame.index], "yes", "no"))
    frame.index = pd.Index([result.classes[level][code] for code in frame.index], name="called")
    key = "median neighbourhood novelty" if frame["median neighbourhood novelty"].notna().any() else "median novelty z"
    return frame.sort_values(key, ascending=False, na_position="last")


def _novelty(page: _Page) -> str | None:
    from . import pl

    result = page.result
    level = result.label_columns[-1]
    table = novelty_table(result, level)
    if table is None:
        return None
    threshold, k = page.settings.get("novelty_threshold"), page.settings.get("neighbourhood_k")
    has_around = bool(np.isfinite(np.asarray(result.levels[level].neighbourhood_novelty, dtype=float)).any())
    around = f"how far their {_e(_fmt(k)) + ' ' if k else ''}nearest query cells stand on average (neighbourhood novelty" \
        + ("" if has_around else "; not computed for these predictions, neighbourhood_k=None") + ")"
    content = (f"<p>Per class the network called at {_e(level)} (before any abstention): how far its query cells "
               f"stand from that class's reference cells (novelty, a robust z located at the query) and {around}. "
               "A type the reference lacks "
               "forms its own group, so a class whose cells' neighbourhoods stand well above the others' may hold "
               "it even where no cell passes the novelty threshold "
               f"({_e(_fmt(threshold))}); such cells keep their call but deserve a look.</p>")
    if "input view" in table.columns and (table["input view"] == "no").any():
        query_only = result.metadata.get("query_only") or {}
        share = query_only.get("share_above", QUERY_ONLY_SHARE)
        min_cells = query_only.get("min_cells", QUERY_ONLY_MIN_CELLS)
        if query_only.get("candidates") == 0:
            min_held = query_only.get("min_held")
            check = (f"No group of at least {_e(_fmt(min_cells))} query cells was called as such a class"
                     + (f" with at least {_e(_fmt(min_held))} held-out reference cells called so" if min_held else "")
                     + ", so the check had nothing to judge (0 calls withdrawn).")
        elif query_only and result.metadata.get("batches"):  # predict(..., batch_key=...): each batch located alone
            located = [f"{_e(name)} {_e(_fmt(rec['query_only'].get('location')))}"
                       for name, rec in result.metadata["batches"].items() if rec.get("query_only")]
            check = (f"Each batch was located on that share on its own (batch_key; {', '.join(located)}, the check "
                     f"running below {_e(_fmt(query_only.get('max_location')))}; "
                     f"{int(query_only['flagged'])} calls withdrawn).")
        elif query_only:
            location = query_only.get("location")
            check = (f"This query's location on that share is {_e(_fmt(location))}"
                     + (" (the check ran; " if location is not None and location < query_only["max_location"]
                        else " (above the check's limit, so it stayed silent; ")
                     + f"{int(query_only['flagged'])} calls withdrawn).")
        else:
            check = "The check did not run for these predictions (a model saved before it, or no neighbourhood search)."
        content += ("<p>Classes marked <em>no</em> under <em>input view</em> kept too few training cells "
                    f"(under {INPUT_VIEW_MIN_MEMBERS}) for the input view to judge the calls into them. The embedding "
                    f"judges such a cell; and where at least {_e(_fmt(min_cells))} cells called so sit in groups of "
                    "query cells with no held-out reference cell among them (query-only share above "
                    f"{_e(_fmt(share))}), in a query that otherwise mixes with the reference, their calls are Unknown. "
                    f"{check} Across platforms or species nothing mixes and a type the reference lacks that the "
                    "network calls as one of these classes is rarely Unknown: "
                    "look twice at such a class when its share vs reference is high.</p>")
    shown = table.head(NOVELTY_TABLE_ROWS).round(3)
    shown["called novel"] = [f"{v:.1%}" for v in shown["called novel"]]  # a share, shown like the report's others
    content += _frame_table(shown)
    if len(table) > NOVELTY_TABLE_ROWS:
        content += f'<p class="muted">{len(table) - NOVELTY_TABLE_ROWS} more classes, less novel, not shown.</p>'
    basis = page.coordinate_basis
    if basis is not None and has_around:
        content += page.fig(pl.embedding(result, page.reference, basis=basis, level=level,
                                         color=("novelty", "neighbourhood_novelty")),
                            f"novelty on the reference {basis}",
                            f"Query cells at their predicted {_e(basis)} coordinates, coloured by the {_e(level)} "
                            "novelty z and its neighbourhood mean (0 to the novelty threshold).")
    return content


def _accuracy(page: _Page) -> str | None:
    if page.truth_frame is None:
        return None
    from . import pl
    from .metrics import evaluation_table

    result, truth_frame, evaluation = page.result, page.truth_frame, page.evaluation
    used = ", ".join(f"{lv} ← {col}" for lv, col in page.truth_used.items())
    content = f'<p>True labels: {_e(used)} ({result.n_obs:,} cells).</p>'
    table = evaluation_table(evaluation, "levels")
    keep = [c for c in ("n", "accuracy", "macro_f1", "balanced_accuracy", "coverage", "accuracy_covered",
                        "network_error", "unknown_withheld_error", "ece", "ece_if_calibrated", "brier", "aurc",
                        "n_excluded") if c in table.columns]
    content += "<h3>Metrics (atlasmtl.evaluate)</h3>" + _frame_table(table[keep])
    hier = evaluation.get("hierarchy") or {}
    flat = {k: v for k, v in hier.items() if not isinstance(v, (Mapping, list, tuple, np.ndarray))}
    if flat and len(result.label_columns) > 1:  # a single level has no path to check
        content += "<h3>Hierarchy</h3>" + _kv_table(flat)
    content += page.fig(pl.confusion(result, truth_frame), "row-normalised confusion matrices",
                        "Rows: true label (cells); columns: predicted label including Unknown. Each row sums to 1.")
    content += page.fig(pl.f1_scores(result, truth_frame), "per-class F1 per level",
                        "Per-class F1 of the final labels; Unknown counts as a miss.")
    content += page.fig(pl.reliability(result, truth_frame), "reliability diagrams",
                        "Accuracy of the network's own call against its confidence (15 bins); a calibrated "
                        "model follows the diagonal. ECE: expected calibration error; on a finite query even a perfectly "
                        "calibrated confidence shows some (ece_if_calibrated in the table above).")
    return content


def _inputs(page: _Page) -> str:
    genes, metadata = page.genes, page.result.metadata
    content = "<h3>Gene overlap</h3>" + _kv_table({k: v for k, v in genes.items() if k != "warnings"})
    if genes.get("warnings"):
        content += "".join(f'<div class="finding">{_e(w)}</div>' for w in genes["warnings"])
    content += '<div class="grid">'
    content += "<div><h3>Query input</h3>" + _kv_table(metadata.get("input", {}) or {}) + "</div>"
    content += ("<div><h3>Model's training input</h3>" + _kv_table(metadata.get("model_input", {}) or {})
                + "</div></div>")
    return content


def _settings(page: _Page) -> str:
    content = "<h3>Prediction settings</h3>" + _kv_table(page.settings)
    if page.model is not None:
        cfg = {k: v for k, v in page.model.train_config.items()
               if k not in ("history", "resource_summary", "runtime_summary", "versions", "knn_space",
                            "unlabelled_cells_per_level")}
        content += "<h3>Training settings</h3>" + _kv_table(cfg)
    return content


def _resources(page: _Page) -> str:
    from . import pl

    model = page.model
    content = ""
    if model is not None:
        content += "<h3>Training</h3>" + _sections_tables(model.resource_summary())
        if model.train_config.get("history"):
            content += page.fig(pl.training_history(model), "training loss per epoch", "Loss per epoch.")
    else:
        content += '<p class="muted">No model given: training resources are not shown.</p>'
    return content + "<h3>Prediction</h3>" + _sections_tables(page.result.summary())


def _versions(page: _Page) -> str:
    versions = dict(page.result.metadata.get("versions", {}) or {})
    versions.setdefault("atlasmtl (report)", __version__)
    return _kv_table(versions)


#: The report's sections in order: (anchor, heading, renderer returning HTML or None to leave it out).
_SECTIONS = (
    ("overview", "Overview", _overview),
    ("coordinates", "Reference coordinates", _coordinates),
    ("labels", "Predicted labels", _labels),
    ("confidence", "Confidence and margin", _confidence),
    ("novelty", "Novelty", _novelty),
    ("accuracy", "Accuracy against known labels", _accuracy),
    ("inputs", "Gene overlap and input checks", _inputs),
    ("settings", "Settings", _settings),
    ("resources", "Resources", _resources),
    ("versions", "Versions", _versions),
)


@_shared_docs
def write_report(
    path: str | os.PathLike,
    result: CallTable,
    *,
    model: Any = None,
    adata: ad.AnnData | None = None,
    truth: Any = None,
    truth_columns: Mapping[str, str] | Sequence[str] | None = None,
    reference: ad.AnnData | np.ndarray | None = None,
    title: str | None = None,
    basis: str | None = None,
    dpi: int = 100,
) -> Path:
    """Write the mapping report to one self-contained HTML file.

    Parameters
    ----------
    path
        The ``.html`` file to write (its folder is created).
    result
        The predictions (:func:`atlasmtl.predict`).
    {doc_report_options}

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    ParameterError, InputError, LabelError
        Bad arguments, an AnnData that does not match the result, or truth
        columns that are missing.
    CoordinateError
        ``basis`` is not one of the predicted coordinates.
    OutputError
        ``path`` does not end in ``.html`` / ``.htm``, or cannot be written (nothing is written then).
    """
    return write_report_and_metrics(path, result, model=model, adata=adata, truth=truth, truth_columns=truth_columns,
                                    reference=reference, title=title, basis=basis, dpi=dpi)[0]


def write_report_and_metrics(path: str | os.PathLike, result: CallTable, **options: Any) -> tuple[Path, dict | None, dict]:
    """:func:`write_report` (same ``options``), returning ``(path, atlasmtl.evaluate's answer or None, truth
    column per level)``: the command line reports the metrics it drew without evaluating twice."""
    from .io import atomic_write

    if not isinstance(path, (str, os.PathLike)) or Path(path).suffix.lower() not in (".html", ".htm"):
        raise OutputError(f"The report is an HTML page: name it with .html (e.g. 'report.html'), not {path!r}.")
    text, evaluation, truth_used = _render(result, **options)
    path = Path(path)
    atomic_write(path, text.encode("utf-8"), "report")  # an OutputError naming the path, as every writer's
    return path, evaluation, truth_used
