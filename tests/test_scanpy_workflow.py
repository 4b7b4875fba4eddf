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


def _counts(adata):
    counts = adata.X.copy()
    counts.data = np.round(np.expm1(counts.data) * np.repeat(adata.obs["nUMI"].to_numpy() / 1e4, np.diff(counts.indptr)))
    return type(adata)(counts, obs=adata.obs.copy(), var=adata.var.copy())


@pytest.mark.parametrize("normalise", [
    dict(target_sum=None, base=None),  # scanpy's default: each cell to the median library size
    dict(target_sum=1e6, base=None),   # log1p CPM
    dict(target_sum=1e4, base=2),      # sc.pp.log1p(base=2)
    dict(target_sum=1e4, base=10),
])
def test_log_values_of_another_total_or_base_give_the_counts_calls(small_model, symphony_split, normalise):
    counts = _counts(symphony_split[1])
    query = counts.copy()
    sc.pp.normalize_total(query, target_sum=normalise["target_sum"])
    sc.pp.log1p(query, base=normalise["base"])
    before = query.X.copy()
    on_log, on_counts = _predict(small_model, query), _predict(small_model, counts)
    assert (query.X != before).nnz == 0
    for level in SYMPHONY_LEVELS:
        np.testing.assert_array_equal(on_log.levels[level]["raw_code"], on_counts.levels[level]["raw_code"])
    assert "brought to natural log1p" in on_log.metadata["input"]["normalisation"]


def test_a_reference_in_log_cpm_trains_the_log_cp10k_model(symphony_split):
    ref = _counts(symphony_split[0])
    cpm = ref.copy()
    sc.pp.normalize_total(cpm, target_sum=1e6)
    sc.pp.log1p(cpm)
    kw = dict(ensemble_size=1, num_epochs=1, show_progress=False, show_summary=False)
    a, b = atlasmtl.build_model(ref, SYMPHONY_LEVELS, **kw), atlasmtl.build_model(cpm, SYMPHONY_LEVELS, **kw)
    assert b.metadata["train_semantics"]["target_sum"] == pytest.approx(1e6, rel=1e-3)
    np.testing.assert_allclose(a.metadata["gene_stats"]["mean"], b.metadata["gene_stats"]["mean"], atol=1e-3)


def test_log_cpm_cut_to_some_genes_warns_with_the_fix(small_model, symphony_split):
    query = _counts(symphony_split[1])
    sc.pp.normalize_total(query, target_sum=1e6)
    sc.pp.log1p(query)
    query = query[:, query.var_names[:1500]].copy()
    with pytest.warns(UserWarning, match=r"more than the 10000 per cell.*layer='counts'"):
        _predict(small_model, query)


def test_square_roots_of_counts_give_the_counts_calls(small_model, symphony_split):
    """``sc.pp.sqrt`` of a counts matrix (values such as 1.414, up to ~30 or beyond): read as the counts they are the
    square roots of, so the calls are those on the counts (they were read as log values, or above 30 as linear
    normalised values, and the calls changed without a word); a reference so given trains the counts' model."""
    counts = _counts(symphony_split[1])
    query = counts.copy()
    sc.pp.sqrt(query)
    assert query.X.max() > 30  # the values log-normalised data cannot reach: read as "other" before
    before = query.X.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on_sqrt = _predict(small_model, query)
    on_counts = _predict(small_model, counts)
    assert (query.X != before).nnz == 0
    for level in SYMPHONY_LEVELS:
        np.testing.assert_array_equal(on_sqrt.levels[level]["raw_code"], on_counts.levels[level]["raw_code"])
    assert "square roots of counts" in on_sqrt.metadata["input"]["normalisation"]
    low = query.copy()  # values under 30 (counts up to 900): read as log values before
    low.X = low.X.minimum(29.0)
    low.X.data[low.X.data >= 29.0] = 1.0
    assert "square roots of counts" in _predict(small_model, low).metadata["input"]["normalisation"]
    ref = _counts(symphony_split[0])
    rooted = ref.copy()
    sc.pp.sqrt(rooted)
    kw = dict(ensemble_size=1, num_epochs=1, show_progress=False, show_summary=False)
    a, b = atlasmtl.build_model(ref, SYMPHONY_LEVELS, **kw), atlasmtl.build_model(rooted, SYMPHONY_LEVELS, **kw)
    np.testing.assert_allclose(a.metadata["gene_stats"]["mean"], b.metadata["gene_stats"]["mean"], atol=1e-3)
