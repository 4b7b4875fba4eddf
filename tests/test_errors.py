"""Bad input gets a clear atlasmtl error naming the problem and the fix; the user's data stays as it was."""

from __future__ import annotations

import re

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import atlasmtl
from atlasmtl.exceptions import (
    AtlasMTLError,
    CoordinateError,
    DeviceError,
    EmptyDataError,
    GeneAlignmentError,
    InputError,
    InvalidValuesError,
    LabelError,
    MatrixSemanticsError,
    ParameterError,
)

from .conftest import LEVELS



def _snapshot(adata):
    X = adata.X
    return {
        "X": X.copy() if not sp.issparse(X) else X.toarray(),
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "layers": sorted(adata.layers.keys()),
        "uns": sorted(adata.uns.keys()),
    }


def _assert_unchanged(adata, snap):
    X = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    np.testing.assert_array_equal(X, snap["X"])
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    assert sorted(adata.obsm.keys()) == sorted(snap["obsm"])
    for k, v in snap["obsm"].items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[k]), v)
    assert sorted(adata.layers.keys()) == snap["layers"] and sorted(adata.uns.keys()) == snap["uns"]


def _train_fails(adata, exc, match, **kw):
    snap = _snapshot(adata)
    kw.setdefault("label_columns", LEVELS)
    kw.setdefault("num_epochs", 1)
    with pytest.raises(exc, match=match) as info:
        atlasmtl.build_model(adata, show_progress=False, **kw)
    assert isinstance(info.value, AtlasMTLError)
    _assert_unchanged(adata, snap)
    return info.value


def _predict_fails(model, adata, exc, match, **kw):
    snap = _snapshot(adata)
    with pytest.raises(exc, match=match) as info:
        atlasmtl.predict(model, adata, show_progress=False, **kw)
    assert isinstance(info.value, AtlasMTLError)
    _assert_unchanged(adata, snap)
    return info.value


@pytest.fixture
def ref(pbmc_split):
    return pbmc_split[0].copy()


@pytest.fixture
def query(pbmc_split):
    return pbmc_split[1].copy()


# ---------------------------------------------------------------- empty and invalid matrices
def test_empty_anndata(ref, pbmc_model):
    _train_fails(ref[:0].copy(), EmptyDataError, "0 cells")
    _train_fails(ref[:, :0].copy(), EmptyDataError, "0 genes")
    _predict_fails(pbmc_model, ref[:0].copy(), EmptyDataError, "at least one cell")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_values(ref, query, pbmc_model, bad):
    X = ref.X.tolil()
    X[3, 5] = bad
    ref.X = X.tocsr()
    _train_fails(ref, InvalidValuesError, "NaN or infinite")
    X = query.X.toarray()
    X[0, 0] = bad
    query.X = X
    _predict_fails(pbmc_model, query, InvalidValuesError, "NaN or infinite")


def test_values_no_expression_measure_reaches(ref, query, pbmc_model):
    """A value of 1e30 (a corrupted matrix): training stopped with numpy's "n < 0" from the shift training's
    integer counts and prediction ran on; both now name the value."""
    X = ref.X.tolil()
    X[3, 5] = 1e30
    ref.X = X.tocsr()
    _train_fails(ref, InvalidValuesError, r"1 value\(s\) beyond ±1e\+12 \(the most extreme 1e\+30\)")
    X = query.X.toarray()
    X[0, 0] = -1e30
    query.X = X
    _predict_fails(pbmc_model, query, InvalidValuesError, r"the most extreme -1e\+30")


def test_negative_values(ref, query, pbmc_model):
    X = ref.X.toarray()
    X[0, :5] = -1.0
    ref.X = X
    err = _train_fails(ref, MatrixSemanticsError, "negative values")
    assert "use_raw=True" in str(err)
    query.X = query.X.toarray() - 0.5
    _predict_fails(pbmc_model, query, MatrixSemanticsError, "negative values")


# ---------------------------------------------------------------- labels
def test_missing_label_column(ref):
    _train_fails(ref, LabelError, "'anno_lv9' is not in adata.obs", label_columns=["lineage", "anno_lv9"])


def test_all_nan_label_column(ref):
    ref.obs["empty"] = np.nan
    _train_fails(ref, LabelError, "no labels", label_columns=["empty"])


def test_single_class_label_column(ref):
    ref.obs["one"] = "T"
    _train_fails(ref, LabelError, "single class", label_columns=["one"])


def test_nan_labels_in_some_cells_train_on_the_labelled(ref, query):
    ref.obs["bulk_labels"] = ref.obs["bulk_labels"].astype(object)
    ref.obs.iloc[:30, ref.obs.columns.get_loc("bulk_labels")] = np.nan
    ref.obs.iloc[:10, ref.obs.columns.get_loc("lineage")] = np.nan
    snap = _snapshot(ref)
    with pytest.warns(UserWarning) as record:
        model = atlasmtl.build_model(ref, LEVELS, num_epochs=3, show_progress=False)
    messages = " ".join(str(w.message) for w in record)
    assert "10 reference cell(s) have no label at any level and were dropped" in messages
    assert "30 reference cell(s) have no label in 'bulk_labels'" in messages
    _assert_unchanged(ref, snap)
    assert model.train_config["resource_summary"]["dropped unlabelled cells"] == 10
    assert model.reference["embedding"].shape[0] == ref.n_obs - 10
    assert (model.reference["labels"]["bulk_labels"] == -1).sum() == 20
    assert atlasmtl.predict(model, query, show_progress=False).n_obs == query.n_obs


# ---------------------------------------------------------------- names
def test_non_unique_names(ref, query, pbmc_model):
    dup = ref.copy()
    dup.obs_names = [ref.obs_names[0]] * 2 + list(ref.obs_names[2:])
    _train_fails(dup, InputError, "obs_names are not unique.*obs_names_make_unique")
    dup = ref.copy()
    dup.var_names = [ref.var_names[0]] * 2 + list(ref.var_names[2:])
    _train_fails(dup, InputError, "var_names are not unique.*var_names_make_unique")
    dupq = query.copy()
    dupq.obs_names = [query.obs_names[0]] * 2 + list(query.obs_names[2:])
    _predict_fails(pbmc_model, dupq, InputError, "obs_names are not unique")


# ---------------------------------------------------------------- coordinates
def test_coordinate_target_problems(ref):
    _train_fails(ref, CoordinateError, "'X_missing' is not in adata.obsm", coord_targets={"umap": "X_missing"})
    for slip in ("umap", "X_UMAP"):  # scanpy's key is X_umap: the message names it
        _train_fails(ref, CoordinateError, re.escape(f"= '{slip}' is not in adata.obsm; available keys: ['X_umap', "
                                                     "'X_ref_latent']. Did you mean 'X_umap'?"), coord_targets={"umap": slip})
    _train_fails(ref, CoordinateError, "one row per cell", coord_targets={"umap": np.zeros((5, 2))})
    ref.obsm["X_bad"] = np.asarray(ref.obsm["X_umap"]).copy()
    ref.obsm["X_bad"][3, 1] = np.nan
    _train_fails(ref, CoordinateError, "NaN", coord_targets={"umap": "X_bad"})


# ---------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"knn_k": 0}, "knn_k"),
        ({"knn_k": -3}, "knn_k"),
        ({"confidence_high": 1.5}, r"confidence_high=1.5 must be a number in \[0, 1\]"),
        ({"margin_threshold": -0.1}, "margin_threshold"),
        ({"knn_conf_low": 2}, "knn_conf_low"),
        ({"confidence_low": 0.8, "confidence_high": 0.7}, "confidence_low=0.8 is above confidence_high=0.7"),
        ({"knn_correction": "sometimes"}, "knn_correction='sometimes' must be one of"),
        ({"device": "tpu"}, "device='tpu' is not recognised"),
        ({"batch_size": 0}, "batch_size"),
        ({"min_gene_overlap": 1.5}, "min_gene_overlap"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_prediction_parameters_out_of_range(pbmc_model, query, kw, match):
    _predict_fails(pbmc_model, query, ParameterError, match, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_epochs": 0}, "num_epochs"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"val_fraction": 1.2}, "val_fraction"),
        ({"input_transform": "log"}, "input_transform='log'"),
        ({"reference_storage": "cloud"}, "reference_storage"),
        ({"hidden_sizes": []}, "hidden_sizes"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"lr_schedule": "step"}, "lr_schedule='step'"),
        ({"min_steps": -1}, "min_steps"),
        ({"device": "gpu"}, "device='gpu' is not recognised"),
    ],
)
def test_training_parameters_out_of_range(ref, kw, match):
    _train_fails(ref, ParameterError, match, **kw)


def test_cuda_without_cuda(ref, query, pbmc_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for machines without it")
    _train_fails(ref, DeviceError, "no CUDA device", device="cuda")
    _predict_fails(pbmc_model, query, DeviceError, "device='auto'", device="cuda")


def test_query_sharing_no_genes(pbmc_model, query):
    q = query.copy()
    q.var_names = [f"NOTAGENE{i}" for i in range(q.n_vars)]
    _predict_fails(pbmc_model, q, GeneAlignmentError, "Only 0 of the model's 765 genes")


def test_not_a_model(query, pbmc_model):
    """A model path (what the command line's --model takes) is told to load it first; swapped arguments are named."""
    with pytest.raises(ParameterError, match=r"not str: load it first, model = atlasmtl.TrainedModel.load\('model/'\)"):
        atlasmtl.predict("model/", query)
    with pytest.raises(ParameterError, match=r"not AnnData: the arguments are swapped, predict\(model, adata\)"):
        atlasmtl.predict(query, pbmc_model)


def test_missing_file_and_layer(pbmc_model, query, tmp_path):
    with pytest.raises(InputError, match="No such file"):
        atlasmtl.predict(pbmc_model, tmp_path / "nope.h5ad")
    (tmp_path / "broken.h5ad").write_bytes(b"not an h5ad")
    with pytest.raises(InputError, match="Could not read"):
        atlasmtl.predict(pbmc_model, tmp_path / "broken.h5ad")
    # another format, named by its ending: how to read it (a CSV was told it might be a cut-short .h5ad)
    pd.DataFrame({"CD3E": [1, 0]}, index=["c1", "c2"]).to_csv(tmp_path / "cells.csv")
    with pytest.raises(InputError, match=r"atlasmtl reads AnnData \.h5ad files .*sc\.read_csv\(path\)"):
        atlasmtl.predict(pbmc_model, tmp_path / "cells.csv")
    with h5py.File(tmp_path / "filtered_feature_bc_matrix.h5", "w") as f:  # HDF5, but not an AnnData
        f.create_group("matrix")
    with pytest.raises(InputError, match=r"not an AnnData \.h5ad file: it has no 'obs'.*sc\.read_10x_h5\(path\)"):
        atlasmtl.predict(pbmc_model, tmp_path / "filtered_feature_bc_matrix.h5")
    _predict_fails(pbmc_model, query, InputError, "layer='counts' is not in the AnnData", layer="counts")
    _predict_fails(pbmc_model, query, InputError, "has no .raw", use_raw=True)
