"""Hostile input (issue 11): every bad input or damaged artifact ends in a clear atlasmtl error or a correct result.

Each test is one class of failure: non-finite values, parameters, names that
collide in the writeback, hostile or mixed model files, interrupted saves,
file permissions, operating-system conditions, and a seeded parameter fuzz.
Only the public API and the ``atlasmtl`` command line are used. The data are
small synthetic AnnData (a few hundred cells, 50 genes) so the battery is fast;
the real-data error paths live in ``test_errors.py`` and ``test_artifacts.py``.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import atlasmtl
from atlasmtl import cli
from atlasmtl.network import member_networks
from atlasmtl.exceptions import (
    ArtifactError,
    AtlasMTLError,
    CoordinateError,
    DeviceError,
    EmptyDataError,
    GeneAlignmentError,
    InputError,
    InvalidValuesError,
    LabelError,
    MatrixSemanticsError,
    OutputError,
    ParameterError,
)

LEVELS = ["lineage", "cell_type"]
FAST = dict(num_epochs=2, hidden_sizes=(32, 16), batch_size=64, num_threads=1, show_progress=False, show_summary=False)
QUIET = dict(num_threads=1, show_progress=False, show_summary=False)
FINAL_NAMES = {"model.pth", "model_metadata.pkl", "model_reference.pkl", "model_embedding.npy", "model_manifest.json"}


# ---------------------------------------------------------------- small synthetic data
def synthetic(n_cells: int = 300, n_genes: int = 50, seed: int = 0) -> ad.AnnData:
    """Counts for 6 cell types in 3 lineages, with marker genes and a 2-d embedding."""
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, 6, n_cells)
    means = rng.gamma(1.0, 0.5, size=(6, n_genes))
    for k in range(6):
        means[k, (k * 5) % n_genes : (k * 5) % n_genes + 5] += 4.0
    X = rng.poisson(means[fine]).astype(np.float32)
    obs = pd.DataFrame(
        {
            "lineage": pd.Categorical([f"L{k // 2}" for k in fine]),
            "cell_type": pd.Categorical([f"T{k}" for k in fine]),
        },
        index=[f"cell{seed}_{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]))
    centres = rng.normal(0, 5, size=(6, 2))
    adata.obsm["X_umap"] = centres[fine] + rng.normal(0, 0.5, size=(n_cells, 2))
    return adata


@pytest.fixture(scope="module")
def tiny():
    return synthetic(300, seed=0), synthetic(150, seed=1)


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return atlasmtl.build_model(tiny[0], LEVELS, coord_targets={"umap": "X_umap"}, random_state=0, **FAST)


@pytest.fixture(scope="module")
def other_model(tiny):
    """Same data and architecture as ``tiny_model``, another seed: the files of the two fit each other."""
    return atlasmtl.build_model(tiny[0], LEVELS, coord_targets={"umap": "X_umap"}, random_state=1, **FAST)


def _valid_result(result, query, model) -> None:
    """What every prediction must satisfy, whatever the parameters."""
    assert isinstance(result, atlasmtl.PredictionResult)
    assert result.n_obs == query.n_obs and list(result.obs_names) == list(query.obs_names)
    for level in model.label_columns:
        r = result.levels[level]
        n_classes = len(model.classes[level])
        assert ((r["code"] >= -1) & (r["code"] < n_classes)).all()
        assert np.array_equal(r["is_unknown"], r["code"] == -1)
        confident = ~r["is_unknown"] & ~r["used_knn"]
        # a kept network call has a real confidence; NaN is never a confident call
        assert np.isfinite(r["conf"][confident]).all()
        assert ((r["conf"][confident] >= 0) & (r["conf"][confident] <= 1.0 + 1e-6)).all()
    for name, values in result.coords.items():
        assert values.shape[0] == query.n_obs


def _finite_network(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.network.state_dict().values())


def _predictions(model, query, **kw):
    return atlasmtl.predict(model, query, **{**QUIET, **kw})


def _same_calls(a, b) -> bool:
    return all(np.array_equal(a.levels[lv]["code"], b.levels[lv]["code"]) and
               np.array_equal(a.levels[lv]["conf"], b.levels[lv]["conf"]) for lv in a.levels)


def _in_fork(fn, timeout: float = 60.0) -> dict:
    """Run ``fn()`` in a forked child; return {"ok": value} or {"error": type, "message", "atlasmtl"} or {"hung"/"died"}.

    The child can hang (a FIFO) or be killed mid-way (``os._exit``) without taking the test run with it.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            try:
                out = {"ok": fn()}
            except BaseException as exc:  # noqa: BLE001
                out = {"error": type(exc).__name__, "message": str(exc), "atlasmtl": isinstance(exc, AtlasMTLError),
                       "traceback": traceback.format_exc()}
            os.write(write_fd, json.dumps(out, default=str).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        return {"hung": True}
    with os.fdopen(read_fd, "rb") as fh:
        data = fh.read()
    return json.loads(data) if data else {"died": os.WEXITSTATUS(status) if os.WIFEXITED(status) else status}


def _manifest(directory: Path, stem: str = "model") -> dict:
    return json.loads((directory / f"{stem}_manifest.json").read_text())


def _refresh_checksums(directory: Path, stem: str = "model") -> None:
    """What an attacker (or a careless copy script) does: make the manifest agree with whatever files are there."""
    path = directory / f"{stem}_manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["files"].values():
        data = (directory / entry["file"]).read_bytes()
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        if "bytes" in entry:
            entry["bytes"] = len(data)
    path.write_text(json.dumps(manifest, indent=2))


def _edit_pickle(directory: Path, role: str, edit) -> None:
    """Rewrite one pickled model file (plain data, as atlasmtl writes it) and fix its checksum."""
    path = directory / _manifest(directory)["files"][role]["file"]
    plain = pickle.loads(path.read_bytes())  # trusted: the test wrote this file itself
    edit(plain)
    path.write_bytes(pickle.dumps(plain, protocol=4))
    _refresh_checksums(directory)


def _snapshot_dir(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ================================================================ non-finite values
def _backed_reference_with_nan(tmp_path: Path, value: float) -> tuple[Path, int]:
    """A 3,000-cell backed reference with one bad value in a row the semantics sampling never reads."""
    ref = synthetic(3000, seed=5)
    X = ref.X.toarray()
    row = 300  # sampled chunks start at 0, 392, 784, ... and hold 256 rows each
    X[row, 3] = value
    ref.X = sp.csr_matrix(X)
    path = tmp_path / "ref_bad.h5ad"
    ref.write_h5ad(path)
    return path, row


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_backed_reference_with_nonfinite_value_beyond_sampled_rows(tmp_path, value):
    path, _ = _backed_reference_with_nan(tmp_path, value)
    with pytest.raises(InvalidValuesError, match="NaN or infinite"):
        atlasmtl.build_model(str(path), LEVELS, **FAST)


@pytest.mark.parametrize("value", [np.nan, -np.inf])
def test_in_memory_dense_reference_with_nonfinite_value(value):
    ref = synthetic(3000, seed=5)
    X = ref.X.toarray()
    X[300, 3] = value
    ref.X = X
    with pytest.raises(InvalidValuesError, match="NaN or infinite"):
        atlasmtl.build_model(ref, LEVELS, **FAST)
    assert np.isnan(ref.X[300, 3]) or np.isinf(ref.X[300, 3])  # the user's data are as they were


def test_backed_query_with_nan_beyond_sampled_rows(tiny_model, tmp_path):
    query = synthetic(3000, seed=6)
    X = query.X.toarray()
    X[300, 3] = np.nan
    query.X = sp.csr_matrix(X)
    query.write_h5ad(tmp_path / "q.h5ad")
    with pytest.raises(InvalidValuesError, match="NaN or infinite"):
        _predictions(tiny_model, str(tmp_path / "q.h5ad"))


def _with_value_beyond_sampled_rows(adata: ad.AnnData, value: float, log: bool = False) -> ad.AnnData:
    """``adata`` (counts; log1p of counts per 10k with ``log``) as a dense matrix, with ``value`` in row 300, which
    the semantics sampling never reads."""
    X = adata.X.toarray()
    if log:
        X = np.log1p(X / np.maximum(X.sum(axis=1, keepdims=True), 1) * 1e4)
    X[300, 3] = value
    out = adata.copy()
    out.X = X.astype(np.float32)
    return out


@pytest.mark.parametrize("where", ["reference in memory", "reference backed", "query in memory", "query backed"])
def test_a_negative_value_beyond_the_sampled_rows_is_refused(tiny_model, tmp_path, where):
    """The semantics are judged on sampled rows; a negative value elsewhere in a dense or backed matrix (scaled
    data, or a corrupt entry) is refused as the sampled one is, not read as a count."""
    data = _with_value_beyond_sampled_rows(synthetic(3000, seed=5), -3.0)
    if where.endswith("backed"):
        data.write_h5ad(tmp_path / "bad.h5ad")
        data = str(tmp_path / "bad.h5ad")
    with pytest.raises(MatrixSemanticsError, match="negative values"):
        if where.startswith("reference"):
            atlasmtl.build_model(data, LEVELS, **FAST)
        else:
            _predictions(tiny_model, data)


def test_log_values_with_an_outlier_beyond_the_sampled_rows(tiny_model, tmp_path):
    """Log-normalised values with one count-sized value elsewhere: in memory the whole matrix is judged, read as
    linear values, with a warning that names the fix; streamed from disk, the row is refused (it would overflow
    the log values' back-transform)."""
    query = _with_value_beyond_sampled_rows(synthetic(3000, seed=6), 1e6, log=True)
    with pytest.warns(UserWarning, match="above what log-normalised data reach"):
        result = _predictions(tiny_model, query)
    assert result.metadata["input"]["semantics"] == "other"
    query.write_h5ad(tmp_path / "q.h5ad")
    with pytest.raises(InvalidValuesError, match="read as log-normalised"):
        _predictions(tiny_model, str(tmp_path / "q.h5ad"))


def test_a_true_false_matrix_is_mapped_with_a_warning_that_names_the_fix(tiny, tiny_model, tmp_path):
    """adata.X > 0 stored as X: read as one count per detected gene (every cell a shallow one), said in a warning,
    in memory and from disk alike; a binary model takes it as it is."""
    query = tiny[1].copy()
    query.X = sp.csr_matrix(query.X > 0, dtype=bool)
    with pytest.warns(UserWarning, match=r"holds True/False values .* input_transform='binary'"):
        result = _predictions(tiny_model, query)
    assert result.metadata["input"]["semantics"] == "counts"
    query.write_h5ad(tmp_path / "q.h5ad")
    with pytest.warns(UserWarning, match="holds True/False values"):
        _predictions(tiny_model, str(tmp_path / "q.h5ad"))
    binary = atlasmtl.build_model(tiny[0], LEVELS, input_transform="binary", **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _predictions(binary, query)


def test_a_report_refuses_a_model_that_did_not_make_the_predictions(tiny, tiny_model, tmp_path):
    """A report draws the model's settings, classes and findings beside the predictions; another model's would
    describe something else (found by an audit: a pbmc68k model's levels shown under Symphony predictions)."""
    result = _predictions(tiny_model, tiny[1])
    fine_only = atlasmtl.build_model(tiny[0], LEVELS[-1:], **FAST)
    with pytest.raises(ParameterError, match="not the one these predictions were made with"):
        result.report(tmp_path / "r.html", model=fine_only)
    assert not (tmp_path / "r.html").exists()
    assert (result.report(tmp_path / "r.html", model=tiny_model)).exists()
    # another training run with the same levels and classes: told apart by the model id the predictions record
    # (it passed: a report mixed one run's training and calibration figures with another's calls)
    rerun = atlasmtl.build_model(tiny[0], LEVELS, **FAST)
    assert result.metadata["model_id"] == tiny_model.metadata["model_id"] != rerun.metadata["model_id"]
    with pytest.raises(ParameterError, match=r"These predictions were made by the model [0-9a-f]+, not by this one"):
        result.report(tmp_path / "r2.html", model=rerun)
    assert not (tmp_path / "r2.html").exists()
    # ... and so are predictions written to an .h5ad and read back (the command line's report --predictions)
    result.write_h5ad(tmp_path / "p.h5ad", tiny[1], mode="full")
    with pytest.raises(InputError, match=r"The predictions in '.*p\.h5ad' were made by the model"):
        atlasmtl.PredictionResult.from_predictions(tmp_path / "p.h5ad", rerun)
    assert atlasmtl.PredictionResult.from_predictions(tmp_path / "p.h5ad", tiny_model).n_obs == tiny[1].n_obs


def test_the_gene_overlap_refusal_never_shows_the_required_share():
    """883 of 1,767 genes is 49.97%: the refusal said "(50.0%) ... at least 50% are required"."""
    ref = synthetic(300, n_genes=1767, seed=2)
    model = atlasmtl.build_model(ref, LEVELS, **FAST)
    with pytest.raises(GeneAlignmentError, match=r"883 of the model's 1767 genes \(49\.9%\)"):
        _predictions(model, ref[:, :883].copy())


def test_duplicate_sparse_entries_read_as_their_sum(tiny_model, tiny):
    """A CSR matrix may store one (cell, gene) value as several entries, which scipy adds up. Log values were
    back-transformed entry by entry before they were added, so such a query was predicted differently from the
    same matrix in canonical form (rows with sorted indices; unsorted ones are read as they are)."""
    query = tiny[1].copy()
    X = sp.csr_matrix(query.X, dtype=np.float32)
    X = sp.csr_matrix(np.log1p(X.multiply(1e4 / np.asarray(X.sum(axis=1))).tocsr()), dtype=np.float32)
    # every stored value as two halves: the same matrix to scipy
    counts = np.diff(X.indptr)
    split = sp.csr_matrix((np.repeat(X.data / 2, 2), np.repeat(X.indices, 2), np.r_[0, np.cumsum(2 * counts)]),
                          shape=X.shape)
    assert split.has_sorted_indices and not split.has_canonical_format and np.allclose(split.toarray(), X.toarray())
    query.X = X
    canonical = _predictions(tiny_model, query)
    query.X = split
    twice = _predictions(tiny_model, query)
    assert len(query.X.data) == 2 * len(X.data)
    for lv in LEVELS:
        np.testing.assert_array_equal(canonical.levels[lv].pred, twice.levels[lv].pred)
        np.testing.assert_allclose(canonical.levels[lv].conf, twice.levels[lv].conf, atol=1e-5)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_an_unbounded_threshold_that_is_not_finite_is_refused_plainly(tiny_model, tiny, value):
    """Said "must be a finite number in [-inf, inf]", an interval that holds it."""
    with pytest.raises(ParameterError, match=r"novelty_threshold=(nan|inf) must be a finite number\.$"):
        _predictions(tiny_model, tiny[1], novelty_threshold=value)


@pytest.mark.parametrize("value", [-1, np.float32(-0.5)])
def test_a_negative_novelty_threshold_is_refused_with_the_way_to_switch_it_off(tiny_model, tiny, value):
    """"-1 to disable" would have called most known cells novel; None is the switch."""
    with pytest.raises(ParameterError, match=r"below 0: it is a robust z-score.*novelty_threshold=None"):
        _predictions(tiny_model, tiny[1], novelty_threshold=value)
    assert _predictions(tiny_model, tiny[1], novelty_threshold=0).metadata["settings"]["novelty_threshold"] == 0


@pytest.mark.parametrize("lr", [np.inf, np.nan, -np.inf, 0.0])
def test_nonfinite_learning_rate_is_refused(tiny, lr):
    with pytest.raises(ParameterError, match="learning_rate"):
        atlasmtl.build_model(tiny[0], LEVELS, **{**FAST, "learning_rate": lr})


def test_diverging_training_stops_with_a_clear_error(tiny):
    # finite input and parameters, but steps this large overflow the network: stop, do not return NaN weights
    with pytest.raises(AtlasMTLError, match="non-finite"):
        atlasmtl.build_model(tiny[0], LEVELS, **{**FAST, "learning_rate": 1e30})


def test_nan_confidence_is_never_a_confident_call(tiny_model, tiny):
    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for member in member_networks(broken.network):
            member.encoder.layers[0].weight.fill_(float("nan"))
    result = _predictions(broken, tiny[1], knn_correction="off")
    for level in LEVELS:
        assert result.levels[level]["is_unknown"].all()
    _valid_result(result, tiny[1], broken)


@pytest.mark.parametrize("val_fraction", [0.999, 0.9999])
def test_val_fraction_leaving_no_training_cells(tiny, val_fraction):
    with pytest.raises(ParameterError, match="val_fraction"):
        atlasmtl.build_model(tiny[0], LEVELS, **{**FAST, "val_fraction": val_fraction})


# ================================================================ names
def test_levels_whose_writeback_columns_collide(tiny):
    ref = tiny[0].copy()
    ref.obs["lineage_raw"] = ref.obs["cell_type"]
    with pytest.raises(LabelError, match="lineage_raw"):
        atlasmtl.build_model(ref, ["lineage", "lineage_raw"], **FAST)


def test_a_coordinate_name_whose_table_columns_are_a_levels(tiny):
    """Coordinate 'pred_ct' writes pred_ct_1, pred_ct_2 in a table, and level 'ct_1' writes pred_ct_1: to_csv
    overwrote the labels with coordinates, and the table could not be read back."""
    ref = tiny[0].copy()
    ref.obs["ct_1"] = ref.obs["cell_type"]
    ref.obsm["U"] = np.random.default_rng(0).random((ref.n_obs, 2))
    with pytest.raises(CoordinateError, match=r"'pred_ct' would write the table column 'pred_ct_1'.*level 'ct_1'"):
        atlasmtl.build_model(ref, ["lineage", "ct_1"], coord_targets={"pred_ct": "U"}, **FAST)
    assert set(atlasmtl.build_model(ref, ["lineage", "ct_1"], coord_targets={"pred_u": "U"}, **FAST).coord_targets) \
        == {"pred_u"}


def test_reference_class_named_unknown(tiny):
    ref = tiny[0].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].cat.rename_categories({"T0": "Unknown"})
    with pytest.raises(LabelError, match="Unknown"):
        atlasmtl.build_model(ref, LEVELS, **FAST)
    assert "Unknown" in ref.obs["cell_type"].cat.categories  # untouched


@pytest.mark.parametrize("kind", ["coordinate", "level"])
def test_names_that_hdf5_keys_cannot_hold(tiny, kind):
    ref = tiny[0].copy()
    if kind == "coordinate":
        kw = {"coord_targets": {"umap/2d": "X_umap"}}
        levels = LEVELS
    else:
        ref.obs["cell/type"] = ref.obs["cell_type"]
        kw, levels = {}, ["lineage", "cell/type"]
    with pytest.raises((LabelError, CoordinateError), match="'/'"):
        atlasmtl.build_model(ref, levels, **FAST, **kw)


def test_cli_refuses_a_coordinate_name_with_a_slash(tiny, tmp_path, capsys):
    tiny[0].write_h5ad(tmp_path / "ref.h5ad")
    code = cli.main(["train", "--reference", str(tmp_path / "ref.h5ad"), "--labels", ",".join(LEVELS),
                     "--coords", "umap/2d=X_umap", "--out", str(tmp_path / "model"), "--num-epochs", "1",
                     "--num-threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "'/'" in err and "Traceback" not in err
    assert not (tmp_path / "model").exists()


# ================================================================ valid values of other types
def test_numpy_scalars_as_parameters(tiny, tiny_model):
    model = atlasmtl.build_model(
        tiny[0], LEVELS, coord_targets={"umap": "X_umap"},
        num_epochs=np.int64(2), hidden_sizes=(np.int64(32), np.int32(16)), batch_size=np.int64(64),
        num_threads=np.int64(1), learning_rate=np.float64(1e-3), dropout_rate=np.float64(0.5),
        label_smoothing=np.float64(0.1), class_weight_power=np.float64(0.5), val_fraction=np.float32(0.0),
        random_state=np.int64(0), show_progress=False, show_summary=False,
    )
    # same integers, same training: the NumPy integers change nothing
    assert all(torch.equal(a, b) for a, b in zip(model.network.state_dict().values(),
                                                 tiny_model.network.state_dict().values()))
    query = tiny[1]
    result = atlasmtl.predict(model, query, confidence_high=np.float64(0.7), confidence_low=np.float64(0.4),
                              margin_threshold=np.float64(0.2), knn_conf_low=np.float64(0.6), knn_k=np.int64(15),
                              batch_size=np.int64(64), num_threads=np.int64(1), min_gene_overlap=np.float64(0.5),
                              show_progress=False)
    _valid_result(result, query, model)
    assert _same_calls(result, _predictions(tiny_model, query))
    single = atlasmtl.predict(model, query, confidence_high=np.float32(0.7), margin_threshold=np.float32(0.2),
                              knn_k=np.int32(5), num_threads=np.int32(1), show_progress=False)
    _valid_result(single, query, model)
    assert single.metadata["settings"]["knn_k"] == 5 and type(single.metadata["settings"]["knn_k"]) is int


def test_random_state_none_trains(tiny):
    model = atlasmtl.build_model(tiny[0], LEVELS, **{**FAST, "random_state": None})
    assert _finite_network(model)
    _valid_result(_predictions(model, tiny[1]), tiny[1], model)


@pytest.mark.parametrize("bad", [-1, 1.5, "seed", True])
def test_invalid_random_state_is_a_parameter_error(tiny, bad):
    with pytest.raises(ParameterError, match="random_state"):
        atlasmtl.build_model(tiny[0], LEVELS, **{**FAST, "random_state": bad})


def test_cuda_device_strings(tiny, tiny_model):
    query = tiny[1]
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DeviceError, match="cuda:7"):
        _predictions(tiny_model, query, device="cuda:7")
    if n_gpus < 2:
        with pytest.raises(DeviceError, match="cuda:1"):
            atlasmtl.build_model(tiny[0], LEVELS, **{**FAST, "device": "cuda:1"})
    for bad in ("cuda:x", "cuda:-1", "cuda:", " cpu"):
        with pytest.raises(ParameterError, match="device"):
            _predictions(tiny_model, query, device=bad)


def test_torch_device_object_is_accepted(tiny, tiny_model):
    _valid_result(_predictions(tiny_model, tiny[1], device=torch.device("cpu")), tiny[1], tiny_model)


@pytest.mark.parametrize("form", ["DataFrame", "csr_matrix"])
def test_coordinate_target_as_dataframe_or_sparse(tiny, tiny_model, form):
    ref = tiny[0].copy()
    umap = np.asarray(ref.obsm["X_umap"])
    ref.obsm["X_other"] = (pd.DataFrame(umap, index=ref.obs_names, columns=["u1", "u2"]) if form == "DataFrame"
                           else sp.csr_matrix(umap))
    model = atlasmtl.build_model(ref, LEVELS, coord_targets={"umap": "X_other"}, random_state=0, **FAST)
    expected = _predictions(tiny_model, tiny[1])
    got = _predictions(model, tiny[1])
    np.testing.assert_array_equal(got.coords["umap"], expected.coords["umap"])


def test_non_numeric_coordinate_dataframe_is_a_coordinate_error(tiny):
    ref = tiny[0].copy()
    ref.obsm["X_text"] = pd.DataFrame({"a": ["x"] * ref.n_obs, "b": ["y"] * ref.n_obs}, index=ref.obs_names)
    with pytest.raises(CoordinateError, match="X_text|umap"):
        atlasmtl.build_model(ref, LEVELS, coord_targets={"umap": "X_text"}, **FAST)


# ================================================================ hostile and mixed artifacts
@pytest.fixture
def saved(tiny_model, tmp_path):
    directory = tmp_path / "a"
    tiny_model.save(directory / "model.pth")
    return directory


@pytest.mark.parametrize("role", ["weights", "metadata", "reference", "embedding"])
def test_files_of_two_models_mixed_are_refused(saved, other_model, tmp_path, role):
    other_dir = tmp_path / "b"
    other_model.save(other_dir / "model.pth")
    name = _manifest(saved)["files"][role]["file"]
    (saved / name).write_bytes((other_dir / name).read_bytes())
    _refresh_checksums(saved)
    with pytest.raises(ArtifactError, match="another model|different model|model id"):
        atlasmtl.TrainedModel.load(saved / "model_manifest.json")


@pytest.mark.parametrize("role, wrong", [("metadata", "reference"), ("reference", "metadata"), ("weights", "metadata"),
                                         ("weights", "reference")])
def test_manifest_entry_pointing_at_the_wrong_file(saved, role, wrong):
    manifest = _manifest(saved)
    manifest["files"][role] = dict(manifest["files"][wrong])
    (saved / "model_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=role):
        atlasmtl.TrainedModel.load(saved / "model_manifest.json")


@pytest.mark.parametrize("key", ["architecture", "genes", "classes", "label_columns", "input_transform",
                                 "coord_stats", "gene_namespace"])
def test_metadata_missing_a_key(saved, tiny, key):
    _edit_pickle(saved, "metadata", lambda meta: meta.pop(key))
    with pytest.raises(ArtifactError, match=key):
        model = atlasmtl.TrainedModel.load(saved / "model_manifest.json")
        _predictions(model, tiny[1])


def _truncate_genes(meta):
    meta["genes"] = meta["genes"][:-5]


def _drop_a_class(meta):
    meta["classes"]["cell_type"] = meta["classes"]["cell_type"][:-1]


def _genes_not_a_list(meta):
    meta["genes"] = "G0"


def _gene_detection_out_of_range(meta):
    n = len(meta["genes"])
    meta["gene_detection"] = {"detected": [2.0] * n, "count_share": [1.0 / n] * n, "median_depth": 100.0, "cells": 10}


def _held_out_call_out_of_range(meta):
    calls = meta["novelty"]["input_view"]["held"]["calls"]  # an array as the file stores it
    arr = np.frombuffer(calls["data"], dtype=np.dtype(calls["dtype"])).copy()
    arr[0] = 99
    calls["data"] = arr.tobytes()


def _bad_label_code(ref):
    labels = ref["labels"]["cell_type"]
    arr = np.frombuffer(labels["data"], dtype=np.dtype(labels["dtype"])).copy()
    arr[0] = 99
    labels["data"] = arr.tobytes()


@pytest.mark.parametrize("role, edit", [("metadata", _truncate_genes), ("metadata", _drop_a_class),
                                        ("metadata", _genes_not_a_list), ("metadata", _gene_detection_out_of_range),
                                        ("metadata", _held_out_call_out_of_range), ("reference", _bad_label_code)],
                         ids=["truncated-genes", "missing-class", "genes-not-a-list", "gene-detection-out-of-range",
                              "held-out-call-out-of-range", "label-code-out-of-range"])
def test_inconsistent_model_files_are_refused_at_load(saved, tiny, role, edit):
    _edit_pickle(saved, role, edit)
    with pytest.raises(ArtifactError, match=role):
        atlasmtl.TrainedModel.load(saved / "model_manifest.json")


def test_embedding_shorter_than_labels_is_refused_at_load(saved):
    """A consistent-looking embedding file (its record and checksums rewritten) of one cell fewer than the labels."""
    path = saved / "model_embedding.npy"
    emb = np.load(path)[:-1]
    np.save(path, emb)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    _edit_pickle(saved, "reference", lambda ref: ref["embedding_file"].update(sha256=digest, shape=list(emb.shape)))
    with pytest.raises(ArtifactError, match="reference"):
        atlasmtl.TrainedModel.load(saved / "model_manifest.json")


def _shared_reference_bomb(depth: int):
    """A structure that pickles to a few hundred bytes but holds 2**depth leaves when copied out."""
    node: object = {"__atlasmtl_ndarray__": True, "dtype": "<f4", "shape": [16], "data": bytes(64)}
    for _ in range(depth):
        node = [node, node]
    return node


def test_shared_reference_pickle_is_refused(saved):
    _edit_pickle(saved, "metadata", lambda meta: meta.__setitem__("padding", _shared_reference_bomb(18)))
    assert len(pickle.dumps(_shared_reference_bomb(18), protocol=4)) < 2000
    with pytest.raises(ArtifactError, match="shared|repeated"):
        atlasmtl.TrainedModel.load(saved / "model_manifest.json")


def test_nonfinite_weights_are_refused_at_load(tiny_model, tmp_path):
    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        member_networks(broken.network)[-1].encoder.layers[0].weight[0, 0] = float("nan")
    broken.save(tmp_path / "model.pth")
    with pytest.raises(ArtifactError, match="NaN|non-finite"):
        atlasmtl.TrainedModel.load(tmp_path / "model_manifest.json")


# ================================================================ saving: crashes, folders, permissions
def _count_renames(monkeypatch, fail_at: int, action):
    """Make the ``fail_at``-th file rename (os.replace / os.rename) call ``action`` instead."""
    calls = {"n": 0}
    real = {"replace": os.replace, "rename": os.rename}

    def wrap(kind):
        def renamed(src, dst, *a, **k):
            calls["n"] += 1
            if calls["n"] == fail_at:
                action()
            return real[kind](src, dst, *a, **k)
        return renamed

    monkeypatch.setattr(os, "replace", wrap("replace"))
    monkeypatch.setattr(os, "rename", wrap("rename"))
    return calls


def _which_model(directory: Path, models: dict, query) -> str:
    """Load the model in ``directory`` and say which of ``models`` it is (by its predictions)."""
    loaded = atlasmtl.TrainedModel.load(directory / "model_manifest.json")
    got = _predictions(loaded, query)
    matches = [name for name, m in models.items() if _same_calls(got, _predictions(m, query))]
    assert len(matches) == 1, matches
    return matches[0]


def _files_not_in_the_model(directory: Path) -> set[str]:
    referenced = {e["file"] for e in _manifest(directory)["files"].values()} | {"model_manifest.json"}
    return {p.name for p in directory.iterdir()} - referenced - FINAL_NAMES


def test_interrupted_overwrite_leaves_one_whole_model(tiny_model, other_model, tiny, tmp_path, monkeypatch):
    """Interrupt the save at every file rename in turn: the folder always holds one whole model, and no debris."""
    models = {"old": tiny_model, "new": other_model}
    seen = set()
    for fail_at in range(1, 30):
        directory = tmp_path / f"crash{fail_at}"
        tiny_model.save(directory / "model.pth")
        calls = _count_renames(monkeypatch, fail_at, lambda: (_ for _ in ()).throw(KeyboardInterrupt("crash")))
        try:
            other_model.save(directory / "model.pth")
            completed = True
        except KeyboardInterrupt:
            completed = False
        finally:
            monkeypatch.undo()
        seen.add(_which_model(directory, models, tiny[1]))
        assert not _files_not_in_the_model(directory), _files_not_in_the_model(directory)
        if completed:
            assert _which_model(directory, models, tiny[1]) == "new"
            assert calls["n"] < fail_at
            break
    assert seen == {"old", "new"}


@pytest.mark.parametrize("role", ["weights", "metadata", "reference", "embedding"])
def test_a_final_name_that_cannot_be_replaced_leaves_the_old_model_as_it_was(tiny_model, other_model, tiny, tmp_path,
                                                                              monkeypatch, role):
    """A companion file the process may not replace (another user's, immutable) fails the save after its first
    commit: every file already replaced gets its old content back, with the old manifest."""
    from atlasmtl import artifacts

    directory = tmp_path / "model"
    tiny_model.save(directory / "model.pth")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real = artifacts._install
    blocked = artifacts.artifact_paths(directory / "model.pth")[role]

    def install(staged, final, token):
        if final == blocked:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(final))
        return real(staged, final, token)

    monkeypatch.setattr(artifacts, "_install", install)
    with pytest.raises(OutputError, match="Nothing was replaced"):
        other_model.save(directory / "model.pth")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert _which_model(directory, {"old": tiny_model, "new": other_model}, tiny[1]) == "old"


def test_a_save_whose_restore_fails_too_says_the_new_model_is_what_loads(tiny_model, other_model, tiny, tmp_path,
                                                                         monkeypatch):
    from atlasmtl import artifacts

    directory = tmp_path / "model"
    tiny_model.save(directory / "model.pth")
    real = artifacts._install

    def install(staged, final, token):
        if final.name == "model_reference.pkl":
            raise PermissionError(errno.EPERM, "Operation not permitted", str(final))
        return real(staged, final, token)

    monkeypatch.setattr(artifacts, "_install", install)
    monkeypatch.setattr(artifacts, "_roll_back", lambda *a: "the disk is full")
    with pytest.raises(OutputError, match="could not be put back .the disk is full.*the new model loads"):
        other_model.save(directory / "model.pth")
    monkeypatch.undo()
    assert _which_model(directory, {"old": tiny_model, "new": other_model}, tiny[1]) == "new"
    other_model.save(directory / "model.pth")  # the next save gives the files their final names and tidies up
    assert {p.name for p in directory.iterdir()} == FINAL_NAMES


def test_process_killed_during_overwrite_leaves_one_whole_model(tiny_model, other_model, tiny, tmp_path, monkeypatch):
    """A hard kill (no cleanup runs) at every rename: one whole model remains, and the next save clears the debris."""
    models = {"old": tiny_model, "new": other_model}
    for fail_at in range(1, 30):
        directory = tmp_path / f"kill{fail_at}"
        tiny_model.save(directory / "model.pth")

        def save_and_die_at_rename():
            _count_renames(monkeypatch, fail_at, lambda: os._exit(0))
            other_model.save(directory / "model.pth")
            return "completed"

        out = _in_fork(save_and_die_at_rename)
        assert "hung" not in out and "error" not in out, out
        _which_model(directory, models, tiny[1])  # loads, and is one of the two
        other_model.save(directory / "model.pth")
        assert {p.name for p in directory.iterdir()} == FINAL_NAMES
        assert _which_model(directory, models, tiny[1]) == "new"
        if out.get("ok") == "completed":
            break
    else:
        pytest.fail("the save never completed")


def test_save_into_an_existing_folder(tiny_model, tmp_path):
    folder = tmp_path / "my_model"
    folder.mkdir()
    paths = tiny_model.save(folder)
    assert {p.name for p in folder.iterdir()} == FINAL_NAMES
    assert Path(paths["manifest"]).parent == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_model"]
    atlasmtl.TrainedModel.load(folder)  # the folder is also a valid thing to load


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_files_respect_the_umask(tiny_model, tiny, tmp_path, umask):
    query = tiny[1]
    query.write_h5ad(tmp_path / "query.h5ad")
    result = _predictions(tiny_model, query)
    old = os.umask(umask)
    try:
        written = list(tiny_model.save(tmp_path / "m" / "model.pth").values())
        result.to_csv(tmp_path / "pred.csv")
        result.write_h5ad(tmp_path / "mem.h5ad", query)
        result.write_h5ad(tmp_path / "file.h5ad", str(tmp_path / "query.h5ad"))
        written += [tmp_path / "pred.csv", tmp_path / "mem.h5ad", tmp_path / "file.h5ad"]
    finally:
        os.umask(old)
    for path in written:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path


# ================================================================ operating-system conditions
def _writers(model, result, query, query_file):
    return {
        "save": lambda p: model.save(p),
        "to_csv": lambda p: result.to_csv(p),
        "write_h5ad(AnnData)": lambda p: result.write_h5ad(p, query),
        "write_h5ad(file)": lambda p: result.write_h5ad(p, str(query_file)),
    }


WRITERS = ["save", "to_csv", "write_h5ad(AnnData)", "write_h5ad(file)"]


@pytest.fixture(scope="module")
def predicted(tiny, tiny_model, tmp_path_factory):
    query = tiny[1]
    query_file = tmp_path_factory.mktemp("q") / "query.h5ad"
    query.write_h5ad(query_file)
    return _predictions(tiny_model, query), query, query_file


@pytest.mark.parametrize("writer", WRITERS)
def test_output_path_under_a_regular_file_or_empty(tiny_model, predicted, tmp_path, writer):
    result, query, query_file = predicted
    write = _writers(tiny_model, result, query, query_file)[writer]
    (tmp_path / "plain.txt").write_text("keep me")
    # every writer refuses a name of another format first (save since 2026-12-07)
    name = {"to_csv": "out.csv", "write_h5ad(AnnData)": "out.h5ad", "write_h5ad(file)": "out.h5ad"}.get(writer, "out.pth")
    for bad, match in [(tmp_path / "plain.txt" / name, "not a folder"), ("", "empty")]:
        with pytest.raises(AtlasMTLError, match=match):
            write(bad)
    assert (tmp_path / "plain.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"]


@pytest.mark.parametrize("writer", WRITERS)
def test_output_into_a_read_only_folder(tiny_model, predicted, writer):
    """Run unprivileged in a forked child (root could write anyway); the folder and its files stay as they were."""
    result, query, query_file = predicted
    base = Path(tempfile.mkdtemp(prefix="atlasmtl-ro-"))
    try:
        os.chmod(base, 0o755)
        readable_query = base / "query.h5ad"  # the unprivileged child must be able to read the source
        readable_query.write_bytes(query_file.read_bytes())
        os.chmod(readable_query, 0o644)
        write = _writers(tiny_model, result, query, readable_query)[writer]
        readonly = base / "ro"
        readonly.mkdir()
        (readonly / "existing.txt").write_text("old")
        os.chmod(readonly, 0o555)
        target = readonly / ("model.pth" if writer == "save" else "out.h5ad" if "h5ad" in writer else "out.csv")
        warm = base / "warm"
        write(warm / target.name)  # import what the writer imports lazily: the child may not read site-packages
        import shutil

        shutil.rmtree(warm)

        def unprivileged_write():
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            write(target)

        out = _in_fork(unprivileged_write)
        assert out.get("atlasmtl") is True, out
        assert "not writable" in out["message"] or "Permission denied" in out["message"], out
        assert sorted(p.name for p in readonly.iterdir()) == ["existing.txt"]
    finally:
        os.chmod(base / "ro", 0o755)
        import shutil

        shutil.rmtree(base)


def test_write_h5ad_creates_a_missing_parent_folder(predicted, tmp_path):
    result, query, query_file = predicted
    for source in (query, str(query_file)):
        dest = tmp_path / "new" / ("a" if source is query else "b") / "out.h5ad"
        result.write_h5ad(dest, source)
        back = ad.read_h5ad(dest)
        assert list(back.obs["pred_cell_type"]) == list(result.labels("cell_type"))


def test_csv_and_save_create_a_missing_parent_folder(tiny_model, predicted, tmp_path):
    result = predicted[0]
    result.to_csv(tmp_path / "x" / "y" / "pred.csv")
    tiny_model.save(tmp_path / "p" / "q" / "model.pth")
    assert (tmp_path / "x" / "y" / "pred.csv").is_file()
    atlasmtl.TrainedModel.load(tmp_path / "p" / "q" / "model_manifest.json")


def test_empty_or_folder_input_paths(tiny_model, tmp_path):
    for bad in ("", tmp_path):
        with pytest.raises(InputError):
            atlasmtl.predict(tiny_model, bad, **QUIET)
        with pytest.raises(InputError):
            atlasmtl.build_model(bad, LEVELS, **FAST)
    with pytest.raises(ArtifactError):
        atlasmtl.TrainedModel.load("")
    with pytest.raises(ArtifactError, match="no model"):
        atlasmtl.TrainedModel.load(tmp_path)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "query.h5ad"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("call", ["predict", "build_model", "load"])
def test_fifo_as_input_path_does_not_hang(tiny_model, fifo, call):
    fns = {
        "predict": lambda: atlasmtl.predict(tiny_model, str(fifo), **QUIET),
        "build_model": lambda: atlasmtl.build_model(str(fifo), LEVELS, **FAST),
        "load": lambda: atlasmtl.TrainedModel.load(fifo.with_name("fifo_manifest.json")),
    }
    if call == "load":
        os.mkfifo(fifo.with_name("fifo_manifest.json"))
    out = _in_fork(fns[call], timeout=20)
    assert "hung" not in out, f"{call} blocked on a FIFO"
    assert out.get("atlasmtl") is True and "regular file" in out["message"], out


def test_cli_fifo_query_exits_cleanly(tiny_model, fifo, tmp_path):
    tiny_model.save(tmp_path / "m" / "model.pth")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run([sys.executable, "-m", "atlasmtl.cli", "predict", "--model", str(tmp_path / "m"),
                               "--query", str(fifo), "--out", str(tmp_path / "out.csv")],
                              capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("atlasmtl predict blocked on a FIFO query")
    assert proc.returncode == 2, proc.stderr
    assert "regular file" in proc.stderr and "Traceback" not in proc.stderr


# ================================================================ property-style fuzz over parameters
TRAIN_SPACE = {
    "num_epochs": [1, 2, np.int64(1), 0, -1, 1.5, True, None, "2"],
    "batch_size": [1, 16, 64, 10_000, np.int32(32), 0, -5, 2.0, "64"],
    "hidden_sizes": [(16,), (32, 16), [np.int64(8)], (), (0,), (16, -1), 5, "ab", (16.5,), None],
    "learning_rate": [1e-3, 0.05, 10.0, np.float32(1e-2), 0.0, -1e-3, np.inf, np.nan, "fast", None],
    "dropout_rate": [0.0, 0.3, 0.99, np.float64(0.1), 1.0, -0.1, np.nan, None],
    "label_smoothing": [0.0, 0.1, 0.9, 1.0, np.nan, -1],
    "class_weight_power": [0.0, 0.5, 1.0, np.float32(0.5), 2.0, np.nan],
    "val_fraction": [0.0, 0.2, 0.5, 0.99, 0.999, 1.0, -0.1, np.nan],
    "early_stopping_patience": [None, 1, 3, np.int64(2), 0, 1.5, True],
    "input_transform": ["binary", "float", "log", None],
    "reference_storage": ["external", "full", "cloud"],
    "num_threads": [1, "max", np.int64(1), 0, -2, 1.5, "many", None],
    "device": ["cpu", "auto", "cuda:3", "tpu", "", None],
    "random_state": [0, 7, None, np.int64(3), -1, 2**40, "x"],
}
PREDICT_SPACE = {
    "knn_correction": ["off", "low_conf_only", "all", "sometimes", None],
    "knn_k": [1, 5, 15, 10_000, np.int64(3), 0, -1, 2.5, None],
    "knn_conf_low": [0.0, 0.6, 1.0, np.float32(0.5), 1.1, np.nan, -0.2],
    "confidence_high": [0.0, 0.7, 1.0, np.float32(0.9), 2.0, np.nan, "high"],
    "confidence_low": [0.0, 0.4, 1.0, np.float64(0.2), -1.0, np.nan],
    "margin_threshold": [0.0, 0.2, 1.0, np.float32(0.1), np.inf, np.nan],
    "batch_size": [1, 7, 4096, np.int64(50), 0, -1, 1.5],
    "min_gene_overlap": [0.0, 0.5, 1.0, np.float32(0.3), 1.5, np.nan, "all"],
    "num_threads": [1, "max", np.int32(1), 0, "none"],
    "device": ["cpu", "auto", "cuda:9", "gpu", 3],
}


def _draw(rng: np.random.Generator, space: dict, n_keys: tuple[int, int]) -> dict:
    keys = rng.choice(list(space), size=int(rng.integers(*n_keys)), replace=False)
    return {str(k): space[str(k)][int(rng.integers(len(space[str(k)])))] for k in keys}


def _clear_error_or(fn, check, params):
    try:
        value = fn()
    except AtlasMTLError as exc:
        assert str(exc).strip(), f"empty error message for {params}"
        return "error"
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{params!r} raised {type(exc).__name__}: {exc}")
    check(value)
    return "ok"


def test_fuzz_training_parameters(tiny):
    """Seeded random draws over build_model's parameters: a clear atlasmtl error or a usable, finite model."""
    ref, query = synthetic(160, n_genes=30, seed=11), synthetic(60, n_genes=30, seed=12)
    rng = np.random.default_rng(2026)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(60):
        params = {"num_epochs": 1, "hidden_sizes": (16,), "num_threads": 1, **_draw(rng, TRAIN_SPACE, (1, 4))}

        def check(model, params=params):
            assert isinstance(model, atlasmtl.TrainedModel), params
            assert _finite_network(model), f"non-finite network returned for {params}"
            _valid_result(_predictions(model, query), query, model)

        outcomes[_clear_error_or(
            lambda: atlasmtl.build_model(ref, LEVELS, show_progress=False, show_summary=False, **params),
            check, params)] += 1
    assert outcomes["ok"] >= 10 and outcomes["error"] >= 10, outcomes  # the draws exercise both paths


def test_fuzz_prediction_parameters(tiny, tiny_model):
    """Seeded random draws over predict's parameters: a clear atlasmtl error or a valid result."""
    query = tiny[1]
    rng = np.random.default_rng(11)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(150):
        params = {"num_threads": 1, **_draw(rng, PREDICT_SPACE, (1, 5))}
        outcomes[_clear_error_or(
            lambda: atlasmtl.predict(tiny_model, query, show_progress=False, show_summary=False, **params),
            lambda result: _valid_result(result, query, tiny_model), params)] += 1
    assert outcomes["ok"] >= 20 and outcomes["error"] >= 20, outcomes


# ================================================================ archived model files
ARCHIVED_V1 = Path(__file__).parent / "data" / "model_schema_v1"


def test_archived_schema_v1_model_still_loads_and_predicts_the_same():
    """A model saved by atlasmtl 0.1.0 (schema_version 1) loads, and its network computes what it computed then.

    The calls themselves are not compared: since 0.1.0 the decision rule changed by design
    (joint decoding of nested levels, class-balanced KNN votes restricted to the parent's
    children), so the labels of this barely trained archived model differ. The network's own
    output (the regressed UMAP, which runs the whole encoder on the aligned, transformed
    query) must be identical, and every call must be a valid class or Unknown.
    """
    assert json.loads((ARCHIVED_V1 / "model_manifest.json").read_text())["schema_version"] == 1
    model = atlasmtl.TrainedModel.load(ARCHIVED_V1 / "model_manifest.json")
    query = ad.read_h5ad(ARCHIVED_V1 / "query.h5ad")
    result = atlasmtl.predict(model, query, knn_correction="all", **QUIET)
    expected = pd.read_csv(ARCHIVED_V1 / "predictions.csv", index_col=0, keep_default_na=False)
    got = result.to_dataframe("full")
    assert list(got.index) == list(expected.index)
    for level in model.label_columns:
        assert set(got[f"pred_{level}"].astype(str)) <= set(model.classes[level]) | {"Unknown"}
        conf = got[f"conf_{level}"].to_numpy(float)
        assert np.all((conf >= 0) & (conf <= 1))
    for k in range(2):
        np.testing.assert_allclose(result.coords["umap"][:, k], expected[f"umap_{k + 1}"], rtol=1e-6, atol=1e-6)


# ================================================================ the same failures from the command line
def _mixed_model_folder(tiny_model, other_model, tmp_path: Path) -> Path:
    tiny_model.save(tmp_path / "a" / "model.pth")
    other_model.save(tmp_path / "b" / "model.pth")
    (tmp_path / "a" / "model_reference.pkl").write_bytes((tmp_path / "b" / "model_reference.pkl").read_bytes())
    _refresh_checksums(tmp_path / "a")
    return tmp_path / "a"


@pytest.mark.parametrize("case", ["mixed-model-files", "val-fraction-leaves-nothing", "class-named-unknown",
                                  "colliding-levels", "output-under-a-file", "empty-output"])
def test_cli_clear_errors(tiny, tiny_model, other_model, tmp_path, monkeypatch, capsys, case):
    """The CLI ends each case with one error line and its exit status, and writes nothing."""
    monkeypatch.chdir(tmp_path)
    ref, query = tiny[0].copy(), tiny[1]
    query.write_h5ad("query.h5ad")
    train = ["train", "--reference", "ref.h5ad", "--labels", ",".join(LEVELS), "--out", "model", "--num-epochs", "1",
             "--num-threads", "1"]
    if case == "mixed-model-files":
        folder = _mixed_model_folder(tiny_model, other_model, tmp_path)
        argv, code, message = ["predict", "--model", str(folder), "--query", "query.h5ad", "--out", "p.csv"], 3, \
            "another model"
    elif case == "val-fraction-leaves-nothing":
        argv, code, message = train + ["--val-fraction", "0.999"], 2, "val_fraction"
    elif case == "class-named-unknown":
        ref.obs["cell_type"] = ref.obs["cell_type"].cat.rename_categories({"T1": "Unknown"})
        argv, code, message = train, 2, "'Unknown'"
    elif case == "colliding-levels":
        ref.obs["lineage_raw"] = ref.obs["cell_type"]
        argv, code, message = train[:4] + ["lineage,lineage_raw"] + train[5:], 2, "pred_lineage_raw"
    else:
        tiny_model.save(tmp_path / "m" / "model.pth")
        Path("plain.txt").write_text("x")
        out = "plain.txt/p.csv" if case == "output-under-a-file" else ""
        argv, code, message = ["predict", "--model", "m", "--query", "query.h5ad", "--out", out], 2, \
            "not a folder" if out else "--out is empty"
    ref.write_h5ad("ref.h5ad")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "warning" not in line]
    assert len(err) == 1 and err[0].startswith("atlasmtl") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_concurrent_saves_and_loads_stay_consistent(tiny_model, other_model, tiny, tmp_path):
    """Two threads saving different models to one name while a third loads: every load is one whole model."""
    import threading

    directory = tmp_path / "shared"
    tiny_model.save(directory / "model.pth")
    errors: list[BaseException] = []
    loaded_ids: list[str] = []
    ids = {tiny_model.metadata["model_id"], other_model.metadata["model_id"]}

    def saver(model):
        try:
            for _ in range(6):
                model.save(directory / "model.pth")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def loader():
        try:
            for _ in range(12):
                loaded_ids.append(atlasmtl.TrainedModel.load(directory).metadata["model_id"])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=saver, args=(m,)) for m in (tiny_model, other_model)]
    threads.append(threading.Thread(target=loader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert set(loaded_ids) <= ids and len(loaded_ids) == 12
    assert {p.name for p in directory.iterdir()} == FINAL_NAMES
    assert atlasmtl.TrainedModel.load(directory).metadata["model_id"] in ids


@pytest.mark.parametrize("members", [10**6, 0, "5", True])
def test_metadata_with_an_impossible_ensemble_size_is_refused_before_building_it(saved, members):
    _edit_pickle(saved, "metadata", lambda meta: meta["architecture"].update(ensemble_size=members))
    with pytest.raises(ArtifactError, match="ensemble_size"):
        atlasmtl.TrainedModel.load(saved / "model_manifest.json")


@pytest.mark.parametrize("name", ["nan", "NA", "None", "", " <NA>", "unknown", "Unknown "])
def test_a_class_named_like_a_missing_value_or_unknown_is_refused_at_training(tiny, name):
    """Such classes trained, then read back from a predictions table as missing (or Unknown)."""
    ref = tiny[0].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str)
    ref.obs.loc[ref.obs["cell_type"] == ref.obs["cell_type"].iloc[0], "cell_type"] = name
    with pytest.raises(LabelError, match="missing value|reads as atlasmtl's 'Unknown'"):
        atlasmtl.build_model(ref, LEVELS, **FAST)


def test_nan_labels_made_text_are_refused_with_the_fix(tiny):
    ref = tiny[0].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(object)
    ref.obs.loc[ref.obs_names[:7], "cell_type"] = np.nan
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str)  # the pitfall: NaN becomes the class 'nan'
    with pytest.raises(LabelError, match=r"\['nan'\] \(7 cells\).*astype\(str\).*Set those cells' label to NaN"):
        atlasmtl.build_model(ref, LEVELS, **FAST)


def test_writeback_keeps_the_users_own_columns_that_only_share_a_name(tiny_model, tiny, tmp_path):
    query = tiny[1].copy()
    result = atlasmtl.predict(tiny_model, query, **QUIET)
    query.obs["conf_cell_type"] = 0.25  # the user's own, from another tool; minimal mode does not write it
    query.obs["pred_cell_type"] = "theirs"
    with pytest.warns(UserWarning, match=r"replaced by the predictions: \['pred_cell_type'\]"):
        result.to_adata(query)
    assert (query.obs["conf_cell_type"] == 0.25).all()
    assert (query.obs["pred_cell_type"] != "theirs").all()
    # once atlasmtl has written here, its columns of any mode are its own: a minimal writeback after a full one
    result.to_adata(query, mode="full")
    result.to_adata(query, mode="minimal")
    assert "conf_cell_type" not in query.obs and "novelty_cell_type" not in query.obs
    # the same from a file (write_h5ad reads obs and uns from the source file)
    source = tiny[1].copy()
    source.obs["conf_cell_type"] = 0.25
    source.write_h5ad(tmp_path / "q.h5ad")
    out = ad.read_h5ad(result.write_h5ad(tmp_path / "annotated.h5ad", tmp_path / "q.h5ad", mode="minimal"))
    assert (out.obs["conf_cell_type"] == 0.25).all() and "pred_cell_type" in out.obs


def test_a_writeback_without_coordinates_drops_an_earlier_writebacks_coordinates(tiny_model, tiny, tmp_path):
    """A second writeback without include_coords kept the first one's obsm['X_pred_umap'] beside its own labels and
    settings (coordinates='heads' recorded over the neighbours' coordinates), and a report rebuilt from the file drew
    them as its own, until 2026-12-07."""
    query = tiny[1].copy()
    first = atlasmtl.predict(tiny_model, query, **QUIET)
    second = atlasmtl.predict(tiny_model, query, coordinates="heads", **QUIET)
    assert not np.allclose(first.coords["umap"], second.coords["umap"])
    first.to_adata(query, include_coords=True)
    second.to_adata(query, mode="full")
    assert "X_pred_umap" not in query.obsm and query.uns["atlasmtl"]["settings"]["coordinates"] == "heads"
    # the same for a copy of a file that holds an earlier writeback; the user's own obsm stays
    source = first.to_adata(tiny[1].copy(), include_coords=True)
    source.obsm["X_mine"] = np.ones((source.n_obs, 2))
    source.write_h5ad(tmp_path / "annotated.h5ad")
    out = ad.read_h5ad(second.write_h5ad(tmp_path / "again.h5ad", tmp_path / "annotated.h5ad", mode="full"))
    assert "X_pred_umap" not in out.obsm and "X_mine" in out.obsm
    rebuilt = atlasmtl.report.result_from_predictions(tmp_path / "again.h5ad", tiny_model)
    assert rebuilt.coords == {}
    out = ad.read_h5ad(second.write_h5ad(tmp_path / "coords.h5ad", tmp_path / "annotated.h5ad", include_coords=True))
    np.testing.assert_allclose(out.obsm["X_pred_umap"], second.coords["umap"])


def test_coordinates_replacing_the_users_own_obsm_entry_are_named(tiny_model, tiny, tmp_path):
    """A user's own obsm['X_pred_umap'] (no earlier atlasmtl writeback) was replaced by include_coords without a word,
    where a user's obs column of an atlasmtl name gets a warning; both writers now warn, and an earlier atlasmtl
    writeback's coordinates are replaced silently as before."""
    result = atlasmtl.predict(tiny_model, tiny[1].copy(), **QUIET)
    query = tiny[1].copy()
    query.obsm["X_pred_umap"] = np.zeros((query.n_obs, 2))
    query.write_h5ad(tmp_path / "mine.h5ad")
    with pytest.warns(UserWarning, match=r"obsm already holds \['X_pred_umap'\].*Rename them first"):
        result.to_adata(query, include_coords=True)
    np.testing.assert_allclose(query.obsm["X_pred_umap"], result.coords["umap"])
    with pytest.warns(UserWarning, match=r"obsm already holds \['X_pred_umap'\]"):
        result.write_h5ad(tmp_path / "out.h5ad", tmp_path / "mine.h5ad", include_coords=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result.to_adata(query, include_coords=True)  # the earlier writeback's own: no warning
        result.to_adata(tiny[1].copy(), include_coords=False)


@pytest.mark.parametrize("kind", ["csr", "csc", "dense", "backed csr", "backed dense"])
def test_an_all_zero_reference_is_refused_and_empty_cells_are_counted(tiny, kind, tmp_path):
    """An all-zero reference trained a model that called every query cell Unknown, with a foreign warning;
    read from disk (backed) it did so silently until 2026-12-07."""
    ref = tiny[0].copy()
    X = sp.csr_matrix(ref.X)
    X = sp.vstack([sp.csr_matrix((7, X.shape[1]), dtype=X.dtype), X[7:]]).tocsr()
    convert = {"csr": lambda m: m, "csc": lambda m: m.tocsc(), "dense": lambda m: m.toarray()}[kind.split()[-1]]

    def reference(matrix):
        ref.X = convert(matrix)
        if not kind.startswith("backed"):
            return ref
        ref.write_h5ad(tmp_path / f"{matrix.nnz}.h5ad")
        return ad.read_h5ad(tmp_path / f"{matrix.nnz}.h5ad", backed="r")

    with pytest.warns(UserWarning, match="7 of 300 labelled reference cells hold no counts"):
        atlasmtl.build_model(reference(X), LEVELS, **FAST)
    with pytest.raises(EmptyDataError, match="holds only zeros in X"):
        atlasmtl.build_model(reference(sp.csr_matrix(X.shape, dtype=np.float32)), LEVELS, **FAST)


def test_networks_too_large_for_the_memory_are_a_parameter_error(tiny):
    """hidden_sizes=(10**9,) died in PyTorch's allocator with a foreign RuntimeError (the CLI said 'unexpected')."""
    with pytest.raises(ParameterError, match=r"hidden_sizes=\(1000000000,\).*GiB of memory available"):
        atlasmtl.build_model(tiny[0], LEVELS, **dict(FAST, hidden_sizes=(10**9,)))


def test_a_coordinate_target_without_columns_is_a_coordinate_error(tiny):
    """It was reported as a diverged training ('use a smaller learning_rate')."""
    ref = tiny[0].copy()
    ref.obsm["X_none"] = np.zeros((ref.n_obs, 0))
    with pytest.raises(CoordinateError, match="has no columns"):
        atlasmtl.build_model(ref, LEVELS, coord_targets={"none": "X_none"}, **FAST)


@pytest.mark.parametrize("value", ["no", 0, 1.0, "False"])
def test_show_flags_other_than_true_false_none_are_refused(tiny, tiny_model, value):
    """'no' was read as True (show)."""
    with pytest.raises(ParameterError, match="show_progress=.*must be True, False or None"):
        atlasmtl.build_model(tiny[0], LEVELS, **dict(FAST, show_progress=value))
    with pytest.raises(ParameterError, match="show_summary=.*must be True, False or None"):
        atlasmtl.predict(tiny_model, tiny[1], num_threads=1, show_progress=False, show_summary=value)


@pytest.mark.parametrize("name", ["model.pth", "model_metadata.pkl"])
def test_a_save_never_replaces_a_file_that_is_not_part_of_a_model(tiny_model, tmp_path, name):
    """A user's own checkpoint named model.pth was overwritten by save (and by `atlasmtl train --out`)."""
    foreign = tmp_path / name
    foreign.write_bytes(b"someone's own checkpoint")
    with pytest.raises(OutputError, match="exists and is not part of an atlasmtl model"):
        tiny_model.save(tmp_path / "model.pth")
    assert foreign.read_bytes() == b"someone's own checkpoint"
    assert {p.name for p in tmp_path.iterdir()} == {name}
    # an earlier atlasmtl model at the same name is replaced as before
    other = tmp_path / "other"
    tiny_model.save(other / "model.pth")
    tiny_model.save(other / "model.pth")
    assert {p.name for p in other.iterdir()} == FINAL_NAMES


# ================================================================ results, plots and reports with unusual input
def test_a_damaged_prediction_table_is_refused_by_name(tiny_model, predicted):
    """Hand-edited tables were read as they came: NaN confidences counted as calls, duplicated rows twice,
    'maybe' as False, and text in a number column was a foreign ValueError."""
    from atlasmtl.report import result_from_predictions

    result = predicted[0]
    table = result.to_dataframe("full")
    level = LEVELS[-1]

    def edited(column, value):
        out = table.copy()
        out[f"{column}_{level}"] = value
        return out

    for bad, match in [(edited("conf", 1.5), "conf_cell_type' holds values outside \\[0, 1\\]"),
                       (edited("knn_vote_frac", 5.0), "outside \\[0, 1\\]"),
                       (edited("is_unknown", "maybe"), "not True / False: \\['maybe'\\]"),
                       (edited("novelty", "x"), "not numbers: \\['x'\\]"),
                       (edited("conf", "high"), r"'conf_cell_type' holds text, not numbers: \['high'\]\. .*"
                                                r"write the predictions again \(result.to_csv\(path, mode='full'\)"),
                       (pd.concat([table, table.iloc[:3]]), "names some cells twice"),
                       (table.iloc[:0], "holds no cells")]:
        with pytest.raises(InputError, match=match):
            result_from_predictions(bad, tiny_model)
    with pytest.raises(ParameterError, match="settings must be a dict"):
        result_from_predictions(table, tiny_model, settings=[1])
    with pytest.raises(ParameterError, match="model must be the TrainedModel"):
        result_from_predictions(table, None)
    rebuilt = result_from_predictions(edited("conf", np.nan), tiny_model)  # no confidence is a valid value
    assert np.isnan(rebuilt.levels[level].conf).all()


def test_names_that_look_like_numbers_survive_a_table(tiny_model, tiny, tmp_path):
    """Cell names '0001' came back from a CSV as '1' (and 'NA' as NaN), so the result no longer matched its query."""
    from atlasmtl.report import result_from_predictions

    query = tiny[1].copy()
    query.obs_names = [f"{i:04d}" for i in range(query.n_obs - 1)] + ["NA"]
    result = _predictions(tiny_model, query)
    result.to_csv(tmp_path / "p.csv", mode="full")
    rebuilt = result_from_predictions(tmp_path / "p.csv", tiny_model)
    assert list(rebuilt.obs_names) == list(query.obs_names)
    assert _same_calls(rebuilt, result)
    rebuilt.to_adata(query, copy=True)  # the same cells: accepted


def test_integer_cell_names_write_back(tiny_model, tiny):
    """AnnData turns integer cell names into text on copy and writeback; the result kept integers and then
    refused its own query as 'not the one these predictions were made for'."""
    query = tiny[1].copy()
    with pytest.warns(UserWarning):  # anndata: the index is not text
        query.obs_names = pd.Index(np.arange(query.n_obs))
    result = _predictions(tiny_model, query)
    out = result.to_adata(query, copy=True)
    assert (out.obs[f"pred_{LEVELS[-1]}"].astype(str) != "").all()
    result.to_adata(query)
    result.to_adata(query)


def test_result_methods_name_bad_arguments(predicted, tmp_path):
    result, query, query_file = predicted
    with pytest.raises(ParameterError, match="level='nope' is not a level.*cell_type"):
        result.labels("nope")
    with pytest.raises(ParameterError, match="not a str; for a file, write an annotated copy with write_h5ad"):
        result.to_adata(str(query_file))
    with pytest.raises(ParameterError, match="copy='yes' must be True or False"):
        result.to_adata(query.copy(), copy="yes")
    with pytest.raises(OutputError, match="write_h5ad writes an .h5ad file"):
        result.write_h5ad(tmp_path / "x.csv", query)
    with pytest.raises(OutputError, match="report is an HTML page"):
        result.report(tmp_path / "r.pdf")
    with pytest.raises(ParameterError, match="dpi=0"):
        result.report(tmp_path / "r.html", dpi=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_plots_name_bad_arguments_and_paths(predicted, tmp_path):
    """Plot arguments and save paths gave matplotlib's or numpy's errors (or a hidden '.png' for save='out/')."""
    from atlasmtl import pl

    result = predicted[0]
    (tmp_path / "file.txt").write_text("keep")
    for call, error, match in [
        (lambda: pl.composition(result, levels=[]), ParameterError, "levels=\\[\\] names no level"),
        (lambda: pl.confidence(result, bins=1.5), ParameterError, "bins=1.5"),
        (lambda: pl.confidence(result, bins=0), ParameterError, "bins=0"),
        (lambda: pl.embedding(result, point_size="x"), ParameterError, "point_size"),
        (lambda: pl.embedding(result, max_points=0), ParameterError, "max_points=0"),
        (lambda: pl.umap(result, basis="umap"), ParameterError, "pl.embedding"),
        (lambda: pl.composition(result, figsize="big"), ParameterError, "figsize='big'"),
        (lambda: pl.composition(result, save=tmp_path / "out.xyz"), OutputError, "figure format's suffix"),
        (lambda: pl.composition(result, save=str(tmp_path / "out") + "/"), OutputError, "figure format's suffix"),
        (lambda: pl.composition(result, save=tmp_path / "file.txt" / "x.png"), OutputError, "not a folder"),
    ]:
        with pytest.raises(error, match=match):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    pl.composition(result, save=tmp_path / "new" / "c.svg")  # missing folders are made, as for tables
    assert (tmp_path / "new" / "c.svg").read_text().lstrip().startswith("<?xml")


def test_classes_of_one_or_two_reference_cells_are_named_at_training(tiny):
    """A class of 1-2 reference cells trained without a word, though the network rarely calls it and the
    KNN vote cannot confirm it (Symphony's HSC: 1 cell; Zilionis' T3: 1)."""
    ref = tiny[0].copy()
    labels = ref.obs["cell_type"].astype(str).to_numpy().copy()
    labels[:2] = "rare"
    ref.obs["cell_type"] = pd.Categorical(labels)
    with pytest.warns(UserWarning, match=r"'cell_type' has 1 class\(es\) with fewer than 3 reference cells \('rare': 2\)"):
        atlasmtl.build_model(ref, LEVELS, **FAST)


def test_a_backed_file_without_x_names_the_fix(tiny, tmp_path):
    """A backed AnnData with no X group raised h5py's KeyError ('object X doesn't exist'); the path form said
    to pass layer= or use_raw=True, and so does the backed object now."""
    import h5py

    ref = tiny[0].copy()
    ref.layers["counts"] = ref.X.copy()
    ref.write_h5ad(tmp_path / "no_x.h5ad")
    with h5py.File(tmp_path / "no_x.h5ad", "r+") as handle:
        del handle["X"]
    backed = ad.read_h5ad(tmp_path / "no_x.h5ad", backed="r")
    with pytest.raises(InputError, match="has no X; pass layer= or use_raw=True"):
        atlasmtl.build_model(backed, LEVELS, **FAST)


def test_an_h5ad_without_its_gene_table_or_cut_short_is_named_incomplete(tiny, tiny_model, predicted, tmp_path,
                                                                        monkeypatch, capsys):
    """A file with obs and X but no var group was read as a dataset of 0 genes (backed: "The AnnData is empty
    (150 cells × 0 genes)"; in memory, `atlasmtl train`: genes named 0, 1, ...) or gave h5py's KeyError; a file
    cut short said only h5py's "truncated file". Both now say what is wrong with the file and how to mend it."""
    import h5py

    monkeypatch.chdir(tmp_path)
    for name, adata in (("ref", tiny[0]), ("query", tiny[1])):
        adata.write_h5ad(f"{name}.h5ad")
        shutil.copyfile(f"{name}.h5ad", f"{name}_novar.h5ad")
        with h5py.File(f"{name}_novar.h5ad", "r+") as handle:
            del handle["var"]
        data = Path(f"{name}.h5ad").read_bytes()
        Path(f"{name}_cut.h5ad").write_bytes(data[: len(data) // 2])
    incomplete = (r"'ref_novar\.h5ad' is incomplete or not an AnnData \.h5ad file: it has no 'var' \(the gene "
                  r"table\) group\. Write it again with adata\.write_h5ad\(path\)")
    cut = r"Could not read 'ref_cut\.h5ad' as \.h5ad .*truncated.*cut short.* write it again with adata\.write_h5ad"
    for path, match in (("ref_novar.h5ad", incomplete), ("ref_cut.h5ad", cut)):
        with pytest.raises(InputError, match=match):
            atlasmtl.build_model(path, LEVELS, **FAST)
        query_path, query_match = path.replace("ref", "query"), match.replace("ref", "query")
        for source in (query_path, Path(query_path)):
            with pytest.raises(InputError, match=query_match):
                _predictions(tiny_model, source)
    with pytest.raises(InputError, match=incomplete.replace("ref", "query")):  # a backed AnnData of the file
        _predictions(tiny_model, ad.read_h5ad("query_novar.h5ad", backed="r"))
    with pytest.raises(InputError, match=incomplete.replace("ref", "query")):  # an annotated copy of the file
        predicted[0].write_h5ad("annotated.h5ad", "query_novar.h5ad")
    # the command line: train reads the reference into memory, predict streams the query, report reads it backed
    tiny_model.save(tmp_path / "model" / "model.pth")
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, name in ((["train", "--reference", "ref_novar.h5ad", "--labels", ",".join(LEVELS), "--out", "m",
                         "--num-epochs", "1", "--num-threads", "1"], "ref"),
                       (["predict", "--model", "model", "--query", "query_novar.h5ad", "--out", "p.csv"], "query"),
                       (["report", "--model", "model", "--query", "query_novar.h5ad", "--out", "r.html"], "query")):
        assert cli.main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "warning" not in line]
        assert len(err) == 1 and err[0].startswith(f"atlasmtl {argv[0]}: error: InputError: "), err
        assert re.search(incomplete.replace("ref", name), err[0]), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_matrix_stored_by_gene_on_disk_is_refused_by_path_and_backed_alike(tiny, tiny_model, tmp_path):
    """A CSC matrix on disk: the path form refused it, while a backed AnnData of the same file was streamed,
    each block of cells reading the whole matrix. Both now refuse it with the same fix; in memory it is
    converted (with a warning) and predicts as the CSR file does."""
    ref, query = tiny[0].copy(), tiny[1].copy()
    query.X = sp.csc_matrix(query.X)
    query.write_h5ad(tmp_path / "q.h5ad")
    ref.X = sp.csc_matrix(ref.X)
    ref.write_h5ad(tmp_path / "r.h5ad")
    fix = r"stored on disk as CSC .* Store it as CSR: a = anndata.read_h5ad\(path\); a.X = a.X.tocsr\(\)"
    for source in (tmp_path / "q.h5ad", ad.read_h5ad(tmp_path / "q.h5ad", backed="r")):
        with pytest.raises(InputError, match=fix):
            atlasmtl.predict(tiny_model, source, show_progress=False, show_summary=False)
    for source in (tmp_path / "r.h5ad", ad.read_h5ad(tmp_path / "r.h5ad", backed="r")):
        with pytest.raises(InputError, match=fix):
            atlasmtl.build_model(source, LEVELS, **FAST)
    with pytest.warns(UserWarning, match="converted to CSR"):
        in_memory = _predictions(tiny_model, ad.read_h5ad(tmp_path / "q.h5ad"))
    as_csr = query.copy()
    as_csr.X = sp.csr_matrix(query.X)
    as_csr.write_h5ad(tmp_path / "q_csr.h5ad")
    from_disk = atlasmtl.predict(tiny_model, tmp_path / "q_csr.h5ad", show_progress=False, show_summary=False)
    for level in LEVELS:
        np.testing.assert_array_equal(in_memory.levels[level].raw, from_disk.levels[level].raw)


def test_a_damaged_chunk_met_while_streaming_names_the_file(tiny, tmp_path):
    """A damaged gzip chunk of X met while training from disk was h5py's bare OSError."""
    import h5py

    ref = tiny[0].copy()
    ref.write_h5ad(tmp_path / "ref.h5ad", compression="gzip")
    with h5py.File(tmp_path / "ref.h5ad", "r") as handle:
        chunk = handle["X/data"].id.get_chunk_info(0)
    with open(tmp_path / "ref.h5ad", "r+b") as raw:
        raw.seek(chunk.byte_offset + chunk.size // 2)
        raw.write(b"\xff" * min(64, chunk.size // 2))
    with pytest.raises(InputError, match="Could not read rows of X from the file .*damaged"):
        atlasmtl.build_model(ad.read_h5ad(tmp_path / "ref.h5ad", backed="r"), LEVELS, **FAST)


def test_a_path_under_an_unexpanded_home_shorthand_is_refused_not_created(tiny_model, tiny, tmp_path, monkeypatch):
    """"~/m" reached the disk as a folder named "~" in the working directory; now writers refuse it, naming
    os.path.expanduser, and a missing input under it says so (as with anndata and h5py, "~" is not expanded)."""
    monkeypatch.chdir(tmp_path)
    result = _predictions(tiny_model, tiny[1])
    with pytest.raises(OutputError, match=r"starts with '~'.*os\.path\.expanduser\('~/m\.pth'\)"):
        tiny_model.save("~/m.pth")
    with pytest.raises(OutputError, match="expanduser"):
        result.to_csv("~/predictions.csv")
    with pytest.raises(InputError, match=r"No such .*'~/query\.h5ad' \('~' is not expanded"):
        atlasmtl.predict(tiny_model, "~/query.h5ad", show_progress=False, show_summary=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "~").mkdir()  # a folder really named "~" is a folder like any other
    tiny_model.save("~/m.pth")
    assert (tmp_path / "~" / "m.pth").is_file()


def test_model_api_and_evaluate_mistakes_found_by_an_audit(tiny_model, tiny, tmp_path):
    """Found by an audit (2026-12-07): sorting model.classes in place relabelled every prediction (and saved so);
    model.save("run_v1.2") wrote run_v1.pth over another model, and a manifest path added a second model to its
    folder; evaluate crashed on a level named twice, read novel_labels={"lineage": "B"} letter by letter and took
    a hierarchy of unknown levels as "nothing to check"; evaluation_table took anything; a report's predictions
    with a level the model lacks were silently cut; --truth-columns took a level twice (the last pair won)."""
    query = tiny[1]
    before = _predictions(tiny_model, query)
    tiny_model.classes["cell_type"].sort(reverse=True)
    tiny_model.hierarchy.clear()
    assert _same_calls(before, _predictions(tiny_model, query))  # the model's own lists are not handed out
    tiny_model.save(tmp_path / "run_v1.pth")
    for bad in ("run_v1.2", "x.pt", "run_v1_manifest.json"):
        with pytest.raises(OutputError, match=r"ends in '\.[a-z0-9]+'; give a folder .* or a weights name ending in \.pth"):
            tiny_model.save(tmp_path / bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"run_v1{s}" for s in (".pth", "_metadata.pkl", "_reference.pkl", "_embedding.npy", "_manifest.json"))
    for bad in (None, 3):
        with pytest.raises(ParameterError, match="must be a file or folder name"):
            atlasmtl.TrainedModel.load(bad)
        with pytest.raises(ParameterError, match="must be a file or folder name"):
            tiny_model.save(bad)
    with pytest.raises(ParameterError, match="reference_storage=''"):
        tiny_model.save(tmp_path / "m2.pth", reference_storage="")
    with pytest.raises(ParameterError, match="names a level twice"):
        atlasmtl.evaluate(before, query, label_columns=["lineage", "lineage"])
    first = str(query.obs["lineage"].iloc[0])
    as_text = atlasmtl.evaluate(before, query, novel_labels={"lineage": first})["novel"]["n_novel"]
    assert as_text == atlasmtl.evaluate(before, query, novel_labels={"lineage": [first]})["novel"]["n_novel"] > 0
    with pytest.raises(ParameterError, match=r"hierarchy names level\(s\) \['foo'\]"):
        atlasmtl.evaluate(before, query, hierarchy={"foo": {"a": "b"}})
    for bad in (before.to_dataframe("full"), {}):
        with pytest.raises(ParameterError, match="evaluation_table takes the dict atlasmtl.evaluate returns"):
            atlasmtl.evaluation_table(bad)
    other = atlasmtl.build_model(tiny[0], ["lineage"], random_state=0, **FAST)
    from atlasmtl.report import result_from_predictions

    with pytest.raises(InputError, match=r"hold level\(s\) \['cell_type'\] that the model lacks"):
        result_from_predictions(before.to_dataframe("full"), other)
    rebuilt = result_from_predictions(before.to_dataframe("full"), tiny_model)  # a table keeps no coordinates
    page = rebuilt.report(tmp_path / "rebuilt.html", model=tiny_model).read_text()
    assert "These predictions hold no coordinates" in page and "The model has no coordinate heads" not in page
    with pytest.raises(cli.UsageError, match="names the level 'lineage' twice"):
        cli.parse_truth_columns("lineage=lineage,lineage=cell_type")
    with pytest.raises(LabelError, match=r"truth maps level\(s\) \['foo'\] that the predictions do not have"):
        before.report(tmp_path / "r.html", adata=query, truth={"lineage": "lineage", "foo": "cell_type"})
