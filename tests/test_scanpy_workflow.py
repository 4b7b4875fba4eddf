"""A query or reference as a scanpy user has it after the usual preprocessing (``normalize_total`` / ``log1p``,
``highly_variable_genes(subset=True)`` with ``raw`` set before): atlasmtl reads it right or names the fix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scanpy as sc

import atlasmtl
from atlasmtl.exceptions import GeneAlignmentError

from .conftest import SYMPHONY_LEVELS


def _predict(model, query, **kw):
    return atlasmtl.predict(model, query, show_progress=False, show_summary=False, **kw)


@pytest.fixture(scope="module")
def small_model(symphony_split):
    ref, _ = symphony_split
    return atlasmtl.build_model(ref, SYMPHONY_LEVELS, ensemble_size=1, num_epochs=3, show_progress=False,
                                show_summary=False)


def _cut_to(query, n_genes):
    """X cut to its first ``n_genes`` genes after ``adata.raw = adata`` (as highly_variable_genes(subset=True))."""
    query = query.copy()
    query.raw = query
    return query[:, query.var_names[:n_genes]].copy()


def test_a_query_cut_to_few_genes_with_raw_is_told_to_use_raw(small_model, symphony_split):
    query = _cut_to(symphony_split[1], 400)  # 400 of the model's 1,767 genes: below min_gene_overlap
    before = query.copy()
    with pytest.raises(GeneAlignmentError, match=r"adata.raw holds 1767 of the model's 1767 genes.*use_raw=True"):
        _predict(small_model, query)
    assert query.obs.equals(before.obs) and (query.X != before.X).nnz == 0
    result = _predict(small_model, query, use_raw=True)
    assert result.metadata["genes"]["n_missing"] == 0


def test_a_query_cut_to_most_genes_with_raw_warns_to_use_raw(small_model, symphony_split):
    query = _cut_to(symphony_split[1], 1500)
    with pytest.warns(UserWarning, match=r"267 of the model's genes are missing.*use_raw=True") as caught:
        result = _predict(small_model, query)
    assert any("use_raw=True" in w for w in result.metadata["genes"]["warnings"])
    # a query without raw, or with raw read, says nothing of raw
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _predict(small_model, query, use_raw=True)
        _predict(small_model, symphony_split[1])
    assert not [w for w in caught if "adata.raw holds" in str(w.message)]


def test_a_path_query_cut_to_few_genes_with_raw_is_told_to_use_raw(small_model, symphony_split, tmp_path):
    path = tmp_path / "hvg.h5ad"
    _cut_to(symphony_split[1], 400).write_h5ad(path)
    with pytest.raises(GeneAlignmentError, match=r"adata.raw holds 1767.*--use-raw"):
        _predict(small_model, path)
