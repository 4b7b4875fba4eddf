"""The stored neighbour index (issue 13): recall against exact search, class-restricted search,
round-trip through saved files, refusal when tampered, and models saved without an index."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

import atlasmtl
from atlasmtl import knn
from atlasmtl.exceptions import ArtifactError, ChecksumMismatchError

from .synthetic import SYNTHETIC_LEVELS


def _clustered(n: int, n_query: int, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d))
    labels = rng.integers(0, 12, n)
    x = knn.normalise_rows(centres[labels] + rng.normal(size=(n, d)))
    q = knn.normalise_rows(centres[rng.integers(0, 12, n_query)] + rng.normal(size=(n_query, d)))
    return x, labels, q


def _exact(ref: np.ndarray, points: np.ndarray, k: int):
    r = torch.from_numpy(np.asarray(ref, dtype=np.float32))
    return knn._exact_search(torch.from_numpy(points), r, (r**2).sum(dim=1), k)


def test_list_index_recall_and_class_restriction(monkeypatch):
    monkeypatch.setattr(knn, "EXACT_SEARCH_MAX_CELLS", 1000)
    monkeypatch.setattr(knn, "LIST_SIZE", 64)
    x, labels, q = _clustered(6000, 400)
    training = np.arange(len(x)) % 10 != 0
    ref = knn.index_reference({"embedding": x, "labels": {"coarse": labels // 4, "fine": labels},
                               "training_cell": training}, ["coarse", "fine"])
    assert ref["embedding"].dtype == np.float16 and "index" in ref
    search = knn.ReferenceSearch(ref, ["coarse", "fine"])
    idx, dist = search.query(q, 15)
    true_idx, true_dist = _exact(ref["embedding"], q, 15)
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(idx, true_idx)])
    assert recall >= 0.95
    assert np.all(dist[:, -1] >= true_dist[:, -1] - 1e-3)  # approximate neighbours are never nearer than the true ones
    # one class's training cells only, and the same neighbours as exact search over them
    members = np.flatnonzero((ref["labels"]["fine"] == 3) & ref["training_cell"])
    c_idx, c_dist = search.class_index("fine", 3).query(q, 10)
    assert np.isin(c_idx, members).all()
    e_idx, e_dist = _exact(ref["embedding"][members], q, 10)
    assert np.mean([len(set(a) & set(members[b])) / 10 for a, b in zip(c_idx, e_idx)]) >= 0.95
    np.testing.assert_allclose(c_dist.mean(axis=1), e_dist.mean(axis=1), rtol=0.05)
    assert search.class_index("fine", 99) is None


def test_one_search_answers_the_vote_and_every_class_as_separate_searches_do(monkeypatch):
    """ReferenceSearch.search shares one pass over the lists between the vote and the novelty score's
    class-restricted searches (and splits the lists between threads): the answers are those of the
    separate searches, whatever the number of threads or the points per pass."""
    monkeypatch.setattr(knn, "EXACT_SEARCH_MAX_CELLS", 1000)
    monkeypatch.setattr(knn, "LIST_SIZE", 64)
    x, labels, q = _clustered(6000, 2500)
    ref = knn.index_reference({"embedding": x, "labels": {"coarse": labels // 4, "fine": labels},
                               "training_cell": np.arange(len(x)) % 10 != 0}, ["coarse", "fine"])
    search = knn.ReferenceSearch(ref, ["coarse", "fine"])
    rng = np.random.default_rng(1)
    codes = {"coarse": rng.integers(-1, 3, len(q)), "fine": rng.integers(-1, 13, len(q))}  # 12: no such class
    voting = np.flatnonzero(rng.random(len(q)) < 0.6)
    runs = []
    for threads, budget in ((1, 1 << 27), (2, 1 << 27), (2, 20_000)):  # 20,000 bytes: passes of 1,024 points
        monkeypatch.setattr(knn, "_CANDIDATE_BUDGET", budget)
        with atlasmtl.runtime.torch_threads(threads):
            runs.append(search.search(q, voting, 15, codes, 10))
    alone, _ = search.query(q[voting], 15)
    for neighbours, distances in runs:
        np.testing.assert_array_equal(neighbours, alone)
        for lv, c in codes.items():
            expected = np.full(len(q), np.nan)
            for code in np.unique(c[c >= 0]):
                rows = np.flatnonzero(c == code)
                index = search.class_index(lv, int(code))
                expected[rows] = np.inf if index is None else index.query(q[rows], 10)[1].mean(axis=1)
            np.testing.assert_array_equal(distances[lv], expected)
    assert np.isinf(runs[0][1]["fine"][codes["fine"] == 12]).all() and np.isnan(runs[0][1]["fine"][codes["fine"] < 0]).all()


def test_probes_grow_with_the_number_of_lists(monkeypatch):
    """Larger references are cut into more lists, and a point's true neighbours spread over more of
    them: the stored n_probe grows as the square root of the lists (16 at least)."""
    assert knn.probes_for(1) == knn.probes_for(202) == knn.N_PROBE == 16
    assert knn.probes_for(1960) == 27 and knn.probes_for(19_600) == 84
    monkeypatch.setattr(knn, "EXACT_SEARCH_MAX_CELLS", 1000)
    monkeypatch.setattr(knn, "LIST_SIZE", 4)
    x, labels, _ = _clustered(6000, 10)
    ref = knn.index_reference({"embedding": x, "labels": {"fine": labels}}, ["fine"])
    n_lists = len(ref["index"]["centroids"])
    assert n_lists > 1000 and ref["index"]["n_probe"] == knn.probes_for(n_lists) > knn.N_PROBE


def test_list_index_answers_k_neighbours_when_probed_lists_are_small(monkeypatch):
    monkeypatch.setattr(knn, "LIST_SIZE", 4)
    x, _, q = _clustered(200, 30)
    index = knn.ListIndex.build(x, list_size=4)
    index.n_probe = 1  # one list of ~4 rows cannot hold 10 neighbours: those points fall back to exact search
    idx, dist = index.query(q, 10)
    assert (idx >= 0).all() and all(len(set(row)) == 10 for row in idx)
    true_idx, _ = _exact(x, q, 10)
    fell_back = index.sizes[np.argmax(q @ index.centroids.numpy().T - 0.5 * (index.centroids.numpy() ** 2).sum(1), axis=1)] < 10
    assert fell_back.sum() > 5
    np.testing.assert_array_equal(np.sort(idx[fell_back], axis=1), np.sort(true_idx[fell_back], axis=1))
    np.testing.assert_allclose(dist, np.linalg.norm(q[:, None, :] - x[idx].astype(np.float32), axis=2), atol=2e-3)


@pytest.fixture
def indexed_model(synthetic_split, monkeypatch):
    """The synthetic model, trained with the exact-search limit lowered so it carries a list index."""
    monkeypatch.setattr(knn, "EXACT_SEARCH_MAX_CELLS", 50)
    monkeypatch.setattr(knn, "LIST_SIZE", 16)
    return atlasmtl.build_model(synthetic_split[0], SYNTHETIC_LEVELS, num_epochs=3, batch_size=32, learning_rate=0.01,
                                hidden_sizes=(32, 16), show_progress=False, show_summary=False)


def _predict(model, query):
    return atlasmtl.predict(model, query, knn_correction="all", show_progress=False, show_summary=False)


def test_stored_index_round_trips_with_the_same_neighbours(indexed_model, synthetic_split, tmp_path):
    _, query = synthetic_split
    index = indexed_model.reference["index"]
    assert len(index["offsets"]) > 3 and "lists" in indexed_model.train_config["knn_space"]["search"]
    indexed_model.save(tmp_path / "model.pth")
    loaded = atlasmtl.TrainedModel.load(tmp_path)
    assert isinstance(loaded.reference["embedding"], np.memmap)  # mapped, not read into memory
    for key in ("centroids", "offsets"):
        np.testing.assert_array_equal(loaded.reference["index"][key], index[key])
    width = indexed_model.reference["embedding"].shape[1]
    points = knn.normalise_rows(np.random.default_rng(0).normal(size=(50, width)))
    for a, b in zip(indexed_model.neighbour_search().query(points, 15), loaded.neighbour_search().query(points, 15)):
        np.testing.assert_array_equal(a, b)
    before, after = _predict(indexed_model, query), _predict(loaded, query)
    for lv in SYNTHETIC_LEVELS:
        for key in ("code", "knn_code", "novelty"):
            np.testing.assert_array_equal(before.levels[lv][key], after.levels[lv][key])


def test_indexed_reference_keeps_each_cells_coordinates_with_its_labels(synthetic_split, monkeypatch, tmp_path):
    """The list index reorders the reference cells; their coordinates move with them, so a query cell is placed
    from the coordinates of the cells it found, and a saved model places it the same way."""
    monkeypatch.setattr(knn, "EXACT_SEARCH_MAX_CELLS", 50)
    monkeypatch.setattr(knn, "LIST_SIZE", 16)
    ref, query = synthetic_split
    model = atlasmtl.build_model(ref, SYNTHETIC_LEVELS, coord_targets={"umap": "X_umap"}, num_epochs=3, batch_size=32,
                                 learning_rate=0.01, hidden_sizes=(32, 16), show_progress=False, show_summary=False)
    assert model.reference.get("index") is not None
    stored = model.reference["coords"]["umap"]
    original = np.asarray(ref.obsm["X_umap"], dtype=np.float32)
    row_of = {tuple(xy): i for i, xy in enumerate(original)}
    assert len(row_of) == len(original)  # distinct coordinates name their cell
    cells = np.array([row_of[tuple(xy)] for xy in stored])
    assert sorted(cells) == list(range(len(original)))
    fine = SYNTHETIC_LEVELS[-1]
    classes = model.classes[fine]
    np.testing.assert_array_equal(np.asarray(classes)[model.reference["labels"][fine]],
                                  ref.obs[fine].astype(str).to_numpy()[cells])
    one = atlasmtl.predict(model, query, knn_k=1, show_progress=False, show_summary=False)
    assert np.isin(one.coords["umap"].view([("x", np.float32), ("y", np.float32)]),
                   original.view([("x", np.float32), ("y", np.float32)])).all()
    model.save(tmp_path / "model.pth")
    loaded = atlasmtl.TrainedModel.load(tmp_path)
    np.testing.assert_array_equal(loaded.reference["coords"]["umap"], stored)
    np.testing.assert_array_equal(atlasmtl.predict(loaded, query, show_progress=False, show_summary=False).coords["umap"],
                                  atlasmtl.predict(model, query, show_progress=False, show_summary=False).coords["umap"])


def _edit_reference(directory, edit):
    path = directory / "model_reference.pkl"
    plain = pickle.loads(path.read_bytes())  # trusted: the test wrote it
    edit(plain["index"])
    path.write_bytes(pickle.dumps(plain, protocol=4))
    manifest = json.loads((directory / "model_manifest.json").read_text())
    manifest["files"]["reference"].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                          bytes=path.stat().st_size)
    (directory / "model_manifest.json").write_text(json.dumps(manifest))


def _array(record):
    return np.frombuffer(record["data"], dtype=np.dtype(record["dtype"])).reshape(record["shape"]).copy()


def _set(record, arr):
    record["data"] = np.ascontiguousarray(arr).tobytes()


def _swap_offsets(index):
    off = _array(index["offsets"])
    off[1], off[2] = off[2], off[1]
    _set(index["offsets"], off)


def _shift_offsets(index):  # lists no longer follow the label groups
    off = _array(index["offsets"])
    off[1:-1] += 1
    _set(index["offsets"], off)


def _nan_centroid(index):
    c = _array(index["centroids"])
    c[0, 0] = np.nan
    _set(index["centroids"], c)


def _zero_probes(index):
    index["n_probe"] = 0


@pytest.mark.parametrize("edit", [_swap_offsets, _shift_offsets, _nan_centroid, _zero_probes],
                         ids=["offsets-out-of-order", "lists-mix-labels", "nan-centroid", "no-probes"])
def test_tampered_index_is_refused(indexed_model, tmp_path, edit):
    indexed_model.save(tmp_path / "model.pth")
    _edit_reference(tmp_path, edit)
    with pytest.raises(ArtifactError, match=r"reference.*index"):
        atlasmtl.TrainedModel.load(tmp_path)


def test_tampered_index_bytes_fail_the_checksum(indexed_model, tmp_path):
    indexed_model.save(tmp_path / "model.pth")
    path = tmp_path / "model_embedding.npy"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="model_embedding.npy"):
        atlasmtl.TrainedModel.load(tmp_path)


def test_model_without_an_index_builds_it_on_first_use(indexed_model, synthetic_split, tmp_path, monkeypatch):
    """A large-reference model saved before indexes existed: loads, indexes itself when first searched."""
    _, query = synthetic_split
    indexed_model.save(tmp_path / "model.pth")
    _edit_reference(tmp_path, lambda index: index.clear())
    path = tmp_path / "model_reference.pkl"
    plain = pickle.loads(path.read_bytes())
    del plain["index"]
    path.write_bytes(pickle.dumps(plain, protocol=4))
    manifest = json.loads((tmp_path / "model_manifest.json").read_text())
    manifest["files"]["reference"].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                          bytes=path.stat().st_size)
    (tmp_path / "model_manifest.json").write_text(json.dumps(manifest))
    loaded = atlasmtl.TrainedModel.load(tmp_path)
    assert "index" not in loaded.reference
    result = _predict(loaded, query)
    assert "index" in loaded.reference and loaded.neighbour_search().lists is not None
    expected = _predict(indexed_model, query)
    for lv in SYNTHETIC_LEVELS:
        assert np.mean(result.levels[lv]["code"] == expected.levels[lv]["code"]) > 0.95
    loaded.save(tmp_path / "again.pth")  # and saving stores the index it built
    assert "index" in atlasmtl.TrainedModel.load(tmp_path / "again_manifest.json").reference


@pytest.mark.parametrize("on_disk", [False, True])
def test_embedding_file_reads_back_what_was_written(on_disk):
    rows = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
    store = knn.EmbeddingFile(len(rows), 8, on_disk=on_disk)
    for start in range(0, len(rows), 300):
        store.write(rows[start : start + 300])
    expected = rows.astype(np.float16)
    pick = np.array([999, 3, 500, 3])
    np.testing.assert_array_equal(store[pick], expected[pick])
    np.testing.assert_array_equal(store[10:20], expected[10:20])
    whole = store.finish()
    assert whole.dtype == np.float16 and isinstance(whole, np.memmap) == on_disk
    np.testing.assert_array_equal(whole, expected)
    with pytest.raises(ValueError):
        store.write(rows[:1])  # full


def test_list_build_on_disk_equals_in_memory(monkeypatch):
    """Indexing an embedding kept on disk (read in chunks of rows) gives the in-memory index, row for row;
    the fit sample cap keeps every row in exactly one list of its own group."""
    monkeypatch.setattr(knn, "EXACT_SEARCH_MAX_CELLS", 1000)
    monkeypatch.setattr(knn, "LIST_SIZE", 64)
    monkeypatch.setattr(knn, "_ROW_CHUNK", 700)  # several chunks per group
    x, labels, q = _clustered(6000, 200)
    record = {"labels": {"coarse": labels // 4, "fine": labels}, "training_cell": np.arange(len(x)) % 10 != 0}
    in_memory = knn.index_reference(dict(record, embedding=x), ["coarse", "fine"])
    store = knn.EmbeddingFile(len(x), x.shape[1], on_disk=True)
    store.write(x)
    on_disk = knn.index_reference(dict(record, embedding=store), ["coarse", "fine"])
    assert isinstance(on_disk["embedding"], knn.EmbeddingFile)
    for key in ("centroids", "offsets"):
        np.testing.assert_array_equal(on_disk["index"][key], in_memory["index"][key])
    np.testing.assert_array_equal(on_disk["embedding"].finish(), in_memory["embedding"])
    for a, b in zip(knn.ReferenceSearch(on_disk, ["coarse", "fine"]).query(q, 15),
                    knn.ReferenceSearch(in_memory, ["coarse", "fine"]).query(q, 15)):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(knn, "KMEANS_MAX_FIT_ROWS", 300)
    capped = knn.index_reference(dict(record, embedding=x), ["coarse", "fine"])
    assert capped["index"]["offsets"][-1] == len(x) and (np.diff(capped["index"]["offsets"]) > 0).all()
    np.testing.assert_array_equal(np.sort(capped["embedding"], axis=0), np.sort(x.astype(np.float16), axis=0))
    first = capped["index"]["offsets"][:-1]
    for lv in ("coarse", "fine"):  # lists stay within one label
        codes = capped["labels"][lv]
        assert all(len(np.unique(codes[a:b])) == 1 for a, b in zip(first, capped["index"]["offsets"][1:]))


def test_group_numbers_match_numpy_unique_in_four_bytes_per_cell():
    """The index build numbers label groups and orders rows as numpy.unique / a stable argsort would,
    through a lookup table or the numpy.unique fallback, with 4-byte integers (issue 13: memory per cell)."""
    rng = np.random.default_rng(3)
    n = 5000
    small = [rng.integers(-1, 9, n).astype(np.int32), rng.integers(0, 3, n), (rng.random(n) < 0.8).astype(np.int8)]
    wide = [rng.integers(-1, 100_000, n), rng.integers(-1, 100_000, n)]  # keys far above n: numpy.unique path
    for columns in (small, wide):
        got = knn._group_numbers(columns)
        expected = np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True)[1].ravel()
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected)
    scattered = rng.integers(-7, 10**9, 300)
    np.testing.assert_array_equal(knn._dense_numbers(scattered), np.unique(scattered, return_inverse=True)[1])
    x, labels, _ = _clustered(3000, 1)
    groups = knn._group_numbers([labels // 4, labels])
    order, _, offsets = knn.build_lists(x, groups, list_size=100)
    assert order.dtype == np.int32 and offsets[-1] == len(x)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(x)))
    np.testing.assert_array_equal(np.sort(groups[order], kind="stable"), groups[order])  # grouped, groups in order


def test_reference_embedding_kept_on_disk_gives_the_same_model(synthetic_split, monkeypatch):
    """Above the exact-search limit training writes the embedding to a temporary file batch by batch and
    indexes it in chunks; the model is the one an in-memory embedding gives."""
    ref, query = synthetic_split
    monkeypatch.setattr(knn, "EXACT_SEARCH_MAX_CELLS", 50)
    monkeypatch.setattr(knn, "LIST_SIZE", 16)
    kw = dict(num_epochs=2, batch_size=32, learning_rate=0.01, hidden_sizes=(32, 16), show_progress=False,
              show_summary=False)
    on_disk = atlasmtl.build_model(ref, SYNTHETIC_LEVELS, **kw)
    monkeypatch.setattr(knn.EmbeddingFile, "for_reference",
                        classmethod(lambda cls, n, width: cls(n, width, on_disk=False)))
    in_memory = atlasmtl.build_model(ref, SYNTHETIC_LEVELS, **kw)
    assert isinstance(on_disk.reference["embedding"], np.memmap)
    assert not isinstance(in_memory.reference["embedding"], np.memmap)
    np.testing.assert_array_equal(on_disk.reference["embedding"], in_memory.reference["embedding"])
    for key in ("centroids", "offsets"):
        np.testing.assert_array_equal(on_disk.reference["index"][key], in_memory.reference["index"][key])
    def same(a, b):  # nested dicts of plain values and arrays
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return np.array_equal(a, b, equal_nan=True) if isinstance(a, np.ndarray) else a == b

    assert same(on_disk.metadata["novelty"], in_memory.metadata["novelty"])
    assert on_disk.metadata["calibration"] == in_memory.metadata["calibration"]
    assert (on_disk.train_config["knn_space"]["neighbour_label_agreement"]
            == in_memory.train_config["knn_space"]["neighbour_label_agreement"])
    a, b = _predict(on_disk, query), _predict(in_memory, query)
    for lv in SYNTHETIC_LEVELS:
        for key in ("code", "knn_code", "novelty"):
            np.testing.assert_array_equal(a.levels[lv][key], b.levels[lv][key])


def test_nearest_rows_is_the_exact_neighbour_set():
    """The lean search returns the same neighbour sets as a full sort of the distances."""
    from atlasmtl.knn import nearest_rows

    rng = np.random.default_rng(1)
    ref, points = rng.normal(size=(500, 8)), rng.normal(size=(70, 8))
    got = nearest_rows(points, ref, 12)
    want = np.argsort(((points[:, None, :] - ref[None]) ** 2).sum(-1), axis=1)[:, :12]
    assert [set(r) for r in got] == [set(r) for r in want]
    assert nearest_rows(points, ref[:5], 12).shape == (70, 5)


def test_temporary_embedding_files_are_closed_quietly():
    """Training past 20,000 cells printed two 'unclosed file' warnings (the on-disk embedding's temporary files)."""
    import gc
    import warnings

    from atlasmtl.knn import EmbeddingFile, index_reference

    rng = np.random.default_rng(0)
    n = 25_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embedding = EmbeddingFile(n, 8, on_disk=True)
        for start in range(0, n, 5000):
            embedding.write(rng.normal(size=(5000, 8)))
        indexed = index_reference({"embedding": embedding, "labels": {"a": rng.integers(0, 3, n)},
                                   "training_cell": np.ones(n, dtype=bool)}, ["a"])
        assert indexed["embedding"].on_disk and indexed["embedding"][:3].shape == (3, 8)
        del embedding, indexed
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
