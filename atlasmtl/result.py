"""``PredictionResult``: the calls of :mod:`atlasmtl.calls` plus writeback into AnnData, ``.h5ad`` and CSV files.

This is the public face of a prediction: :func:`atlasmtl.predict` returns it,
and it writes itself back (:meth:`~PredictionResult.to_adata`,
:meth:`~PredictionResult.write_h5ad`, :meth:`~PredictionResult.to_csv`) and
renders its report (:meth:`~PredictionResult.report`). The data and the column
vocabulary live in :class:`~atlasmtl.calls.CallTable` / :class:`~atlasmtl.calls.LevelCalls`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ._docs import fill_docs
from .calls import (MODES, UNKNOWN, CallTable, LevelCalls, check_same_model, column_names, levels_in_table, mode_fields,
                    numeric_column)
from .exceptions import InputError, OutputError, ParameterError, user_stacklevel
from .gating import GatingConfig
from .report_html import doc_report_options
from .io import (atomic_path, atomic_write, check_input_file, elem_io, prepare_output, from_h5ad, h5ad_safe, read_h5ad,
                 read_h5ad_obs, read_text_table, table_format)
from .runtime import format_sections
from .validation import as_bool, as_float

__all__ = ["PredictionResult", "LevelCalls", "UNKNOWN", "MODES", "column_names"]


class PredictionResult(CallTable):
    """Predictions for every query cell at every level, plus coordinates and metadata.

    Made by :func:`atlasmtl.predict`, or read back by :meth:`from_predictions`.

    Attributes
    ----------
    obs_names
        Query cell names, in order (a text Index).
    classes
        Class names per level (the model's); codes in ``levels`` index them.
    levels
        Per level: a :class:`~atlasmtl.calls.LevelCalls` with arrays ``pred``
        (final class code, -1 = Unknown; also readable as ``["code"]``),
        ``conf``, ``margin``, ``is_unknown``, ``raw`` (``["raw_code"]``),
        ``knn`` (``["knn_code"]``), ``knn_vote_frac``, ``is_low_conf``, ``used_knn``,
        ``novelty``, ``is_novel`` and ``neighbourhood_novelty``.
    coords
        Predicted coordinates per coordinate target (cells × dims).
    metadata
        Settings, gene overlap, input checks, versions and ``prediction_runtime``.
    hierarchy
        For each level that nests in the previous one: child label → parent label (empty when none does).
    """

    def to_csv(self, path: str | os.PathLike, mode: str = "minimal", include_coords: bool = False) -> None:
        """Write :meth:`to_dataframe` to a text table, one row per cell (index label ``cell``), atomically.

        Parameters
        ----------
        path
            ``.csv`` (comma-separated) or ``.tsv`` (tab-separated), optionally compressed
            by a further ``.gz``, ``.bz2``, ``.xz`` or ``.zip`` (``predictions.csv.gz``), as
            :func:`pandas.read_csv` reads it back. Another name (``.parquet``, ``.h5ad``) is an
            :class:`~atlasmtl.exceptions.OutputError`.
        mode
            ``"minimal"``, ``"standard"`` or ``"full"``: which columns (see :meth:`to_dataframe`).
        include_coords
            Also write the predicted coordinates, one column per dimension (``<target>_1``, ``<target>_2`` ...),
            which :meth:`from_predictions` reads back.
        """
        include_coords = as_bool("include_coords", include_coords)
        sep, compression = table_format(path)
        frame = self.to_dataframe(mode)
        if include_coords:
            for name, values in self.coords.items():
                for j, column in enumerate(coord_columns(name, values.shape[1])):
                    frame[column] = values[:, j]
        buffer = io.BytesIO()
        options = {"method": compression, "mtime": 0} if compression == "gzip" else {"method": compression}
        if compression == "zip":
            options["archive_name"] = Path(os.fspath(path)).stem
        frame.to_csv(buffer, sep=sep, index_label="cell", compression=options if compression else None)
        atomic_write(path, buffer.getvalue(), "predictions")

    def uns_entry(self) -> dict[str, Any]:
        """The ``uns["atlasmtl"]`` entry a writeback stores: :attr:`metadata` in a form ``.h5ad`` files hold.

        Returns
        -------
        dict
            The metadata with ``None`` values left out and lists made arrays (nested alike).
        """
        return h5ad_safe(self.metadata)

    def _check_cells(self, obs_names: Any, what: str) -> None:
        if not self.has_cells(obs_names):
            raise InputError(what)

    def _coord_keys(self) -> list[str]:
        """The ``obsm`` keys a writeback of this result's coordinates uses (``X_pred_<name>``)."""
        return [f"X_pred_{name}" for name in self.coords]

    def _warn_replacing_coords(self, obsm_keys: Any, earlier_writeback: bool, include_coords: bool) -> None:
        """Warn (as for ``obs`` columns) when writing coordinates replaces ``obsm`` entries of the user's:
        ``X_pred_<name>`` keys present where no earlier atlasmtl writeback made them."""
        replaced = [k for k in self._coord_keys() if k in obsm_keys] if include_coords and not earlier_writeback else []
        if replaced:
            warnings.warn(
                f"The AnnData's obsm already holds {replaced}, not from an earlier atlasmtl writeback (no "
                "uns['atlasmtl']); replaced by the predicted coordinates. Rename them first to keep them.",
                UserWarning, stacklevel=user_stacklevel())

    def _obs_with_calls(self, obs: pd.DataFrame, mode: str, earlier_writeback: bool) -> pd.DataFrame:
        """``obs`` plus this result's columns. With ``earlier_writeback`` (the AnnData holds ``uns["atlasmtl"]``)
        every column atlasmtl writes for these levels goes first, so no column of another ``mode`` lingers; without
        it, a column of the user's that only shares a name with one atlasmtl writes is kept unless this writeback
        replaces it, which a warning names."""
        frame = self.to_dataframe(mode)
        if earlier_writeback:
            new_obs = obs[[c for c in obs.columns if c not in self.own_columns()]].copy()
        else:
            replaced = [c for c in frame.columns if c in obs.columns]
            if replaced:
                warnings.warn(
                    f"The AnnData's obs already holds columns atlasmtl writes, not from an earlier atlasmtl writeback "
                    f"(no uns['atlasmtl']); they are replaced by the predictions: {replaced[:10]}"
                    + (f" and {len(replaced) - 10} more" if len(replaced) > 10 else "")
                    + ". Rename them first to keep them.", UserWarning, stacklevel=user_stacklevel())
            new_obs = obs.copy()
        for col in frame.columns:
            new_obs[col] = frame[col].values
        return new_obs

    def to_adata(
        self, adata: ad.AnnData, mode: str = "minimal", include_coords: bool = False, copy: bool = False
    ) -> ad.AnnData:
        """Write predictions into ``adata.obs`` (and ``obsm``/``uns``) and return it.

        Earlier atlasmtl columns for the same levels are replaced (all of them, whatever ``mode`` wrote them, when
        ``adata.uns`` holds an earlier writeback's ``"atlasmtl"`` entry, and so are its ``obsm["X_pred_<name>"]``
        for this result's coordinates, written again only with ``include_coords``); other columns are kept, and a
        column (or ``obsm`` entry) of the user's named like one written now is replaced with a warning.

        Parameters
        ----------
        adata
            The query AnnData the result was computed from (same cells, same order).
        mode
            Which columns to write; see :meth:`to_dataframe`.
        include_coords
            Also write ``obsm["X_pred_<name>"]`` for each coordinate head.
        copy
            Write into a copy and return it instead of modifying ``adata``.

        Returns
        -------
        anndata.AnnData
            ``adata`` itself, written into, or its annotated copy with ``copy=True``.

        Raises
        ------
        ParameterError
            ``adata`` is not an AnnData in memory (a path: use :meth:`write_h5ad`), ``mode`` is
            unknown, or ``copy`` / ``include_coords`` is not a boolean.
        InputError
            ``adata``'s cells are not the result's (same names, same order).
        """
        mode_fields(mode)  # a bad mode fails before anything is checked or copied
        if not isinstance(adata, ad.AnnData):
            raise ParameterError(f"to_adata writes into an AnnData in memory, not a {type(adata).__name__}; for a "
                                 "file, write an annotated copy with write_h5ad(path, source).")
        copy, include_coords = as_bool("copy", copy), as_bool("include_coords", include_coords)
        self._check_cells(
            adata.obs_names,
            f"The AnnData ({adata.n_obs} cells) is not the one these predictions were made for "
            f"({self.n_obs} cells, same names and order required).",
        )
        target = adata.copy() if copy else adata
        earlier = "atlasmtl" in target.uns
        target.obs = self._obs_with_calls(target.obs, mode, earlier)
        if earlier:  # an earlier writeback's coordinates are not this result's: none linger beside its labels
            for key in self._coord_keys():
                target.obsm.pop(key, None)
        self._warn_replacing_coords(target.obsm.keys(), earlier, include_coords)
        if include_coords:
            for name, values in self.coords.items():
                target.obsm[f"X_pred_{name}"] = values
        target.uns["atlasmtl"] = self.uns_entry()
        return target

    def write_h5ad(
        self,
        path: str | os.PathLike,
        source: ad.AnnData | str | os.PathLike,
        mode: str = "standard",
        include_coords: bool = False,
    ) -> Path:
        """Write an annotated copy of the query to a new ``.h5ad`` without loading its matrix.

        Parameters
        ----------
        path
            The new file (written atomically; must differ from the source file).
        source
            The query the result was computed from: its ``.h5ad`` path, a backed
            AnnData, or an in-memory AnnData (left unchanged).
        mode, include_coords
            As in :meth:`to_adata`; ``mode`` defaults to ``"standard"`` here (``to_adata``'s to ``"minimal"``).

        Returns
        -------
        pathlib.Path
            The file written.

        Raises
        ------
        OutputError
            ``path`` does not end in ``.h5ad`` or cannot be written.
        InputError
            The source file is missing or unreadable, is ``path`` itself, or does not hold the result's cells.
        ParameterError
            ``mode`` is unknown or ``include_coords`` not a boolean.

        Notes
        -----
        For a file or backed AnnData the source file is copied byte for byte and
        only ``obs``, ``obsm`` and ``uns`` are rewritten, so memory does not
        grow with the size of the expression matrix. A view of a backed AnnData
        (``adata[mask]``) reads only its cells' rows into memory and writes those.
        """
        import h5py

        _, write_elem, _ = elem_io()
        mode_fields(mode)  # the options fail before anything is created
        include_coords = as_bool("include_coords", include_coords)
        text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        if isinstance(text, str) and text.strip() and Path(text).suffix.lower() != ".h5ad":
            raise OutputError(f"{text!r}: write_h5ad writes an .h5ad file; name it so (e.g. 'annotated.h5ad'). "
                              "For a table use to_csv.")
        dest = prepare_output(path, "annotated .h5ad file")
        if isinstance(source, ad.AnnData) and getattr(source, "isbacked", False) and source.is_view:
            # a subset of a file's cells: copying the file would pair the subset's obs with every cell's matrix
            # (an unreadable file); only the subset's rows are read, as the command line's --query-filter does
            source = source.to_memory()
        if isinstance(source, ad.AnnData) and not getattr(source, "isbacked", False):
            annotated = self.to_adata(source, mode=mode, include_coords=include_coords, copy=True)
            with atomic_path(dest, "annotated .h5ad file") as tmp:
                annotated.write_h5ad(tmp)
            return dest
        src_path = check_input_file(source.filename if isinstance(source, ad.AnnData) else source, "query file")
        if src_path.resolve() == dest.resolve():
            raise InputError(f"write_h5ad would overwrite its source {str(src_path)!r}; choose a new file name.")
        obs = source.obs if isinstance(source, ad.AnnData) else read_h5ad_obs(src_path)
        self._check_cells(obs.index, f"{str(src_path)!r} does not hold the cells these predictions were made for.")
        with h5py.File(src_path, "r") as f:
            earlier = "uns" in f and "atlasmtl" in f["uns"]
            self._warn_replacing_coords(list(f["obsm"].keys()) if "obsm" in f else [], earlier, include_coords)
        new_obs = self._obs_with_calls(obs, mode, earlier)
        with atomic_path(dest, "annotated .h5ad file") as tmp:
            shutil.copyfile(src_path, tmp)
            with h5py.File(tmp, "r+") as f:
                del f["obs"]
                write_elem(f, "obs", new_obs)
                if earlier and "obsm" in f:  # as to_adata: an earlier writeback's coordinates do not linger
                    for key in self._coord_keys():
                        if key in f["obsm"]:
                            del f["obsm"][key]
                if include_coords:
                    for name, values in self.coords.items():
                        key = f"X_pred_{name}"
                        if key in f["obsm"]:
                            del f["obsm"][key]
                        write_elem(f["obsm"], key, values)
                if "atlasmtl" in f["uns"]:
                    del f["uns"]["atlasmtl"]
                write_elem(f["uns"], "atlasmtl", self.uns_entry())
        return dest

    def show_resource_usage(self) -> None:
        """Print a compact, sectioned summary of the prediction run."""
        print(format_sections("atlasmtl prediction", self.summary()))

    @functools.partial(fill_docs, docs={"doc_report_options": doc_report_options.replace("\n", "\n    ")})
    def report(
        self,
        path: str | os.PathLike,
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
        """Write a self-contained HTML mapping report; see :func:`atlasmtl.report.write_report`.

        Parameters
        ----------
        path
            The ``.html`` file to write (its folder is created).
        {doc_report_options}

        Returns
        -------
        pathlib.Path
            The path written.

        Raises
        ------
        OutputError
            ``path`` does not end in ``.html`` / ``.htm``, or cannot be written; and the errors
            :func:`~atlasmtl.report.write_report` names for its other arguments.
        """
        from .report_html import write_report

        return write_report(path, self, model=model, adata=adata, truth=truth, truth_columns=truth_columns,
                            reference=reference, title=title, basis=basis, dpi=dpi)

    @classmethod
    def from_predictions(
        cls,
        predictions: pd.DataFrame | ad.AnnData | str | os.PathLike,
        model: Any,
        settings: dict[str, Any] | None = None,
    ) -> "PredictionResult":
        """Rebuild a result from predictions written with ``mode="full"``; see :func:`atlasmtl.report.result_from_predictions`.

        Parameters
        ----------
        predictions
            A ``.csv`` / ``.tsv`` (optionally compressed) or ``.h5ad`` path written with ``mode="full"``, or the
            equivalent DataFrame / AnnData.
        model
            The :class:`~atlasmtl.model.TrainedModel` that made them.
        settings
            Gate settings to record when the predictions hold none (a table keeps no metadata).

        Returns
        -------
        PredictionResult
            The calls of every level, and the coordinates and metadata the predictions hold.

        Raises
        ------
        InputError
            No such file, a table that cannot be read, levels the model lacks, or columns missing
            or unreadable (written in a mode other than ``"full"``).
        ParameterError
            ``model`` is not a model, or ``settings`` not a dict of valid gate settings.
        """
        if not (hasattr(model, "classes") and hasattr(model, "label_columns")):
            raise ParameterError(f"model must be the TrainedModel that made the predictions, not {type(model).__name__}.")
        if settings is not None and not isinstance(settings, Mapping):
            raise ParameterError(f"settings must be a dict of the prediction's settings, not {type(settings).__name__}.")
        metadata: dict[str, Any] = {}
        coords: dict[str, np.ndarray] = {}
        where = "the predictions"
        if isinstance(predictions, (str, os.PathLike)):
            where = os.fspath(predictions)
            if not os.path.exists(where):
                raise InputError(f"No such predictions file: {where!r}.")
            if Path(where).suffix.lower() == ".h5ad":  # as write_h5ad accepts it ("P.H5AD")
                predictions = read_h5ad(where)
            else:
                predictions = read_text_table(where, "prediction table")  # as text, as written
        if isinstance(predictions, ad.AnnData):
            frame = predictions.obs
            metadata = from_h5ad(dict(predictions.uns.get("atlasmtl", {}) or {}))
            coords = {k[len("X_pred_"):]: np.asarray(v, dtype=np.float32) for k, v in predictions.obsm.items()
                      if k.startswith("X_pred_")}
        elif isinstance(predictions, pd.DataFrame):
            frame = predictions
        else:
            raise InputError(f"predictions must be a path, DataFrame or AnnData, not {type(predictions).__name__}.")
        check_same_model(metadata, model, where)
        if not metadata.get("settings"):
            metadata["settings"] = _checked_settings(settings or {})
            metadata.setdefault("note", "rebuilt from a prediction table without metadata")
        foreign = [lv for lv in levels_in_table(frame.columns) if lv not in model.label_columns]
        if foreign:
            raise InputError(f"{where} hold level(s) {foreign} that the model lacks (its levels: {model.label_columns}); "
                             "pass the model that made these predictions.")
        if isinstance(predictions, pd.DataFrame):  # a table: coordinates are columns, as to_csv writes them
            coords = _table_coords(frame, model, where)
        classes = {lv: list(model.classes[lv]) for lv in model.label_columns}
        return cls.from_frame(frame, classes, coords=coords, metadata=metadata, hierarchy=model.hierarchy, where=where)

    def __repr__(self) -> str:
        return f"PredictionResult({self.n_obs} cells; levels {self.label_columns}; coords {list(self.coords) or 'none'})"


#: The number a coordinate column's name ends in (``umap_1``): 1, 2, ... as :meth:`PredictionResult.to_csv` writes it.
_DIMENSION = re.compile(r"[1-9][0-9]*")


def coord_columns(name: str, n_dims: int) -> list[str]:
    """The table columns of coordinate target ``name`` with ``n_dims`` dimensions: ``<name>_1`` ... ``<name>_d``
    (what :meth:`PredictionResult.to_csv` writes and :meth:`PredictionResult.from_predictions` reads back)."""
    return [f"{name}_{j}" for j in range(1, n_dims + 1)]


def _table_coords(frame: pd.DataFrame, model: Any, where: str) -> dict[str, np.ndarray]:
    """The coordinates a prediction table holds, as :meth:`PredictionResult.to_csv` writes them with
    ``include_coords=True``: for each of the model's coordinate heads ``<name>`` of ``d`` dimensions, the columns
    ``<name>_1`` ... ``<name>_d``, read as float32 (an empty value, a cell left unplaced, is NaN).

    Only a head's full run is read, so a column that merely ends in ``_1`` (``batch_1``) is never taken for
    coordinates. A table with some of a head's columns only, or more of them (``umap_3`` beside a 2-d head),
    was not written for this model: those columns are left out, with a warning naming them.
    """
    architecture = (getattr(model, "metadata", None) or {}).get("architecture") or {}
    dims = dict(architecture.get("coord_dims") or {})
    by_name = {str(c): c for c in frame.columns}
    coords: dict[str, np.ndarray] = {}
    for name in getattr(model, "coord_targets", None) or {}:
        prefix = f"{name}_"
        written = sorted(int(c[len(prefix):]) for c in by_name
                         if c.startswith(prefix) and _DIMENSION.fullmatch(c[len(prefix):]))
        if not written:
            continue
        n_dims = int(dims.get(name, len(written)))
        if written != list(range(1, n_dims + 1)):
            warnings.warn(
                f"{where}: the columns {[f'{prefix}{j}' for j in written]} are not read as the {name!r} coordinates: "
                f"the model's {name!r} head has {n_dims} dimension(s), which to_csv(include_coords=True) writes as "
                f"{prefix}1 ... {prefix}{n_dims}. Write the predictions again with include_coords=True "
                "(--include-coords) to read them.", UserWarning, stacklevel=user_stacklevel())
            continue
        columns = coord_columns(name, n_dims)
        coords[name] = np.column_stack(
            [numeric_column(frame[by_name[c]], f"{where}: column {c!r}", unit_interval=False) for c in columns]
        ).astype(np.float32)
    return coords


def _checked_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A user's prediction settings for a rebuilt result, with the gate's thresholds checked as
    :func:`atlasmtl.predict` checks them (plots and the report read them as numbers)."""
    settings = dict(settings)
    gate = {f.name: settings[f.name] for f in dataclasses.fields(GatingConfig) if f.name in settings}
    checked = dataclasses.asdict(GatingConfig(**gate).validate())
    settings.update({name: checked[name] for name in gate})
    if settings.get("novelty_threshold") is not None:
        settings["novelty_threshold"] = as_float("novelty_threshold", settings["novelty_threshold"], 0.0)
    return settings
