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
from typing import Any, Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .exceptions import GeneAlignmentError, InputError, ParameterError, user_stacklevel
from .inputs import MatrixSource

#: Network input: ``binary`` (x > 0) or ``float`` (log1p of values per 10,000).
INPUT_TRANSFORMS = ("binary", "float")
_TARGET_SUM = 1e4
NAMESPACES = ("symbol", "ensembl", "ensembl_versioned")
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}$")
_ENSEMBL_VERSIONED = re.compile(r"^ENS[A-Z]*G\d{6,}\.\d+$")

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


def read_gene_map(gene_map: Mapping[str, str] | pd.DataFrame | pd.Series | str | os.PathLike) -> dict[str, str]:
    """Read a user gene map (query name → model name) from a dict, DataFrame or CSV/TSV path.

    A DataFrame or file needs two columns: query names first, model names second.
    """
    if isinstance(gene_map, Mapping):
        return {str(k): str(v) for k, v in gene_map.items()}
    if isinstance(gene_map, pd.Series):
        return {str(k): str(v) for k, v in gene_map.items()}
    if isinstance(gene_map, (str, os.PathLike)):
        path = os.fspath(gene_map)
        if not os.path.exists(path):
            raise InputError(f"gene_map file {path!r} does not exist.")
        sep = "\t" if path.endswith((".tsv", ".txt", ".tsv.gz")) else ","
        gene_map = pd.read_csv(path, sep=sep, dtype=str)
    if isinstance(gene_map, pd.DataFrame):
        if gene_map.shape[1] < 2:
            raise InputError("gene_map needs two columns: query gene names, then model gene names.")
        frame = gene_map.iloc[:, :2].dropna()
        return dict(zip(frame.iloc[:, 0].astype(str), frame.iloc[:, 1].astype(str)))
    raise ParameterError(f"gene_map must be a dict, DataFrame, Series or CSV/TSV path, not {type(gene_map).__name__}.")


# ---------------------------------------------------------------- input transform
def check_input_transform(input_transform: str) -> None:
    if input_transform not in INPUT_TRANSFORMS:
        raise ParameterError(f"input_transform={input_transform!r} must be one of {INPUT_TRANSFORMS}.")


def to_linear_values(block: Any, semantics: str, input_transform: str) -> Any:
    """Bring a row block to the linear scale the gene aggregation sums over.

    For ``binary`` input nothing changes (only x > 0 matters; ``block`` itself
    is returned). For ``float`` input, counts (and other non-negative values)
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
    """

    n_model_genes: int
    input_transform: str
    semantics: str
    aggregation: sp.csr_matrix | None
    report: dict[str, Any] = field(default_factory=dict)

    def transform(self, block: Any) -> np.ndarray:
        """Query row block (sparse or dense) → dense float32 network input."""
        if sp.issparse(block):
            return self.transform_sparse(block).toarray()
        linear = to_linear_values(block, self.semantics, self.input_transform)
        if self.aggregation is not None:
            linear = linear @ self.aggregation
        dense = np.asarray(linear.toarray() if sp.issparse(linear) else linear, dtype=np.float32)
        if self.input_transform == "binary":
            return (dense > 0).astype(np.float32)
        if dense is block:  # float input is always a new array; never write into the caller's
            dense = dense.copy()
        return np.log1p(dense, out=dense)

    def transform_sparse(self, block: sp.csr_matrix) -> sp.csr_matrix:
        """Sparse query rows → sparse CSR network input (same values as :meth:`transform`).

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
) -> GeneAligner:
    """Match the query's genes to the model's and build the aggregation matrix.

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
        mapping = read_gene_map(gene_map)
        keys = np.array([mapping.get(q, "") for q in query_names], dtype=object)
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
    if overlap < min_gene_overlap:
        hint = ""
        if _family(query_ns) != model_fam:
            hint = (
                f" The query's genes look like {query_ns} names while the model was trained on "
                f"{model_namespace} names: add a var column with {model_fam} IDs (e.g. 'gene_ids'), "
                "or pass gene_map= (query name → model name)."
            )
        else:
            hint = " Check that reference and query use the same gene annotation (organism, release)."
        raise GeneAlignmentError(
            f"Only {n_matched} of the model's {n_model} genes ({overlap:.1%}) were found in the query "
            f"({len(query_names)} genes, mapped by {how}); at least {min_gene_overlap:.0%} are required."
            + hint
            + " To map anyway, lower min_gene_overlap."
        )
    if overlap < WARN_OVERLAP:
        warnings.warn(
            f"Only {n_matched} of {n_model} model genes ({overlap:.1%}) were found in the query; "
            "missing genes are treated as zero and predictions may be less accurate.",
            stacklevel=user_stacklevel(),
        )
    if n_duplicated:
        warnings.warn(
            f"{n_duplicated} query gene(s) mapped onto a model gene that was already matched; "
            f"they were {report['duplicates_handling']}.",
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
    return GeneAligner(n_model, input_transform, semantics, aggregation, report)
