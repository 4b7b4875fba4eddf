"""The CPU training step computed by hand equals autograd's; the soft targets are PyTorch's cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import atlasmtl
from atlasmtl import training
from atlasmtl.network import MultiTaskNetwork
from atlasmtl.training import _Objective, prepare_reference, soft_targets

from .conftest import SYMPHONY_LEVELS


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
def test_step_by_hand_equals_autograd(symphony_split, hidden, dropout, mixup):
    """Loss and every gradient (the first layer's through its transposed alias), on real training batches
    (shifted, f(0) row, mixup pairs and dropout masks drawn by the worker), some cells unlabelled at a level."""
    ref_adata, _ = symphony_split
    ref = prepare_reference(ref_adata, list(SYMPHONY_LEVELS), None, layer=None, use_raw=False, input_transform="zscore")
    ref.codes[ref.cells[:200:7], 1] = -1  # unlabelled at the fine level
    objective = _Objective(ref, ref.cells, 0.5, 0.1, torch.device("cpu"), atlasmtl.augment.ShiftAugmentation(),
                           np.random.default_rng(0), mixup_alpha=mixup)
    torch.manual_seed(0)
    net = MultiTaskNetwork(ref.source.n_vars, [len(ref.classes[c]) for c in ref.label_columns], {}, hidden, dropout)
    objective.dropout_widths = net.encoder.dropout_widths() if dropout else []
    rows = ref.cells[:200]
    batch = objective.minibatch(rows, *objective.transform(ref.source.rows(rows), train=True), train=True)
    assert batch.x.zero_row and (batch.mix is not None) == (mixup > 0)
    assert net.step_by_hand_fits(batch.x, batch.dropout_keep)
    net.train()
    with training._first_layer_stored_transposed(net) as weight_t:
        loss = objective.loss(net, batch)
        loss.backward()
        training._hand_over_first_gradient(net, weight_t)
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


def test_step_by_hand_declines_what_it_does_not_compute(symphony_split):
    """Coordinate heads, dense input, or dropout without given masks go through autograd."""
    ref_adata, _ = symphony_split
    ref = prepare_reference(ref_adata, list(SYMPHONY_LEVELS), None, layer=None, use_raw=False, input_transform="zscore")
    objective = _Objective(ref, ref.cells, 0.5, 0.1, torch.device("cpu"))
    rows = ref.cells[:50]
    batch = objective.minibatch(rows, *objective.transform(ref.source.rows(rows), train=True), train=True)
    plain = MultiTaskNetwork(ref.source.n_vars, [3, 5], {}, (16,), 0.0)
    assert plain.step_by_hand_fits(batch.x, None)
    assert not MultiTaskNetwork(ref.source.n_vars, [3, 5], {"umap": 2}, (16,), 0.0).step_by_hand_fits(batch.x, None)
    assert not MultiTaskNetwork(ref.source.n_vars, [3, 5], {}, (16,), 0.3).step_by_hand_fits(batch.x, None)
    assert not plain.step_by_hand_fits(torch.zeros(50, ref.source.n_vars), None)
    assert not plain.step_by_hand_fits(batch.x._replace(rows_t=None), None)


def test_training_by_hand_and_through_autograd_agree(symphony_split, monkeypatch):
    """Two epochs at the defaults (one network): the two ways of computing the step train the same network,
    to rounding."""
    ref_adata, _ = symphony_split
    nets, calls = [], []
    real = _Objective.step_by_hand
    monkeypatch.setattr(_Objective, "step_by_hand", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    for hand in (True, False):
        monkeypatch.setattr(training, "HAND_STEP", hand)
        calls.clear()
        model = atlasmtl.build_model(ref_adata, list(SYMPHONY_LEVELS), num_epochs=2, ensemble_size=1, random_state=0,
                                     show_progress=False, show_summary=False)
        assert (len(calls) > 0) == hand  # the steps were computed by hand, or none was
        nets.append(model.network)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
