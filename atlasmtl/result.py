"""``PredictionResult`` and writeback into AnnData, DataFrames and CSV files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .exceptions import InputError, ParameterError
from .runtime import format_sections

UNKNOWN = "Unknown"
MODES = ("minimal", "standard", "full")


def column_names(level: str) -> dict[str, str]:
    """Writeback column names for one level, by field."""
    return {
        "pred": f"pred_{level}",
        "conf": f"conf_{level}",
        "margin": f"margin_{level}",
        "is_unknown": f"is_unknown_{level}",
        "raw": f"pred_{level}_raw",
        "knn": f"pred_{level}_knn",
        "knn_vote_frac": f"knn_vote_frac_{level}",
        "is_low_conf": f"is_low_conf_{level}",
        "used_knn": f"used_knn_{level}",
    }


_MODE_FIELDS = {
    "minimal": ("pred",),
    "standard": ("pred", "conf", "margin", "is_unknown"),
    "full": ("pred", "conf", "margin", "is_unknown", "raw", "knn", "knn_vote_frac", "is_low_conf", "used_knn"),
}


def _labels(codes: np.ndarray, classes: list[str]) -> pd.Categorical:
    names = list(classes) + ([UNKNOWN] if UNKNOWN not in classes else [])
    unknown_code = names.index(UNKNOWN)
    return pd.Categorical.from_codes(np.where(codes < 0, unknown_code, codes), categories=names)


def h5ad_safe(obj: Any) -> Any:
    """Make nested metadata writable to .h5ad (no None, homogeneous lists)."""
    if isinstance(obj, dict):
        return {str(k): h5ad_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        items = [h5ad_safe(v) for v in obj]
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in items):
            return np.asarray(items)
        if all(isinstance(v, str) for v in items):
            return np.asarray(items, dtype=object) if items else np.asarray([], dtype=str)
        if all(isinstance(v, dict) for v in items):
            return {str(i): v for i, v in enumerate(items)}
        return np.asarray([str(v) for v in items], dtype=object)
    if isinstance(obj, np.generic):
        return obj.item()
    for plain in (bool, int, float, str):  # exact types: h5py cannot write subclasses such as TorchVersion
        if isinstance(obj, plain):
            return plain(obj)
    return obj


class PredictionResult:
    """Predictions for every query cell at every level, plus coordinates and metadata.

    Attributes
    ----------
    obs_names
        Query cell names, in order.
    levels
        Per level: arrays ``code`` (final class code, -1 = Unknown), ``raw_code``,
        ``conf``, ``margin``, ``knn_code``, ``knn_vote_frac``, ``is_unknown``,
        ``is_low_conf``, ``used_knn``.
    coords
        Predicted coordinates per coordinate target (cells × dims).
    metadata
        Settings, gene overlap, input checks, versions and ``prediction_runtime``.
    """

    def __init__(
        self,
        obs_names: np.ndarray,
        classes: dict[str, list[str]],
        levels: dict[str, dict[str, np.ndarray]],
        coords: dict[str, np.ndarray],
        metadata: dict[str, Any],
        hierarchy: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.obs_names = pd.Index(obs_names)
        self.classes = classes
        self.levels = levels
        self.coords = coords
        self.metadata = metadata
        self.hierarchy = hierarchy or {}

    @property
    def label_columns(self) -> list[str]:
        return list(self.levels)

    @property
    def n_obs(self) -> int:
        return len(self.obs_names)

    def labels(self, level: str) -> pd.Categorical:
        """Final labels of one level (``Unknown`` where abstained)."""
        return _labels(self.levels[level]["code"], self.classes[level])

    def to_dataframe(self, mode: str = "minimal") -> pd.DataFrame:
        """The prediction table, one row per query cell.

        Parameters
        ----------
        mode
            ``"minimal"`` (``pred_<level>``), ``"standard"`` (also ``conf_``,
            ``margin_``, ``is_unknown_``) or ``"full"`` (also the network's raw
            label, the KNN label and vote fraction, and low-confidence / KNN-used flags).
        """
        if mode not in MODES:
            raise ParameterError(f"mode={mode!r} must be one of {MODES}.")
        columns: dict[str, Any] = {}
        for level, r in self.levels.items():
            names = column_names(level)
            for field in _MODE_FIELDS[mode]:
                if field == "pred":
                    value = self.labels(level)
                elif field == "raw":
                    value = _labels(r["raw_code"], self.classes[level])
                elif field == "knn":
                    value = _labels(r["knn_code"], self.classes[level])
                elif field == "knn_vote_frac":
                    value = r["knn_vote_frac"]
                else:
                    value = r[field]
                columns[names[field]] = value
        return pd.DataFrame(columns, index=self.obs_names.copy())

    def to_csv(self, path: str | os.PathLike, mode: str = "minimal") -> None:
        """Write :meth:`to_dataframe` to a CSV file (index = cell names)."""
        from .artifacts import atomic_write

        frame = self.to_dataframe(mode)
        atomic_write(Path(path), frame.to_csv(index_label="cell").encode())

    def own_columns(self) -> set[str]:
        return {c for level in self.levels for c in column_names(level).values()}

    def uns_entry(self) -> dict[str, Any]:
        return h5ad_safe(self.metadata)

    def to_adata(
        self, adata: ad.AnnData, mode: str = "minimal", include_coords: bool = False, copy: bool = False
    ) -> ad.AnnData:
        """Write predictions into ``adata.obs`` (and ``obsm``/``uns``) and return it.

        Earlier atlasmtl columns for the same levels are replaced; other columns are kept.

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
        """
        frame = self.to_dataframe(mode)
        if adata.n_obs != self.n_obs or not np.array_equal(np.asarray(adata.obs_names), np.asarray(self.obs_names)):
            raise InputError(
                f"The AnnData ({adata.n_obs} cells) is not the one these predictions were made for "
                f"({self.n_obs} cells, same names and order required)."
            )
        target = adata.copy() if copy else adata
        keep = [c for c in target.obs.columns if c not in self.own_columns()]
        obs = target.obs[keep].copy()
        for col in frame.columns:
            obs[col] = frame[col].values
        target.obs = obs
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
            As in :meth:`to_adata`.

        Notes
        -----
        For a file or backed AnnData the source file is copied byte for byte and
        only ``obs``, ``obsm`` and ``uns`` are rewritten, so memory does not
        grow with the size of the expression matrix.
        """
        import shutil
        import tempfile

        import h5py

        try:
            from anndata.io import read_elem, write_elem
        except ImportError:  # anndata < 0.11
            from anndata.experimental import read_elem, write_elem

        dest = Path(path)
        if isinstance(source, ad.AnnData) and not getattr(source, "isbacked", False):
            annotated = self.to_adata(source, mode=mode, include_coords=include_coords, copy=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.close(fd)
            try:
                annotated.write_h5ad(tmp)
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return dest
        src_path = Path(source.filename if isinstance(source, ad.AnnData) else source)
        if src_path.resolve() == dest.resolve():
            raise InputError(f"write_h5ad would overwrite its source {str(src_path)!r}; choose a new file name.")
        if isinstance(source, ad.AnnData):
            obs = source.obs
        else:
            with h5py.File(src_path, "r") as f:
                obs = read_elem(f["obs"])  # only obs: read_h5ad(backed="r") would load every layer
        if len(obs) != self.n_obs or not np.array_equal(np.asarray(obs.index), np.asarray(self.obs_names)):
            raise InputError(f"{str(src_path)!r} does not hold the cells these predictions were made for.")
        frame = self.to_dataframe(mode)
        new_obs = obs[[c for c in obs.columns if c not in self.own_columns()]].copy()
        for col in frame.columns:
            new_obs[col] = frame[col].values
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(src_path, tmp)
            with h5py.File(tmp, "r+") as f:
                del f["obs"]
                write_elem(f, "obs", new_obs)
                if include_coords:
                    for name, values in self.coords.items():
                        key = f"X_pred_{name}"
                        if key in f["obsm"]:
                            del f["obsm"][key]
                        write_elem(f["obsm"], key, values)
                if "atlasmtl" in f["uns"]:
                    del f["uns"]["atlasmtl"]
                write_elem(f["uns"], "atlasmtl", self.uns_entry())
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    def summary(self) -> dict[str, dict[str, Any]]:
        rt = self.metadata.get("prediction_runtime", {})
        genes = self.metadata.get("genes", {})
        per_level = {}
        for level, r in self.levels.items():
            per_level[level] = (
                f"unknown {r['is_unknown'].mean():.1%}, low-confidence {r['is_low_conf'].mean():.1%}, "
                f"KNN-corrected {r['used_knn'].mean():.1%}"
            )
        return {
            "query": {"cells": self.n_obs, "input": self.metadata.get("input", {}).get("semantics")},
            "genes": {
                "matched": f"{genes.get('n_matched')} / {genes.get('n_model_genes')} ({genes.get('overlap_fraction', 0):.1%})",
                "mapped by": genes.get("mapped_by"),
            },
            "levels": per_level,
            "runtime": {k: v for k, v in rt.items() if v is not None},
        }

    def show_resource_usage(self) -> None:
        """Print a compact, sectioned summary of the prediction run."""
        print(format_sections("atlasmtl prediction", self.summary()))

    def report(self, path: str | os.PathLike, **kwargs: Any) -> "os.PathLike":
        """Write a self-contained HTML mapping report; see :func:`atlasmtl.report.write_report`.

        Keyword arguments (``model=``, ``adata=``, ``truth=``, ``reference=``, ...) are passed on.
        """
        from .report import write_report

        return write_report(path, self, **kwargs)

    def __repr__(self) -> str:
        return f"PredictionResult({self.n_obs} cells; levels {self.label_columns}; coords {list(self.coords) or 'none'})"
