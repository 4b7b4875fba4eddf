"""Gene selection: ``build_model(n_top_genes=...)`` trains on a subset of the reference's genes.

With ``gene_selection="variable"`` they are the most variable: scanpy's ``flavor="seurat"`` ranking,
computed in a streaming pass. The default, ``"variable+labels"``, keeps three quarters of them
(``genes.LABEL_GENE_SHARE``) and fills the rest with the genes that tell the finest level's labels apart (one-way ANOVA F, as scikit-learn's
``f_classif``, from per-label sums of the same pass). The network reads only the kept genes, and each
cell is still normalised over its whole library (as a query is).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
from sklearn.feature_selection import f_classif

import atlasmtl
from atlasmtl.exceptions import ParameterError
from atlasmtl.genes import (
    build_aligner,
    highly_variable_genes,
    LABEL_GENE_SHARE,
    label_informative_order,
    log_gene_statistics,
    reference_gene_statistics,
    selection_aligner,
)
from atlasmtl.inputs import get_matrix_source
from atlasmtl.reference import prepare_reference

from .conftest import SYMPHONY_LEVELS
from .test_shift import _counts

FAST = dict(num_epochs=4, ensemble_size=1, hidden_sizes=(32,), num_threads=1, show_progress=False, show_summary=False)


def _scanpy_hvg(log_values: ad.AnnData, n: int) -> np.ndarray:
    table = sc.pp.highly_variable_genes(log_values, n_top_genes=n, flavor="seurat", inplace=False)
    return np.flatnonzero(table["highly_variable"].to_numpy())


@pytest.mark.parametrize("n", [200, 800])
def test_selection_is_scanpys_seurat_ranking_on_log_values(symphony, n):
    cells = np.arange(symphony.n_obs)
    ours = highly_variable_genes(get_matrix_source(symphony), "lognorm", cells, n, chunk_size=97)
    assert len(ours) == n
    np.testing.assert_array_equal(ours, _scanpy_hvg(symphony, n))


def test_selection_on_counts_normalises_each_cell_first(symphony):
    counts = ad.AnnData(_counts(symphony), obs=symphony.obs, var=symphony.var)
    ours = highly_variable_genes(get_matrix_source(counts), "counts", np.arange(counts.n_obs), 300)
    log_values = counts.copy()
    sc.pp.normalize_total(log_values, target_sum=1e4)
    sc.pp.log1p(log_values)
    np.testing.assert_array_equal(ours, _scanpy_hvg(log_values, 300))
    dense = ad.AnnData(counts.X.toarray(), obs=counts.obs, var=counts.var)  # a dense matrix streams alike
    np.testing.assert_array_equal(highly_variable_genes(get_matrix_source(dense), "counts", np.arange(dense.n_obs), 300), ours)


@pytest.mark.parametrize("semantics", ["lognorm", "counts", "dense counts"])
@pytest.mark.parametrize("n_top_genes", [300, None])
def test_one_read_gives_the_selection_and_the_statistics_of_two_passes(symphony, semantics, n_top_genes):
    """``build_model`` reads the reference once for the selection and the z-score statistics; both are
    exactly what the two separate passes give (the selection, then the statistics of the kept genes)."""
    data = symphony
    if semantics != "lognorm":
        data = ad.AnnData(_counts(symphony), obs=symphony.obs, var=symphony.var)
        if semantics == "dense counts":
            data = ad.AnnData(data.X.toarray(), obs=data.obs, var=data.var)
    kind = "lognorm" if semantics == "lognorm" else "counts"
    source, cells = get_matrix_source(data), np.arange(3, data.n_obs, 2)  # a subset of the rows, as in training
    keep, mean, std = reference_gene_statistics(source, kind, cells, n_top_genes, "zscore", chunk_size=97)
    expected = np.arange(data.n_vars) if n_top_genes is None else highly_variable_genes(source, kind, cells, n_top_genes)
    np.testing.assert_array_equal(keep, expected)
    two_pass = log_gene_statistics(source, selection_aligner(data.n_vars, expected, "zscore", kind), cells,
                                   chunk_size=97)
    np.testing.assert_array_equal(mean, two_pass[0])
    np.testing.assert_array_equal(std, two_pass[1])
    assert reference_gene_statistics(source, kind, cells, n_top_genes, "float")[1:] == (None, None)


def test_model_reads_only_the_selected_genes(symphony_split):
    ref, query = symphony_split
    model = atlasmtl.build_model(ref, SYMPHONY_LEVELS, n_top_genes=300, gene_selection="variable", random_state=0, **FAST)
    expected = _scanpy_hvg(ref, 300)
    assert model.genes == list(ref.var_names[expected])
    assert model.metadata["architecture"]["n_genes"] == 300
    assert model.metadata["train_config"]["n_top_genes"] == 300
    assert model.metadata["train_config"]["gene_selection"] == "variable"
    assert model.metadata["train_config"]["resource_summary"]["reference genes"] == ref.n_vars
    assert model.resource_summary()["model"]["genes"] == f"300 most variable of {ref.n_vars}"
    assert len(model.metadata["gene_stats"]["mean"]) == 300
    result = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
    assert result.metadata["genes"]["n_matched"] == 300
    accuracy = np.mean(np.asarray(result.labels("cell_type_broad")).astype(str) == query.obs["cell_type_broad"].astype(str).to_numpy())
    assert accuracy > 0.8  # 4 epochs of one small network: a floor that a broken selection would fail


def test_selected_reference_cells_are_normalised_over_their_whole_library(symphony_split):
    """A counts reference: the network input of a reference cell is what a query holding the same
    cell (every gene) gets, so the depth a selected gene is scaled by is the cell's whole library."""
    ref, _ = symphony_split
    counts = ad.AnnData(_counts(ref), obs=ref.obs, var=ref.var)
    prepared = prepare_reference(counts, SYMPHONY_LEVELS, None, layer=None, use_raw=False, input_transform="zscore",
                                 n_top_genes=250)
    assert prepared.n_genes == 250 and prepared.aligner.n_model_genes == 250
    genes = list(counts.var_names[prepared.genes])
    query_side = build_aligner(genes, "symbol", {}, get_matrix_source(counts), "zscore", "counts",
                               gene_mean=prepared.aligner.gene_mean, gene_std=prepared.aligner.gene_std)
    rows = counts.X[:50]
    np.testing.assert_allclose(prepared.aligner.sparse_input(rows).toarray(), query_side.sparse_input(rows).toarray(),
                               rtol=1e-6, atol=1e-6)
    totals = np.asarray(rows.sum(axis=1)).ravel()
    kept_totals = np.asarray(rows[:, prepared.genes].sum(axis=1)).ravel()
    assert (kept_totals < totals).all()  # the kept genes alone would give another depth


def test_training_from_disk_selects_the_same_genes(symphony_split, tmp_path):
    ref, _ = symphony_split
    path = tmp_path / "ref.h5ad"
    ref.write_h5ad(path)
    in_memory = atlasmtl.build_model(ref, SYMPHONY_LEVELS, n_top_genes=300, random_state=0, **FAST)
    from_disk = atlasmtl.build_model(str(path), SYMPHONY_LEVELS, n_top_genes=300, random_state=0, **FAST)
    assert from_disk.genes == in_memory.genes


def test_n_top_genes_at_or_above_the_gene_count_keeps_every_gene(synthetic_split):
    ref, _ = synthetic_split
    for n in (ref.n_vars, ref.n_vars + 1, None):
        model = atlasmtl.build_model(ref, ["coarse", "fine"], n_top_genes=n, random_state=0, **FAST)
        assert model.genes == list(ref.var_names)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "5000", True])
def test_bad_n_top_genes_is_a_parameter_error(synthetic_split, bad):
    with pytest.raises(ParameterError, match="n_top_genes"):
        atlasmtl.build_model(synthetic_split[0], ["coarse", "fine"], n_top_genes=bad, **FAST)


def test_selection_is_deterministic_and_leaves_the_reference_untouched(symphony_split):
    ref, _ = symphony_split
    before = ref.X.copy()
    first = highly_variable_genes(get_matrix_source(ref), "lognorm", np.arange(ref.n_obs), 400)
    second = highly_variable_genes(get_matrix_source(ref), "lognorm", np.arange(ref.n_obs), 400)
    np.testing.assert_array_equal(first, second)
    assert (ref.X != before).nnz == 0 if sp.issparse(before) else np.array_equal(ref.X, before)


def _log_cp10k(data: ad.AnnData, kind: str) -> sp.csr_matrix:
    x = sp.csr_matrix(data.X, dtype=np.float64)
    if kind == "counts":
        x = sp.csr_matrix(sp.diags(1e4 / np.asarray(x.sum(axis=1)).ravel()) @ x)
    else:
        x.data = np.expm1(x.data)
    x.data = np.log1p(x.data.astype(np.float32)).astype(np.float64)  # the pass's float32 log values
    return x


@pytest.mark.filterwarnings("ignore:Features .* are constant")  # scikit-learn on genes never detected
@pytest.mark.parametrize("semantics", ["lognorm", "counts", "dense counts"])
def test_label_genes_are_sklearns_anova_f_on_the_labelled_cells(symphony, semantics):
    """The default selection: the most variable genes, then the genes of largest F across the finest
    labels (scikit-learn's ``f_classif`` on log1p CP10k) until n are kept. Cells without a finest label
    count for the variability and the statistics but not for F; a chunked read gives the same genes."""
    data = symphony if semantics == "lognorm" else ad.AnnData(_counts(symphony), obs=symphony.obs, var=symphony.var)
    kind = "lognorm" if semantics == "lognorm" else "counts"
    log_values = _log_cp10k(data, kind)
    if semantics == "dense counts":
        data = ad.AnnData(data.X.toarray(), obs=data.obs, var=data.var)
    labels = data.obs["cell_type"].astype("category")
    codes = labels.cat.codes.to_numpy().astype(np.int32)
    codes[::7] = -1  # unlabelled at the finest level
    source, cells = get_matrix_source(data), np.arange(data.n_obs)
    keep, mean, std = reference_gene_statistics(source, kind, cells, 300, "zscore", chunk_size=97,
                                                labels=codes, n_labels=len(labels.cat.categories))
    n_variable = 300 - int(LABEL_GENE_SHARE * 300)
    variable = highly_variable_genes(source, kind, cells, n_variable)
    with np.errstate(divide="ignore", invalid="ignore"):  # genes constant within every label: F = inf
        f, _ = f_classif(log_values[codes >= 0], codes[codes >= 0])
    by_f = np.argsort(-np.nan_to_num(f), kind="stable")
    expected = np.sort(np.concatenate([variable, by_f[~np.isin(by_f, variable)][: 300 - n_variable]]))
    assert 0 < n_variable < 300 and len(keep) == 300
    assert len(np.intersect1d(variable, by_f[: 300 - n_variable])) > 0  # the two rankings overlap: filled to n
    np.testing.assert_array_equal(keep, expected)
    two_pass = log_gene_statistics(source, selection_aligner(data.n_vars, keep, "zscore", kind), cells, chunk_size=97)
    np.testing.assert_array_equal(mean, two_pass[0])
    np.testing.assert_array_equal(std, two_pass[1])


def test_label_order_ranks_a_perfect_marker_first_and_a_constant_gene_last():
    from atlasmtl.genes import GroupSums

    x = np.array([[1.0, 0.0, 2.0, 5.0], [1.0, 0.0, 3.0, 5.0], [3.0, 0.0, 2.5, 5.0], [3.0, 0.0, 2.0, 5.0]])
    groups = np.array([0, 0, 1, 1])
    sums = np.stack([x[groups == g].sum(axis=0) for g in (0, 1)])
    order = label_informative_order(GroupSums(sums, np.array([2.0, 2.0]), np.zeros(4)), (x**2).sum(axis=0))
    assert order[0] == 0  # constant within each label, different between them
    assert list(order[-2:]) == [1, 3]  # no variation anywhere: F = 0, column order
    one_group = GroupSums(x.sum(axis=0, keepdims=True), np.array([4.0]), np.zeros(4))
    np.testing.assert_array_equal(label_informative_order(one_group, (x**2).sum(axis=0)), np.arange(4))


def test_default_model_keeps_variable_and_label_genes(symphony_split):
    ref, _ = symphony_split
    model = atlasmtl.build_model(ref, SYMPHONY_LEVELS, n_top_genes=300, random_state=0, **FAST)
    assert model.metadata["train_config"]["gene_selection"] == "variable+labels"
    kept = set(model.genes)
    variable = set(ref.var_names[_scanpy_hvg(ref, 300)])
    most_variable = set(ref.var_names[_scanpy_hvg(ref, 300 - int(LABEL_GENE_SHARE * 300))])
    assert len(kept) == 300 and most_variable <= kept and kept != variable
    # the summary said "300 most variable of ..." of a selection of which a quarter are not (until 2026-12-07)
    assert model.resource_summary()["model"]["genes"] == f"300 most variable and label-informative of {ref.n_vars}"


@pytest.mark.parametrize("bad", ["labels", "", None, 1])
def test_bad_gene_selection_is_a_parameter_error(synthetic_split, bad):
    with pytest.raises(ParameterError, match="gene_selection"):
        atlasmtl.build_model(synthetic_split[0], ["coarse", "fine"], n_top_genes=50, gene_selection=bad, **FAST)
