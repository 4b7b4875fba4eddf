"""Training at scale: the sparse first layer, block-shuffled streaming from disk, the prefetch worker."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import atlasmtl
from atlasmtl import batch_worker, hierarchy, network, reference, training_loop
from atlasmtl.genes import identity_aligner
from atlasmtl.inputs import MatrixSource, h5ad_reference_source
from atlasmtl.network import MultiTaskNetwork, SparseInput

from .conftest import SYMPHONY_LEVELS


def _counts(n_cells: int, n_genes: int, seed: int) -> sp.csr_matrix:
    x = sp.random(n_cells, n_genes, density=0.06, format="csr", dtype=np.float32, random_state=seed)
    x.data = np.round(x.data * 30) + 1
    return x


@pytest.mark.parametrize("kernels", ["torch", "scipy"])
@pytest.mark.parametrize("transform", ["zscore", "float", "binary"])
def test_sparse_first_layer_equals_dense(transform, kernels, monkeypatch):
    """W f(x) + b computed as W (f(x) - f(0)) + (W f(0) + b): same output and same gradients as the dense input,
    with PyTorch's (MKL) CPU products and with scipy's (PyTorch builds without MKL); also with f(0) carried as
    an extra last row of the batch and of its transpose (``zero_row``, how training batches come)."""
    if kernels == "torch" and not torch.backends.mkl.is_available():
        pytest.skip("this PyTorch has no MKL")
    monkeypatch.setattr(network, "CPU_CSR_KERNELS", kernels)
    rng = np.random.default_rng(0)
    x = _counts(64, 300, seed=1)
    aligner = identity_aligner(300, transform, "counts")
    if transform == "zscore":  # include genes whose f(0) is clipped at -10
        aligner.gene_mean = (rng.random(300) * 3).astype(np.float32)
        aligner.gene_std = (rng.random(300) * 0.5 + 0.05).astype(np.float32)
        assert (aligner.zero_input() == -10).any()
    torch.manual_seed(0)
    net = MultiTaskNetwork(300, [3, 5], {"c": 2}, [32, 16], dropout_rate=0.0)
    zero = aligner.zero_input()
    sparse = SparseInput(aligner.sparse_input(x), None if zero is None else torch.from_numpy(zero))
    assert sparse.rows.nnz <= x.nnz  # never denser than the counts
    dense = torch.from_numpy(aligner.transform(x))
    inputs = [dense, sparse]
    if zero is not None:
        with_row = sp.vstack([sparse.rows, sp.csr_matrix(zero[None, :])], format="csr")
        inputs.append(SparseInput(with_row, sparse.zero_input, with_row.T.tocsr(), zero_row=True))
    grads, outs = [], []
    for inp in inputs:
        net.zero_grad()
        out = net(inp)
        (out.logits[1].pow(2).sum() + out.coords["c"].sum()).backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
        outs.append(out)
    for out, grad in zip(outs[1:], grads[1:]):
        assert out.embedding.shape[0] == 64
        torch.testing.assert_close(out.embedding, outs[0].embedding, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits[1], outs[0].logits[1], rtol=1e-5, atol=1e-5)
        assert len(grads[0]) == len(grad) > 2
        for g_dense, g_sparse in zip(grads[0], grad):
            torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-4)


def test_dropout_masks_drawn_beside_the_step_are_dropout_and_used_as_given():
    """The masks the minibatch worker draws keep each unit with probability 1 - p, scaled by 1 / (1 - p); in
    training mode the encoder applies exactly the masks it is given (all ones: the network in eval mode)."""
    rng = np.random.default_rng(0)
    keep = network.dropout_keep(rng, 2000, 64, 0.3)
    assert keep.dtype == np.float32 and keep.shape == (2000, 64)
    assert set(np.unique(keep).tolist()) == {0.0, float(np.float32(1 / 0.7))}
    assert abs((keep > 0).mean() - 0.7) < 0.01
    torch.manual_seed(0)
    net = MultiTaskNetwork(40, [3], {}, (16, 8), 0.3).train()
    assert net.encoder.dropout_widths() == [(16, 0.3), (8, 0.3)]
    x = torch.randn(5, 40)
    masks = [torch.from_numpy(network.dropout_keep(rng, 5, w, p)) for w, p in net.encoder.dropout_widths()]
    layers = net.encoder.layers
    with torch.no_grad():
        expected = torch.relu(layers[3](torch.relu(layers[0](x)) * masks[0])) * masks[1]
        torch.testing.assert_close(net(x, dropout_keep=masks).embedding, expected)
        ones = [torch.ones_like(m) for m in masks]
        torch.testing.assert_close(net(x, dropout_keep=ones).embedding, net.eval()(x).embedding)


def test_optimiser_steps_the_first_layer_through_its_transposed_alias_exactly():
    """Stepping W.T (contiguous, sharing W's memory) gives the same weights as stepping W in its usual layout."""
    rng = np.random.default_rng(0)
    x = _counts(64, 300, seed=2)
    aligner = identity_aligner(300, "float", "counts")
    batch = SparseInput(aligner.sparse_input(x))
    target = torch.from_numpy(rng.integers(0, 5, 64))
    nets = []
    for alias in (False, True):
        torch.manual_seed(0)
        net = MultiTaskNetwork(300, [5], {}, [32, 16], dropout_rate=0.0)
        with training_loop._first_layer_stored_transposed(net) as weight_t:
            first = net.encoder.layers[0].weight
            params = [weight_t if (alias and p is first) else p for p in net.parameters()]
            optimiser = training_loop._adam(params, 1e-2)
            for _ in range(3):
                optimiser.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(net(batch).logits[0], target).backward()
                if alias:
                    training_loop._hand_over_first_gradient(net, weight_t)
                    assert first.grad is None and weight_t.grad.is_contiguous()
                optimiser.step()
        assert net.encoder.layers[0].weight.is_contiguous()  # the usual layout back after training
        nets.append(net)
    for plain, aliased in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(aliased, plain, rtol=0, atol=1e-6)


def test_dropout_keeps_each_unit_with_probability_one_minus_p():
    from atlasmtl.network import Dropout

    torch.manual_seed(0)
    layer = Dropout(0.3)
    x = torch.ones(400, 500)
    y = layer(x)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.7) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert abs(float(y.mean()) - 1.0) < 0.01  # unbiased, as torch.nn.Dropout
    assert not torch.equal(layer(x), y)  # a fresh mask every call
    layer.eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def _backed_source(x: sp.csr_matrix) -> MatrixSource:
    import pandas as pd

    return MatrixSource(matrix=x, var=pd.DataFrame(index=[f"g{i}" for i in range(x.shape[1])]), where="X", backed=True)


def test_block_shuffled_epoch_covers_each_cell_once(monkeypatch):
    monkeypatch.setattr(training_loop, "STREAM_BLOCK_CELLS", 16)
    monkeypatch.setattr(training_loop, "STREAM_BUFFER_BLOCKS", 3)
    x = sp.hstack([sp.csr_matrix(np.arange(500, dtype=np.float32)[:, None] + 1.0), _counts(500, 40, seed=2)],
                  format="csr")  # row id + 1 in column 0, to check that blocks and row numbers agree
    cells = np.setdiff1d(np.arange(500), np.arange(0, 500, 7))  # gaps, as after a calibration split
    source = _backed_source(x)

    def epoch(seed):
        return list(training_loop.shuffled_minibatches(source, cells, 32, np.random.default_rng(seed)))

    batches = epoch(0)
    seen = np.concatenate([rows for rows, _ in batches])
    assert np.array_equal(np.sort(seen), cells)
    assert all(len(rows) == 32 for rows, _ in batches[:-1])
    for rows, block in batches:
        assert np.array_equal(block[:, 0].toarray().ravel(), rows + 1.0)
    again = epoch(0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))  # deterministic given the seed
    assert not np.array_equal(seen, np.concatenate([rows for rows, _ in epoch(1)]))
    # equal steps for distributed ranks
    assert len(list(training_loop.shuffled_minibatches(source, cells, 32, np.random.default_rng(0), n_batches=5))) == 5


def test_prefetch_passes_items_and_errors():
    assert list(batch_worker.prefetch(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        list(batch_worker.prefetch(failing()))
    stream = batch_worker.prefetch(iter(range(1000)), depth=2)
    assert next(stream) == 0
    stream.close()  # stops the worker


def _batches(n_batches, n_genes=50, fail_at=None):
    """A producer of (rows, CSR batch, transpose) items with an end mark after each 3 batches."""
    def produce():
        for i in range(n_batches):
            if i == fail_at:
                raise ValueError(f"bad batch {i}")
            x = _counts(8 + i, n_genes, seed=i)
            yield np.arange(i, i + x.shape[0]), x, x.T.tocsr(), {"w": np.full(x.shape[0], i, dtype=np.float32)}
            if i % 3 == 2:
                yield None
    return produce


@pytest.mark.skipif(not batch_worker.fork_available(), reason="needs fork")
def test_forked_prefetch_hands_over_every_batch_exactly():
    """Batches prepared in the forked worker arrive intact through the shared slots (and pickled when a batch
    is larger than a slot), marks in place, and the worker is gone afterwards."""
    expected = list(_batches(7)())
    for max_nnz in (10_000, 40):  # slots large enough; too small, so every batch goes through the pipe
        got = []
        slots = batch_worker.CsrSlots(2, 16, 50, max_nnz, {"w": (np.float32, 0)})
        for item in batch_worker.forked_prefetch(_batches(7), slots):
            got.append(None if item is None else (item[0].copy(), item[1].copy(), item[2].copy(), item[3]["w"].copy()))
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert (a is None) == (b is None)
            if a is not None:
                assert np.array_equal(a[0], b[0])
                assert (a[1] != b[1]).nnz == 0 and a[1].shape == b[1].shape
                assert (a[2] != b[2]).nnz == 0 and a[2].shape == b[2].shape
                assert np.array_equal(a[3], b[3]["w"])
    assert not [c for c in __import__("multiprocessing").active_children() if c.name == "atlasmtl-batch-worker"]


@pytest.mark.skipif(not batch_worker.fork_available(), reason="needs fork")
def test_forked_prefetch_raises_worker_errors_and_stops_on_close():
    with pytest.raises(ValueError, match="bad batch 2"):
        list(batch_worker.forked_prefetch(_batches(5, fail_at=2), batch_worker.CsrSlots(2, 16, 50, 10_000)))
    stream = batch_worker.forked_prefetch(_batches(1000), batch_worker.CsrSlots(2, 16, 50, 10_000))
    next(stream)
    stream.close()  # stops the worker
    assert not [c for c in __import__("multiprocessing").active_children() if c.name == "atlasmtl-batch-worker"]


@pytest.mark.skipif(not batch_worker.fork_available(), reason="needs fork")
def test_forked_prefetch_reports_a_worker_that_dies():
    """A worker killed mid-epoch (e.g. by the out-of-memory killer) is an atlasmtl error, not a hang."""
    import os

    def produce():
        yield from _batches(2)()
        os._exit(3)

    from atlasmtl.exceptions import TrainingError
    with pytest.raises(TrainingError, match="stopped unexpectedly .exit code 3"):
        list(batch_worker.forked_prefetch(produce, batch_worker.CsrSlots(2, 16, 50, 10_000)))


@pytest.mark.skipif(not batch_worker.fork_available(), reason="needs fork")
def test_forked_prefetch_falls_back_to_the_thread_when_the_fork_fails(monkeypatch):
    import multiprocessing.context

    def no_fork(self):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", no_fork)
    expected = list(_batches(4)())
    with pytest.warns(RuntimeWarning, match="could not start its minibatch worker process"):
        got = list(batch_worker.forked_prefetch(_batches(4), batch_worker.CsrSlots(2, 16, 50, 10_000)))
    assert [g is None for g in got] == [e is None for e in expected]
    assert all(np.array_equal(g[0], e[0]) for g, e in zip(got, expected) if g is not None)


def test_worker_process_and_thread_train_the_same_network(symphony_split, monkeypatch):
    """The forked worker draws the same minibatches and augmentations as the prefetch thread: same weights,
    whether the worker also makes the network input or hands the shifted counts over for the training
    process to do it (``training_loop.SPLIT_SHIFT_ABOVE_VALUES``: 0 always splits, infinity never)."""
    ref, _ = symphony_split
    kw = dict(num_epochs=3, num_threads=2, ensemble_size=1, show_progress=False, show_summary=False,
              random_state=0)
    models = []
    for worker, above in (("process", 0.0), ("process", float("inf")), ("thread", 0.0)):
        monkeypatch.setenv(batch_worker.WORKER_ENV, worker)
        monkeypatch.setattr(training_loop, "SPLIT_SHIFT_ABOVE_VALUES", above)
        models.append(atlasmtl.build_model(ref, SYMPHONY_LEVELS, **kw))
    first, *others = (m.network.state_dict() for m in models)
    for other in others:
        assert all(torch.equal(first[k], other[k]) for k in first)



def test_mean_stored_values_of_sparse_and_dense_rows():
    """What decides whether the worker hands over shifted counts: stored values per row, CSR or dense."""
    rng = np.random.default_rng(0)
    dense = rng.random((300, 40)) * (rng.random((300, 40)) < 0.25)
    cells = np.arange(0, 300, 2)
    expected = np.count_nonzero(dense[cells]) / len(cells)
    assert batch_worker.mean_stored_values(sp.csr_matrix(dense), cells) == pytest.approx(expected)
    assert batch_worker.mean_stored_values(dense, cells) == pytest.approx(expected)
    assert batch_worker.mean_stored_values(sp.csc_matrix(dense), cells) == pytest.approx(expected)
    assert batch_worker.mean_stored_values(dense, cells[:0]) == 0.0

def test_worker_process_only_where_it_is_safe(monkeypatch):
    monkeypatch.delenv(batch_worker.WORKER_ENV, raising=False)
    assert batch_worker.use_worker_process(False, False) == batch_worker.fork_available()
    assert not batch_worker.use_worker_process(True, False)  # an open HDF5 file is not shared with a child
    assert not batch_worker.use_worker_process(False, True)  # torchrun ranks keep the thread
    monkeypatch.setenv(batch_worker.WORKER_ENV, "thread")
    assert not batch_worker.use_worker_process(False, False)
    monkeypatch.delenv(batch_worker.WORKER_ENV)
    monkeypatch.setattr(batch_worker.mp, "current_process", lambda: type("P", (), {"daemon": True})())
    assert not batch_worker.use_worker_process(False, False)  # a Pool worker may not start children


def _accuracy(model, query):
    result = atlasmtl.predict(model, query, show_progress=False)
    truth = query.obs[SYMPHONY_LEVELS[-1]].astype(str).to_numpy()
    return float(np.mean(np.asarray(result.labels(SYMPHONY_LEVELS[-1])).astype(str) == truth))


def test_training_from_disk_matches_in_memory(symphony_split, tmp_path, monkeypatch):
    """A reference file trained from disk (block-shuffled) maps a held-out chemistry as well as in memory."""
    monkeypatch.setattr(training_loop, "STREAM_BLOCK_CELLS", 64)
    monkeypatch.setattr(training_loop, "STREAM_BUFFER_BLOCKS", 4)
    ref, query = symphony_split
    path = tmp_path / "ref.h5ad"
    ref.write_h5ad(path)
    kw = dict(num_epochs=15, num_threads=1, show_progress=False, show_summary=False, random_state=0)
    in_memory = atlasmtl.build_model(ref, SYMPHONY_LEVELS, **kw)
    from_disk = atlasmtl.build_model(str(path), SYMPHONY_LEVELS, **kw)
    again = atlasmtl.build_model(str(path), SYMPHONY_LEVELS, **kw)
    assert from_disk.metadata["genes"] == in_memory.metadata["genes"]
    for a, b in zip(from_disk.network.state_dict().values(), again.network.state_dict().values()):
        assert torch.equal(a, b)  # deterministic given random_state
    acc_memory, acc_disk = _accuracy(in_memory, query), _accuracy(from_disk, query)
    assert acc_memory > 0.7 and acc_disk > 0.7
    assert abs(acc_memory - acc_disk) <= 0.05, (acc_memory, acc_disk)


def test_reference_file_opens_lean(symphony_split, tmp_path):
    ref, _ = symphony_split
    path = tmp_path / "ref.h5ad"
    ref.layers["extra"] = ref.X.copy()
    ref.write_h5ad(path)
    del ref.layers["extra"]
    with h5ad_reference_source(path, obs_keys=["cell_type", "not_a_column"]) as (lite, source):
        # only the label columns asked for are read; the others are only named (for error messages)
        assert lite.n_obs == ref.n_obs and list(lite.obs.columns) == ["cell_type"]
        assert lite.obs_columns == list(ref.obs.columns)
        assert (lite.obs["cell_type"].to_numpy() == ref.obs["cell_type"].to_numpy()).all()
        assert source.backed and source.n_vars == ref.n_vars
        rows = np.array([3, 4, 7, 10])
        assert np.allclose(source.rows(rows).toarray(), ref.X[rows].toarray())


def test_reference_file_cell_names_checked_in_chunks(symphony_split, tmp_path, monkeypatch):
    """Training from a file checks its cell names are unique without loading them all (hashed in chunks);
    colliding hashes are compared exactly."""
    from atlasmtl import inputs
    from atlasmtl.exceptions import InputError

    monkeypatch.setattr(inputs, "_NAME_CHUNK", 100)
    names = np.array([f"c{i}" for i in range(1000)], dtype=object)
    assert inputs._names_unique(names)
    names[700] = "c5"
    assert not inputs._names_unique(names)
    monkeypatch.setattr(inputs.pd.util, "hash_array", lambda v: np.zeros(len(v), dtype=np.uint64))  # every hash collides
    assert not inputs._names_unique(names)
    names[700] = "c700"
    assert inputs._names_unique(names)
    monkeypatch.undo()
    ref, _ = symphony_split
    ref = ref.copy()
    ref.obs_names = ["same"] * 2 + list(ref.obs_names[2:])
    path = tmp_path / "dup.h5ad"
    ref.write_h5ad(path)
    with pytest.raises(InputError, match="obs_names are not unique"):
        atlasmtl.build_model(path, SYMPHONY_LEVELS, num_epochs=1, show_progress=False, show_summary=False)


def test_reference_labels_and_rows_take_four_bytes_per_cell_and_the_hierarchy_reads_them_in_chunks(monkeypatch):
    """Per-cell arrays kept while training (label codes, row numbers) are int32, and the label
    hierarchy found chunk by chunk is the one found over all cells at once (same pairs, same order)."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    fine = rng.integers(0, 12, 3000)
    parent = np.array(list("aabbbccddeef"))[fine]
    labels = pd.DataFrame({"coarse": parent, "fine": [f"f{c}" for c in fine]}, index=[f"c{i}" for i in range(3000)])
    labels.loc[labels.index[::17], "fine"] = np.nan
    adata = ad.AnnData(X=_counts(3000, 40, seed=2), obs=labels)
    with pytest.warns(UserWarning, match="177 reference cell\\(s\\) have no label in 'fine'"):
        ref = reference.prepare_reference(adata, ["coarse", "fine"], None, layer=None, use_raw=False,
                                         input_transform="float")
    assert ref.codes.dtype == np.int32 and ref.cells.dtype == np.int32
    whole = hierarchy.infer_hierarchy(ref.label_columns, ref.classes, ref.codes)
    monkeypatch.setattr(hierarchy, "_HIERARCHY_CHUNK", 97)
    chunked = hierarchy.infer_hierarchy(ref.label_columns, ref.classes, ref.codes)
    assert list(chunked["fine"].items()) == list(whole["fine"].items())
    first_seen = list(dict.fromkeys(labels["fine"].dropna()))
    assert list(whole["fine"]) == first_seen and whole["fine"]["f11"] == "f"


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_training_optimiser_steps_as_torch_adamw(weight_decay):
    """atlasmtl's AdamW (PyTorch's functional fused step) updates exactly as ``torch.optim.AdamW``, also when
    the learning rate changes between steps and a parameter has no gradient in a step."""
    torch.manual_seed(0)
    start = [torch.randn(30, 8), torch.randn(8), torch.randn(3, 8)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    grads[2][2] = None
    results = []
    for ours in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = training_loop._adam(params, 1e-2, weight_decay) if ours else \
            torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
        for i, step_grads in enumerate(grads):
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, step_grads):
                p.grad = None if g is None else g.clone()
            if ours:
                opt.lr = 1e-2 / (i + 1)
            else:
                opt.param_groups[0]["lr"] = 1e-2 / (i + 1)
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
