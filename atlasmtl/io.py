"""File and plain-data helpers shared by every stage that reads or writes.

* opening ``.h5ad`` files (:func:`open_anndata`, :func:`read_h5ad`, :func:`read_h5ad_obs`), refusing
  damaged or incomplete ones by name (:func:`unreadable_h5ad`, :func:`check_h5ad_groups`);
* checking paths before use (:func:`check_input_file`, :func:`prepare_output`): ordinary
  operating-system conditions (empty path, a folder, a FIFO, no permission, a path under a
  regular file) become one clear atlasmtl error, and nothing blocks;
* atomic writes (:func:`atomic_write` for bytes, :func:`atomic_path` for writers that want a path),
  with the permissions the umask gives ordinary new files;
* plain-data conversion: :func:`to_plain` / :func:`from_plain` (model files hold no globals),
  :func:`h5ad_safe` (metadata writable to ``.h5ad``), :func:`from_h5ad` (metadata read back),
  :func:`to_json` (strict JSON for the command line).
"""

from __future__ import annotations

import contextlib
import json
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import anndata as ad
import numpy as np
import pandas as pd

from .exceptions import AtlasMTLError, InputError, OutputError, UnsafeArtifactError

_ARRAY_TAG = "__atlasmtl_ndarray__"


# ---------------------------------------------------------------- checking paths
def _home_shorthand(text: str) -> bool:
    """True for a path whose first part is ``~`` or ``~user`` and names no folder here: a shell shorthand, which
    atlasmtl (like anndata and h5py) does not expand."""
    first = Path(text).parts[0] if Path(text).parts else ""
    return first.startswith("~") and not Path(first).exists()


def check_input_file(path: str | os.PathLike, what: str = "file", error: type[Exception] = InputError) -> Path:
    """``path`` as a :class:`Path` if it names an existing regular file; else ``error`` saying why.

    Only ``stat`` is used, so a FIFO or device is refused without being opened
    (opening a FIFO with no writer would block forever).
    """
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise error(f"The {what} path is empty; give the path of an existing file.")
    try:
        info = os.stat(text)
    except FileNotFoundError:
        hint = f" ('~' is not expanded: pass os.path.expanduser({text!r}))" if _home_shorthand(text) else ""
        raise error(f"No such {what}: {text!r}{hint}.") from None
    except NotADirectoryError:
        raise error(f"No such {what}: {text!r} (a part of the path is a file, not a folder).") from None
    except OSError as exc:
        raise error(f"Cannot read the {what} {text!r}: {exc.strerror or exc}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"The {what} {text!r} is a folder; give the path of a file inside it.")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"The {what} {text!r} is not a regular file (a pipe, socket or device); save it to a file first.")
    if not os.access(text, os.R_OK):
        raise error(f"Cannot read the {what} {text!r}: permission denied.")
    return Path(text)


def prepare_output(path: str | os.PathLike, what: str = "output") -> Path:
    """Check that ``path`` can be written as a file and create its missing parent folders.

    Raises :class:`~atlasmtl.exceptions.OutputError` for an empty path, a path
    that starts with an unexpanded ``~`` (it would create a folder named ``~``),
    a path that is a folder, a path under a regular file, or a folder that is not
    writable; nothing is created in those cases.
    """
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise OutputError(f"The {what} path is empty; give a file name.")
    if _home_shorthand(text):
        raise OutputError(f"The {what} path {text!r} starts with '~', which is not expanded here (it would create a "
                          f"folder named {Path(text).parts[0]!r}); pass os.path.expanduser({text!r}).")
    target = Path(text)
    if target.is_dir():
        raise OutputError(f"The {what} path {text!r} is a folder; give a file name inside it.")
    existing = target.absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"Cannot write the {what} to {text!r}: {str(existing)!r} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write the {what} to {text!r}: the folder {str(existing)!r} is not writable.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, target, what) from exc
    return target


def output_error(exc: OSError, path: Path, what: str = "output") -> OutputError:
    """An :class:`OutputError` for an operating-system failure while writing ``path``."""
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EROFS: "read-only file system"}.get(exc.errno, exc.strerror or str(exc))
    return OutputError(f"Cannot write the {what} to {str(path)!r}: {reason}. Nothing was replaced.")


def file_mode() -> int:
    """Permission bits of an ordinary new file under this process's umask (``0o666 & ~umask``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read the umask the only portable way (set and restore)
    os.umask(mask)
    return 0o666 & ~mask


# ---------------------------------------------------------------- reading .h5ad
#: The groups every AnnData ``.h5ad`` file holds (anndata writes them even for an empty table), and what they are.
H5AD_GROUPS = {"obs": "the cell table", "var": "the gene table"}


#: File endings of other single-cell formats → how to read them into an AnnData (atlasmtl reads ``.h5ad`` files).
OTHER_FORMATS = {
    (".csv", ".csv.gz"): "a text table: read it with sc.read_csv(path) (add .T when genes are the rows)",
    (".tsv", ".tsv.gz", ".txt", ".txt.gz", ".tab"): "a text table: read it with sc.read_text(path) (add .T when "
                                                    "genes are the rows)",
    (".loom",): "a loom file: read it with sc.read_loom(path)",
    (".mtx", ".mtx.gz"): "a Matrix Market file: read it with sc.read_10x_mtx(folder) or sc.read_mtx(path)",
    (".h5",): "perhaps a 10x Genomics HDF5 file: read it with sc.read_10x_h5(path)",
    (".zarr",): "an AnnData zarr store: read it with anndata.read_zarr(path)",
    (".rds", ".rda", ".rdata", ".qs"): "an R object: convert it to .h5ad in R (zellkonverter for a "
                                        "SingleCellExperiment, SeuratDisk or sceasy for a Seurat object)",
}


def other_format_hint(path: str) -> str:
    """A sentence naming the format a file's ending suggests and how to read it (empty for ``.h5ad`` and others)."""
    name = os.fspath(path).lower().rstrip("/")
    for endings, how in OTHER_FORMATS.items():
        if name.endswith(endings):
            return (f" Its name suggests {how}, then pass the AnnData (or save it with adata.write_h5ad and pass "
                    "that file).")
    return ""


def unreadable_h5ad(path: str, exc: Exception) -> InputError:
    """The error for an ``.h5ad`` file that h5py or anndata cannot read (h5py raises many types for damaged files)."""
    hint = other_format_hint(path)
    if hint:
        return InputError(f"Could not read {path!r}: atlasmtl reads AnnData .h5ad files ({type(exc).__name__}: "
                          f"{exc}).{hint}")
    return InputError(f"Could not read {path!r} as .h5ad ({type(exc).__name__}: {exc}). The file may be cut short "
                      "(an interrupted copy or write) or not an .h5ad; write it again with adata.write_h5ad(path).")


def check_h5ad_groups(f: Any, path: str) -> None:
    """Refuse an open ``.h5ad`` file (an ``h5py.File``, or a backed AnnData's ``adata.file``) that lacks a group of
    :data:`H5AD_GROUPS`, with an :class:`~atlasmtl.exceptions.InputError` naming it.

    anndata reads a file without its ``var`` group as one of 0 genes (backed) or of genes named ``0``, ``1`` ...
    (in memory), so the problem would surface later as an empty or unmatched dataset.
    """
    missing = [name for name in H5AD_GROUPS if name not in f]
    if missing:
        parts = " and ".join(f"{name!r} ({H5AD_GROUPS[name]})" for name in missing)
        hint = other_format_hint(path)
        if hint:
            raise InputError(f"{path!r} is not an AnnData .h5ad file: it has no {parts} group.{hint}")
        raise InputError(f"{path!r} is incomplete or not an AnnData .h5ad file: it has no {parts} group. Write it "
                         "again with adata.write_h5ad(path) from the AnnData it was made from (an interrupted copy "
                         "or write leaves a file incomplete).")


def read_h5ad(path: str | os.PathLike, backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file (``backed=True``: read-only, matrix left on disk) with a clear error.

    A file that is not HDF5, is cut short, or lacks a group every ``.h5ad`` holds (:data:`H5AD_GROUPS`) is an
    :class:`~atlasmtl.exceptions.InputError` saying so.
    """
    import h5py

    path = os.fspath(check_input_file(path))
    try:
        with h5py.File(path, "r") as f:
            check_h5ad_groups(f, path)
        return ad.read_h5ad(path, backed="r" if backed else None)
    except InputError:
        raise
    except Exception as exc:
        raise unreadable_h5ad(path, exc) from exc


def open_anndata(adata: ad.AnnData | str | os.PathLike) -> ad.AnnData:
    """Accept an AnnData or a path to an ``.h5ad`` file (opened backed, read-only)."""
    if isinstance(adata, ad.AnnData):
        return adata
    if isinstance(adata, (str, os.PathLike)):
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
    path = os.fspath(path)
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise unreadable_h5ad(path, exc) from exc
    with f:
        check_h5ad_groups(f, path)
        return read_elem(f["obs"])


# ---------------------------------------------------------------- atomic writes
def temp_file_beside(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """A new hidden file beside ``path`` (``.<name>.<random><suffix>``), open for writing, with :func:`file_mode`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; give what an ordinary new file gets
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "output") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    The path is checked first (:func:`prepare_output`); operating-system
    failures become :class:`~atlasmtl.exceptions.OutputError`, and an existing
    ``path`` is left as it was.
    """
    path = prepare_output(path, what)
    try:
        fd, tmp = temp_file_beside(path)
    except OSError as exc:
        raise output_error(exc, path, what) from exc
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # writers such as h5py recreate the file
        os.replace(tmp, path)
    except OSError as exc:
        if isinstance(exc, AtlasMTLError):
            raise
        raise output_error(exc, path, what) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: bytes, what: str = "output") -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename (see :func:`atomic_path`)."""
    path = prepare_output(path, what)
    tmp = None
    try:
        fd, tmp = temp_file_beside(path)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise output_error(exc, path, what) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- prediction tables
TABLE_SEPARATORS = {".csv": ",", ".tsv": "\t"}
TABLE_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zip": "zip"}


def table_format(path: str | os.PathLike, strict: bool = True) -> tuple[str, str | None]:
    """The separator and compression a table's file name asks for, as pandas reads them back.

    ``.csv`` is comma-separated, ``.tsv`` tab-separated; a further ``.gz``, ``.bz2``,
    ``.xz`` or ``.zip`` compresses the file (``predictions.csv.gz``), as :func:`pandas.read_csv`
    infers from the name. Another name (``.parquet``, ``.h5ad``, none) is an ``OutputError`` when
    ``strict`` (a file is never written in another format than its name says), else read as CSV.
    """
    if strict and not os.fspath(path).strip():
        raise OutputError("The predictions path is empty; give a file name such as 'predictions.csv'.")
    suffixes = [s.lower() for s in Path(os.fspath(path)).suffixes]
    compression = TABLE_COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression is not None:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in TABLE_SEPARATORS:
        return TABLE_SEPARATORS[suffixes[-1]], compression
    if strict:
        raise OutputError(
            f"{os.fspath(path)!r}: a prediction table is written as text, so its name must end in .csv or .tsv "
            f"(optionally followed by .gz, .bz2, .xz or .zip). For an AnnData use write_h5ad or to_adata; "
            f"for another format write to_dataframe() yourself (e.g. result.to_dataframe().to_parquet(path)).")
    return ",", compression


def read_prediction_table(path: str | os.PathLike) -> pd.DataFrame:
    """Predictions written by ``to_csv`` / ``atlasmtl predict --out x.csv`` (a CSV/TSV read as text) or by
    ``write_h5ad`` / ``--out x.h5ad`` (only its ``obs``: the matrix is never read), indexed by cell name."""
    check_input_file(path, "predictions file")
    if Path(os.fspath(path)).suffix.lower() == ".h5ad":
        return read_h5ad_obs(path)
    return read_text_table(path, "prediction table")


def read_text_table(path: str | os.PathLike, what: str = "table", missing_as_nan: bool = False) -> pd.DataFrame:
    """A CSV/TSV file (separator and compression from its name, :func:`table_format`) as text, indexed by
    its first column.

    Every value is read as written, so cell and class names such as ``"0001"`` or ``"NA"`` stay
    themselves; with ``missing_as_nan`` an empty field is NaN (a missing label), else ``""``. A file
    that cannot be read as a table is an :class:`~atlasmtl.exceptions.InputError` naming ``what``.
    """
    where = os.fspath(path)
    sep = table_format(where, strict=False)[0]
    try:
        table = pd.read_csv(where, sep=sep, dtype=str, keep_default_na=False, na_values=[""] if missing_as_nan else None)
        return table.set_index(table.columns[0])  # index_col would parse it
    except Exception as exc:
        raise InputError(f"Could not read {where!r} as a {what} ({' '.join(str(exc).split()) or type(exc).__name__}).") from exc


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


#: Deepest nesting :func:`from_plain` accepts (atlasmtl's own files nest about 5 deep).
MAX_PLAIN_DEPTH = 64


def from_plain(obj: Any) -> Any:
    """Inverse of :func:`to_plain`, for data read from a file: flat and bounded.

    A pickle can make one object appear many times (shared references), so a
    few kilobytes can describe a structure that grows exponentially when it is
    copied out. atlasmtl never writes shared containers, so any list, dict or
    bytes object met twice, or nesting deeper than :data:`MAX_PLAIN_DEPTH`, is
    refused with :class:`~atlasmtl.exceptions.UnsafeArtifactError`; the decoded
    data is then no larger than the file.
    """
    seen: set[int] = set()

    def visit(node: Any, depth: int) -> Any:
        if isinstance(node, (dict, list, bytes, bytearray)):
            if id(node) in seen:
                raise UnsafeArtifactError(
                    "The model file repeats an object by reference (shared references), which atlasmtl never "
                    "writes and which can expand without bound when read; refusing it."
                )
            seen.add(id(node))
        if depth > MAX_PLAIN_DEPTH:
            raise UnsafeArtifactError(
                f"The model file nests data deeper than {MAX_PLAIN_DEPTH} levels, which atlasmtl never writes; refusing it."
            )
        if isinstance(node, dict):
            if node.get(_ARRAY_TAG) is True:
                dtype = np.dtype(node["dtype"])
                if dtype.hasobject:
                    raise UnsafeArtifactError("An array in the model file declares an object dtype; refusing to load it.")
                data = node["data"]
                if isinstance(data, (bytes, bytearray)):
                    visit(data, depth + 1)
                return np.frombuffer(data, dtype=dtype).reshape(node["shape"]).copy()
            return {k: visit(v, depth + 1) for k, v in node.items()}
        if isinstance(node, list):
            return [visit(v, depth + 1) for v in node]
        return node

    return visit(obj, 0)


def h5ad_safe(obj: Any) -> Any:
    """Make nested metadata writable to .h5ad (no None, homogeneous lists)."""
    if isinstance(obj, dict):
        return {str(k): h5ad_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        items = [h5ad_safe(v) for v in obj]
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in items):
            return np.asarray(items)
        if items and all(isinstance(v, (bool, np.bool_)) for v in items):
            return np.asarray(items, dtype=bool)
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
