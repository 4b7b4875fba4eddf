"""The CPU training step computed by hand equals autograd's; the soft targets are PyTorch's cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import atlasmtl
from atlasmtl import network, training_loop
from atlasmtl.network import MultiTaskNetwork
from atlasmtl.reference import prepare_reference
from atlasmtl.training_loop import Objective, soft_targets

from .conftest import SYMPHONY_LEVELS


@pytest.fixture(params=["sparse", "dense"])
def first_layer_kernel(request, monkeypatch):
    """Both CPU kernels of the first layer: CSR products with the batch's transpose, or the batch densified
    (``network.DENSE_ABOVE_STEP``; the fixture's batches hold 12-15% non-zero values)."""
    for name in ("DENSE_ABOVE_FORWARD", "DENSE_ABOVE_STEP"):
        monkeypatch.setattr(network, name, 1.0 if request.param == "sparse" else 0.0)
    return request.param


def test_soft_targets_give_pytorchs_weighted_smoothed_cross_entropy_and_its_mixture():
    """-Σ target · log softmax is torch's cross-entropy (class weights, label smoothing, ignore_index -1,
    summed); with mixup, the weighted mixture of the own and the partner's label's cross-entropies."""
    rng = np.random.default_rng(0)
    n, k = 40, 6
    codes = rng.integers(-1, k, n)
    partner = rng.permutation(n)
    own = rng.uniform(0.5, 1.0, n).astype(np.float32)
    weight = rng.uniform(0.2, 3.0, k).astype(np.float32)
    logits = torch.randn(n, k)
    log_p = torch.log_softmax(logits, 1)
    for w in (None, weight):
        options = dict(weight=None if w is None else torch.from_numpy(w), ignore_index=-1, reduction="none",
                       label_smoothing=0.1)
        per_label = [torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), **options)
                     for y in (codes, codes[partner])]
        plain = torch.from_numpy(soft_targets(codes, k, w, 0.1))
        torch.testing.assert_close(-(plain * log_p).sum(), per_label[0].sum())
        mixed = torch.from_numpy(soft_targets(codes, k, w, 0.1, partner, own))
        expected = (torch.from_numpy(own) * per_label[0] + (1 - torch.from_numpy(own)) * per_label[1]).sum()
        torch.testing.assert_close(-(mixed * log_p).sum(), expected)
    assert not soft_targets(np.full(3, -1), k, weight, 0.1).any()  # unlabelled cells: no target


@pytest.mark.parametrize("hidden, dropout, mixup", [((32, 16), 0.3, 0.4), ((24,), 0.0, 0.0), ((32, 16, 8), 0.2, 0.0)])
def test_step_by_hand_equals_autograd(symphony_split, hidden, dropout, mixup, first_layer_kernel):
    """Loss and every gradient (the first layer's through its transposed alias), on real training batches
    (shifted, f(0) row, mixup pairs and dropout masks drawn by the worker), some cells unlabelled at a level;
    with either first-layer kernel (a densified batch comes without its transpose)."""
    ref_adata, _ = symphony_split
    ref = prepare_reference(ref_adata, list(SYMPHONY_LEVELS), None, layer=None, use_raw=False, input_transform="zscore")
    ref.codes[ref.cells[:200:7], 1] = -1  # unlabelled at the fine level
    objective = Objective(ref, ref.cells, 0.5, 0.1, torch.device("cpu"), atlasmtl.augment.ShiftAugmentation(),
                           np.random.default_rng(0), mixup_alpha=mixup)
    torch.manual_seed(0)
    net = MultiTaskNetwork(ref.source.n_vars, [len(ref.classes[c]) for c in ref.label_columns], {}, hidden, dropout)
    objective.dropout_widths = net.encoder.dropout_widths() if dropout else []
    rows = ref.cells[:200]
    batch = objective.minibatch(rows, *objective.transform(ref.source.rows(rows), train=True), train=True)
    assert batch.x.zero_row and (batch.mix is not None) == (mixup > 0)
    assert (batch.x.rows_t is None) == (first_layer_kernel == "dense")
    assert net.step_by_hand_fits(batch.x, batch.dropout_keep)
    net.train()
    with training_loop._first_layer_stored_transposed(net) as weight_t:
        loss = objective.loss(net, batch)
        loss.backward()
        training_loop._hand_over_first_gradient(net, weight_t)
        expected = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
        expected["first_t"] = weight_t.grad.clone()
        for p in [*net.parameters(), weight_t]:
            p.grad = None
        by_hand = objective.step_by_hand(net, batch, weight_t)
        got = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
        got["first_t"] = weight_t.grad
    assert float(by_hand) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert set(got) == set(expected) and len(got) == 2 * (len(hidden) - 1) + 2 * 2 + 2  # first weight: on the alias
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_step_by_hand_declines_what_it_does_not_compute(symphony_split, first_layer_kernel):
    """Coordinate heads, dense input, or dropout without given masks go through autograd; so does a CSR
    batch without its transpose unless the first layer multiplies it densely."""
    ref_adata, _ = symphony_split
    ref = prepare_reference(ref_adata, list(SYMPHONY_LEVELS), None, layer=None, use_raw=False, input_transform="zscore")
    objective = Objective(ref, ref.cells, 0.5, 0.1, torch.device("cpu"))
    rows = ref.cells[:50]
    batch = objective.minibatch(rows, *objective.transform(ref.source.rows(rows), train=True), train=True)
    plain = MultiTaskNetwork(ref.source.n_vars, [3, 5], {}, (16,), 0.0)
    assert plain.step_by_hand_fits(batch.x, None)
    assert not MultiTaskNetwork(ref.source.n_vars, [3, 5], {"umap": 2}, (16,), 0.0).step_by_hand_fits(batch.x, None)
    assert not MultiTaskNetwork(ref.source.n_vars, [3, 5], {}, (16,), 0.3).step_by_hand_fits(batch.x, None)
    assert not plain.step_by_hand_fits(torch.zeros(50, ref.source.n_vars), None)
    assert plain.step_by_hand_fits(batch.x._replace(rows_t=None), None) == (first_layer_kernel == "dense")


def test_training_by_hand_and_through_autograd_agree(symphony_split, monkeypatch, first_layer_kernel):
    """Two epochs at the defaults (one network): the two ways of computing the step train the same network,
    to rounding, with either first-layer kernel."""
    ref_adata, _ = symphony_split
    nets, calls = [], []
    real = Objective.step_by_hand
    monkeypatch.setattr(Objective, "step_by_hand", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    for hand in (True, False):
        monkeypatch.setattr(training_loop, "HAND_STEP", hand)
        calls.clear()
        model = atlasmtl.build_model(ref_adata, list(SYMPHONY_LEVELS), num_epochs=2, ensemble_size=1, random_state=0,
                                     show_progress=False, show_summary=False)
        assert (len(calls) > 0) == hand  # the steps were computed by hand, or none was
        nets.append(model.network)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_the_dense_and_csr_kernels_train_the_same_network(symphony_split, monkeypatch):
    """The first layer's kernel is a speed choice only: two epochs at the defaults (one network) with every
    batch multiplied densely and with every batch through CSR products give the same network, to rounding."""
    ref_adata, _ = symphony_split
    nets = []
    for dense_above in (0.0, 1.0):
        monkeypatch.setattr(network, "DENSE_ABOVE_FORWARD", dense_above)
        monkeypatch.setattr(network, "DENSE_ABOVE_STEP", dense_above)
        model = atlasmtl.build_model(ref_adata, list(SYMPHONY_LEVELS), num_epochs=2, ensemble_size=1, random_state=0,
                                     show_progress=False, show_summary=False)
        nets.append(model.network)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("zero_row", [False, True])
def test_dense_first_layer_products_equal_the_csr_ones(monkeypatch, zero_row):
    """The densified batch gives the CSR kernels' first-layer output and weight gradient, and a product
    too large to densify at once goes in slices of rows with the same result."""
    import scipy.sparse as sp
    rng = np.random.default_rng(0)
    rows = sp.random(41, 300, density=0.3, format="csr", dtype=np.float32, random_state=1)
    weight, grad = torch.randn(16, 300), torch.randn(40 if zero_row else 41, 16)
    zero_input = None if zero_row else torch.from_numpy(rng.normal(size=300).astype(np.float32))
    assert network.multiplies_densely(rows)
    dense = network._dense_rows(rows)
    torch.testing.assert_close(network._first_layer_product(weight, zero_input, rows, zero_row, dense),
                               network._first_layer_product(weight, zero_input, rows, zero_row))
    torch.testing.assert_close(network._first_layer_weight_grad_t(None, grad, zero_input, zero_row, dense),
                               network._first_layer_weight_grad_t(rows.T.tocsr(), grad, zero_input, zero_row))
    csr = network._csr_times_dense(rows, weight.t().contiguous())
    monkeypatch.setattr(network, "DENSE_SLICE_VALUES", 300 * 7)  # 7 rows at a time: 6 slices
    assert not network.multiplies_densely(rows)
    torch.testing.assert_close(network._csr_times_dense(rows, weight.t().contiguous(), 0.1), csr)
    assert not network.multiplies_densely(sp.csr_matrix((0, 300), dtype=np.float32))
