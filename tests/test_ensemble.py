"""Ensembles of networks (``build_model(ensemble_size=...)``): how members combine, the automatic size,
that member 0 is the single network, saving and loading, and refused sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import atlasmtl
from atlasmtl.exceptions import ParameterError
from atlasmtl.network import EnsembleNetwork, MultiTaskNetwork
from atlasmtl.training import AUTO_ENSEMBLE_CELLS, AUTO_ENSEMBLE_MAX, resolve_ensemble_size

from .synthetic import SYNTHETIC_LEVELS

FAST = dict(num_epochs=3, batch_size=32, learning_rate=0.01, hidden_sizes=(32, 16), num_threads=1,
            show_progress=False, show_summary=False)


def test_members_combine_as_mean_probability_side_by_side_embedding_and_mean_coordinates():
    torch.manual_seed(0)
    members = [MultiTaskNetwork(20, [3, 4], {"umap": 2}, (8, 6)).eval() for _ in range(3)]
    x = torch.randn(5, 20)
    out = EnsembleNetwork(members).eval()(x)
    outs = [m(x) for m in members]
    for j in range(2):
        mean_prob = torch.stack([torch.softmax(o.logits[j], 1) for o in outs]).mean(0)
        torch.testing.assert_close(torch.softmax(out.logits[j], 1), mean_prob)
        torch.testing.assert_close(out.logits[j].exp().sum(1), torch.ones(5))
    torch.testing.assert_close(out.coords["umap"], torch.stack([o.coords["umap"] for o in outs]).mean(0))
    assert out.embedding.shape == (5, 18)
    # unit rows whose cosine similarity is the members' mean cosine similarity
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(5))
    cos = [torch.nn.functional.cosine_similarity(o.embedding[0:1], o.embedding[1:2]) for o in outs]
    torch.testing.assert_close((out.embedding[0] @ out.embedding[1]).reshape(1), torch.stack(cos).mean(0))


@pytest.mark.parametrize("cells, members", [(240, 10), (AUTO_ENSEMBLE_CELLS // AUTO_ENSEMBLE_MAX, 10), (20_000, 5),
                                            (30_000, 3), (50_001, 1), (AUTO_ENSEMBLE_CELLS, 1), (10**7, 1)])
def test_automatic_size_keeps_training_within_one_network_on_the_budget(cells, members):
    assert resolve_ensemble_size("auto", cells) == members
    assert resolve_ensemble_size("auto", cells) * min(cells, AUTO_ENSEMBLE_CELLS) <= max(AUTO_ENSEMBLE_CELLS, cells)
    assert resolve_ensemble_size(2, cells) == 2


def test_member_zero_is_the_single_network_and_the_ensemble_round_trips(synthetic_split, tmp_path):
    ref, query = synthetic_split
    single = atlasmtl.build_model(ref, SYNTHETIC_LEVELS, ensemble_size=1, random_state=3, **FAST)
    pair = atlasmtl.build_model(ref, SYNTHETIC_LEVELS, ensemble_size=2, random_state=3, **FAST)
    assert isinstance(single.network, MultiTaskNetwork) and isinstance(pair.network, EnsembleNetwork)
    for key, value in single.network.state_dict().items():
        torch.testing.assert_close(pair.network.members[0].state_dict()[key], value)
    assert not torch.equal(pair.network.members[0].encoder.layers[0].weight, pair.network.members[1].encoder.layers[0].weight)
    assert pair.metadata["architecture"]["ensemble_size"] == 2
    assert pair.reference["embedding"].shape[1] == 2 * 16
    assert pair.train_config["resource_summary"]["ensemble members"] == 2
    assert {r["member"] for r in pair.train_config["history"]} == {0, 1}

    pair.save(tmp_path / "pair.pth")
    loaded = atlasmtl.TrainedModel.load(tmp_path / "pair.pth")
    assert isinstance(loaded.network, EnsembleNetwork) and len(loaded.network.members) == 2
    a = atlasmtl.predict(pair, query, show_progress=False, show_summary=False)
    b = atlasmtl.predict(loaded, query, show_progress=False, show_summary=False)
    for level in SYNTHETIC_LEVELS:
        np.testing.assert_array_equal(a.levels[level]["code"], b.levels[level]["code"])
        np.testing.assert_allclose(a.levels[level]["conf"], b.levels[level]["conf"], rtol=1e-6)


def test_the_default_trains_an_ensemble_on_a_small_reference(synthetic_model, synthetic_split):
    n_train = synthetic_model.train_config["resource_summary"]["training cells"]
    assert synthetic_model.train_config["ensemble_size"] == "auto"
    assert synthetic_model.metadata["architecture"]["ensemble_size"] == min(AUTO_ENSEMBLE_MAX, AUTO_ENSEMBLE_CELLS // n_train)


@pytest.mark.parametrize("value", [0, -1, 65, 2.5, "three", True, None])
def test_bad_ensemble_size_is_a_clear_error(synthetic_split, value):
    with pytest.raises(ParameterError, match="ensemble_size"):
        atlasmtl.build_model(synthetic_split[0], SYNTHETIC_LEVELS, ensemble_size=value, **FAST)


def test_log_of_mean_probability_is_finite_for_extreme_logits():
    members = [MultiTaskNetwork(4, [2], {}, (3,)).eval() for _ in range(2)]
    with torch.no_grad():
        for m, bias in zip(members, (1e4, -1e4)):
            m.label_heads[0].bias.copy_(torch.tensor([bias, 0.0]))
    with torch.no_grad():
        out = EnsembleNetwork(members).eval()(torch.zeros(2, 4))
    assert torch.isfinite(out.logits[0]).all()
    torch.testing.assert_close(torch.softmax(out.logits[0], 1)[0], torch.tensor([0.5, 0.5]), atol=1e-6, rtol=0)
    assert math.isclose(float(out.logits[0].exp().sum(1)[0]), 1.0, rel_tol=1e-6)
