"""The reference, checked and encoded for training: labels, coordinates, cells and genes.

:func:`prepare_reference` runs the checks :func:`atlasmtl.predict` runs on a query
(values, semantics), encodes each annotation level's labels (:func:`encode_labels`),
reads the coordinate targets, and picks the cells and the genes the network reads
(:func:`~atlasmtl.genes.reference_gene_statistics`) in one streamed read of the matrix.
The result, a :class:`Reference`, is everything the training loop
(:mod:`atlasmtl.training_loop`) and :func:`atlasmtl.training.describe` read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .calls import UNKNOWN, check_writeback_names, whole_number_text
from .exceptions import CoordinateError, EmptyDataError, InputError, LabelError, ParameterError, user_stacklevel
from .hierarchy import infer_hierarchy
from .genes import GeneAligner, reference_gene_statistics, selection_aligner
from .inputs import MatrixSource, ReferenceTable, check_block, checked_semantics, get_matrix_source
from .knn import row_number_dtype
from . import distributed as _dist


#: Class names refused at training: text that pandas reads as a missing value (its default ``na_values``), which
#: is also what ``astype(str)`` makes of NaN and None.
MISSING_LABEL_NAMES = frozenset({"", "nan", "NaN", "-nan", "-NaN", "NA", "N/A", "n/a", "#N/A", "#N/A N/A", "#NA",
                                 "<NA>", "NULL", "null", "None", "NaT", "1.#IND", "-1.#IND", "1.#QNAN", "-1.#QNAN"})


def encode_labels(adata: ad.AnnData | ReferenceTable, label_columns: Sequence[str]) -> tuple[dict[str, list[str]], np.ndarray, dict]:
    """Integer codes (n_cells × n_levels, int32, -1 = unlabelled) and class names per level."""
    if isinstance(label_columns, str):
        label_columns = [label_columns]
    if not label_columns:
        raise LabelError("label_columns is empty; name at least one obs column holding reference labels.")
    if len(set(label_columns)) != len(label_columns):
        raise LabelError(f"label_columns={list(label_columns)} names a column twice.")
    classes: dict[str, list[str]] = {}
    codes = np.full((adata.n_obs, len(label_columns)), -1, dtype=np.int32)  # 4 bytes per cell and level
    unlabelled: dict[str, int] = {}
    for j, col in enumerate(label_columns):
        if col not in adata.obs.columns:
            available = adata.obs_columns if isinstance(adata, ReferenceTable) else list(adata.obs.columns)
            raise LabelError(
                f"Label column {col!r} is not in adata.obs; available columns: {available[:20]}."
            )
        values = adata.obs[col]
        missing = values.isna().to_numpy()
        if missing.all():
            raise LabelError(f"Label column {col!r} holds no labels (all values are NaN); fill it or drop the level.")
        if isinstance(values.dtype, pd.CategoricalDtype):  # from its codes: no string per cell
            level_codes, names = _categorical_codes(values.cat.codes.to_numpy(), values.cat.categories)
        else:
            whole = whole_number_text(values.to_numpy()[~missing]) if values.dtype.kind == "f" else None
            if whole is not None:  # integer codes read as floats because of the NaN: "1", not "1.0"
                text = np.full(len(values), np.nan, dtype=object)
                text[~missing] = whole
                cat = pd.Categorical(text)
            else:
                cat = pd.Categorical(values.astype(str).where(~missing))
            level_codes, names = cat.codes, [str(c) for c in cat.categories]
            if values.dtype == object:
                n_values = len(pd.unique(values[~missing]))
                if n_values > len(names):
                    warnings.warn(
                        f"Label column {col!r} holds {n_values} distinct values that read as {len(names)} labels: values "
                        "of different types with the same text (e.g. the number 1 and the text '1') are one class. "
                        "Give the column one type if they are different classes.",
                        UserWarning, stacklevel=user_stacklevel())
        padded: dict[str, list[str]] = {}
        for n in names:
            padded.setdefault(n.strip(), []).append(n)
        padded = {k: v for k, v in padded.items() if len(v) > 1}
        if padded:
            example = next(iter(padded.values()))
            warnings.warn(
                f"Label column {col!r} has classes that differ only by surrounding spaces ({len(padded)} such group(s), "
                f"e.g. {example}); they are trained as different classes, and the levels may then not nest. Strip the "
                f"labels (adata.obs[{col!r}] = adata.obs[{col!r}].str.strip()) if they are the same.",
                UserWarning, stacklevel=user_stacklevel())
        if UNKNOWN in names:
            raise LabelError(
                f"Label column {col!r} has a class named {UNKNOWN!r}, which atlasmtl reserves for the cells it "
                f"abstains on. Rename the class (e.g. 'Unassigned') or set those cells' label to NaN so they do "
                "not count for this level."
            )
        like_unknown = [n for n in names if n != UNKNOWN and n.strip().lower() == UNKNOWN.lower()]
        if like_unknown:
            raise LabelError(
                f"Label column {col!r} has a class named {like_unknown[0]!r}, which reads as atlasmtl's {UNKNOWN!r} "
                "(the cells it abstains on). Rename the class or set those cells' label to NaN."
            )
        like_missing = [n for n in names if n.strip() in MISSING_LABEL_NAMES]
        if like_missing:
            n_cells = int(np.isin(level_codes, [names.index(n) for n in like_missing]).sum())
            raise LabelError(
                f"Label column {col!r} has classes named like a missing value: {like_missing} ({n_cells} cells). Such "
                "labels are usually NaN turned into text (astype(str)), and a table of predictions reads them back "
                "as missing. Set those cells' label to NaN (they then do not count for this level) or rename the class."
            )
        if len(names) < 2:
            raise LabelError(
                f"Label column {col!r} has a single class ({names[0]!r}); a classifier needs at least two. "
                "Drop this level or use a finer annotation."
            )
        classes[col] = names
        codes[:, j] = level_codes
        unlabelled[col] = int(missing.sum())
    return classes, codes, unlabelled


def _categorical_codes(codes: np.ndarray, categories: pd.Index) -> tuple[np.ndarray, list[str]]:
    """Codes and class names of a categorical label column, as ``pd.Categorical(values.astype(str))`` gives them
    (the categories in use, as strings, sorted; -1 = missing), computed from its codes."""
    used = np.flatnonzero(np.bincount(codes[codes >= 0], minlength=len(categories)))
    whole = whole_number_text(np.asarray(categories[used]))
    text = whole if whole is not None else np.array([str(c) for c in categories[used]], dtype=object)
    names, inverse = np.unique(text, return_inverse=True)
    lookup = np.full(len(categories), -1, dtype=np.int32)
    lookup[used] = inverse.ravel()
    return np.where(codes >= 0, lookup[np.maximum(codes, 0)], -1), [str(c) for c in names]


def _numeric_coordinates(values: Any, what: str) -> np.ndarray:
    """Coordinates (cells × dims) as float64, from an array, a DataFrame or a sparse matrix."""
    if sp.issparse(values):
        values = values.toarray()  # cells × a few dimensions: small
    try:
        return np.asarray(values.to_numpy() if isinstance(values, pd.DataFrame) else values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CoordinateError(f"{what} does not hold numbers ({exc}); pass a numeric cells × dims array.") from None


def _coordinate_targets(adata: ad.AnnData | ReferenceTable, coord_targets: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    if coord_targets is None:
        return {}
    if not isinstance(coord_targets, Mapping):
        raise ParameterError("coord_targets must be a dict of name → obsm key, e.g. {'umap': 'X_umap'}.")
    out = {}
    for name, key in coord_targets.items():
        if isinstance(key, str):
            if key not in adata.obsm:
                # scanpy names obsm keys X_<basis>: 'umap' or 'X_UMAP' for 'X_umap' is the likely slip
                near = [k for k in adata.obsm.keys() if str(k).lower() in (key.lower(), f"x_{key.lower()}")]
                raise CoordinateError(
                    f"coord_targets[{name!r}] = {key!r} is not in adata.obsm; available keys: {list(adata.obsm.keys())}."
                    + (f" Did you mean {near[0]!r}?" if near else "")
                )
            values = _numeric_coordinates(adata.obsm[key], f"coord_targets[{name!r}] = adata.obsm[{key!r}]")
        else:
            values = _numeric_coordinates(key, f"coord_targets[{name!r}]")
        if values.ndim != 2 or values.shape[0] != adata.n_obs:
            raise CoordinateError(
                f"coord_targets[{name!r}] has shape {values.shape}; it needs one row per cell ({adata.n_obs} rows)."
            )
        if values.shape[1] == 0:
            raise CoordinateError(
                f"coord_targets[{name!r}] has no columns (shape {values.shape}); give an embedding with at least one "
                "dimension, e.g. obsm['X_umap']."
            )
        if not np.isfinite(values).all():
            raise CoordinateError(
                f"coord_targets[{name!r}] holds NaN or infinite values; compute the embedding for every cell first."
            )
        out[str(name)] = values
    return out


@dataclass
class ReferenceOnDisk:
    """A reference file opened for training from disk: its labels (``table``) and its matrix (``source``)."""

    table: ReferenceTable
    source: MatrixSource


@dataclass
class Reference:
    """The reference, checked and encoded: everything the fit loop and :func:`describe` read.

    Attributes
    ----------
    source
        The expression matrix (rows streamed per minibatch).
    semantics
        What the matrix holds (:func:`~atlasmtl.inputs.detect_semantics`), plus how it is normalised.
    aligner
        The reference's own gene aligner (identity order) carrying the input transform.
    label_columns, classes, codes
        Levels, class names per level, integer codes (cells × levels, -1 = unlabelled).
    unlabelled
        Cells without a label, per level.
    coords, coord_stats
        Coordinate targets (cells × dims) and their mean / std over the used cells.
    cells, dropped
        Cells with a label at some level (the ones used), and how many were dropped.
    genes
        Columns of ``source`` the network reads (sorted; every column unless ``n_top_genes`` selected
        fewer): the model's genes. :attr:`aligner` takes them from each row after normalising it over
        all its genes.
    hierarchy
        Child → parent label for each level that nests in the one before (:func:`~atlasmtl.hierarchy.infer_hierarchy`).
    """

    source: MatrixSource
    semantics: dict[str, Any]
    aligner: GeneAligner
    label_columns: list[str]
    classes: dict[str, list[str]]
    codes: np.ndarray
    unlabelled: dict[str, int]
    coords: dict[str, np.ndarray]
    coord_stats: dict[str, dict[str, np.ndarray]]
    cells: np.ndarray
    dropped: int
    genes: np.ndarray
    hierarchy: dict[str, dict[str, str]]

    @property
    def n_genes(self) -> int:
        """Network input width: the model's genes."""
        return int(len(self.genes))

    def standardised_coords(self) -> dict[str, np.ndarray]:
        """Coordinate targets standardised with :attr:`coord_stats` (what the coordinate heads learn)."""
        return {n: ((v - self.coord_stats[n]["mean"]) / self.coord_stats[n]["std"]).astype(np.float32)
                for n, v in self.coords.items()}


def prepare_reference(
    adata: ad.AnnData | ReferenceTable,
    label_columns: Sequence[str] | str,
    coord_targets: Mapping[str, Any] | None,
    *,
    layer: str | None,
    use_raw: bool,
    input_transform: str,
    source: MatrixSource | None = None,
    n_top_genes: int | None = None,
    gene_selection: str = "variable",
) -> Reference:
    """Check the reference, encode its labels and coordinates and pick the cells and genes to train on.

    ``source`` is the expression matrix when it was opened apart from ``adata`` (a
    reference file read from disk, :func:`~atlasmtl.inputs.h5ad_reference_source`, whose
    labels and coordinates come as a :class:`~atlasmtl.inputs.ReferenceTable`).

    The matrix checks (values, semantics) are the ones :func:`atlasmtl.predict` runs on a query.
    With ``n_top_genes`` below the number of genes, the model keeps the reference's ``n_top_genes``
    most variable genes (:func:`~atlasmtl.genes.highly_variable_genes`, on the labelled cells), or
    with ``gene_selection="variable+labels"`` three quarters of them and a quarter the genes that tell
    the finest level's labels apart (:func:`~atlasmtl.genes.reference_gene_statistics`).
    """
    if source is None:
        source = get_matrix_source(adata, layer=layer, use_raw=use_raw)
    if isinstance(adata, ad.AnnData) and not adata.obs_names.is_unique:  # a ReferenceTable's were checked on reading
        raise InputError("Reference obs_names are not unique; call adata.obs_names_make_unique() first.")
    if not source.var_names.is_unique:
        raise InputError("Reference var_names are not unique; call adata.var_names_make_unique() first.")
    label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    if not all(isinstance(c, str) for c in label_columns):
        raise LabelError(f"label_columns={label_columns!r} must be obs column names (strings).")
    label_columns = [str(c) for c in label_columns]  # NumPy strings (np.array([...])) would not load back from a file
    if coord_targets is not None and not isinstance(coord_targets, Mapping):
        raise ParameterError("coord_targets must be a dict of name → obsm key, e.g. {'umap': 'X_umap'}.")
    check_writeback_names(label_columns, [str(n) for n in (coord_targets or {})])
    classes, codes, unlabelled = encode_labels(adata, label_columns)
    hierarchy = infer_hierarchy(label_columns, classes, codes, warn=True)  # says now why levels meant to nest do not
    coords = _coordinate_targets(adata, coord_targets)
    semantics = checked_semantics(source, input_transform)
    if input_transform != "binary" and semantics["semantics"] == "counts":
        semantics["normalisation"] = "total counts scaled to 1e4 per cell, then log1p" + (
            ", then each gene standardised (reference mean and std, clipped to ±10)" if input_transform == "zscore" else "")

    has_label = (codes >= 0).any(axis=1)
    cells = np.flatnonzero(has_label).astype(row_number_dtype(len(has_label)))
    dropped = int((~has_label).sum())
    if dropped:
        warnings.warn(f"{dropped} reference cell(s) have no label at any level and were dropped.", stacklevel=user_stacklevel())
    for col, n in unlabelled.items():
        if n and n > dropped:
            warnings.warn(
                f"{n} reference cell(s) have no label in {col!r}; they are not used for that level's loss.",
                stacklevel=user_stacklevel(),
            )

    for j, col in enumerate(label_columns):
        counts = np.bincount(codes[cells, j][codes[cells, j] >= 0], minlength=len(classes[col]))
        tiny = [f"{classes[col][i]!r}: {int(counts[i])}" for i in np.flatnonzero(counts < TINY_CLASS_CELLS)]
        if tiny:
            warnings.warn(
                f"{col!r} has {len(tiny)} class(es) with fewer than {TINY_CLASS_CELLS} reference cells ("
                + ", ".join(tiny[:8]) + (", ..." if len(tiny) > 8 else "") + "): the network rarely calls such a "
                "class and the KNN vote cannot confirm it. Merge them into a related class, or label those cells NaN "
                "at this level, if their calls matter.", stacklevel=user_stacklevel())

    empty = empty_cells(source, cells)
    if empty is not None:
        _check_empty_cells(empty, len(cells), source.where)
    read_empty = [0]  # a backed reference: counted while the gene statistics read it

    def count_empty(block: Any) -> None:
        read_empty[0] += empty_rows(block)

    coord_stats = {}
    for name, values in coords.items():
        mean = values[cells].mean(axis=0)
        std = values[cells].std(axis=0)
        std[std == 0] = 1.0
        coord_stats[name] = {"mean": mean.astype(np.float64), "std": std.astype(np.float64)}
    # under torchrun each rank reads its share of the cells and the per-gene sums are combined
    share = cells[_dist.shard_slice(len(cells))] if _dist.is_distributed() else cells
    reduce = _dist.all_reduce_sum if _dist.is_distributed() else None
    # one read of the reference ranks its genes and standardises the kept ones
    by_labels = gene_selection == "variable+labels"
    genes, gene_mean, gene_std = reference_gene_statistics(
        source, semantics["semantics"], share, n_top_genes, input_transform, reduce=reduce,
        labels=codes[share, -1] if by_labels else None, n_labels=len(classes[label_columns[-1]]) if by_labels else 0,
        on_block=count_empty if empty is None else None)
    if empty is None and (gene_mean is not None or len(genes) < source.n_vars):  # the statistics read every cell
        if reduce is not None:  # each process read its share
            read_empty[0] = int(round(reduce(np.array([read_empty[0]], dtype=np.float64))[0]))
        _check_empty_cells(read_empty[0], len(cells), source.where)
    aligner = selection_aligner(source.n_vars, genes, input_transform, semantics["semantics"])
    aligner.gene_mean, aligner.gene_std = gene_mean, gene_std
    return Reference(source, semantics, aligner, label_columns, classes, codes, unlabelled, coords, coord_stats,
                     cells, dropped, genes, hierarchy)


#: Classes with fewer labelled reference cells than this get a warning at training (they are rarely called).
TINY_CLASS_CELLS = 3


def _check_empty_cells(empty: int, n_cells: int, where: str) -> None:
    """An :class:`EmptyDataError` when every labelled reference cell is empty, a warning when some are."""
    if empty == n_cells:
        raise EmptyDataError(
            f"Every labelled reference cell holds only zeros in {where}: there is nothing to learn from. "
            "Check that the matrix (or layer=/use_raw=) is the one holding the expression values."
        )
    if empty:
        warnings.warn(
            f"{empty} of {n_cells} labelled reference cells hold no counts (every gene zero in {where}); "
            "they train as empty cells. Filter them first, e.g. scanpy.pp.filter_cells(adata, min_genes=1).",
            stacklevel=user_stacklevel(),
        )


def empty_rows(block: Any) -> int:
    """How many rows of a block (sparse or dense) hold no non-zero value; a sparse row is judged by its
    stored values (a row of stored zeros counts as holding values)."""
    if sp.issparse(block):
        block = block.tocsr()
        return int((np.diff(block.indptr) == 0).sum())
    return int((np.count_nonzero(np.asarray(block), axis=1) == 0).sum())


def empty_cells(source: MatrixSource, cells: np.ndarray, chunk_size: int = 4096) -> int | None:
    """How many of the rows ``cells`` hold no non-zero value, for a matrix in memory (``None`` for one read
    from disk, whose rows :func:`prepare_reference` counts while its gene statistics read them). A CSR
    matrix is judged by its stored values (from ``indptr``, no pass over the values)."""
    if source.backed:
        return None
    if source.columns is not None:  # some features are not read (gene_expression_only): count the rows read
        return sum(empty_rows(source.rows(cells[i : i + chunk_size])) for i in range(0, len(cells), chunk_size))
    matrix = source.matrix
    if sp.issparse(matrix):
        if matrix.format == "csr":
            return int((np.diff(matrix.indptr)[cells] == 0).sum())
        rows = matrix.tocoo()
        has = np.zeros(matrix.shape[0], dtype=bool)
        has[rows.row[rows.data != 0]] = True
        return int((~has[cells]).sum())
    return sum(empty_rows(matrix[cells[i : i + chunk_size]]) for i in range(0, len(cells), chunk_size))


def reference_rows(ref: Reference, rows: np.ndarray | slice) -> Any:
    """Reference rows as read for the network, checked (:func:`~atlasmtl.inputs.check_block`; streamed data is
    checked only here)."""
    block = ref.source.rows(rows)
    check_block(block, ref.source.where, ref.semantics["semantics"])
    return block
