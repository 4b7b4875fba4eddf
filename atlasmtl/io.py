"""File and plain-data helpers shared by every stage that reads or writes.

* opening ``.h5ad`` files (:func:`open_anndata`, :func:`read_h5ad`, :func:`read_h5ad_obs`);
* atomic writes (:func:`atomic_write` for bytes, :func:`atomic_path` for writers that want a path);
* plain-data conversion: :func:`to_plain` / :func:`from_plain` (model files hold no globals),
  :func:`h5ad_safe` (metadata writable to ``.h5ad``), :func:`from_h5ad` (metadata read back),
  :func:`to_json` (strict JSON for the command line).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import anndata as ad
import numpy as np
import pandas as pd

from .exceptions import InputError, UnsafeArtifactError

_ARRAY_TAG = "__atlasmtl_ndarray__"


# ---------------------------------------------------------------- reading .h5ad
def read_h5ad(path: str | os.PathLike, backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file (``backed=True``: read-only, matrix left on disk) with a clear error."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"No such file: {path!r}.")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # h5py raises many types for damaged files
        raise InputError(f"Could not read {path!r} as .h5ad ({type(exc).__name__}: {exc}).") from exc


def open_anndata(adata: ad.AnnData | str | os.PathLike) -> ad.AnnData:
    """Accept an AnnData or a path to an ``.h5ad`` file (opened backed, read-only)."""
    if isinstance(adata, ad.AnnData):
        return adata
    if isinstance(adata, (str, os.PathLike)):
        if not os.path.exists(adata):
            raise InputError(f"No such file: {os.fspath(adata)!r}. Pass an AnnData or the path of an existing .h5ad file.")
        return read_h5ad(adata, backed=True)
    raise InputError(f"Expected an AnnData or a path to an .h5ad file, got {type(adata).__name__}.")


def elem_io() -> tuple[Any, Any, Any]:
    """anndata's ``(read_elem, write_elem, sparse_dataset)`` across anndata versions."""
    try:
        from anndata.io import read_elem, sparse_dataset, write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem, sparse_dataset, write_elem
    return read_elem, write_elem, sparse_dataset


def read_h5ad_obs(path: str | os.PathLike) -> pd.DataFrame:
    """Only the ``obs`` table of an ``.h5ad`` file (``read_h5ad(backed="r")`` would load every layer)."""
    import h5py

    read_elem, _, _ = elem_io()
    with h5py.File(path, "r") as f:
        return read_elem(f["obs"])


# ---------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- plain data
def to_plain(obj: Any) -> Any:
    """Replace numpy arrays/scalars by plain values so a pickle needs no globals."""
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return [to_plain(v) for v in obj.tolist()]
        arr = np.ascontiguousarray(obj)
        return {_ARRAY_TAG: True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if obj is None:
        return None
    for plain in (bool, int, float, str, bytes):  # exact types: subclasses (e.g. TorchVersion) pickle as globals
        if isinstance(obj, plain):
            return plain(obj)
    return str(obj)


def from_plain(obj: Any) -> Any:
    """Inverse of :func:`to_plain`."""
    if isinstance(obj, dict):
        if obj.get(_ARRAY_TAG) is True:
            dtype = np.dtype(obj["dtype"])
            if dtype.hasobject:
                raise UnsafeArtifactError("An array in the model file declares an object dtype; refusing to load it.")
            return np.frombuffer(obj["data"], dtype=dtype).reshape(obj["shape"]).copy()
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    return obj


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


def from_h5ad(obj: Any) -> Any:
    """Metadata read back from .h5ad (numpy scalars and arrays) as plain Python values."""
    if isinstance(obj, Mapping):
        return {str(k): from_h5ad(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [from_h5ad(v) for v in obj.tolist()] if obj.ndim else obj.item()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def to_json(obj: Any) -> str:
    """Strict JSON (NaN → null; numpy values as plain numbers and lists)."""

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    def clean(o: Any) -> Any:
        if isinstance(o, float) and o != o:
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(json.loads(json.dumps(obj, default=default))), indent=2, allow_nan=False)
