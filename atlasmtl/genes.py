"""Genes stage: namespaces (symbols vs Ensembl IDs), alignment, and the input transform.

The aligner turns any query gene space into the model's training gene order:
missing genes become zero, extra genes are dropped, genes that map to the same
model gene are summed (counts) or the first is kept (other values). All of it
is one sparse ``query genes × model genes`` matrix applied per minibatch,
between the two halves of the input transform (to the linear scale, then
``x > 0`` or ``log1p``), so each batch takes one conversion path from the
matrix rows to the network input.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .exceptions import GeneAlignmentError, InputError, ParameterError, user_stacklevel
from .inputs import MatrixSource, check_block, pseudo_counts, raw_hint
from .io import check_input_file

#: Network input: ``zscore`` (log1p of values per 10,000, each gene standardised with the
#: reference's mean and standard deviation, clipped to ±:data:`ZSCORE_CLIP`), ``float``
#: (log1p of values per 10,000) or ``binary`` (x > 0).
INPUT_TRANSFORMS = ("zscore", "float", "binary")
#: Standardised values are clipped to [-ZSCORE_CLIP, ZSCORE_CLIP] (as ``scanpy.pp.scale(max_value=10)``).
ZSCORE_CLIP = 10.0
_TARGET_SUM = 1e4
#: Equal-width bins of log1p(mean) within which a gene's dispersion is standardised (scanpy's ``n_bins``).
_HVG_MEAN_BINS = 20
NAMESPACES = ("symbol", "ensembl", "ensembl_versioned")
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}$")
_ENSEMBL_VERSIONED = re.compile(r"^ENS[A-Z]*G\d{6,}\.\d+$")
_ENSEMBL_PREFIX = re.compile(r"^(ENS[A-Z]*G)\d{6,}")

#: ``var`` columns that real files use to carry other gene identifiers.
ID_COLUMNS = (
    "gene_ids",
    "gene_id",
    "ensembl_id",
    "ensembl_ids",
    "ensembl",
    "feature_id",
    "feature_name",
    "gene_symbols",
    "gene_symbol",
    "gene_name",
    "gene_names",
    "symbol",
    "symbols",
)

#: Warn below this fraction of model genes found in the query.
WARN_OVERLAP = 0.8
#: When at least this share of the matched genes matches only case-insensitively, the query is taken to come
#: from another species (human ``CD3E`` ↔ mouse ``Cd3e``) and a warning says so.
OTHER_SPECIES_SHARE = 0.5
#: Training cells (a random sample) whose detection of each model gene the model keeps for the unmeasured-gene
#: check (:func:`detection_profile`, ``metadata["gene_detection"]``).
DETECTION_SAMPLE_CELLS = 5000
#: A model gene is *unexpectedly zero* in a query when its sampled cells, at their depth, should detect it in at
#: least this many cells (:func:`unmeasured_genes`) and none does.
UNMEASURED_MIN_EXPECTED = 20.0
#: Warn that the query seems to lack genes when at least this share of the genes it should detect are
#: unexpectedly zero, and at least :data:`UNMEASURED_WARN_MIN_GENES` of them. On the benchmark's 34 queries
#: the share is 0.39–0.43 where 30–50% of the genes were removed, at most 0.03 otherwise (thinned queries
#: included) and at most 0.09 for one cell type alone (API contract, forty-first session).
UNMEASURED_WARN_SHARE = 0.2
UNMEASURED_WARN_MIN_GENES = 20


def detect_namespace(names: Any) -> str:
    """Classify gene names as ``symbol``, ``ensembl`` or ``ensembl_versioned``.

    The majority of names decides; a list of mostly ``ENSG…`` names is Ensembl,
    with versions when most carry a ``.N`` suffix.
    """
    names = pd.Index(names).astype(str)
    if len(names) == 0:
        return "symbol"
    sample = names[:: max(1, len(names) // 5000)]
    versioned = np.mean([bool(_ENSEMBL_VERSIONED.match(n)) for n in sample])
    plain = np.mean([bool(_ENSEMBL.match(n)) for n in sample])
    if versioned + plain > 0.5:
        return "ensembl_versioned" if versioned > plain else "ensembl"
    return "symbol"


def _family(namespace: str) -> str:
    return "ensembl" if namespace.startswith("ensembl") else "symbol"


def normalise_names(names: Any, namespace: str) -> np.ndarray:
    """Names as comparable keys: Ensembl versions stripped."""
    arr = pd.Index(names).astype(str).to_numpy()
    if _family(namespace) == "ensembl":
        arr = np.array([n.split(".", 1)[0] if n.startswith("ENS") else n for n in arr], dtype=object)
    return arr


def alternative_ids(var: pd.DataFrame) -> dict[str, list[str]]:
    """Other identifier columns of ``var`` keyed by namespace family (for storing in a model)."""
    out: dict[str, list[str]] = {}
    own = _family(detect_namespace(var.index))
    for col in ID_COLUMNS:
        if col in var.columns:
            values = var[col].astype(str)
            fam = _family(detect_namespace(values))
            if fam != own and fam not in out:
                out[fam] = list(normalise_names(values, fam))
    return out


def read_gene_map(
    gene_map: Mapping[str, str] | pd.DataFrame | pd.Series | str | os.PathLike,
    query_names: Any = None,
    model_names: Any = None,
) -> dict[str, str]:
    """Read a user gene map (query name → model name) from a dict, Series, DataFrame or CSV/TSV path.

    A table with two columns maps the first (query names) to the second (model
    names). A file's first row is its header unless it holds a query or model
    gene name (then the file has no header and that row is a pair too). A query
    name listed with several model names maps to the first, with a warning. A wider table, such as an orthologue table with one column per
    species, is oriented by content when ``query_names`` and ``model_names`` are
    given: the column holding most query genes maps to the column holding most
    model genes (names compared case-insensitively).
    """
    if isinstance(gene_map, Mapping):
        return {str(k): str(v) for k, v in gene_map.items()}
    if isinstance(gene_map, pd.Series):
        return _first_per_name(gene_map.index, gene_map.to_numpy(), query_names)
    if isinstance(gene_map, (str, os.PathLike)):
        gene_map = _read_gene_table(gene_map, query_names, model_names)
    if isinstance(gene_map, pd.DataFrame):
        if gene_map.shape[1] < 2:
            raise InputError(f"gene_map needs two columns: query gene names, then model gene names; it has "
                             f"{gene_map.shape[1]} ({', '.join(map(str, gene_map.columns)) or 'none'}).")
        q_col, m_col = 0, 1
        if gene_map.shape[1] > 2 and query_names is not None and model_names is not None:
            q_col, m_col = _orient_gene_table(gene_map, query_names, model_names)
        frame = gene_map.iloc[:, [q_col, m_col]].dropna()
        return _first_per_name(frame.iloc[:, 0].to_numpy(), frame.iloc[:, 1].to_numpy(), query_names)
    raise ParameterError(f"gene_map must be a dict, DataFrame, Series or CSV/TSV path, not {type(gene_map).__name__}.")


def _first_per_name(query: Any, model: Any, query_names: Any = None) -> dict[str, str]:
    """Pairs as a map, each query name to the first model name listed for it; a warning counts the query names
    given several model names (a one-to-many table), with examples: among the query's genes when
    ``query_names`` is given (Ensembl versions ignored)."""
    mapping: dict[str, str] = {}
    several: dict[str, list[str]] = {}
    for q, m in zip(map(str, query), map(str, model)):
        first = mapping.setdefault(q, m)
        if m != first and m not in several.setdefault(q, [first]):
            several[q].append(m)
    several = {q: ms for q, ms in several.items() if len(ms) > 1}
    if several and query_names is not None:
        held = set(normalise_names(query_names, "ensembl"))
        several = {q: ms for q, ms in several.items() if normalise_names([q], "ensembl")[0] in held}
    if several:
        examples = "; ".join(f"{q} → {', '.join(ms[:3])}" for q, ms in list(several.items())[:3])
        warnings.warn(
            f"gene_map gives {len(several)} query gene(s) more than one model gene (e.g. {examples}); each was "
            "mapped to the first one listed only. For one-to-one matching pass a 1:1 table (one row per query "
            "gene, e.g. 1:1 orthologues), or order the rows so the one to use comes first.",
            stacklevel=user_stacklevel(),
        )
    return mapping


def _read_gene_table(path: str | os.PathLike, query_names: Any = None, model_names: Any = None) -> pd.DataFrame:
    """A gene map file as a table of strings.

    Tab-separated for ``.tsv`` / ``.txt`` (also compressed), else comma-separated; a file that reads as one
    column under its extension's separator is read with the other (a tab-separated ``.csv``), and then as
    columns separated by spaces (a ``.txt`` written with spaces). The first row
    is a header unless one of its cells is a query or model gene name (a file without a header: its first
    pair is kept). A path that is not a readable file, an empty file, or one that is not text is an
    :class:`InputError` naming the file.
    """
    path = os.fspath(check_input_file(path, "gene_map file"))
    tab = path.endswith((".tsv", ".txt", ".tsv.gz", ".txt.gz"))
    table = pd.DataFrame()
    try:
        for sep in ("\t", ",", r"\s+") if tab else (",", "\t", r"\s+"):
            table = pd.read_csv(path, sep=sep, dtype=str)
            if table.shape[1] >= 2:
                break
        if query_names is not None and model_names is not None:
            genes = set(normalise_names(list(pd.Index(query_names).astype(str)) + list(pd.Index(model_names).astype(str)),
                                        "ensembl"))
            if any(name in genes for name in normalise_names(table.columns, "ensembl")):
                table = pd.read_csv(path, sep=sep, dtype=str, header=None)
    except pd.errors.EmptyDataError:
        raise InputError(f"The gene_map file {path!r} is empty; it needs two columns: query gene names, then "
                         "model gene names.") from None
    except (UnicodeDecodeError, pd.errors.ParserError, OSError) as exc:
        raise InputError(f"Could not read the gene_map file {path!r} as a CSV/TSV table ({exc}); write it as "
                         "text, one row per gene: query gene name, then model gene name.") from None
    return table


def _orient_gene_table(table: pd.DataFrame, query_names: Any, model_names: Any) -> tuple[int, int]:
    """Positions of the columns that best hold the query's and the model's gene names."""
    query_up = set(pd.Index(query_names).astype(str).str.upper())
    model_up = set(pd.Index(model_names).astype(str).str.upper())
    hits = []
    for j in range(table.shape[1]):
        col = set(table.iloc[:, j].dropna().astype(str).str.upper())
        hits.append((len(col & query_up), len(col & model_up)))
    best = max(((q, m) for q in range(len(hits)) for m in range(len(hits)) if q != m),
               key=lambda qm: (hits[qm[0]][0] + hits[qm[1]][1], -qm[0]))
    return best


# ---------------------------------------------------------------- input transform
def check_input_transform(input_transform: str) -> None:
    if input_transform not in INPUT_TRANSFORMS:
        raise ParameterError(f"input_transform={input_transform!r} must be one of {INPUT_TRANSFORMS}.")


def to_linear_values(block: Any, semantics: str, input_transform: str) -> Any:
    """Bring a row block to the linear scale the gene aggregation sums over.

    For ``binary`` input nothing changes (only x > 0 matters; ``block`` itself
    is returned). For ``float`` and ``zscore`` input, counts (and other non-negative values)
    are scaled to 10,000 per cell using the cell's full library (row-local, so
    minibatches give the same answer), and log-normalised values are mapped
    back with ``expm1``; the result is then a new matrix.
    """
    if input_transform == "binary":
        return block
    if semantics == "lognorm":
        if sp.issparse(block):
            block = block.copy()
            np.expm1(block.data, out=block.data)
            return block
        return np.expm1(block)
    totals = np.asarray(block.sum(axis=1)).ravel().astype(np.float32)
    scale = np.divide(_TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(block):
        return sp.diags(scale) @ block
    return block * scale[:, None]


# ---------------------------------------------------------------- alignment
@dataclass
class GeneAligner:
    """Maps query rows into the model's gene order and applies the input transform.

    Attributes
    ----------
    aggregation
        Sparse ``query genes × model genes`` 0/1 matrix, or ``None`` when the
        query already has exactly the model's genes in order.
    report
        What was matched, missing, duplicated, and how (stored in results).
    gene_mean, gene_std
        Per-gene mean and standard deviation of the reference's log1p values
        (model gene order); used by the ``zscore`` transform only.
    """

    n_model_genes: int
    input_transform: str
    semantics: str
    aggregation: sp.csr_matrix | None
    report: dict[str, Any] = field(default_factory=dict)
    gene_mean: np.ndarray | None = None
    gene_std: np.ndarray | None = None

    @property
    def keeps_zeros(self) -> bool:
        """Whether zeros stay zero (the network input can stay sparse): not for ``zscore``."""
        return self.input_transform != "zscore"

    def transform(self, block: Any) -> np.ndarray:
        """Query row block (sparse or dense) → dense float32 network input."""
        if sp.issparse(block):
            dense = self._sparse_values(block).toarray()
        else:
            linear = to_linear_values(block, self.semantics, self.input_transform)
            if self.aggregation is not None:
                linear = linear @ self.aggregation
            dense = np.asarray(linear.toarray() if sp.issparse(linear) else linear, dtype=np.float32)
            if self.input_transform == "binary":
                return (dense > 0).astype(np.float32)
            if dense is block:  # float input is always a new array; never write into the caller's
                dense = dense.copy()
            np.log1p(dense, out=dense)
        return self._standardise(dense) if self.input_transform == "zscore" else dense

    def detected(self, block: Any) -> np.ndarray:
        """Per row, whether any model gene has a non-zero value (before any standardisation)."""
        if sp.issparse(block):
            return np.diff(self._sparse_values(block).indptr) > 0
        linear = to_linear_values(block, self.semantics, self.input_transform)
        if self.aggregation is not None:
            linear = linear @ self.aggregation
        dense = linear.toarray() if sp.issparse(linear) else np.asarray(linear)
        return (dense != 0).any(axis=1)

    def transform_sparse(self, block: sp.csr_matrix) -> sp.csr_matrix:
        """Sparse query rows → sparse CSR network input (same values as :meth:`transform`).

        Only for transforms that keep zeros (:attr:`keeps_zeros`); ``zscore``
        input is dense by nature and goes through :meth:`transform` per batch.
        """
        if not self.keeps_zeros:
            raise ValueError("the zscore transform does not keep zeros; use transform()")
        return self._sparse_values(block)

    def model_counts(self, block: Any) -> sp.csr_matrix:
        """Rows → pseudo-counts (:func:`~atlasmtl.inputs.pseudo_counts` of what they hold) on the model's
        genes (summed where several genes map to one): what the unmeasured-gene check reads."""
        counts = pseudo_counts(block, self.semantics)
        return counts if self.aggregation is None else sp.csr_matrix(counts @ self.aggregation)

    def zero_input(self) -> np.ndarray | None:
        """The network input of a gene with value 0, per model gene: ``f(0)`` (``None`` when it is 0).

        For ``zscore`` it is ``clip(-mean / std, ±10)``; ``binary`` and ``float`` keep zeros at 0.
        """
        if self.keeps_zeros:
            return None
        zero = np.zeros((1, self.n_model_genes), dtype=np.float32)
        return self._standardise(zero)[0]

    def sparse_input(self, block: Any) -> sp.csr_matrix:
        """Row block → sparse CSR *offset* input ``f(x) - f(0)`` (model gene order, float32).

        ``f`` is the input transform. For ``binary`` and ``float`` ``f(0) = 0``, so this is
        :meth:`transform_sparse`. For ``zscore``, ``f_j(x) = clip((x - mean_j) / std_j, ±10)``
        and ``f(x) - f(0)`` is non-zero only where ``x`` is, so a linear layer is exact as
        ``W (f(x) - f(0)) + (W f(0) + b)``: a sparse product plus a bias that does not depend
        on the cell (:meth:`zero_input`). The dense ``zscore`` matrix is never formed.
        """
        values = self._sparse_values(block if sp.issparse(block) else sp.csr_matrix(block, dtype=np.float32))
        if self.keeps_zeros:
            return values
        if self.gene_mean is None or self.gene_std is None:
            raise ValueError("the zscore transform needs the reference's gene statistics")
        cols = values.indices
        zero = self.zero_input()
        data = (values.data - self.gene_mean[cols]) / self.gene_std[cols]
        np.clip(data, -ZSCORE_CLIP, ZSCORE_CLIP, out=data)
        data -= zero[cols]
        values.data = data.astype(np.float32, copy=False)
        return values

    def _sparse_values(self, block: sp.csr_matrix) -> sp.csr_matrix:
        """Sparse rows → x > 0 or log1p values in model gene order (before any standardisation).

        One conversion path: the block is copied only when no step before the
        in-place transform has already made a new matrix.
        """
        linear = to_linear_values(block, self.semantics, self.input_transform)
        if self.aggregation is not None:
            linear = linear @ self.aggregation
        out = sp.csr_matrix(linear, dtype=np.float32, copy=linear is block)
        out.eliminate_zeros()
        if self.input_transform == "binary":
            out.data = (out.data > 0).astype(np.float32)
            out.eliminate_zeros()
        else:
            np.log1p(out.data, out=out.data)
        return out

    def _standardise(self, dense: np.ndarray) -> np.ndarray:
        if self.gene_mean is None or self.gene_std is None:
            raise ValueError("the zscore transform needs the reference's gene statistics")
        dense -= self.gene_mean
        dense /= self.gene_std
        return np.clip(dense, -ZSCORE_CLIP, ZSCORE_CLIP, out=dense)


def _float64(x: Any) -> Any:
    """A sparse or dense block in float64 (sums of squares of linear-scale values stay exact enough)."""
    return sp.csr_matrix(x, dtype=np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64)


@dataclass
class GroupSums:
    """Per-group column sums of the last block :func:`_streamed_column_sums` reads, for the label ranking.

    ``sums[g]`` sums the rows of group ``g`` (float64, groups × columns); ``counts[g]`` counts them;
    ``ungrouped_squares`` is the column sums of squares of the rows in no group (code ``-1``), so the
    grouped rows' sums of squares are the block's total less these."""

    sums: np.ndarray
    counts: np.ndarray
    ungrouped_squares: np.ndarray


def _streamed_column_sums(source: MatrixSource, cells: np.ndarray, values: Any, n: int, n_blocks: int,
                          chunk_size: int, reduce: Any, groups: np.ndarray | None = None, n_groups: int = 0,
                          ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, GroupSums | None]:
    """Per-column sums and sums of squares (float64) over ``cells`` of each of the ``n_blocks`` blocks that
    ``values(rows)`` returns (sparse or dense, ``n`` columns each, all from one read of the rows), read
    ``chunk_size`` rows at a time, and the cell count; ``reduce`` combines them over processes.
    With ``groups`` (a code in ``[-1, n_groups)`` per cell of ``cells``), the last block's sums are also
    taken per group (:class:`GroupSums`).

    Returns ``[(sums, sums of squares) per block], count, group sums or None``."""
    sums = [(np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.float64)) for _ in range(n_blocks)]
    grouped = None if groups is None else GroupSums(
        np.zeros((n_groups, n), dtype=np.float64), np.zeros(n_groups, dtype=np.float64), np.zeros(n, dtype=np.float64))
    for start in range(0, len(cells), chunk_size):
        blocks = values(source.rows(cells[start : start + chunk_size]))
        for (total, total_sq), x in zip(sums, blocks, strict=True):
            if sp.issparse(x):
                total += np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
                total_sq += np.asarray(x.multiply(x).sum(axis=0), dtype=np.float64).ravel()
            else:
                x = np.asarray(x, dtype=np.float64)
                total += x.sum(axis=0)
                total_sq += np.einsum("ij,ij->j", x, x)
        if grouped is not None:
            _add_group_sums(grouped, blocks[-1], groups[start : start + chunk_size])
    count = len(cells)
    if reduce is not None:
        parts = [v for pair in sums for v in pair] + [np.array([count], dtype=np.float64)]
        if grouped is not None:
            parts += [grouped.sums.ravel(), grouped.counts, grouped.ungrouped_squares]
        summed = reduce(np.concatenate(parts))
        sums = [(summed[2 * i * n : (2 * i + 1) * n], summed[(2 * i + 1) * n : (2 * i + 2) * n])
                for i in range(n_blocks)]
        at = 2 * n_blocks * n
        count = int(round(summed[at]))
        if grouped is not None:
            at += 1
            grouped = GroupSums(summed[at : at + n_groups * n].reshape(n_groups, n),
                                summed[at + n_groups * n : at + n_groups * (n + 1)], summed[at + n_groups * (n + 1) :])
    return sums, count, grouped


def _add_group_sums(grouped: GroupSums, x: Any, codes: np.ndarray) -> None:
    """Add a block's rows to their groups' sums (rows with code ``-1`` to the ungrouped squares only)."""
    codes = np.asarray(codes)
    member = codes >= 0
    n_groups = len(grouped.counts)
    indicator = sp.csr_matrix((np.ones(int(member.sum())), (codes[member], np.flatnonzero(member))),
                              shape=(n_groups, len(codes)))
    if sp.issparse(x):
        grouped.sums += np.asarray((indicator @ sp.csr_matrix(x, dtype=np.float64)).todense())
        rest = sp.csr_matrix(x[~member], dtype=np.float64)
        grouped.ungrouped_squares += np.asarray(rest.multiply(rest).sum(axis=0)).ravel()
    else:
        x = np.asarray(x, dtype=np.float64)
        grouped.sums += indicator @ x
        grouped.ungrouped_squares += np.einsum("ij,ij->j", x[~member], x[~member])
    grouped.counts += np.bincount(codes[member], minlength=n_groups)


def _log_statistics(total: np.ndarray, total_sq: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (float32) from per-gene sums of log values; a deviation under 1e-3 becomes 1."""
    count = max(count, 1)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std[std < 1e-3] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def log_gene_statistics(source: MatrixSource, aligner: GeneAligner, cells: np.ndarray,
                        chunk_size: int = 4096, reduce: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per gene of the reference's log1p values, in one streaming pass.

    The rows are read ``chunk_size`` at a time and stay sparse, so memory does not
    grow with the number of cells. Genes with a standard deviation below 1e-3
    (never or always expressed alike) get 1, so they are centred but not inflated.
    ``reduce`` sums the per-gene sums and the cell count over processes (each passing
    its own share of ``cells``; :func:`atlasmtl.distributed.all_reduce_sum`).
    """
    [(total, total_sq)], count, _ = _streamed_column_sums(
        source, cells, lambda block: (aligner._sparse_values(block),), aligner.n_model_genes, 1, chunk_size, reduce)
    return _log_statistics(total, total_sq, count)


def highly_variable_genes(source: MatrixSource, semantics: str, cells: np.ndarray, n_top_genes: int,
                          chunk_size: int = 4096, reduce: Any = None) -> np.ndarray:
    """The reference's ``n_top_genes`` most variable genes, as scanpy's ``flavor="seurat"`` ranks them,
    in one streaming pass.

    Per gene, the mean and (unbiased) variance of the values on their linear scale (counts per
    10,000 for counts, ``expm1`` of log-normalised values) give the log dispersion ``log(var / mean)``;
    genes are put in 20 equal-width bins of ``log1p(mean)`` and a gene's dispersion is standardised
    within its bin; the genes of the ``n_top_genes`` largest standardised dispersions are kept (ties at
    the cut are all kept, as in scanpy). This is exactly :func:`scanpy.pp.highly_variable_genes` with
    ``flavor="seurat", n_top_genes=n_top_genes`` on log1p counts per 10,000 (tested against it), without
    ever holding more than ``chunk_size`` rows: the reference may be on disk. The parameters are those of
    :func:`reference_gene_statistics`; returns the sorted column numbers of the kept genes.
    """
    return reference_gene_statistics(source, semantics, cells, n_top_genes, "float", chunk_size, reduce)[0]


#: ``build_model(gene_selection=...)``: how the ``n_top_genes`` genes are ranked.
GENE_SELECTIONS = ("variable+labels", "variable")
#: ``gene_selection="variable+labels"``: the share of the ``n_top_genes`` genes chosen for telling the labels
#: apart (the rest are the most variable). 0.25 of 0.25 / 0.5 / 0.75 measured (API contract, "Genes that tell
#: the labels apart").
LABEL_GENE_SHARE = 0.25


def reference_gene_statistics(source: MatrixSource, semantics: str, cells: np.ndarray, n_top_genes: int | None,
                              input_transform: str, chunk_size: int = 4096, reduce: Any = None,
                              labels: np.ndarray | None = None, n_labels: int = 0,
                              on_block: Callable[[Any], None] | None = None,
                              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The genes a model keeps and, for ``zscore`` input, their log statistics, from one read of the reference.

    Each block of rows is brought to its linear scale over all its genes once (as
    :func:`to_linear_values`); the per-gene sums of those values rank the genes by
    variability (:func:`highly_variable_genes`) and the sums of their ``log1p`` give the
    standardisation of every gene, of which the kept genes' are returned. Both
    equal what :func:`highly_variable_genes` and :func:`log_gene_statistics` (on
    :func:`selection_aligner` of the kept genes) compute in two passes.

    With ``labels``, the ``n_top_genes - int(LABEL_GENE_SHARE * n_top_genes)`` most variable genes are
    kept, then those whose ``log1p`` values differ most between the labels until ``n_top_genes`` are
    (:func:`label_informative_order`: the one-way ANOVA F statistic, from per-label sums of the same read).

    Parameters
    ----------
    source
        The reference matrix.
    semantics
        What it holds (``"counts"``, ``"lognorm"`` or ``"other"``).
    cells
        Rows to compute the statistics on (sorted).
    n_top_genes
        Genes to keep; ``None`` (or at least the number of genes) keeps all.
    input_transform
        The model's input transform; the log statistics are computed for ``"zscore"`` only.
    chunk_size
        Rows read at once.
    reduce
        Sums the per-gene sums and the cell count over processes (:func:`atlasmtl.distributed.all_reduce_sum`).
    labels
        A label code in ``[-1, n_labels)`` per cell of ``cells`` (``-1``: unlabelled, left out of the
        label ranking), or ``None`` to rank by variability alone.
    n_labels
        Number of label codes.
    on_block
        Called with every block of rows as read (before any transform), when the reference is read
        at all: not for ``"binary"`` / ``"float"`` input that keeps every gene.

    Returns
    -------
    tuple
        Sorted column numbers of the kept genes, and their log mean and standard deviation
        (float32; ``None`` unless ``input_transform="zscore"``).
    """
    n = source.n_vars
    select = n_top_genes is not None and n_top_genes < n
    by_labels = select and labels is not None and n_labels >= 2
    zscore = input_transform == "zscore"
    if not select and not zscore:
        return np.arange(n), None, None

    def values(block: Any) -> tuple[Any, ...]:
        check_block(block, source.where, semantics)  # the first read of every row (a backed one judged on a sample)
        if on_block is not None:
            on_block(block)
        linear = to_linear_values(block, semantics, "float")
        out = (_float64(linear),) if select else ()
        if zscore or by_labels:
            log_values = sp.csr_matrix(linear, dtype=np.float32, copy=linear is block)
            log_values.eliminate_zeros()
            np.log1p(log_values.data, out=log_values.data)
            out += (log_values,)
        return out

    sums, count, grouped = _streamed_column_sums(source, cells, values, n, int(select) + int(zscore or by_labels),
                                                 chunk_size, reduce, labels if by_labels else None, n_labels)
    if not select:
        keep = np.arange(n)
    elif by_labels:
        variable = _most_variable(*sums[0], count, n_top_genes - int(LABEL_GENE_SHARE * n_top_genes))
        informative = label_informative_order(grouped, sums[-1][1])
        keep = np.sort(np.concatenate([variable, informative[~np.isin(informative, variable)]
                                       [: max(n_top_genes - len(variable), 0)]]))
    else:
        keep = _most_variable(*sums[0], count, n_top_genes)
    if not zscore:
        return keep, None, None
    mean, std = _log_statistics(sums[-1][0][keep], sums[-1][1][keep], count)
    return keep, mean, std


def label_informative_order(grouped: GroupSums, total_sq: np.ndarray) -> np.ndarray:
    """Columns from the most to the least label-informative: the one-way ANOVA F statistic of each
    column across the groups (as :func:`sklearn.feature_selection.f_classif`), from per-group sums.

    ``total_sq`` is every row's column sums of squares (grouped or not). A column that does not vary
    within the groups but does between them ranks first; one that varies in neither ranks last
    (F = 0). Ties keep column order. With fewer than two non-empty groups, or no more rows than
    groups, every F is 0 (column order)."""
    present = grouped.counts > 0
    sums, counts = grouped.sums[present], grouped.counts[present]
    n_rows, k = counts.sum(), len(counts)
    if k < 2 or n_rows <= k:
        return np.arange(len(total_sq))
    explained = (sums**2 / counts[:, None]).sum(axis=0)
    between = np.maximum(explained - sums.sum(axis=0) ** 2 / n_rows, 0.0) / (k - 1)
    within = np.maximum(total_sq - grouped.ungrouped_squares - explained, 0.0) / (n_rows - k)
    f = np.divide(between, within, out=np.zeros_like(between), where=within > 0)
    f[(within == 0) & (between > 0)] = np.inf
    return np.argsort(-f, kind="stable")


def _most_variable(total: np.ndarray, total_sq: np.ndarray, count: int, n_top_genes: int) -> np.ndarray:
    """Scanpy's ``flavor="seurat"`` selection from per-gene sums of linear-scale values (see
    :func:`highly_variable_genes`)."""
    n = len(total)
    if n_top_genes >= n or count < 2:
        return np.arange(n)
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0) * (count / (count - 1))
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
    table = pd.DataFrame({"mean": np.log1p(mean), "dispersion": dispersion})
    table["bin"] = pd.cut(table["mean"], bins=_HVG_MEAN_BINS)
    stats = table.groupby("bin", observed=True)["dispersion"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()  # a bin of one gene: its dispersion counts as one deviation above 0
    stats.loc[single, "dev"], stats.loc[single, "avg"] = stats.loc[single, "avg"], 0.0
    stats = stats.loc[table["bin"]]
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = (table["dispersion"].to_numpy() - stats["avg"].to_numpy()) / stats["dev"].to_numpy()
    finite = normalised[~np.isnan(normalised)]
    if len(finite) <= n_top_genes:
        return np.flatnonzero(~np.isnan(normalised))
    cut = np.sort(finite)[::-1][n_top_genes - 1]
    return np.flatnonzero(np.nan_to_num(normalised, nan=-np.inf) >= cut)


def selection_aligner(n_genes: int, keep: np.ndarray, input_transform: str, semantics: str) -> GeneAligner:
    """Aligner for the reference restricted to the genes ``keep`` (sorted column numbers): each row is
    brought to its linear scale over *all* its genes (a cell's depth is its whole library, as for a
    query), then the kept columns are taken."""
    if len(keep) == n_genes:
        return identity_aligner(n_genes, input_transform, semantics)
    selection = sp.csr_matrix((np.ones(len(keep), dtype=np.float32), (np.asarray(keep), np.arange(len(keep)))),
                              shape=(n_genes, len(keep)))
    return GeneAligner(len(keep), input_transform, semantics, selection,
                       {"n_model_genes": len(keep), "n_reference_genes": n_genes})


def identity_aligner(n_genes: int, input_transform: str, semantics: str) -> GeneAligner:
    """Aligner for the reference itself (genes already in model order)."""
    return GeneAligner(n_genes, input_transform, semantics, None, {"n_model_genes": n_genes})


def build_aligner(
    model_genes: list[str],
    model_namespace: str,
    model_alt_ids: dict[str, list[str]],
    source: MatrixSource,
    input_transform: str,
    semantics: str,
    gene_map: Any = None,
    min_gene_overlap: float = 0.5,
    gene_mean: np.ndarray | None = None,
    gene_std: np.ndarray | None = None,
) -> GeneAligner:
    """Match the query's genes to the model's and build the aggregation matrix.

    Names are matched exactly first (Ensembl versions ignored); model genes
    still unmatched are then matched case-insensitively where the upper-cased
    name is unique on both sides (``Cd3e`` ↔ ``CD3E``: mouse and human
    orthologues that share a symbol). The report counts both.

    Parameters
    ----------
    model_genes, model_namespace, model_alt_ids
        The model's training genes, their namespace and other identifiers stored for them.
    source
        The query's matrix and gene table.
    gene_map
        Optional user mapping from query gene names to model gene names.
    min_gene_overlap
        Raise :class:`GeneAlignmentError` when fewer than this fraction of the
        model's genes are found (0 disables the check).
    gene_mean, gene_std
        The model's per-gene statistics (``zscore`` transform).
    """
    if not 0.0 <= float(min_gene_overlap) <= 1.0:
        raise ParameterError(f"min_gene_overlap={min_gene_overlap!r} must lie in [0, 1].")
    n_model = len(model_genes)
    query_names = pd.Index(source.var_names).astype(str)
    query_ns = detect_namespace(query_names)
    model_fam = _family(model_namespace)
    how = "var_names"
    model_keys = normalise_names(model_genes, model_namespace)

    if gene_map is not None:
        mapping = read_gene_map(gene_map, query_names, model_genes)
        # Ensembl versions ignored here too: a map keyed by ENSG00000141510 serves a query's ENSG00000141510.16
        loose = dict(zip(normalise_names(list(mapping), "ensembl"), mapping.values()))
        keys = np.array([mapping.get(q, loose.get(stripped, "")) for q, stripped
                         in zip(query_names, normalise_names(query_names, "ensembl"))], dtype=object)
        keys = normalise_names(keys, model_namespace)
        how = "gene_map"
    elif _family(query_ns) == model_fam:
        keys = normalise_names(query_names, query_ns)
    else:
        keys = None
        for col in ID_COLUMNS:
            if col in source.var.columns and _family(detect_namespace(source.var[col].astype(str))) == model_fam:
                keys = normalise_names(source.var[col].astype(str), model_fam)
                how = f"query var[{col!r}]"
                break
        if keys is None and _family(query_ns) in model_alt_ids:
            model_keys = np.asarray(model_alt_ids[_family(query_ns)], dtype=object)
            keys = normalise_names(query_names, query_ns)
            how = f"model's stored {_family(query_ns)} IDs"
        if keys is None:
            keys = normalise_names(query_names, query_ns)
            how = "var_names (namespaces differ, no mapping column found)"

    position = {}
    for i, key in enumerate(model_keys):
        position.setdefault(key, i)
    keys, n_case_insensitive = _case_insensitive_keys(np.asarray(keys, dtype=object), model_keys, position)
    keys, n_dash = _loose_keys(keys, model_keys, position, _seurat_dash)
    rows, cols, seen = [], [], {}
    n_duplicated = 0
    for qi, key in enumerate(keys):
        mi = position.get(key)
        if mi is None or key in ("", "nan"):
            continue
        if mi in seen:
            n_duplicated += 1
            if semantics != "counts" and input_transform != "binary":
                continue  # keep the first for non-count values
        seen.setdefault(mi, qi)
        rows.append(qi)
        cols.append(mi)
    n_matched = len(seen)
    overlap = n_matched / n_model if n_model else 0.0
    report = {
        "model_namespace": model_namespace,
        "query_namespace": query_ns,
        "mapped_by": how,
        "n_model_genes": n_model,
        "n_query_genes": int(len(query_names)),
        "n_matched": int(n_matched),
        "n_matched_case_insensitive": int(n_case_insensitive),
        "n_matched_underscore_dash": int(n_dash),
        "n_missing": int(n_model - n_matched),
        "n_query_genes_unused": int(len(query_names) - len(set(rows))),
        "n_duplicated": int(n_duplicated),
        "duplicates_handling": (
            "none"
            if n_duplicated == 0
            else ("summed" if (semantics == "counts" or input_transform == "binary") else "kept first")
        ),
        "overlap_fraction": round(overlap, 4),
    }
    in_raw = raw_hint(source, model_genes, n_matched) if overlap < WARN_OVERLAP else ""
    if overlap < min_gene_overlap:
        hint = ""
        if in_raw:  # X cut to some genes that adata.raw keeps: the fix is use_raw=True, not the annotation
            hint = in_raw
        elif how == "gene_map":
            hint = _gene_map_hint(mapping, query_names, model_keys, model_namespace)
        elif how.startswith("var_names (namespaces differ"):
            hint = (
                f" The query's genes look like {query_ns} names while the model was trained on "
                f"{model_namespace} names: add a var column holding the model's {model_fam} names (e.g. "
                f"{'gene_ids' if model_fam == 'ensembl' else 'gene_symbols'!r}), or pass gene_map= (--gene-map on "
                "the command line; query name → model name)."
            )
        else:
            hint = _annotation_hint(keys, model_keys)
        hint = _names_elsewhere_hint(source, model_keys, model_namespace, n_matched) or hint
        raise GeneAlignmentError(
            f"Only {n_matched} of the model's {n_model} genes ({np.floor(overlap * 1000) / 10:.1f}%) were "
            "found in the query "
            f"({len(query_names)} genes, mapped by {how}); at least {min_gene_overlap:.0%} are required."
            + hint
            + " To map anyway, lower min_gene_overlap (--min-gene-overlap on the command line)."
        )
    if overlap < WARN_OVERLAP:
        absent = [str(g) for i, g in enumerate(model_keys) if i not in seen][:3]
        advice = in_raw or (
            " If the query names more of them another way (other IDs, another species or annotation release), "
            "match them: a var column with the model's IDs, or gene_map= (--gene-map on the command line), query "
            "name → model name.")
        warnings.warn(
            f"Only {n_matched} of {n_model} model genes ({overlap:.1%}) were found in the query (mapped by {how}); "
            f"missing genes are treated as zero and predictions may be less accurate.{advice} Missing, "
            f"e.g.: {', '.join(absent)}.",
            stacklevel=user_stacklevel(),
        )
    if n_duplicated:
        warnings.warn(
            f"{n_duplicated} query gene(s) mapped onto a model gene that was already matched; "
            f"they were {report['duplicates_handling']}.",
            stacklevel=user_stacklevel(),
        )
    if how == "gene_map" and n_matched < n_model:
        query_keys = normalise_names(query_names, model_namespace)
        used = set(rows)
        spelled: dict[str, str] = {}  # upper-cased name → the query's spelling, of query genes the map left unused
        for qi, key in enumerate(query_keys):
            if qi not in used:
                spelled.setdefault(str(key).upper(), str(key))
        held = set(query_keys)
        unmatched = [str(g) for i, g in enumerate(model_keys) if i not in seen and g not in ("", "nan")]
        same_name = [g for g in unmatched if g in held]
        case_only = [f"{spelled[g.upper()]} → {g}" for g in unmatched if g not in held and g.upper() in spelled]
        if same_name or case_only:
            ignoring = (f", {len(case_only)} of them only when case is ignored (e.g. {', '.join(case_only[:3])})"
                        if case_only else "")
            examples = f" (e.g. {', '.join(same_name[:3])})" if same_name else ""
            warnings.warn(
                f"{len(same_name) + len(case_only)} model gene(s) that gene_map leaves unmatched are in the query "
                f"under the same name{examples}{ignoring} and were not used: gene_map is the whole mapping. To use "
                "them, add them to it (query name → model name), or leave gene_map out when the query's names are "
                "the model's.",
                stacklevel=user_stacklevel(),
            )
    if how != "gene_map" and n_matched and n_case_insensitive >= OTHER_SPECIES_SHARE * n_matched:
        missing = (
            f" Orthologues with other names are not matched this way ({n_model - n_matched} model genes missing): "
            "pass gene_map= (--gene-map on the command line) a 1:1 orthologue table (query name → model name) to "
            "match them."
            if n_matched < n_model else ""
        )
        warnings.warn(
            f"{n_case_insensitive} of the {n_matched} matched genes match only when case is ignored (e.g. mouse "
            "'Cd3e' and human 'CD3E'): the query probably comes from another species than the reference (or its "
            f"names were re-cased).{missing} Across species expect less certain calls, and novel types to be "
            "missed more often (README, 'Known limits').",
            stacklevel=user_stacklevel(),
        )
    identity = (
        n_duplicated == 0 and len(rows) == n_model == len(query_names) and rows == list(range(n_model)) and cols == rows
    )
    aggregation = None
    if not identity:
        aggregation = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (np.asarray(rows), np.asarray(cols))),
            shape=(len(query_names), n_model),
        )
    return GeneAligner(n_model, input_transform, semantics, aggregation, report, gene_mean, gene_std)


def _names_elsewhere_hint(source: MatrixSource, model_keys: np.ndarray, model_namespace: str, n_matched: int) -> str:
    """A sentence naming where the model's genes are when ``var_names`` hold few of them: a ``var`` column (e.g.
    ``anndata.read_loom``'s default ``var_names='Gene'`` on a file written by anndata leaves the names ``0, 1, ...``
    and the genes in ``var['var_names']``), or the cell names (a genes × cells table read without ``.T``);
    ``""`` when neither holds clearly more of them (at least ``max(10, 10%)`` of the model's genes more)."""
    wanted = set(map(str, model_keys))
    enough = n_matched + max(10, 0.1 * len(wanted))
    def held(values: Any) -> int:
        return len(wanted.intersection(normalise_names(pd.Index(values).astype(str), model_namespace)))
    if source.obs_names is not None:
        in_obs = held(source.obs_names)
        if in_obs >= enough:
            return (f" The cell names (obs_names) hold {in_obs} of the model's genes: the matrix looks transposed, genes "
                    "as rows and cells as columns (e.g. sc.read_csv of a genes × cells table); pass adata.T "
                    "(sc.read_csv(path).T).")
    best, column = 0, None
    for col in source.var.columns:
        values = source.var[col]
        if values.dtype == object or isinstance(values.dtype, (pd.CategoricalDtype, pd.StringDtype)):
            n = held(values)
            if n > best:
                best, column = n, col
    if column is not None and best >= enough:
        return (f" var[{str(column)!r}] holds {best} of the model's genes, var_names only {n_matched} (e.g. "
                "anndata.read_loom's default var_names='Gene' on a file whose names are in another attribute): set "
                f"adata.var_names = adata.var[{str(column)!r}].astype(str) (then adata.var_names_make_unique()), or read "
                "the file with those names (anndata.read_loom(path, var_names=..., obs_names=...)).")
    return ""


def _ensembl_prefix(names: Any) -> str | None:
    """The species prefix (``ENSG``, ``ENSMUSG``, ...) most of ``names`` carry, or ``None`` when most are no
    Ensembl gene IDs."""
    prefixes = pd.Series([m.group(1) if m else None for m in map(_ENSEMBL_PREFIX.match, map(str, names))],
                         dtype=object)
    top = prefixes.value_counts()
    return str(top.index[0]) if len(top) and top.iloc[0] > 0.5 * len(prefixes) else None


def _annotation_hint(keys: np.ndarray, model_keys: np.ndarray) -> str:
    """Why query names of the model's namespace match too few model genes: Ensembl IDs of two species
    (``ENSMUSG…`` against ``ENSG…``), else another annotation."""
    query_prefix, model_prefix = _ensembl_prefix(keys), _ensembl_prefix(model_keys)
    if query_prefix and model_prefix and query_prefix != model_prefix:
        return (
            f" The query's Ensembl IDs are {query_prefix}… and the model's {model_prefix}…: genes of two species, "
            "which share no ID. Pass gene_map= a table of orthologues (query gene → model gene)."
        )
    return (
        " Check that reference and query use the same gene annotation (organism, release), or pass gene_map= "
        "(query name → model name)."
    )


def _gene_map_hint(mapping: Mapping[str, str], query_names: pd.Index, model_keys: np.ndarray,
                   model_namespace: str) -> str:
    """What a gene map that matches too few model genes holds: how many query genes its keys name and model
    genes its values name, or that it maps the other way (model names → query names), with the fix."""
    query_held = set(normalise_names(query_names, "ensembl"))
    model_held = set(model_keys)
    keys, values = list(mapping), list(mapping.values())
    q_keys = len(query_held.intersection(normalise_names(keys, "ensembl")))
    m_values = len(model_held.intersection(normalise_names(values, model_namespace)))
    q_values = len(query_held.intersection(normalise_names(values, "ensembl")))
    m_keys = len(model_held.intersection(normalise_names(keys, model_namespace)))
    if q_values + m_keys > q_keys + m_values:
        return (
            f" gene_map seems to map the other way (model name → query name): {m_keys} of its keys (first column) "
            f"are model genes and {q_values} of its values (second column) are query genes. Give the query's names "
            "first: swap the table's two columns, or reverse a dict ({v: k for k, v in gene_map.items()})."
        )
    return (
        f" gene_map ({len(mapping)} entries) names {q_keys} of the query's genes among its keys (first column) and "
        f"{m_values} of the model's among its values (second column): check that it maps the query's gene names "
        "to the model's, in the namespaces each uses."
    )


def _loose_keys(keys: np.ndarray, model_keys: np.ndarray, position: dict,
                fold: Callable[[str], str]) -> tuple[np.ndarray, int]:
    """Query keys with unmatched names replaced by the unmatched model name they equal after ``fold``.

    Only unambiguous pairs: the folded name is unique among the model's
    unmatched genes and among the query's unmatched names.
    """
    matched = {position[k] for k in keys if k in position}
    model_folded: dict[str, list[int]] = {}
    for i, key in enumerate(model_keys):
        if i not in matched and position.get(key) == i:
            model_folded.setdefault(fold(str(key)), []).append(i)
    unmatched = [qi for qi, k in enumerate(keys) if k not in position and k not in ("", "nan")]
    query_folded: dict[str, list[int]] = {}
    for qi in unmatched:
        query_folded.setdefault(fold(str(keys[qi])), []).append(qi)
    out, n = keys.copy(), 0
    for folded, qis in query_folded.items():
        mis = model_folded.get(folded)
        if mis and len(mis) == 1 and len(qis) == 1:
            out[qis[0]] = model_keys[mis[0]]
            n += 1
    return out, n


def _case_insensitive_keys(keys: np.ndarray, model_keys: np.ndarray, position: dict) -> tuple[np.ndarray, int]:
    """Query keys with unmatched names replaced by the model name they equal case-insensitively
    (:func:`_loose_keys` with upper-casing)."""
    return _loose_keys(keys, model_keys, position, str.upper)


def _seurat_dash(name: str) -> str:
    """A name as Seurat stores it: upper-cased, ``_`` and ``|`` replaced by ``-`` (SeuratObject refuses both in
    feature names and replaces them, so a query converted from Seurat holds ``RP11-34P13-7`` for ``RP11-34P13_7``)."""
    return name.upper().replace("_", "-").replace("|", "-")


# ---------------------------------------------------------------- genes the query lacks
def detection_profile(counts: sp.csr_matrix) -> dict[str, Any] | None:
    """What the unmeasured-gene check keeps of the reference: per model gene the share of cells detecting
    it and its share of the counts, and the cells' median depth.

    Parameters
    ----------
    counts
        Pseudo-counts (:func:`~atlasmtl.inputs.pseudo_counts`) of sampled training cells × the model's genes.

    Returns
    -------
    dict or None
        ``{"detected", "count_share"}`` (one float per model gene), ``"median_depth"`` and ``"cells"``;
        ``None`` when the cells hold no counts.
    """
    counts = sp.csr_matrix(counts)
    depth = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    if counts.shape[0] == 0 or not (depth > 0).any():
        return None
    detected = np.asarray((counts > 0).sum(axis=0), dtype=np.float64).ravel() / counts.shape[0]
    totals = np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()
    return {"detected": detected.tolist(), "count_share": (totals / totals.sum()).tolist(),
            "median_depth": float(np.median(depth[depth > 0])), "cells": int(counts.shape[0])}


def unmeasured_genes(profile: Mapping[str, Any], counts: sp.csr_matrix,
                     present: np.ndarray | None = None) -> dict[str, Any]:
    """Model genes a query holds but seems not to measure: expected in many of its cells at their depth,
    detected in none.

    A gene the reference detects in a share ``r_j`` of its cells has a Poisson rate
    ``lambda_j = -log(1 - r_j) / median depth`` per count, so a query cell of depth ``N_c`` detects it
    with probability ``1 - exp(-lambda_j N_c)``; the sum over the query's cells, ``E_j``, is how many
    should. ``N_c`` counts only the genes the query detects, scaled by their share of the reference's
    counts, so genes the query lacks do not make its cells look shallow. A gene with
    ``E_j >= UNMEASURED_MIN_EXPECTED`` that no cell detects is *unexpectedly zero*: a gene a shallow
    query misses has a small ``E_j``; a column of zeros for a gene the query never measured (as when a
    query is zero-padded to the reference's genes) has a large one. Only genes the query holds are judged
    (``present``): one it does not hold is already counted as missing by the alignment.

    Parameters
    ----------
    profile
        The model's :func:`detection_profile`.
    counts
        Pseudo-counts of sampled query cells × the model's genes.
    present
        Per model gene, whether some query gene maps to it (``None``: all).

    Returns
    -------
    dict
        ``cells_sampled``, ``genes_expected`` (``E_j >= UNMEASURED_MIN_EXPECTED``),
        ``genes_unexpectedly_zero`` and their ``share_unexpectedly_zero`` (0 when none is expected), and
        ``lacks_genes``: whether the share and the count reach :data:`UNMEASURED_WARN_SHARE` and
        :data:`UNMEASURED_WARN_MIN_GENES`.
    """
    counts = sp.csr_matrix(counts)
    r = np.clip(np.asarray(profile["detected"], dtype=np.float64), 0.0, 1.0 - 1e-9)
    share = np.asarray(profile["count_share"], dtype=np.float64)
    detected = np.asarray((counts > 0).sum(axis=0)).ravel() > 0
    covered = float(share[detected].sum())
    depth = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel() / max(covered, 1e-12)
    rate = -np.log1p(-r) / max(float(profile["median_depth"]), 1e-12)
    expected = np.zeros(len(r))
    for start in range(0, len(depth), 256):  # a block of cells × genes at a time
        expected -= np.expm1(-np.outer(depth[start : start + 256], rate)).sum(axis=0)
    judged = expected >= UNMEASURED_MIN_EXPECTED
    if present is not None:
        judged &= np.asarray(present, dtype=bool)
    zero = int((judged & ~detected).sum())
    share_zero = zero / int(judged.sum()) if judged.any() else 0.0
    return {"cells_sampled": int(counts.shape[0]), "genes_expected": int(judged.sum()),
            "genes_unexpectedly_zero": zero, "share_unexpectedly_zero": round(share_zero, 4),
            "lacks_genes": bool(share_zero >= UNMEASURED_WARN_SHARE and zero >= UNMEASURED_WARN_MIN_GENES)}
