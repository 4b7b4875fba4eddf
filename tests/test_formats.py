"""AnnData as other tools leave it (10x Cell Ranger with antibody or peak features, Seurat conversions,
scvi-tools, loom and CSV round trips): atlasmtl reads it right or names the fix."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import atlasmtl

from .conftest import SYMPHONY_LEVELS


def _predict(model, query, **kw):
    return atlasmtl.predict(model, query, show_progress=False, show_summary=False, **kw)


def _counts(adata):
    counts = sp.csr_matrix(adata.X, copy=True)
    counts.data = np.round(np.expm1(counts.data) * np.repeat(adata.obs["nUMI"].to_numpy() / 1e4, np.diff(counts.indptr)))
    counts.eliminate_zeros()
    return ad.AnnData(counts.astype(np.float32), obs=adata.obs.copy(), var=adata.var.copy())


@pytest.fixture(scope="module")
def counts_split(symphony_split):
    return _counts(symphony_split[0]), _counts(symphony_split[1])


@pytest.fixture(scope="module")
def counts_model(counts_split):
    return atlasmtl.build_model(counts_split[0], SYMPHONY_LEVELS, ensemble_size=1, num_epochs=3, show_progress=False,
                                show_summary=False)


def _same_calls(a, b):
    for level in SYMPHONY_LEVELS:
        np.testing.assert_array_equal(a.levels[level]["raw_code"], b.levels[level]["raw_code"])


def _with_features(adata, kind, names, values):
    """``adata`` as Cell Ranger's file read with gex_only=False: genes, then ``names`` of ``feature_types`` ``kind``."""
    var = adata.var.assign(gene_ids=[f"ENSG{i:011d}" for i in range(adata.n_vars)], feature_types="Gene Expression")
    extra = pd.DataFrame({"gene_ids": names, "feature_types": kind}, index=names)
    return ad.AnnData(sp.hstack([adata.X, sp.csr_matrix(values)], format="csr").astype(np.float32),
                      obs=adata.obs.copy(), var=pd.concat([var, extra]))


@pytest.mark.parametrize("kind,n_features,per_cell", [("Antibody Capture", 50, 3000.0), ("Peaks", 2000, 5000.0)])
def test_antibody_or_peak_features_stay_out_of_the_normalisation(counts_model, counts_split, kind, n_features,
                                                                 per_cell):
    query = counts_split[1]
    rng = np.random.default_rng(0)
    names = ([f"CD{i}_TotalSeqB" for i in range(n_features)] if kind == "Antibody Capture"
             else [f"chr1:{1000 * i}-{1000 * i + 500}" for i in range(n_features)])
    values = rng.poisson(np.outer(rng.lognormal(np.log(per_cell), 0.5, query.n_obs),
                                  rng.dirichlet(np.full(n_features, 0.5)))).astype(np.float32)
    full = _with_features(query, kind, names, values)
    before = full.copy()
    with pytest.warns(UserWarning, match=rf"feature_types'\] marks {n_features} .*{kind}: {n_features}.*"
                                         r"adata\[:, adata.var\['feature_types'\] == 'Gene Expression'\]"):
        result = _predict(counts_model, full)
    _same_calls(result, _predict(counts_model, query))
    assert result.metadata["input"]["features_left_out"] == {kind: n_features}
    assert (full.X != before.X).nnz == 0 and full.var.equals(before.var)


def test_a_reference_with_antibody_features_trains_on_its_genes(counts_split):
    ref = counts_split[0]
    rng = np.random.default_rng(1)
    names = [f"CD{i}_TotalSeqB" for i in range(30)]
    values = rng.poisson(np.outer(rng.lognormal(np.log(2000), 0.5, ref.n_obs), rng.dirichlet(np.ones(30)))).astype(np.float32)
    kw = dict(ensemble_size=1, num_epochs=1, show_progress=False, show_summary=False)
    with pytest.warns(UserWarning, match="feature_types"):
        model = atlasmtl.build_model(_with_features(ref, "Antibody Capture", names, values), SYMPHONY_LEVELS, **kw)
    plain = atlasmtl.build_model(ref, SYMPHONY_LEVELS, **kw)
    assert model.genes == plain.genes
    np.testing.assert_allclose(model.metadata["gene_stats"]["mean"], plain.metadata["gene_stats"]["mean"], atol=1e-5)


@pytest.mark.parametrize("seurat_sct", [False, True])
def test_log1p_of_counts_not_normalised_per_cell_reads_as_the_counts(counts_model, counts_split, seurat_sct):
    """``sc.pp.log1p`` without ``normalize_total``, or Seurat's SCTransform ``data`` slot (log1p of counts
    corrected to the median depth) converted to X: each cell is normalised as its counts would be."""
    counts = counts_split[1]
    query = counts.copy()
    if seurat_sct:  # counts brought to the median library size, rounded (as SCTransform's corrected counts)
        totals = np.asarray(query.X.sum(axis=1)).ravel()
        query.X.data = np.round(query.X.data * np.repeat(np.median(totals) / totals, np.diff(query.X.indptr)))
        query.X.eliminate_zeros()
        counts = query.copy()
    sc.pp.log1p(query)
    before = query.X.copy()
    on_log = _predict(counts_model, query)
    _same_calls(on_log, _predict(counts_model, counts))
    assert "of counts not normalised per cell" in on_log.metadata["input"]["normalisation"]
    assert (query.X != before).nnz == 0


def test_log_cp10k_cut_to_some_genes_is_not_read_as_log_counts(counts_model, symphony_split):
    # the committed fixture is log1p CP10k cut to 1,767 genes: the rows' totals differ, and it is read as it is
    result = _predict(counts_model, symphony_split[1])
    assert "normalisation" not in result.metadata["input"]


def test_a_loom_read_with_default_names_is_told_where_the_genes_are(counts_model, counts_split, tmp_path):
    pytest.importorskip("loompy")
    path = tmp_path / "query.loom"
    counts_split[1].write_loom(path)  # anndata writes var_names / obs_names attributes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query = ad.read_loom(path)  # default var_names="Gene": genes named 0, 1, ...
    with pytest.raises(atlasmtl.exceptions.GeneAlignmentError,
                       match=r"var\['var_names'\] holds 1767 of the model's genes.*adata.var_names = adata.var\['var_names'\]"):
        _predict(counts_model, query)


def test_a_genes_by_cells_table_is_told_to_transpose(counts_model, counts_split, tmp_path):
    path = tmp_path / "genes_by_cells.csv"
    counts_split[1].to_df().T.to_csv(path)
    query = sc.read_csv(path)
    with pytest.raises(atlasmtl.exceptions.GeneAlignmentError, match=r"obs_names\) hold 1767 .*transposed.*adata\.T"):
        _predict(counts_model, query)
    _same_calls(_predict(counts_model, query.T), _predict(counts_model, counts_split[1]))


@pytest.mark.parametrize("library_size", [1.0, 1e4])
def test_denoised_expression_warns_to_pass_the_counts(counts_model, counts_split, library_size):
    """X as scvi-tools' get_normalized_expression leaves it (smooth frequencies, no zeros; counts in a layer)."""
    counts = counts_split[1]
    freq = np.asarray(counts.X.toarray()) / np.asarray(counts.X.sum(axis=1))
    smooth = 0.5 * freq + 0.5 * (freq.mean(axis=0) + 1e-6)  # a softmax: no value is 0
    query = ad.AnnData((library_size * smooth / smooth.sum(axis=1, keepdims=True)).astype(np.float32),
                       obs=counts.obs.copy(), var=counts.var.copy(), layers={"counts": counts.X.copy()})
    with pytest.warns(UserWarning, match=r"almost no zeros.*denoised.*layer='counts'"):
        _predict(counts_model, query)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _predict(counts_model, query, layer="counts")
        _predict(counts_model, sc.pp.log1p(counts, copy=True))
    assert not [w for w in caught if "almost no zeros" in str(w.message)]


def test_seurat_dashes_match_the_reference_underscores(counts_model, counts_split):
    """Seurat replaces ``_`` by ``-`` in feature names: a query converted from Seurat matches a model whose gene
    names hold underscores (and the other way round), counted apart from case-insensitive matches (no species
    warning), with the same calls as under the model's own names."""
    from atlasmtl.genes import build_aligner
    from atlasmtl.inputs import get_matrix_source

    _, query = counts_split
    genes = [str(g) for g in query.var_names]
    model_genes = [g[:2] + "_" + g[2:] if i < 30 else g for i, g in enumerate(genes)]  # 30 names with "_"
    seurat = query.copy()
    seurat.var_names = [g.replace("_", "-") for g in model_genes]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = build_aligner(model_genes, "symbol", {}, get_matrix_source(seurat), "float", "counts",
                               min_gene_overlap=0.0).report
    assert report["n_matched"] == len(genes)
    assert report["n_matched_underscore_dash"] == sum("_" in g for g in model_genes) >= 30
    assert report["n_matched_case_insensitive"] == 0
    # a Seurat-built model ("-") against a query with the original underscores
    back = build_aligner(list(seurat.var_names), "symbol", {}, get_matrix_source(query.copy()), "float", "counts",
                         min_gene_overlap=0.0).report
    assert back["n_matched"] == len(genes) - 30  # the query's names lack the inserted "_": nothing to fold
    underscored = query.copy()
    underscored.var_names = model_genes
    back = build_aligner(list(seurat.var_names), "symbol", {}, get_matrix_source(underscored), "float", "counts",
                         min_gene_overlap=0.0).report
    assert back["n_matched"] == len(genes) and back["n_matched_underscore_dash"] == report["n_matched_underscore_dash"]
    piped = underscored.copy()
    piped.var_names = [g.replace("_", "|") for g in model_genes]  # SeuratObject replaces "|" by "-" too
    assert build_aligner(list(seurat.var_names), "symbol", {}, get_matrix_source(piped), "float", "counts",
                         min_gene_overlap=0.0).report["n_matched"] == len(genes)
    # end to end: the model's "HLA-DRA", "MT-CO1", ... read from a query that spells them "HLA_DRA", "MT_CO1"
    dashed = {str(g) for g in counts_model.genes if "-" in str(g)}
    assert len(dashed) > 10
    spelt = query.copy()
    spelt.var_names = [g.replace("-", "_") if g in dashed else g for g in genes]
    a, b = _predict(counts_model, query), _predict(counts_model, spelt)
    assert b.metadata["genes"]["n_matched_underscore_dash"] == len(dashed)
    assert b.metadata["genes"]["n_matched"] == a.metadata["genes"]["n_matched"]
    _same_calls(a, b)
