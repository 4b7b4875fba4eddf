"""A mapping report people can look at: one self-contained HTML file.

``atlasmtl.report.write_report(path, result, model=..., adata=..., truth=...)``
(also ``result.report(path, ...)`` and ``atlasmtl report`` on the command line)
writes a single ``.html`` file that opens in any browser without network access.
:func:`result_from_predictions` rebuilds a result from predictions written
earlier with ``mode="full"``, so a report can be made without predicting again.

The rendering lives in :mod:`atlasmtl.report_html`; this module is the public
entry point and sits above :mod:`atlasmtl.result`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import anndata as ad
import pandas as pd

from .report_html import findings, render_report, write_report
from .result import PredictionResult

__all__ = ["write_report", "render_report", "result_from_predictions", "findings"]


def result_from_predictions(
    predictions: pd.DataFrame | ad.AnnData | str | os.PathLike,
    model: Any,
    settings: Mapping[str, Any] | None = None,
) -> PredictionResult:
    """Rebuild a :class:`PredictionResult` from predictions written with ``mode="full"``.

    Parameters
    ----------
    predictions
        A ``.csv`` written by ``result.to_csv(path, mode="full")`` (or ``atlasmtl
        predict --mode full``; with ``include_coords=True`` its ``<name>_1`` ...
        ``<name>_d`` columns of each of the model's coordinate heads are read back
        as coordinates), an ``.h5ad`` written back with ``mode="full"`` (its
        ``uns["atlasmtl"]`` metadata and ``obsm["X_pred_*"]`` coordinates are used
        too), or the equivalent DataFrame / AnnData.
    model
        The :class:`~atlasmtl.model.TrainedModel` that made them (for the class names).
    settings
        Gate settings to record when the file holds none (a CSV keeps no metadata).

    Returns
    -------
    PredictionResult
        The result, as :func:`atlasmtl.predict` returned it up to what the file keeps: the calls of
        every level and, where written, the coordinates and metadata.

    Raises
    ------
    InputError
        Missing columns (written in a mode other than ``"full"``), labels the
        model does not know, or text in a number column (confidences, coordinates).
    ParameterError
        ``model`` is not a :class:`~atlasmtl.model.TrainedModel`, or ``settings`` not a dict of valid gate settings.

    Warns
    -----
    UserWarning
        A table holds only some of a coordinate head's columns, or more (those
        columns are not read as coordinates).
    """
    return PredictionResult.from_predictions(predictions, model, settings=settings)
