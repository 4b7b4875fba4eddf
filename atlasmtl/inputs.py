"""Reading expression matrices: where the values live, what they mean, and streaming them.

This is the first stage of the pipeline. It never densifies a whole
cells × genes matrix: rows are read in minibatches from in-memory sparse or
dense matrices, or from backed (on-disk) AnnData.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .exceptions import EmptyDataError, InputError, InvalidValuesError, MatrixSemanticsError, ParameterError, user_stacklevel
from .io import check_h5ad_groups, check_input_file, elem_io, unreadable_h5ad

#: What an expression matrix may hold, as detected by :func:`detect_semantics`.
SEMANTICS = ("counts", "lognorm", "scaled", "other")


@dataclass
class MatrixSource:
    """Row access to the expression matrix chosen from an AnnData.

    Attributes
    ----------
    matrix
        scipy CSR matrix, numpy array, or a backed (on-disk) dataset.
    var
        The gene table that goes with ``matrix`` (``adata.var`` or ``adata.raw.var``).
    where
        Human-readable location, e.g. ``"X"``, ``"layers['counts']"``, ``"raw.X"``.
    """

    matrix: Any
    var: pd.DataFrame
    where: str
    backed: bool = False
    notes: list[str] = field(default_factory=list)
    #: Gene names of ``adata.raw`` when ``matrix`` is ``X`` or a layer and the AnnData has a ``raw``: where a
    #: query's ``X`` lost genes that ``raw`` kept (``sc.pp.highly_variable_genes(subset=True)``), :func:`raw_hint`
    #: tells the user to pass ``use_raw=True``.
    raw_var_names: pd.Index | None = None
    #: ``(log base, factor)`` when the matrix holds log values of another base or of another per-cell total than
    #: log1p(CP10k) (:func:`lognorm_scale`): :meth:`rows` then returns ``log1p(factor · (base**x − 1))``;
    #: ``(SQRT_OF_COUNTS, None)`` when it holds square roots of counts (:func:`_sqrt_of_counts`).
    lognorm_fix: tuple[float | str, float | None] | None = None
    #: Column numbers of ``matrix`` that are read (``var`` holds only theirs), or ``None`` for all: the
    #: ``'Gene Expression'`` features of a 10x file whose ``var['feature_types']`` also marks antibody, peak or
    #: other features (:func:`gene_expression_only`).
    columns: np.ndarray | None = None
    #: The features :attr:`columns` leaves out, counted by ``feature_types`` (recorded with the semantics).
    left_out: dict[str, int] | None = None
    #: The AnnData's cell names, for the hint that a matrix holds genes as rows (:func:`atlasmtl.genes.build_aligner`).
    obs_names: pd.Index | None = None

    @property
    def n_obs(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def n_vars(self) -> int:
        return int(self.matrix.shape[1]) if self.columns is None else len(self.columns)

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    def rows(self, index: slice | np.ndarray) -> sp.csr_matrix | np.ndarray:
        """Rows as a CSR matrix (sparse input) or float array (dense input).

        On disk (``backed``), sorted row numbers that lie close together are read as one
        contiguous slice and subset in memory: one sequential read instead of many small ones.
        """
        if self.backed and isinstance(index, np.ndarray) and index.ndim == 1 and len(index) > 1 \
                and index.dtype.kind in "iu" and bool(np.all(index[1:] > index[:-1])):
            lo, hi = int(index[0]), int(index[-1]) + 1
            if hi - lo <= 2 * len(index) + 1024:
                whole = self.rows(slice(lo, hi))
                return whole if hi - lo == len(index) else whole[index - lo]
        try:
            block = self.matrix[index]
        except OSError as exc:  # h5py: a damaged chunk met while streaming a file
            if not self.backed:
                raise
            raise InputError(f"Could not read rows of {self.where} from the file ({exc}): the file may be damaged; "
                             "check it (e.g. h5py, or anndata.read_h5ad without backed) or write it again.") from exc
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            if self.columns is not None:
                block = block[:, self.columns]
            if block.dtype != np.float32:
                block = block.astype(np.float32)
            if block.has_sorted_indices and not block.has_canonical_format:
                # sorted, not canonical: duplicate entries, which add up (as scipy reads them) before any transform.
                # Unsorted rows are left as they are: finding duplicates there costs a sort of every block
                block = block.copy()
                block.sum_duplicates()
            return self.natural_log1p_cp10k(block)
        block = np.asarray(block, dtype=np.float32)
        return self.natural_log1p_cp10k(block if self.columns is None else block[:, self.columns])

    def natural_log1p_cp10k(self, block: Any) -> Any:
        """``block`` as log1p(CP10k) when :attr:`lognorm_fix` is set (a new array; the matrix is never changed).

        ``lognorm_fix = (base, factor)``: each value ``x`` becomes ``log1p(factor · (base**x − 1))``; with
        ``factor=None`` (log values of counts not normalised per cell) each row is scaled to ``TARGET_SUM``
        (row-local, so any chunking gives the same answer). With ``base`` :data:`SQRT_OF_COUNTS` the values are
        square roots of counts: ``x²``, each row scaled to ``TARGET_SUM``."""
        if self.lognorm_fix is None:
            return block
        base, factor = self.lognorm_fix
        out = block.copy() if sp.issparse(block) else np.array(block, dtype=np.float32)
        values = out.data if sp.issparse(out) else out
        if base == SQRT_OF_COUNTS:
            np.square(values, out=values)
        else:
            values *= np.float32(np.log(base))
            np.expm1(values, out=values)
        if factor is None:
            totals = np.asarray(out.sum(axis=1), dtype=np.float64).ravel()
            scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
            if sp.issparse(out):
                values *= np.repeat(scale, np.diff(out.indptr))
            else:
                values *= scale[:, None]
        else:
            values *= np.float32(factor)
        np.log1p(values, out=values)
        return out

    def iter_chunks(self, chunk_size: int) -> Iterator[tuple[int, int, Any]]:
        """Yield ``(start, stop, rows)`` over contiguous row chunks."""
        for start in range(0, self.n_obs, chunk_size):
            stop = min(start + chunk_size, self.n_obs)
            yield start, stop, self.rows(slice(start, stop))


def _stored_as_csc(what: str) -> InputError:
    """The error for a matrix on disk stored by column: reading a block of rows reads all of it, every block."""
    return InputError(
        f"{what} is stored on disk as CSC (by gene), so each block of cells read from it reads the whole matrix. "
        "Store it as CSR: a = anndata.read_h5ad(path); a.X = a.X.tocsr() (the same for the layer or raw.X you "
        "use); a.write_h5ad(new_path); or pass the AnnData read into memory (not backed)."
    )


#: The ``var['feature_types']`` value of genes in 10x files (Cell Ranger, ``sc.read_10x_h5(gex_only=False)``,
#: muon); the other values (``'Antibody Capture'``, ``'Peaks'``, ``'CRISPR Guide Capture'``, ...) are no genes.
GENE_EXPRESSION = "Gene Expression"


def gene_expression_only(source: MatrixSource) -> MatrixSource:
    """Keep only the ``'Gene Expression'`` features of a matrix whose ``var['feature_types']`` (10x Cell Ranger's
    column) also marks other features, e.g. antibody counts of CITE-seq or peaks of multiome, with a warning.

    Such features are no genes: read with the genes, their counts (often thousands per cell) would enter each
    cell's normalisation to counts per 10k and lower every gene's value. ``source`` is changed in place (the
    columns read and its ``var``; the matrix itself is never changed) and returned."""
    if "feature_types" not in source.var.columns:
        return source
    types = source.var["feature_types"].astype(str).to_numpy()
    genes = types == GENE_EXPRESSION
    if genes.all() or not genes.any():
        return source
    other = pd.Series(types[~genes]).value_counts()
    left_out = {str(k): int(v) for k, v in other.items()}
    examples = ", ".join(map(str, source.var.index[~genes][:3]))
    message = (
        f"adata.{source.where}: var['feature_types'] marks {int((~genes).sum())} of its {len(types)} features as no "
        f"genes ({', '.join(f'{k}: {v}' for k, v in left_out.items())}; e.g. {examples}). atlasmtl reads only the "
        f"{int(genes.sum())} '{GENE_EXPRESSION}' features, so that their counts do not enter each cell's "
        "normalisation. To read the genes alone without this warning, subset first: "
        f"adata = adata[:, adata.var['feature_types'] == '{GENE_EXPRESSION}'].copy() (sc.read_10x_h5 and "
        "sc.read_10x_mtx do so with their default gex_only=True).")
    source.notes.append(message)
    warnings.warn(message, UserWarning, stacklevel=user_stacklevel())
    source.columns = np.flatnonzero(genes)
    source.var = source.var.iloc[source.columns]
    source.left_out = left_out
    return source


def get_matrix_source(adata: ad.AnnData, layer: str | None = None, use_raw: bool = False) -> MatrixSource:
    """Pick ``X``, a layer, or ``raw.X`` from ``adata`` and check it is not empty."""
    backed = bool(getattr(adata, "isbacked", False))
    if backed and adata.file.is_open:  # a file without its gene table reads as 0 genes: say what is wrong with it
        check_h5ad_groups(adata.file, os.fspath(adata.filename))
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise EmptyDataError(
            f"The AnnData is empty ({adata.n_obs} cells × {adata.n_vars} genes); "
            "pass an AnnData with at least one cell and one gene."
        )
    if use_raw and layer is not None:
        raise ParameterError("Pass either layer= or use_raw=True, not both.")
    if use_raw:
        if adata.raw is None:
            raise InputError("use_raw=True but the AnnData has no .raw; pass use_raw=False or set adata.raw.")
        matrix, var, where = adata.raw.X, adata.raw.var, "raw.X"
    elif layer is not None:
        if layer not in adata.layers:
            raise InputError(
                f"layer={layer!r} is not in the AnnData; available layers: {list(adata.layers.keys())}."
            )
        matrix, var, where = adata.layers[layer], adata.var, f"layers[{layer!r}]"
    else:
        try:
            matrix, var, where = adata.X, adata.var, "X"
        except KeyError as exc:  # a backed file without an X group: h5py's own error otherwise
            raise InputError(f"{getattr(adata, 'filename', None) or 'The AnnData'!s} has no X; pass layer= or "
                             "use_raw=True to point at the expression values.") from exc
    if matrix is None:
        raise InputError(f"adata.{where} is None; pass layer= or use_raw=True to point at the expression values.")
    if backed and getattr(matrix, "format", None) == "csc":
        raise _stored_as_csc(f"{where} of {getattr(adata, 'filename', None) or 'the backed AnnData'!s}")
    notes: list[str] = []
    if sp.issparse(matrix) and not isinstance(matrix, (sp.csr_matrix, sp.csr_array)):
        notes.append(f"{where} was {type(matrix).__name__}; converted to CSR for row access (store CSR to save memory).")
        warnings.warn(notes[-1], stacklevel=user_stacklevel())
        matrix = sp.csr_matrix(matrix)
    if matrix.shape[1] == 0 or matrix.shape[0] == 0:
        raise EmptyDataError(f"adata.{where} is empty ({matrix.shape[0]} × {matrix.shape[1]}).")
    if sp.issparse(matrix) and matrix.indptr.dtype != matrix.indices.dtype:
        # scipy would cast the whole index array on every row slice; align the small indptr once
        # (a new matrix object sharing data and indices: the user's AnnData is not modified)
        matrix = sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr.astype(matrix.indices.dtype)),
                               shape=matrix.shape, copy=False)
    raw_names = adata.raw.var_names if not use_raw and adata.raw is not None else None
    return gene_expression_only(MatrixSource(matrix=matrix, var=var, where=where, backed=backed, notes=notes,
                                             raw_var_names=raw_names, obs_names=adata.obs_names))


def raw_hint(source: MatrixSource, genes: Any, n_matched: int | None = None) -> str:
    """A sentence telling the user to pass ``use_raw=True`` when ``adata.raw`` holds clearly more of ``genes``
    (by exact name) than the chosen matrix (by exact name, or ``n_matched`` when larger), e.g. after ``sc.pp.highly_variable_genes(
    subset=True)`` or ``sc.pp.filter_genes`` with ``raw`` set before; ``""`` otherwise."""
    if source.raw_var_names is None:
        return ""
    genes = pd.Index(genes)
    in_raw = int(pd.Index(source.raw_var_names).isin(genes).sum())
    n_matched = max(int(source.var_names.isin(genes).sum()), n_matched or 0)
    if in_raw < n_matched + max(10, 0.01 * len(genes)):
        return ""
    return (f" adata.raw holds {in_raw} of the model's {len(genes)} genes, adata.{source.where} only {n_matched}: "
            f"{source.where} looks cut to a subset of genes (e.g. sc.pp.highly_variable_genes(subset=True) or "
            "sc.pp.filter_genes after setting adata.raw). Pass use_raw=True (--use-raw on the command line) to read "
            "adata.raw.X, or the AnnData before the genes were cut.")


@contextlib.contextmanager
def _h5ad_file(path: str | os.PathLike) -> Iterator[tuple[Any, str]]:
    """``(h5py file, path string)`` of a checked ``.h5ad`` path, open for reading; closed on exit."""
    import h5py

    path = os.fspath(check_input_file(path))
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise unreadable_h5ad(path, exc) from exc
    try:
        check_h5ad_groups(f, path)
        yield f, path
    finally:
        f.close()


@contextlib.contextmanager
def h5ad_query_source(
    path: str | os.PathLike, layer: str | None = None, use_raw: bool = False
) -> Iterator[tuple[pd.Index, MatrixSource]]:
    """Open an ``.h5ad`` file for streaming: cell names, gene table and the chosen matrix only.

    Unlike ``anndata.read_h5ad(path, backed="r")``, which loads every layer
    into memory and keeps only ``X`` on disk, this reads just the cell names,
    the gene table and row chunks of the one matrix prediction needs.
    """
    read_elem, _, _ = elem_io()
    with _h5ad_file(path) as (f, path):
        try:
            obs_group = f["obs"]
            obs_names = pd.Index(read_elem(obs_group[obs_group.attrs["_index"]]), dtype=str)
        except Exception as exc:
            raise unreadable_h5ad(path, exc) from exc
        source = _h5ad_matrix(f, path, layer, use_raw, len(obs_names))
        source.obs_names = obs_names
        yield obs_names, source


@dataclass
class ReferenceTable:
    """What training reads of a reference file besides its matrix (:func:`h5ad_reference_source`).

    Attributes
    ----------
    obs
        The requested ``obs`` columns (labels), one row per cell, indexed by position.
    obsm
        The requested ``obsm`` entries (coordinate targets).
    obs_columns
        Every ``obs`` column in the file (for error messages).
    """

    obs: pd.DataFrame
    obsm: dict[str, Any]
    obs_columns: list[str]

    @property
    def n_obs(self) -> int:
        return len(self.obs)


#: Cell names hashed at once by the uniqueness check of :func:`h5ad_reference_source`.
_NAME_CHUNK = 1 << 18


def _names_unique(names: Any) -> bool:
    """True when the string dataset ``names`` (an ``.h5ad`` obs index) holds no name twice.

    The names are read and hashed in chunks (64 bits per cell are kept, not the strings);
    names whose hashes collide are then compared exactly.
    """
    n = len(names)
    hashes = np.empty(n, dtype=np.uint64)
    for start in range(0, n, _NAME_CHUNK):
        hashes[start : start + _NAME_CHUNK] = pd.util.hash_array(np.asarray(names[start : start + _NAME_CHUNK], dtype=object))
    order = np.argsort(hashes, kind="stable")
    same = hashes[order[1:]] == hashes[order[:-1]]
    if not same.any():
        return True
    suspects = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
    values = [names[int(i)] for i in suspects]
    return len(set(values)) == len(values)


def _read_obs_column(node: Any, read_elem: Any) -> Any:
    """One ``obs`` column of an ``.h5ad`` file; a plain string column is read in chunks into a categorical.

    Categorical and numeric columns are read as they are (codes or numbers). A plain string
    column would be a Python string per cell (tens of bytes each); read ``_NAME_CHUNK`` cells at
    a time and coded as it goes, it costs an integer code per cell.
    """
    import h5py

    if isinstance(node, h5py.Group) or node.dtype.kind != "O" or node.ndim != 1:
        return read_elem(node)
    codes = np.empty(len(node), dtype=np.int32)
    categories: dict[str, int] = {}
    strings = node.asstr()
    for start in range(0, len(node), _NAME_CHUNK):
        values, inverse = np.unique(np.asarray(strings[start : start + _NAME_CHUNK], dtype=object), return_inverse=True)
        lookup = np.array([categories.setdefault(v, len(categories)) for v in values], dtype=np.int32)
        codes[start : start + len(inverse)] = lookup[inverse.ravel()]
    return pd.Categorical.from_codes(codes, categories=list(categories))


@contextlib.contextmanager
def h5ad_reference_source(
    path: str | os.PathLike, layer: str | None = None, use_raw: bool = False, obsm_keys: Any = (),
    obs_keys: Any = (),
) -> Iterator[tuple[ReferenceTable, MatrixSource]]:
    """Open a reference ``.h5ad`` file for training from disk.

    Yields a :class:`ReferenceTable` holding only the ``obs`` columns named in
    ``obs_keys`` (the labels; names not in the file are left out) and the ``obsm``
    entries named in ``obsm_keys`` (coordinate targets), and the chosen matrix as a
    backed :class:`MatrixSource` whose rows are read per block. Nothing else is
    loaded (``anndata.read_h5ad(path, backed="r")`` would load every layer, and the
    cell names alone are tens of bytes per cell): the cell names are only checked to
    be unique, in chunks.
    """
    read_elem, _, _ = elem_io()
    with _h5ad_file(path) as (f, path):
        try:
            group = f["obs"]
            index_key = group.attrs["_index"]
            columns = [str(c) for c in group.attrs.get("column-order", []) if str(c) != index_key]
            obs = pd.DataFrame({k: _read_obs_column(group[k], read_elem) for k in obs_keys if k in columns},
                               index=pd.RangeIndex(group[index_key].shape[0]))
            obsm = {k: read_elem(f["obsm"][k]) for k in obsm_keys if "obsm" in f and k in f["obsm"]}
            unique = _names_unique(group[index_key])
        except Exception as exc:
            raise unreadable_h5ad(path, exc) from exc
        if not unique:
            raise InputError(f"Reference obs_names are not unique in {path!r}; call adata.obs_names_make_unique() "
                             "and write the file again.")
        source = _h5ad_matrix(f, path, layer, use_raw, len(obs))
        yield ReferenceTable(obs, obsm, columns), source


def _h5ad_matrix(f: Any, path: str, layer: str | None, use_raw: bool, n_obs: int) -> MatrixSource:
    """The matrix ``layer`` / ``raw.X`` / ``X`` of an open ``.h5ad`` file as a backed :class:`MatrixSource`."""
    import h5py

    read_elem, _, sparse_dataset = elem_io()
    if use_raw and layer is not None:
        raise ParameterError("Pass either layer= or use_raw=True, not both.")
    try:
        if use_raw:
            if "raw" not in f:
                raise InputError(f"use_raw=True but {path!r} has no raw; pass use_raw=False.")
            node, var, where = f["raw/X"], read_elem(f["raw/var"]), "raw.X"
        elif layer is not None:
            if "layers" not in f or layer not in f["layers"]:
                available = list(f["layers"].keys()) if "layers" in f else []
                raise InputError(f"layer={layer!r} is not in {path!r}; available layers: {available}.")
            node, var, where = f["layers"][layer], read_elem(f["var"]), f"layers[{layer!r}]"
        else:
            if "X" not in f:
                raise InputError(f"{path!r} has no X; pass layer= or use_raw=True.")
            node, var, where = f["X"], read_elem(f["var"]), "X"
        matrix = sparse_dataset(node) if isinstance(node, h5py.Group) else node
    except InputError:
        raise
    except Exception as exc:
        raise unreadable_h5ad(path, exc) from exc
    if n_obs == 0 or matrix.shape[1] == 0:
        raise EmptyDataError(
            f"{path!r} is empty ({matrix.shape[0]} cells × {matrix.shape[1]} genes); "
            "pass a file with at least one cell and one gene."
        )
    if node.attrs.get("encoding-type", "") == "csc_matrix":
        raise _stored_as_csc(f"{where} in {path!r}")
    raw_names = None
    if not use_raw and "raw" in f and "var" in f["raw"]:
        try:
            raw_var = f["raw/var"]
            raw_names = pd.Index(read_elem(raw_var[raw_var.attrs["_index"]]), dtype=str)
        except Exception:  # only for a hint: an unreadable raw is reported when use_raw=True reads it
            raw_names = None
    return gene_expression_only(MatrixSource(matrix=matrix, var=var, where=where, backed=True,
                                             raw_var_names=raw_names))


def _values_of(block: Any) -> np.ndarray:
    return block.data if sp.issparse(block) else np.asarray(block).ravel()


#: No expression measure reaches this in one cell and gene (a count of a trillion molecules); a larger value is
#: a corrupted or mis-scaled matrix (and above about 9.2e18 it overflows the integer counts the shift training draws).
MAX_EXPRESSION = 1e12


def check_finite(block: Any, where: str) -> None:
    """Raise :class:`InvalidValuesError` when ``block`` holds NaN or infinite values, or a value beyond
    ± :data:`MAX_EXPRESSION`."""
    values = _values_of(block)
    if not values.size:
        return
    high, low = values.max(), values.min()  # NaN propagates; no copy of the values
    if not (np.isfinite(high) and np.isfinite(low)):
        n_bad = int((~np.isfinite(values)).sum())
        raise InvalidValuesError(
            f"adata.{where} holds {n_bad} NaN or infinite value(s); remove or impute them "
            "(e.g. np.nan_to_num) before mapping."
        )
    if max(float(high), -float(low)) > MAX_EXPRESSION:
        n_bad = int((np.abs(values) > MAX_EXPRESSION).sum())
        extreme = float(high) if float(high) >= -float(low) else float(low)
        raise InvalidValuesError(
            f"adata.{where} holds {n_bad} value(s) beyond ±{MAX_EXPRESSION:.0e} (the most extreme {extreme:.3g}), "
            "larger than any expression measure: the matrix looks corrupted or mis-scaled. Check how it was made, "
            "or pass the raw counts (layer='counts', or use_raw=True where adata.raw holds them)."
        )


def validate_values(source: MatrixSource, chunk_size: int = 4096) -> tuple[float, float] | None:
    """Check the whole matrix for NaN/inf and return its ``(min, max)`` (a cheap pass; ``None`` for backed data,
    whose rows are checked as they are streamed, :func:`check_block`)."""
    if source.backed:
        return None
    m = source.matrix
    if sp.issparse(m) and source.columns is None:
        check_finite(m, source.where)
        data = m.data
        return (float(min(data.min(), 0.0)), float(data.max())) if data.size else (0.0, 0.0)
    low, high = np.inf, -np.inf
    for _, _, block in source.iter_chunks(chunk_size):
        check_finite(block, source.where)
        values = _values_of(block)
        if sp.issparse(block) and block.nnz < block.shape[0] * block.shape[1]:
            low = min(low, 0.0)  # the zeros a sparse block leaves out
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    return (low, high) if np.isfinite(low) else (0.0, 0.0)


#: The largest value log-normalised data reach (``log1p`` of any per-cell normalisation); above it a non-integer
#: matrix is read as linear values (``"other"``, :func:`detect_semantics`).
LOGNORM_MAX = 30.0


def _scaled_message(where: str, input_transform: str = "zscore") -> str:
    return (f"adata.{where} holds negative values: it looks scaled or centred (e.g. sc.pp.scale, "
            "sc.pp.regress_out or Pearson residuals), which "
            f"cannot be {'binarised' if input_transform == 'binary' else 'normalised'} meaningfully. "
            "Pass raw counts or log-normalised values instead: use_raw=True (--use-raw on the command line) if "
            "adata.raw holds them, or layer='counts' (--layer counts).")


def check_block(block: Any, where: str, semantics: str) -> None:
    """Check rows read after the matrix was judged on a sample (backed data, the training minibatches): no NaN or
    infinite value (:class:`InvalidValuesError`), no negative value (:class:`MatrixSemanticsError`, as
    :func:`check_semantics_usable`), and, in a matrix read as log-normalised, no value above
    :data:`LOGNORM_MAX` (:class:`InvalidValuesError`: counts or outliers among log values)."""
    check_finite(block, where)
    values = _values_of(block)
    if not values.size:
        return
    if values.min() < 0:
        raise MatrixSemanticsError(_scaled_message(where))
    if semantics == "lognorm" and values.max() > LOGNORM_MAX:
        raise InvalidValuesError(
            f"adata.{where} was read as log-normalised (its sampled rows stay at or below {LOGNORM_MAX:g}) but other "
            f"rows hold values up to {float(values.max()):g}: raw counts mixed with log values, or outliers. Pass one "
            "kind of matrix (layer='counts', or use_raw=True if adata.raw holds the log values) and fix the outliers."
        )


def sample_rows(source: MatrixSource, max_rows: int = 2048, n_chunks: int = 8) -> Any:
    """A few contiguous chunks spread over the matrix (cheap even when backed)."""
    n = source.n_obs
    if n <= max_rows:
        return source.rows(slice(0, n))
    per = max_rows // n_chunks
    starts = np.linspace(0, n - per, n_chunks).astype(int)
    blocks = [source.rows(slice(int(s), int(s) + per)) for s in starts]
    return sp.vstack(blocks, format="csr") if sp.issparse(blocks[0]) else np.vstack(blocks)


def pseudo_counts(block: Any, semantics: str) -> sp.csr_matrix:
    """Row block → integer-valued counts (CSR, float32).

    Counts stay as they are. Log-normalised values are mapped back with
    ``expm1`` and each cell is divided by its smallest non-zero value, which is
    one count in a per-cell normalised profile (exact for CP10k-style data
    where some gene has a single count; otherwise a close, depth-preserving
    approximation), then rounded.
    """
    out = sp.csr_matrix(block, dtype=np.float32, copy=True)
    out.eliminate_zeros()
    if semantics == "counts":
        return out
    if semantics == "lognorm":
        np.expm1(out.data, out=out.data)
    lengths = np.diff(out.indptr)
    nonempty = lengths > 0
    smallest = np.ones(out.shape[0], dtype=np.float32)
    if nonempty.any():
        smallest[nonempty] = np.minimum.reduceat(out.data, out.indptr[:-1][nonempty])
    smallest[smallest <= 0] = 1.0
    out.data /= np.repeat(smallest, lengths)
    np.maximum(np.round(out.data), 1.0, out=out.data)
    return out


def detect_semantics(source: MatrixSource, sample: Any = None,
                     extent: tuple[float, float] | None = None) -> dict[str, Any]:
    """Guess what the matrix holds: ``counts``, ``lognorm``, ``scaled`` or ``other``.

    Returns a dict with the verdict and the evidence (min, max, integer fraction).
    Negative values anywhere mean scaled/centred data; all-integer values mean
    counts; non-negative non-integer values up to :data:`LOGNORM_MAX` mean log-normalised data.
    ``sample``: the rows :func:`sample_rows` returns, when the caller has read them already;
    ``extent``: the whole matrix's ``(min, max)`` (:func:`validate_values`; else the sample's).
    """
    if sample is None:
        sample = sample_rows(source)
    values = _values_of(sample)
    check_finite(sample, source.where)
    if extent is not None:
        vmin, vmax = extent
    elif sp.issparse(source.matrix) and not source.backed and source.columns is None:
        data = source.matrix.data
        vmin = float(min(data.min(), 0.0)) if data.size else 0.0
        vmax = float(data.max()) if data.size else 0.0
    else:
        vmin = float(values.min()) if values.size else 0.0
        vmax = float(values.max()) if values.size else 0.0
        if sp.issparse(sample) and sample.nnz < sample.shape[0] * sample.shape[1]:
            vmin = min(vmin, 0.0)  # a sparse sample's stored values leave its zeros out
    nonzero = values[values != 0]
    integer_fraction = float(np.mean(np.equal(np.round(nonzero), nonzero))) if nonzero.size else 1.0
    if vmin < 0:
        kind = "scaled"
    elif integer_fraction > 0.999:
        kind = "counts"
    elif vmax <= LOGNORM_MAX:
        kind = "lognorm"
    else:
        kind = "other"
    return {
        "semantics": kind,
        "min": round(vmin, 4),
        "max": round(vmax, 4),
        "integer_fraction": round(integer_fraction, 4),
        "source": source.where,
    }


#: ``MatrixSource.lognorm_fix``'s base for square roots of counts (``sc.pp.sqrt``; :func:`_sqrt_of_counts`).
SQRT_OF_COUNTS = "sqrt"


def _sqrt_of_counts(sample: Any) -> bool:
    """Whether non-integer sampled rows are square roots of counts (``sc.pp.sqrt`` of a counts matrix): their
    squares are whole numbers as :func:`_log_of_counts` judges undone log values (every value of the row, in at
    least :data:`LOG_OF_COUNTS_SHARE` of the cells). Log values of counts, or square roots of counts normalised per
    cell, square to whole numbers only by chance."""
    squared = sp.csr_matrix(sample, dtype=np.float64)
    squared.eliminate_zeros()
    squared.data **= 2
    return _log_of_counts(squared)


#: Log bases tried on log-normalised values: natural (``sc.pp.log1p``), 2 and 10 (``sc.pp.log1p(base=...)``).
LOG_BASES = (float(np.e), 2.0, 10.0)
#: The per-cell total atlasmtl's log-normalised input is on (``log1p`` of counts per 10k).
TARGET_SUM = 1e4


def _whole_count_share(values: np.ndarray, indptr: np.ndarray, base: float) -> float:
    """Share of cells whose ``base**v − 1`` values, divided by the cell's smallest, are whole numbers (counts)."""
    linear = np.expm1(values.astype(np.float64) * np.log(base))
    lengths = np.diff(indptr)
    keep = lengths > 0
    if not keep.any():
        return 0.0
    smallest = np.minimum.reduceat(linear, indptr[:-1][keep])
    ratio = linear / np.repeat(smallest, lengths[keep])
    whole = np.abs(ratio - np.round(ratio)) < 0.01
    per_cell = np.add.reduceat(whole.astype(float), indptr[:-1][keep]) / lengths[keep]
    return float(np.mean(per_cell > 0.9))


def lognorm_scale(sample: Any) -> dict[str, Any]:
    """What a log-normalised matrix's sampled rows are the log of: the log base and, when every row sums to one
    total (``sc.pp.normalize_total`` over all genes: its default target, the median library size, or
    ``target_sum=1e6``), that total.

    The base is the one of :data:`LOG_BASES` under which most cells' values are whole multiples of their smallest
    (counts scaled per cell; natural unless another fits and the natural one does not). Returns
    ``{"log_base", "target_sum", "fix"}``: ``fix`` = ``(base, TARGET_SUM / total)`` when the values are not
    log1p(CP10k) and can be brought to it, else ``None``; ``target_sum`` is ``None`` when the rows' totals differ
    (a matrix cut to some genes), then only the base is changed.
    """
    block = sp.csr_matrix(sample, dtype=np.float32)
    block.eliminate_zeros()
    base = LOG_BASES[0]
    if block.nnz and _whole_count_share(block.data, block.indptr, base) < 0.5:  # other bases only where e fails
        shares = [_whole_count_share(block.data, block.indptr, b) for b in LOG_BASES[1:]]
        if max(shares) >= 0.9:
            base = LOG_BASES[1 + int(np.argmax(shares))]
    linear = block.copy()
    linear.data = np.expm1(linear.data.astype(np.float64) * np.log(base))
    totals = np.asarray(linear.sum(axis=1)).ravel()
    totals = totals[totals > 0]
    target = None
    if totals.size >= 2 and (totals.max() - totals.min()) <= 0.01 * np.median(totals):
        target = float(np.median(totals))
    factor = TARGET_SUM / target if target is not None and abs(target / TARGET_SUM - 1) > 0.01 else 1.0
    fix: tuple[float, float | None] | None = (base, factor) if base != LOG_BASES[0] or factor != 1.0 else None
    counts = target is None and _log_of_counts(linear)
    if counts:  # log1p of counts that were never normalised per cell: normalise each row as counts are
        fix = (base, None)
    return {"log_base": "e" if base == LOG_BASES[0] else int(base), "target_sum": target and round(target, 2),
            "fix": fix, "median_total": float(np.median(totals)) if totals.size else 0.0, "of_counts": counts}


#: Share of sampled cells whose undone log values must all be whole numbers for a matrix to be read as log values
#: of counts that were never normalised per cell (:func:`_log_of_counts`).
LOG_OF_COUNTS_SHARE = 0.9


def _log_of_counts(linear: sp.csr_matrix) -> bool:
    """Whether rows of undone log values (``base**x − 1``, no stored zeros; or squared square roots,
    :func:`_sqrt_of_counts`) are counts: in at least
    :data:`LOG_OF_COUNTS_SHARE` of the cells every value is a whole number (``sc.pp.log1p`` without
    ``sc.pp.normalize_total``; Seurat's SCTransform ``data`` slot, log1p of corrected counts). Counts normalised per
    cell are multiples of ``target / library size``, whole numbers only in the rare cell whose library divides the
    target (the tolerance is relative above 1,000: float32 log values keep about seven digits)."""
    lengths = np.diff(linear.indptr)
    keep = lengths > 0
    if keep.sum() < 2:
        return False
    starts = linear.indptr[:-1][keep]
    whole = np.abs(linear.data - np.round(linear.data)) < np.maximum(0.01, 1e-5 * linear.data)
    all_whole = np.add.reduceat(whole.astype(np.int64), starts) == lengths[keep]
    return float(np.mean(all_whole)) >= LOG_OF_COUNTS_SHARE


def check_semantics_usable(semantics: str, input_transform: str, where: str) -> None:
    """Refuse matrices the network cannot use (scaled/centred values)."""
    if semantics == "scaled":
        raise MatrixSemanticsError(_scaled_message(where, input_transform))


#: Below this share of zeros among the sampled values (and with at least :data:`DENOISED_MIN_GENES` genes), a
#: matrix of non-integer values is taken for denoised or imputed expression, with a warning
#: (:func:`_warn_if_denoised`). Measured single-cell counts and their log values are mostly zeros.
DENOISED_MAX_ZERO_SHARE = 0.05
DENOISED_MIN_GENES = 200


def _warn_if_denoised(source: MatrixSource, sample: Any) -> None:
    """Warn when non-integer values hold almost no zeros: denoised or imputed expression (scvi-tools'
    ``get_normalized_expression``, MAGIC, ...), which the model, trained on measured values, reads as another kind
    of data."""
    n_values = sample.shape[0] * sample.shape[1]
    if sample.shape[1] < DENOISED_MIN_GENES or not n_values:
        return
    nonzero = sample.count_nonzero() if sp.issparse(sample) else int(np.count_nonzero(sample))
    zero_share = 1.0 - nonzero / n_values
    if zero_share < DENOISED_MAX_ZERO_SHARE:
        warnings.warn(
            f"adata.{source.where} holds almost no zeros ({zero_share:.2%} of the sampled values): it looks denoised or "
            "imputed (e.g. scvi-tools' get_normalized_expression, MAGIC), not measured counts or their log values, and "
            "calls on it are less reliable. Pass the counts instead: layer='counts' (where scvi-tools keeps them) or "
            "use_raw=True.", UserWarning, stacklevel=user_stacklevel())


def checked_semantics(source: MatrixSource, input_transform: str, sample: Any = None) -> dict[str, Any]:
    """Check the values (NaN/inf), detect what they hold, and refuse what the network cannot use.

    The one entry point training and prediction share; returns :func:`detect_semantics`'s dict
    (``sample``: :func:`sample_rows`'s rows, when already read).
    """
    extent = validate_values(source)
    if sample is None:  # read once: detection, the denoised check and the log scale all use it
        sample = sample_rows(source)
    semantics = detect_semantics(source, sample, extent)
    if source.left_out:
        semantics["features_left_out"] = dict(source.left_out)
    check_semantics_usable(semantics["semantics"], input_transform, source.where)
    if input_transform != "binary" and np.dtype(getattr(source.matrix, "dtype", np.float32)) == np.bool_:
        warnings.warn(
            f"adata.{source.where} holds True/False values (e.g. adata.X > 0), not expression levels: atlasmtl reads "
            "each detected gene as one count, so every cell looks like a very shallow one. Pass the counts or "
            "log-normalised values (layer='counts', use_raw=True), or train and predict on such matrices with "
            "input_transform='binary'.",
            UserWarning, stacklevel=user_stacklevel())
    if semantics["semantics"] in ("lognorm", "other") and input_transform != "binary" and _sqrt_of_counts(sample):
        source.lognorm_fix = (SQRT_OF_COUNTS, None)  # read as the counts they are the square roots of
        semantics.update(semantics="lognorm", normalisation="square roots of counts (sc.pp.sqrt) brought to natural "
                         "log1p of counts per 1e4")
        return semantics
    if semantics["semantics"] in ("lognorm", "other"):
        _warn_if_denoised(source, sample)
    if semantics["semantics"] == "other" and input_transform != "binary":
        warnings.warn(
            f"adata.{source.where} holds non-integer values up to {semantics['max']:g}, above what log-normalised data "
            f"reach ({LOGNORM_MAX:g}): atlasmtl reads them as linear normalised values (e.g. TPM, or counts per 10k "
            "without log) and log-normalises them per cell. If the matrix holds log-normalised values with a few "
            "outliers, or log values and counts mixed, fix it or choose another (layer='counts', use_raw=True).",
            UserWarning, stacklevel=user_stacklevel())
    if semantics["semantics"] == "lognorm" and input_transform != "binary":
        scale = lognorm_scale(sample)
        semantics["log_base"], semantics["target_sum"] = scale["log_base"], scale["target_sum"]
        if scale["fix"] is not None:
            source.lognorm_fix = scale["fix"]
            semantics["normalisation"] = (
                f"log{'1p' if scale['log_base'] == 'e' else str(scale['log_base'])} values"
                + (f" of {scale['target_sum']:g} per cell" if scale["target_sum"] else "")
                + (" of counts not normalised per cell" if scale["of_counts"] else "")
                + " brought to natural log1p of counts per 1e4")
        elif scale["target_sum"] is None and scale["median_total"] > 1.5 * TARGET_SUM:
            warnings.warn(
                f"adata.{source.where} holds log-normalised values whose cells sum to about "
                f"{scale['median_total']:.3g} (median, after undoing the log), more than the {TARGET_SUM:g} per cell "
                "atlasmtl's log1p(CP10k) input holds (e.g. log1p of counts per million, over a subset of genes, so "
                "the total cannot be recovered; or not log values at all, e.g. a square root): the values are read as they are and calls will be off. Pass counts "
                "(layer='counts') or the whole matrix (use_raw=True), or normalise with "
                "sc.pp.normalize_total(adata, target_sum=1e4) before sc.pp.log1p.",
                UserWarning, stacklevel=user_stacklevel())
    return semantics
