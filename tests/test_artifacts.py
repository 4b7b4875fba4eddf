"""Saving and loading models: both entry points, moved directories, tampering, malicious pickles."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import atlasmtl
from atlasmtl.artifacts import SCHEMA_VERSION, artifact_paths
from atlasmtl.exceptions import (
    ArtifactError,
    ChecksumMismatchError,
    SchemaVersionError,
    UnsafeArtifactError,
)

from .synthetic import SYNTHETIC_LEVELS


def _same_predictions(a, b):
    for level in a.levels:
        for key in ("code", "raw_code", "conf", "margin", "knn_code", "used_knn"):
            np.testing.assert_array_equal(a.levels[level][key], b.levels[level][key])
    for name in a.coords:
        np.testing.assert_array_equal(a.coords[name], b.coords[name])


def _rewrite_manifest_checksum(manifest_path, role):
    manifest = json.loads(manifest_path.read_text())
    target = manifest_path.parent / manifest["files"][role]["file"]
    manifest["files"][role]["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    manifest["files"][role]["bytes"] = target.stat().st_size
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture
def saved(pbmc_model, tmp_path):
    paths = pbmc_model.save(tmp_path / "model.pth")
    return pbmc_model, tmp_path, paths


def test_save_writes_the_five_files_with_checksums(saved):
    model, directory, paths = saved
    assert sorted(os.listdir(directory)) == [
        "model.pth",
        "model_embedding.npy",
        "model_manifest.json",
        "model_metadata.pkl",
        "model_reference.pkl",
    ]
    manifest = json.loads((directory / "model_manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["atlasmtl_version"] == atlasmtl.__version__
    for role, entry in manifest["files"].items():
        data = (directory / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], role
    assert "created" in manifest


def test_stem_follows_the_given_name(pbmc_model, tmp_path):
    pbmc_model.save(tmp_path / "foo.pth")
    assert {p.name for p in tmp_path.iterdir()} == {
        "foo.pth", "foo_metadata.pkl", "foo_reference.pkl", "foo_embedding.npy", "foo_manifest.json"
    }


def test_a_name_without_a_suffix_loads_as_it_was_saved(pbmc_model, tmp_path):
    """``save("m")`` writes ``m.pth`` and its companions beside the name; ``load("m")`` said "No such model file"."""
    pbmc_model.save(tmp_path / "intlab_m")
    assert not (tmp_path / "intlab_m").exists() and (tmp_path / "intlab_m_manifest.json").is_file()
    loaded = atlasmtl.TrainedModel.load(str(tmp_path / "intlab_m"))
    assert loaded.metadata["model_id"] == json.loads((tmp_path / "intlab_m_manifest.json").read_text())["model_id"]
    assert loaded.classes == pbmc_model.classes
    with pytest.raises(ArtifactError, match="No such model file"):  # a folder name that is not there
        atlasmtl.TrainedModel.load(str(tmp_path / "intlab_m") + "/")


@pytest.mark.parametrize("entry", ["model_manifest.json", "model.pth"])
def test_roundtrip_predicts_identically(saved, query_copy, entry):
    model, directory, _ = saved
    loaded = atlasmtl.TrainedModel.load(directory / entry)
    before = atlasmtl.predict(model, query_copy, show_progress=False, knn_correction="all")
    after = atlasmtl.predict(loaded, query_copy, show_progress=False, knn_correction="all")
    _same_predictions(before, after)
    assert loaded.classes == model.classes
    assert loaded.train_config["train_seconds"] == model.train_config["train_seconds"]


def test_moved_and_renamed_directory_still_loads(saved, query_copy, tmp_path_factory):
    model, directory, _ = saved
    moved = tmp_path_factory.mktemp("elsewhere") / "renamed_model_dir"
    shutil.move(str(directory), moved)
    loaded = atlasmtl.TrainedModel.load(moved / "model_manifest.json")
    _same_predictions(
        atlasmtl.predict(model, query_copy, show_progress=False),
        atlasmtl.predict(loaded, query_copy, show_progress=False),
    )


def test_full_reference_storage_embeds_reference(pbmc_model, query_copy, tmp_path):
    pbmc_model.save(tmp_path / "model.pth", reference_storage="full")
    assert not (tmp_path / "model_reference.pkl").exists() and not (tmp_path / "model_embedding.npy").exists()
    loaded = atlasmtl.TrainedModel.load(tmp_path / "model_manifest.json")
    np.testing.assert_array_equal(loaded.reference["embedding"], pbmc_model.reference["embedding"])
    _same_predictions(
        atlasmtl.predict(pbmc_model, query_copy, show_progress=False),
        atlasmtl.predict(loaded, query_copy, show_progress=False),
    )


@pytest.mark.parametrize("name", ["model.pth", "model_metadata.pkl", "model_reference.pkl", "model_embedding.npy"])
def test_tampered_file_is_refused(saved, name):
    _, directory, _ = saved
    path = directory / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=name):
        atlasmtl.TrainedModel.load(directory / "model_manifest.json")


def test_truncated_file_is_refused(saved):
    _, directory, _ = saved
    path = directory / "model_metadata.pkl"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ChecksumMismatchError):
        atlasmtl.TrainedModel.load(directory / "model_manifest.json")
    # even with a matching checksum, a truncated pickle is a clear ArtifactError, not a deep traceback
    _rewrite_manifest_checksum(directory / "model_manifest.json", "metadata")
    with pytest.raises(ArtifactError, match="truncated or corrupted"):
        atlasmtl.TrainedModel.load(directory / "model_manifest.json")


class _Exploit:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("role", ["metadata", "reference"])
def test_malicious_pickle_is_refused_and_never_runs(saved, tmp_path_factory, role):
    _, directory, _ = saved
    sentinel = tmp_path_factory.mktemp("sentinel") / "pwned"
    target = directory / f"model_{role}.pkl"
    target.write_bytes(pickle.dumps({"genes": ["A"], "payload": _Exploit(sentinel)}))
    # the attacker also fixes the checksum, so only the code-free unpickler stands in the way
    _rewrite_manifest_checksum(directory / "model_manifest.json", role)
    with pytest.raises(UnsafeArtifactError, match="posix.system|os.system|refused"):
        atlasmtl.TrainedModel.load(directory / "model_manifest.json")
    assert not sentinel.exists()


def test_malicious_weights_are_refused(saved, tmp_path_factory):
    _, directory, _ = saved
    sentinel = tmp_path_factory.mktemp("sentinel") / "pwned"
    torch.save({"x": _Exploit(sentinel)}, directory / "model.pth")
    _rewrite_manifest_checksum(directory / "model_manifest.json", "weights")
    with pytest.raises(UnsafeArtifactError, match="holds Python objects.*refuses it") as caught:
        atlasmtl.TrainedModel.load(directory / "model_manifest.json")
    assert not sentinel.exists()
    # PyTorch's own advice ("re-running torch.load with weights_only=False will likely succeed") is not passed on
    assert "weights_only" not in str(caught.value)


@pytest.mark.parametrize("edit", [{"schema_version": 3.0}, {"schema_version": True}, {"bytes": "big"}, {"bytes": 1e400},
                                  {"nested": "deep"}])
def test_a_damaged_manifest_is_an_artifact_error_not_an_upgrade_hint(saved, edit):
    _, directory, _ = saved
    path = directory / "model_manifest.json"
    manifest = json.loads(path.read_text())
    if "schema_version" in edit:
        manifest["schema_version"] = edit["schema_version"]
        text = json.dumps(manifest)
    elif "bytes" in edit:
        manifest["files"]["weights"]["bytes"] = edit["bytes"]
        text = json.dumps(manifest)
    else:  # nesting deep enough to exhaust the JSON parser's stack (a RecursionError before)
        text = json.dumps(manifest)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path.write_text(text)
    with pytest.raises(ArtifactError) as caught:
        atlasmtl.TrainedModel.load(path)
    assert not isinstance(caught.value, SchemaVersionError) and "Upgrade" not in str(caught.value)


def test_newer_schema_is_refused(saved):
    _, directory, _ = saved
    manifest_path = directory / "model_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match="Upgrade atlasmtl"):
        atlasmtl.TrainedModel.load(manifest_path)


@pytest.mark.parametrize("bad_name", ["../outside.pkl", "/etc/passwd", "sub/model_metadata.pkl"])
def test_manifest_pointing_outside_is_refused(saved, bad_name):
    _, directory, _ = saved
    manifest_path = directory / "model_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["metadata"]["file"] = bad_name
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UnsafeArtifactError, match="directory"):
        atlasmtl.TrainedModel.load(manifest_path)


def test_missing_manifest_or_garbage_is_a_clear_error(saved, tmp_path):
    _, directory, _ = saved
    (directory / "model_manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest"):
        atlasmtl.TrainedModel.load(directory / "model.pth")
    garbage = tmp_path / "garbage_manifest.json"
    garbage.write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        atlasmtl.TrainedModel.load(garbage)
    with pytest.raises(ArtifactError, match="No such model file"):
        atlasmtl.TrainedModel.load(tmp_path / "nope_manifest.json")


def test_interrupted_save_keeps_the_previous_model(pbmc_model, synthetic_model, tmp_path, monkeypatch):
    pbmc_model.save(tmp_path / "model.pth")
    other = synthetic_model

    calls = {"n": 0}
    real_replace = os.replace

    def crash_on_first_rename(src, dst):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("simulated crash mid-save")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_first_rename)
    with pytest.raises(KeyboardInterrupt):
        other.save(tmp_path / "model.pth")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or staged files
    # the new files never replaced the old ones: the previous model loads, whole
    assert atlasmtl.TrainedModel.load(tmp_path / "model_manifest.json").label_columns == ["lineage", "bulk_labels"]
    other.save(tmp_path / "model.pth")  # a completed save replaces it
    assert atlasmtl.TrainedModel.load(tmp_path / "model_manifest.json").label_columns == SYNTHETIC_LEVELS


def test_artifact_paths_naming(tmp_path):
    paths = artifact_paths(tmp_path / "atlas_v2.pth")
    assert paths["manifest"].name == "atlas_v2_manifest.json"
    assert paths["reference"].name == "atlas_v2_reference.pkl"


def test_embedding_is_saved_in_chunks_as_plain_npy(tmp_path, monkeypatch):
    """The embedding file is exactly what ``np.save`` writes, and saving a memory-mapped embedding never
    holds it whole in memory (``tracemalloc`` sees numpy's buffers): the peak stays under a few chunks."""
    import tracemalloc

    from atlasmtl import artifacts

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, 64)).astype(np.float16)  # 25.6 MB
    np.save(tmp_path / "src.npy", x)
    mapped = np.load(tmp_path / "src.npy", mmap_mode="r")
    monkeypatch.setattr(artifacts, "_SAVE_ROW_CHUNK", 4096)  # ~0.5 MB chunks
    tracemalloc.start()
    try:
        payload, record = artifacts._embedding_payload(mapped)
        artifacts._write_new_file(tmp_path / "out.npy", payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"saving held {peak / 2**20:.1f} MB of a 25.6 MB embedding"
    written = (tmp_path / "out.npy").read_bytes()
    assert written == (tmp_path / "src.npy").read_bytes()
    assert record == {"sha256": hashlib.sha256(written).hexdigest(), "dtype": "float16", "shape": [200_000, 64]}
    assert payload.nbytes == len(written)


@pytest.mark.parametrize("edit", ["components", "members", "location", "residual", "spread"])
def test_input_view_round_trips_and_a_damaged_one_is_refused(saved, edit):
    """The novelty score's input view is saved as plain arrays, loads back equal, and a file whose view does
    not fit the model (wrong PCA width, class codes out of range, a non-finite location, a residual score
    without a scale, a negative class spread) is refused by name."""
    from atlasmtl.artifacts import safe_loads
    from atlasmtl.io import to_plain

    model, directory, _ = saved
    view = model.metadata["novelty"]["input_view"]
    loaded = atlasmtl.TrainedModel.load(directory / "model_manifest.json").metadata["novelty"]["input_view"]
    for key in ("components", "mean", "points"):
        np.testing.assert_array_equal(view[key], loaded[key])
    path = directory / "model_metadata.pkl"
    meta = safe_loads(path.read_bytes(), "metadata")
    stored = meta["novelty"]["input_view"]
    level = next(iter(stored["members"]))
    if edit == "components":
        stored["components"] = stored["components"][:, :-1]
    elif edit == "members":
        stored["members"][level] = stored["members"][level] + 1000
    elif edit == "location":
        stored["levels"][level]["location"] = np.full_like(stored["levels"][level]["location"], np.inf)
    elif edit == "residual":
        stored["levels"][level]["residual"]["scale"] = 0.0
    else:
        stored["levels"][level]["spread"] = -stored["levels"][level]["spread"]
    path.write_bytes(pickle.dumps(to_plain(meta), protocol=4))
    _rewrite_manifest_checksum(directory / "model_manifest.json", "metadata")
    with pytest.raises(ArtifactError, match="input_view"):
        atlasmtl.TrainedModel.load(directory / "model_manifest.json")


@pytest.mark.parametrize("edit", ["shape", "nan", "names"])
def test_damaged_reference_coordinates_are_refused(saved, edit):
    """The reference cells' coordinates (what the query is placed from) load back equal, and a file whose
    coordinates do not fit the model (a column short, a NaN, another head's name) is refused by name."""
    from atlasmtl.artifacts import safe_loads
    from atlasmtl.io import to_plain

    model, directory, _ = saved
    loaded = atlasmtl.TrainedModel.load(directory / "model_manifest.json")
    for name, values in model.reference["coords"].items():
        np.testing.assert_array_equal(loaded.reference["coords"][name], values)
    path = directory / "model_reference.pkl"
    reference = safe_loads(path.read_bytes(), "reference")
    coords = reference["coords"]
    if edit == "shape":
        coords["umap"] = coords["umap"][:, :1]
    elif edit == "nan":
        coords["umap"] = coords["umap"].copy()
        coords["umap"][0, 0] = np.nan
    else:
        coords["tsne"] = coords.pop("umap")
    path.write_bytes(pickle.dumps(to_plain(reference), protocol=4))
    _rewrite_manifest_checksum(directory / "model_manifest.json", "reference")
    with pytest.raises(ArtifactError, match="coords"):
        atlasmtl.TrainedModel.load(directory / "model_manifest.json")


def test_a_view_saved_before_the_residual_coordinate_and_class_spreads_loads_and_predicts(pbmc_model, pbmc_split, tmp_path):
    """Models saved before the residual coordinate and the class spreads (a view with neither key) still load
    and predict as before their save; a view without the residual coordinate scores in the PCA alone, never
    above the current view's score (the larger of the two z)."""
    from atlasmtl.model import TrainedModel

    _, query = pbmc_split
    view = pbmc_model.metadata["novelty"]["input_view"]
    assert view["residual"] and view["class_scale"] and view["points"].shape[1] == view["components"].shape[0] + 1

    def with_view(stored):
        return TrainedModel(pbmc_model.network, {**pbmc_model.metadata, "novelty": {**pbmc_model.metadata["novelty"],
                                                                                 "input_view": stored}}, pbmc_model.reference)

    def strip(keys):
        return {lv: None if s is None else {k: v for k, v in s.items() if k not in keys} for lv, s in view["levels"].items()}

    quiet = {"show_progress": False, "show_summary": False}
    fine = pbmc_model.label_columns[-1]
    # the earlier format: no "residual" or "class_scale" key, PCA coordinates only, no spreads
    oldest = {k: v for k, v in view.items() if k not in ("residual", "class_scale")}
    oldest.update(points=view["points"][:, :-1], levels=strip({"residual", "spread"}))
    with_view(oldest).save(tmp_path / "old.pth")
    loaded = atlasmtl.TrainedModel.load(tmp_path / "old_manifest.json")
    assert not {"residual", "class_scale"} & set(loaded.metadata["novelty"]["input_view"])
    np.testing.assert_array_equal(atlasmtl.predict(loaded, query, **quiet).levels[fine].novelty,
                                  atlasmtl.predict(with_view(oldest), query, **quiet).levels[fine].novelty)
    # the residual coordinate only adds a second z: without it no cell scores higher
    pca_only = {**view, "residual": False, "points": view["points"][:, :-1], "levels": strip({"residual"})}
    before = atlasmtl.predict(with_view(pca_only), query, **quiet).levels[fine].novelty
    now = atlasmtl.predict(pbmc_model, query, **quiet).levels[fine].novelty
    both = np.isfinite(before) & np.isfinite(now)
    assert both.mean() > 0.9 and np.all(before[both] <= now[both] + 1e-6) and np.any(before[both] < now[both] - 1e-3)
