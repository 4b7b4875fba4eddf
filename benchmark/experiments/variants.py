"""Training variants measured against the defaults and not adopted (research; not part of atlasmtl).

These patches were written against the training code of 8f27718 (``_Objective.losses``, ``Minibatch.y``);
since cf69c97 the objective builds soft targets and the CPU step is computed by hand, so run them at
8f27718, as the API contract's commands say.

``build_setting_study.py`` applies one with the setting key ``"variant"``, e.g.
``'{"variant": "members:zscore,float,zscore,float,zscore"}'``. Each patches atlasmtl in the study's
process only:

``members:<input>,<input>,...``
    Ensemble member ``i`` trains on input ``i`` (cycled) of a ``zscore`` model. ``zscore``: the
    default. ``float``: the log values themselves (the ``float`` transform), clipped where the
    z-scores are; after training the member's first layer is rewritten to take z-scores
    (``W diag(std)``, bias ``+ W mean``), the same function, so prediction is unchanged (exact to
    float rounding: checked on pbmc68k_reduced, largest logit difference 1e-7). ``offset``: the
    z-scores' offset ``f(x) - f(0)`` with a free first-layer bias (``W f(0)`` folded into it before
    and out of it after training): the same function class as ``zscore``, without the gradient
    that couples the first layer's weight to its bias.
``members.augment:<0|1>,...``
    Member ``i`` trains with (1) or without (0) the shift augmentation.
``layernorm``
    ``LayerNorm`` after each hidden ``Linear`` of the encoder (before the ReLU).
``wide``
    A linear path from the input to every level's logits beside the encoder (wide & deep; its
    weights start at zero), through the same sparse first-layer product.
``mixup:<alpha>`` / ``mixup_class:<alpha>``
    Mixup on the network input of each training minibatch (as in scNym): every cell is mixed with
    another of the batch, ``λ x_i + (1 - λ) x_j`` with ``λ = max(b, 1 - b)``, ``b ~ Beta(α, α)``, and the
    loss is ``λ CE(y_i) + (1 - λ) CE(y_j)`` per level; ``mixup_class`` draws the partner from the cells of
    the same finest class only (no label mixing).
"""
from __future__ import annotations

import copy
import types

import numpy as np
import torch
from torch import nn

import atlasmtl.network as net_module
import atlasmtl.training as tr
import atlasmtl.training_loop as loop
from atlasmtl.augment import simulate_shift
from atlasmtl.augment import ShiftAugmentation
from atlasmtl.genes import ZSCORE_CLIP
from atlasmtl.network import Dropout, SparseInput, sparse_linear

_calls = [0]


def new_model() -> None:
    """Call before each ``build_model``: member numbering starts again."""
    _calls[0] = 0
    _mix_rng[0] = np.random.default_rng(0)


def _float_objective(objective):
    """A copy of the training objective whose input is the clipped log values (``float``)."""
    import dataclasses
    aligner = objective.ref.aligner
    out = copy.copy(objective)
    out.zero_input = None
    upper = (aligner.gene_mean + ZSCORE_CLIP * aligner.gene_std).astype(np.float32)
    plain = dataclasses.replace(aligner, input_transform="float")
    counts = dataclasses.replace(aligner, input_transform="float", semantics="counts")

    def transform(self, block, train=False):
        if train and self.augmentation is not None:
            x = counts.sparse_input(simulate_shift(block, self.ref.semantics["semantics"], self.rng, self.augmentation))
        else:
            x = plain.sparse_input(block)
        np.minimum(x.data, upper[x.indices], out=x.data)
        return x, (x.T.tocsr() if train and self.dev.type == "cpu" else None)
    out.transform = types.MethodType(transform, out)
    return out


def _members(kinds):
    fit = tr.fit

    def member_fit(net, objective, *args, **kwargs):
        kind = kinds[_calls[0] % len(kinds)]
        _calls[0] += 1
        first = net.encoder.layers[0]
        if kind in ("aug", "noaug"):
            objective.augmentation = ShiftAugmentation() if kind == "aug" else None
            return fit(net, objective, *args, **kwargs)
        if kind == "zscore" or objective.zero_input is None:
            return fit(net, objective, *args, **kwargs)
        if kind == "float":
            records = fit(net, _float_objective(objective), *args, **kwargs)
            aligner = objective.ref.aligner
            with torch.no_grad():
                first.bias += first.weight @ torch.from_numpy(aligner.gene_mean)
                first.weight *= torch.from_numpy(aligner.gene_std)
            return records
        if kind == "offset":
            offset = copy.copy(objective)
            offset.zero_input = None
            with torch.no_grad():
                first.bias += first.weight @ objective.zero_input
            records = fit(net, offset, *args, **kwargs)
            with torch.no_grad():
                first.bias -= first.weight @ objective.zero_input
            return records
        raise ValueError(f"unknown member input {kind!r}")
    tr.fit = member_fit


class _LayerNormEncoder(net_module.Encoder):
    def __init__(self, n_genes, hidden_sizes, dropout_rate):
        nn.Module.__init__(self)
        layers, width = [], n_genes
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.LayerNorm(size), nn.ReLU(), Dropout(dropout_rate)]
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_features = width


class _WideNetwork(net_module.MultiTaskNetwork):
    def __init__(self, n_genes, n_classes, coord_dims, hidden_sizes=(256, 128), dropout_rate=0.3):
        super().__init__(n_genes, n_classes, coord_dims, hidden_sizes, dropout_rate)
        self.level_sizes = list(n_classes)
        self.wide = nn.Linear(n_genes, sum(n_classes))
        nn.init.zeros_(self.wide.weight)
        nn.init.zeros_(self.wide.bias)

    def forward(self, x, first_weight_t=None):
        out = super().forward(x, first_weight_t)
        if isinstance(x, SparseInput):
            wide = sparse_linear(x, self.wide)
        elif x.layout == torch.sparse_csr:
            wide = torch.sparse.mm(x, self.wide.weight.t().contiguous()) + self.wide.bias
        else:
            wide = self.wide(x)
        starts = np.cumsum([0] + self.level_sizes)
        logits = [lg + wide[:, starts[j]:starts[j + 1]] for j, lg in enumerate(out.logits)]
        return net_module.NetworkOutput(out.embedding, logits, out.coords)


_mix_rng = [np.random.default_rng(0)]


def _mixup(alpha: float, same_class: bool) -> None:
    import scipy.sparse as sp
    loss = loop.Objective.loss

    def mixed_loss(self, net, batch):
        if not net.training or not isinstance(batch.x, SparseInput):
            return loss(self, net, batch)
        rng, n = _mix_rng[0], batch.n_cells
        y = batch.y
        if same_class:
            fine = y[:, -1].numpy()
            perm = np.arange(n)
            for c in np.unique(fine):
                members = np.flatnonzero(fine == c)
                perm[members] = rng.permutation(members)
        else:
            perm = rng.permutation(n)
        b = rng.beta(alpha, alpha, size=n).astype(np.float32)
        lam = np.maximum(b, 1.0 - b)
        rows = batch.x.rows
        mixed = (sp.diags(lam) @ rows + sp.diags(1.0 - lam) @ rows[perm]).tocsr().astype(np.float32)
        out = net(SparseInput(mixed, batch.x.zero_input, mixed.T.tocsr()))
        lam_t = torch.from_numpy(lam)
        total = torch.zeros(())
        for j, lg in enumerate(out.logits):
            ce = self.losses[j]
            kw = dict(weight=ce.weight, ignore_index=-1, reduction="none", label_smoothing=ce.label_smoothing)
            a = nn.functional.cross_entropy(lg, y[:, j], **kw)
            if same_class:
                total = total + a.sum() / batch.n_labelled[j]
            else:
                bb = nn.functional.cross_entropy(lg, y[perm, j], **kw)
                total = total + (lam_t * a + (1 - lam_t) * bb).sum() / batch.n_labelled[j]
        return total
    loop.Objective.loss = mixed_loss


def apply(name: str) -> None:
    """Patch atlasmtl (this process) for the variant ``name`` (see the module docstring)."""
    if name.startswith("members:"):
        _members(name.split(":", 1)[1].split(","))
    elif name.startswith("members.augment:"):
        _members(["aug" if v.strip() == "1" else "noaug" for v in name.split(":", 1)[1].split(",")])
    elif name == "layernorm":
        net_module.Encoder = _LayerNormEncoder
    elif name == "wide":
        tr.MultiTaskNetwork = _WideNetwork
    elif name.startswith(("mixup:", "mixup_class:")):
        _mixup(float(name.split(":", 1)[1]), name.startswith("mixup_class"))
    else:
        raise ValueError(f"unknown variant {name!r}")
