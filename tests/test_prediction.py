"""Prediction: gating, KNN modes, coordinates, gene alignment, writeback and determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import atlasmtl
from atlasmtl.network import member_networks
from atlasmtl.exceptions import GeneAlignmentError, InputError
from atlasmtl.gating import GatingConfig, apply_gate, top_two
from atlasmtl.knn import vote
from atlasmtl.result import column_names

from .conftest import LEVELS
from .synthetic import SYNTHETIC_LEVELS


def _predict(model, query, **kw):
    return atlasmtl.predict(model, query, show_progress=False, **kw)


# ---------------------------------------------------------------- gating and voting units
def test_top_two_confidence_and_margin():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    code, conf, margin = top_two(probs)
    np.testing.assert_array_equal(code, [0, 0])
    np.testing.assert_allclose(conf, [0.7, 0.4])
    np.testing.assert_allclose(margin, [0.5, 0.05])


def test_gate_rules():
    cfg = GatingConfig(confidence_high=0.7, confidence_low=0.4, margin_threshold=0.2, knn_conf_low=0.6)
    raw = np.array([0, 1, 2, 0, 1])
    conf = np.array([0.9, 0.65, 0.3, 0.5, 0.3])
    margin = np.array([0.8, 0.5, 0.05, 0.1, 0.01])
    knn = np.array([-1, 2, 2, 1, 1])
    frac = np.array([0.0, 0.8, 0.9, 0.4, 0.5])
    covered = np.array([False, True, True, True, True])
    g = apply_gate(raw, conf, margin, knn, frac, covered, cfg)
    # cell 0 confident; 1 low, a strong vote for another class → the call stands (the vote never replaces it);
    # 2 below confidence_low, rescued by a strong vote confirming its call; 3 low with a weak vote → the
    # call stands (above confidence_low); 4 below confidence_low with a weak confirming vote → Unknown
    np.testing.assert_array_equal(g["code"], [0, 1, 2, 0, -1])
    np.testing.assert_array_equal(g["is_low_conf"], [False, True, True, True, True])
    np.testing.assert_array_equal(g["used_knn"], [False, False, True, False, False])
    off = apply_gate(raw, conf, margin, knn, frac, np.zeros(5, bool), cfg)
    np.testing.assert_array_equal(off["code"], [0, 1, -1, 0, -1])


def test_vote_fractions_and_unlabelled_neighbours():
    ref_codes = np.array([0, 0, 1, 1, 1, -1])
    idx = np.array([[0, 1, 2], [2, 3, 5], [5, 5, 5]])
    code, frac = vote(idx, ref_codes, 2)
    np.testing.assert_array_equal(code, [0, 1, -1])
    np.testing.assert_allclose(frac, [2 / 3, 2 / 3, 0.0])


def test_synthetic_types_are_learned_and_dense_equals_sparse(synthetic_model, synthetic_split):
    _, query = synthetic_split
    sparse = _predict(synthetic_model, query)
    dense_query = query.copy()
    dense_query.X = dense_query.X.toarray()
    dense = _predict(synthetic_model, dense_query)
    for lv in SYNTHETIC_LEVELS:
        np.testing.assert_array_equal(sparse.levels[lv]["code"], dense.levels[lv]["code"])
        np.testing.assert_allclose(sparse.levels[lv]["conf"], dense.levels[lv]["conf"], rtol=1e-6)
        # marker blocks tenfold above background: five epochs learn them (chance is 1/3 and 1/6)
        assert np.mean(sparse.labels(lv).astype(str) == query.obs[lv].to_numpy()) > 0.7, lv


# ---------------------------------------------------------------- KNN modes on real data
def test_knn_modes(pbmc_model, query_copy):
    off = _predict(pbmc_model, query_copy, knn_correction="off")
    low = _predict(pbmc_model, query_copy, knn_correction="low_conf_only")
    full = _predict(pbmc_model, query_copy, knn_correction="all")
    n = query_copy.n_obs
    assert off.metadata["prediction_runtime"]["knn_cells_searched"] == 0
    any_low = np.zeros(n, bool)
    for lv in LEVELS:
        r_off, r_low, r_all = off.levels[lv], low.levels[lv], full.levels[lv]
        assert not r_off["used_knn"].any()
        # network outputs do not depend on the KNN mode
        np.testing.assert_array_equal(r_off["raw_code"], r_low["raw_code"])
        np.testing.assert_array_equal(r_off["is_low_conf"], r_low["is_low_conf"])
        # low_conf_only: KNN touches only low-confidence cells; confident cells keep the network label
        # (unless the novelty score's input view makes them Unknown, which needs no low confidence)
        assert not r_low["used_knn"][~r_low["is_low_conf"]].any()
        confident = ~r_low["is_low_conf"]
        np.testing.assert_array_equal(r_low["code"][confident & ~r_low["is_novel"]],
                                      r_low["raw_code"][confident & ~r_low["is_novel"]])
        assert (r_low["code"][confident & r_low["is_novel"]] == -1).all()
        assert np.isnan(r_low["knn_vote_frac"][confident]).all()
        assert not np.isnan(r_low["knn_vote_frac"][r_low["is_low_conf"]]).any()
        # all: every cell has a vote
        assert not np.isnan(r_all["knn_vote_frac"]).any()
        any_low |= r_low["is_low_conf"]
        # an accepted vote confirms the network's call; otherwise the call is as without KNN
        acc = r_low["used_knn"]
        np.testing.assert_array_equal(r_low["code"][acc], r_low["raw_code"][acc])
        np.testing.assert_array_equal(r_low["knn_code"][acc], r_low["raw_code"][acc])
        np.testing.assert_array_equal(r_low["code"][~acc], r_off["code"][~acc])
    assert low.metadata["prediction_runtime"]["knn_cells_searched"] == int(any_low.sum())
    assert 0 < any_low.sum() < n
    assert full.metadata["prediction_runtime"]["knn_cells_searched"] == n


def test_knn_space_keeps_label_neighbourhoods(pbmc_model):
    agreement = pbmc_model.train_config["knn_space"]["neighbour_label_agreement"]
    assert agreement is not None and agreement > 0.8


# ---------------------------------------------------------------- coordinates
def test_coordinate_heads_place_query_on_reference_umap(pbmc_model, pbmc_split):
    _, query = pbmc_split
    result = _predict(pbmc_model, query, coordinates="heads")
    assert result.metadata["settings"]["coordinates"] == "heads"
    pred, true = result.coords["umap"], np.asarray(query.obsm["X_umap"])
    assert pred.shape == true.shape
    rmse = np.sqrt(np.mean((pred - true) ** 2))
    spread = np.sqrt(np.mean((true - true.mean(0)) ** 2))
    assert rmse < 0.5 * spread, (rmse, spread)
    for d in range(2):
        assert np.corrcoef(pred[:, d], true[:, d])[0, 1] > 0.8
    assert result.coords["latent"].shape == (query.n_obs, query.obsm["X_ref_latent"].shape[1])


def test_neighbour_coordinates_place_query_closer_than_heads(pbmc_model, pbmc_split):
    """The default places a cell at the mean coordinates of its nearest reference cells: nearer its own UMAP
    position than the heads put it, not drawn toward the middle, and with the same calls."""
    ref, query = pbmc_split
    heads = _predict(pbmc_model, query, coordinates="heads")
    placed = _predict(pbmc_model, query)
    assert placed.metadata["settings"]["coordinates"] == "neighbours"
    assert placed.summary()["query"]["coordinates"] == "latent, umap from the mean of each cell's 15 nearest reference cells"
    assert heads.summary()["query"]["coordinates"] == "latent, umap from the coordinate heads"
    true = np.asarray(query.obsm["X_umap"])

    def rmse(xy):
        return np.sqrt(np.mean(np.sum((xy - true) ** 2, axis=1)))

    def spread(xy):
        return np.sqrt(np.mean(np.sum((xy - xy.mean(0)) ** 2, axis=1)))

    assert rmse(placed.coords["umap"]) < 0.75 * rmse(heads.coords["umap"])
    assert abs(spread(placed.coords["umap"]) / spread(true) - 1) < abs(spread(heads.coords["umap"]) / spread(true) - 1)
    assert placed.coords["latent"].shape == heads.coords["latent"].shape
    for lv in LEVELS:
        np.testing.assert_array_equal(placed.levels[lv].pred, heads.levels[lv].pred)
    # with one neighbour, every cell sits exactly on a reference cell
    one = _predict(pbmc_model, query, knn_k=1, knn_correction="off")
    ref_xy = np.asarray(ref.obsm["X_umap"], dtype=np.float32)
    gaps = np.abs(one.coords["umap"][:, None, :] - ref_xy[None]).sum(axis=2).min(axis=1)
    assert gaps.max() < 1e-5


def test_neighbour_coordinates_leave_cells_without_signal_unplaced(pbmc_model, pbmc_split):
    _, query = pbmc_split
    q = query[:20].copy()
    q.X = np.asarray(q.X.toarray() if hasattr(q.X, "toarray") else q.X).copy()
    q.X[:3] = 0.0
    with pytest.warns(UserWarning, match="detect none"):
        result = _predict(pbmc_model, q)
    assert np.isnan(result.coords["umap"][:3]).all() and np.isfinite(result.coords["umap"][3:]).all()
    assert np.isfinite(_predict(pbmc_model, q[3:].copy()).coords["umap"]).all()


def test_coordinate_source_choice(pbmc_model, pbmc_split):
    import copy

    from atlasmtl.exceptions import ParameterError

    _, query = pbmc_split
    with pytest.raises(ParameterError, match="coordinates"):
        _predict(pbmc_model, query[:10].copy(), coordinates="umap")
    older = copy.copy(pbmc_model)  # a model saved before the reference's coordinates were stored
    older.reference = {k: v for k, v in pbmc_model.reference.items() if k != "coords"}
    older._search = None
    with pytest.raises(ParameterError, match="coordinates='heads'"):
        _predict(older, query[:10].copy(), coordinates="neighbours")
    auto = _predict(older, query[:10].copy())
    assert auto.metadata["settings"]["coordinates"] == "heads"
    np.testing.assert_array_equal(auto.coords["umap"], _predict(pbmc_model, query[:10].copy(), coordinates="heads").coords["umap"])


# ---------------------------------------------------------------- gene alignment
def test_missing_and_reordered_genes(pbmc_model, pbmc_split):
    _, query = pbmc_split
    base = _predict(pbmc_model, query, knn_correction="off")
    rng = np.random.default_rng(0)
    shuffled = query[:, rng.permutation(query.n_vars)].copy()
    same = _predict(pbmc_model, shuffled, knn_correction="off")
    np.testing.assert_allclose(same.levels["bulk_labels"]["conf"], base.levels["bulk_labels"]["conf"], rtol=1e-5)
    keep = np.sort(rng.choice(query.n_vars, size=int(query.n_vars * 0.7), replace=False))
    with pytest.warns(UserWarning, match="model genes"):
        partial = _predict(pbmc_model, query[:, keep].copy(), knn_correction="off")
    genes = partial.metadata["genes"]
    assert genes["n_matched"] == len(keep) and genes["n_missing"] == query.n_vars - len(keep)
    agree = np.mean(partial.levels["lineage"]["raw_code"] == base.levels["lineage"]["raw_code"])
    assert agree > 0.8
    with pytest.raises(GeneAlignmentError, match=r"Only \d+ of the model's 765 genes"):
        _predict(pbmc_model, query[:, : query.n_vars // 3].copy())


def test_extra_query_genes_are_dropped(pbmc_model, pbmc_split):
    import anndata as ad
    import scipy.sparse as sp

    _, query = pbmc_split
    extra = ad.AnnData(
        X=sp.random(query.n_obs, 5, density=0.5, format="csr", random_state=0, dtype=np.float32),
        obs=query.obs[[]],
        var=pd.DataFrame(index=[f"EXTRA{i}" for i in range(5)]),
    )
    wide = ad.concat([query, extra], axis=1, merge="first")
    res = _predict(pbmc_model, wide, knn_correction="off")
    base = _predict(pbmc_model, query, knn_correction="off")
    assert res.metadata["genes"]["n_query_genes_unused"] == 5
    np.testing.assert_allclose(res.levels["lineage"]["conf"], base.levels["lineage"]["conf"], rtol=1e-5)


# ---------------------------------------------------------------- writeback
def test_writeback_columns_per_mode(pbmc_model, pbmc_split):
    _, query = pbmc_split
    result = _predict(pbmc_model, query)
    expected = {
        "minimal": ["pred"],
        "standard": ["pred", "conf", "margin", "is_unknown"],
        "full": ["pred", "conf", "margin", "is_unknown", "raw", "knn", "knn_vote_frac", "is_low_conf", "used_knn",
                 "novelty", "is_novel", "neighbourhood_novelty"],
    }
    for mode, fields in expected.items():
        frame = result.to_dataframe(mode)
        assert list(frame.columns) == [column_names(lv)[f] for lv in LEVELS for f in fields]
        adata = query.copy()
        adata.obs["my_col"] = 1
        out = result.to_adata(adata, mode=mode)
        assert out is adata
        assert [c for c in out.obs.columns if c != "my_col"] == list(frame.columns) or set(frame.columns) <= set(out.obs)
        assert "my_col" in out.obs and "atlasmtl" in out.uns
        assert not any(k.startswith("X_pred_") for k in out.obsm)
    # a full write followed by a minimal one replaces atlasmtl's columns but keeps the user's
    adata = query.copy()
    adata.obs["my_col"] = 1
    result.to_adata(adata, mode="full", include_coords=True)
    assert {"X_pred_umap", "X_pred_latent"} <= set(adata.obsm)
    result.to_adata(adata, mode="minimal")
    assert set(adata.obs.columns) == {"lineage", "bulk_labels", "my_col", "pred_lineage", "pred_bulk_labels"}
    uns = adata.uns["atlasmtl"]
    assert uns["genes"]["n_matched"] == 765 and "prediction_runtime" in uns and "settings" in uns


def test_writeback_refuses_a_different_anndata(pbmc_model, pbmc_split):
    ref, query = pbmc_split
    result = _predict(pbmc_model, query)
    with pytest.raises(InputError, match="not the one"):
        result.to_adata(ref)


def test_unknown_is_a_category(pbmc_model, query_copy):
    result = _predict(pbmc_model, query_copy, confidence_low=0.95, confidence_high=0.95)
    labels = result.labels("bulk_labels")
    assert "Unknown" in labels.categories
    assert (np.asarray(labels) == "Unknown").sum() == result.levels["bulk_labels"]["is_unknown"].sum() > 0


def test_result_written_uns_survives_h5ad_roundtrip(pbmc_model, query_copy, tmp_path):
    import anndata as ad

    result = _predict(pbmc_model, query_copy)
    result.to_adata(query_copy, mode="full", include_coords=True)
    query_copy.write_h5ad(tmp_path / "annotated.h5ad")
    back = ad.read_h5ad(tmp_path / "annotated.h5ad")
    assert back.obs["pred_bulk_labels"].equals(query_copy.obs["pred_bulk_labels"])
    assert back.uns["atlasmtl"]["settings"]["knn_correction"] == "low_conf_only"
    # lists of booleans stay booleans (not the strings "True" / "False")
    for lv, known in result.metadata["reference_classes"].items():
        stored = back.uns["atlasmtl"]["reference_classes"][lv]
        assert stored["input_view"].dtype == bool and stored["input_view"].tolist() == known["input_view"], lv
        assert stored["cells"].tolist() == known["cells"], lv


# ---------------------------------------------------------------- determinism
def test_same_random_state_gives_identical_model_and_predictions(synthetic_split):
    ref, query = synthetic_split
    kw = dict(num_epochs=5, show_progress=False, random_state=7, val_fraction=0.2, hidden_sizes=(32, 16))
    a = atlasmtl.build_model(ref, SYNTHETIC_LEVELS, coord_targets={"umap": "X_umap"}, **kw)
    b = atlasmtl.build_model(ref, SYNTHETIC_LEVELS, coord_targets={"umap": "X_umap"}, **kw)
    for (name, pa), (_, pb) in zip(a.network.state_dict().items(), b.network.state_dict().items()):
        assert torch.equal(pa, pb), name
    ra, rb = _predict(a, query, knn_correction="all"), _predict(b, query, knn_correction="all")
    for lv in SYNTHETIC_LEVELS:
        np.testing.assert_array_equal(ra.levels[lv]["conf"], rb.levels[lv]["conf"])
        np.testing.assert_array_equal(ra.levels[lv]["code"], rb.levels[lv]["code"])
    np.testing.assert_array_equal(ra.coords["umap"], rb.coords["umap"])
    c = atlasmtl.build_model(ref, SYNTHETIC_LEVELS, num_epochs=5, show_progress=False, random_state=8,
                             hidden_sizes=(32, 16))
    first = [member_networks(m.network)[0].encoder.layers[0].weight for m in (a, c)]
    assert not torch.equal(*first)


def test_global_torch_rng_is_left_alone(synthetic_split):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    atlasmtl.build_model(synthetic_split[0], SYNTHETIC_LEVELS, num_epochs=1, show_progress=False)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


# ---------------------------------------------------------------- training behaviour
def test_train_config_and_early_stopping(pbmc_split):
    ref, _ = pbmc_split
    model = atlasmtl.build_model(
        ref, LEVELS, num_epochs=60, val_fraction=0.25, early_stopping_patience=2, show_progress=False
    )
    cfg = model.train_config
    assert cfg["train_seconds"] > 0
    rs, rt = cfg["resource_summary"], cfg["runtime_summary"]
    assert rs["training cells"] + rs["validation cells"] == ref.n_obs
    assert rs["genes"] == ref.n_vars and rs["device"] == "cpu" and rs["cpu count"] >= 1
    assert 1 <= rs["epochs completed"] < 60  # early stopping kicked in
    assert all("val_loss" in h for h in cfg["history"])
    assert rt["elapsed_seconds"] > 0 and rt["throughput_cells_per_second"] > 0 and rt["process_peak_rss_mb"] > 0
    assert model.hierarchy["bulk_labels"]["CD19+ B"] == "B"


def test_min_steps_extends_a_small_reference_and_cosine_anneals(synthetic_split):
    ref, _ = synthetic_split
    kw = dict(num_epochs=2, batch_size=64, show_progress=False, calibration_fraction=0.0)
    steps_per_epoch = -(-ref.n_obs // 64)
    model = atlasmtl.build_model(ref, SYNTHETIC_LEVELS, min_steps=5 * steps_per_epoch, lr_schedule="cosine",
                                 weight_decay=1e-2, **kw)
    cfg = model.train_config
    members = cfg["resource_summary"]["ensemble members"]
    assert cfg["resource_summary"]["epochs completed"] == 5 and len(cfg["history"]) == 5 * members
    assert (cfg["min_steps"], cfg["lr_schedule"], cfg["weight_decay"]) == (5 * steps_per_epoch, "cosine", 1e-2)
    # a reference that already gets the steps keeps num_epochs
    assert atlasmtl.build_model(ref, SYNTHETIC_LEVELS, min_steps=steps_per_epoch, **kw).train_config[
        "resource_summary"]["epochs completed"] == 2


def test_float_input_transform(pbmc_split):
    ref, query = pbmc_split
    model = atlasmtl.build_model(ref, LEVELS, input_transform="float", num_epochs=15, show_progress=False)
    res = _predict(model, query)
    acc = np.mean(np.asarray(res.labels("lineage")) == query.obs["lineage"].to_numpy())
    assert acc > 0.85


def test_exact_neighbour_search_matches_scikit_learn():
    from sklearn.neighbors import NearestNeighbors

    from atlasmtl.knn import NeighbourIndex

    rng = np.random.default_rng(0)
    ref, points = rng.normal(size=(3000, 8)) * 3, rng.normal(size=(2500, 8)) * 3  # > one 2048-row chunk
    idx, dist = NeighbourIndex(ref).query(points, 10)
    true_dist, true_idx = NearestNeighbors(n_neighbors=10).fit(ref).kneighbors(points)
    np.testing.assert_array_equal(idx, true_idx)
    np.testing.assert_allclose(dist, true_dist, atol=1e-3)


def test_sparse_and_dense_queries_agree(pbmc_model, pbmc_split):
    _, query = pbmc_split
    dense = query.copy()
    dense.X = dense.X.toarray()
    a = _predict(pbmc_model, query, knn_correction="all")
    b = _predict(pbmc_model, dense, knn_correction="all")
    for lv in LEVELS:
        np.testing.assert_allclose(a.levels[lv]["conf"], b.levels[lv]["conf"], rtol=1e-4, atol=1e-5)
        assert np.mean(a.levels[lv]["code"] == b.levels[lv]["code"]) > 0.99


def test_exact_search_in_small_chunks_gives_the_same_neighbours(monkeypatch):
    import atlasmtl.knn as knn

    rng = np.random.default_rng(1)
    ref, points = rng.normal(size=(1000, 4)), rng.normal(size=(300, 4))
    full_idx, _ = knn.NeighbourIndex(ref).query(points, 5)
    monkeypatch.setattr(knn, "_SCORE_BUDGET", 7 * 1000)  # 7 query rows per chunk
    small_idx, _ = knn.NeighbourIndex(ref).query(points, 5)
    np.testing.assert_array_equal(full_idx, small_idx)


def test_mixed_index_dtypes_are_aligned_without_touching_the_anndata():
    import anndata as ad
    import scipy.sparse as sp

    from atlasmtl.inputs import get_matrix_source

    X = sp.random(50, 20, density=0.3, format="csr", dtype=np.float32, random_state=0)
    X.indptr = X.indptr.astype(np.int64)
    adata = ad.AnnData(X)
    source = get_matrix_source(adata)
    assert source.matrix.indptr.dtype == source.matrix.indices.dtype
    assert adata.X.indptr.dtype == np.int64
    np.testing.assert_array_equal(source.rows(np.arange(50)).toarray(), X.toarray())
