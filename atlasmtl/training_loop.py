"""The training loop: minibatches, the loss, the optimiser and the epoch loop (:func:`fit`).

:class:`Objective` turns reference rows into network input (augmented when training),
cross-entropy targets (class weights, label smoothing, mixup) and coordinate targets,
and computes the loss, through autograd or by hand on the CPU;
:func:`shuffled_minibatches` deals one epoch of rows, in memory or streamed from disk;
:func:`fit` runs the epochs (early stopping, a cosine schedule, ``torchrun`` shards).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.optim.adamw import adamw as functional_adamw  # no torch._dynamo import, unlike the class

from .augment import ShiftAugmentation, mixup_pairs, simulate_shift
from .batch_worker import (CsrSlots, forked_prefetch, max_batch_nonzeros, mean_stored_values, prefetch,
                           use_worker_process)
from .exceptions import TrainingError
from .inputs import MatrixSource, check_block
from . import distributed as _dist
from .network import MultiTaskNetwork, SparseInput, dropout_keep, multiplies_densely
from .reference import Reference
from .runtime import progress


def class_weights(codes: np.ndarray, n_classes: int, power: float, device: torch.device) -> torch.Tensor | None:
    """Cross-entropy class weights ∝ frequency ** -power, scaled so the average weight per cell is 1."""
    if power == 0:
        return None
    counts = np.bincount(codes[codes >= 0], minlength=n_classes).astype(np.float64)
    weights = (counts.sum() / np.maximum(counts, 1)) ** power
    weights *= counts.sum() / max((weights * counts).sum(), 1e-12)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def soft_targets(codes: np.ndarray, n_classes: int, weight: np.ndarray | None, label_smoothing: float,
                 partner: np.ndarray | None = None, own_weight: np.ndarray | None = None) -> np.ndarray:
    """The cross-entropy targets of a minibatch at one level, class weights and label smoothing included.

    Row ``i`` is ``λ_i t(y_i) + (1 - λ_i) t(y_partner(i))`` with ``t(y) = w ⊙ ((1 - ε) e_y + ε / C)``
    (``w`` the class weights, ``ε`` the label smoothing, ``C`` the classes) and ``t = 0`` for an
    unlabelled cell (code -1); without mixup ``λ = 1``. The loss of a cell with logits ``z`` is
    ``-Σ_c target_c log softmax(z)_c``: PyTorch's weighted, label-smoothed cross-entropy (summed), and
    for a mixed cell the same mixture of its two labels' cross-entropies. Its gradient at ``z`` is
    ``softmax(z) Σ_c target_c - target``. float32, cells × classes.
    """
    n = len(codes)
    targets = np.zeros((n, n_classes), dtype=np.float32)
    mass = np.zeros(n, dtype=np.float32)
    own = np.ones(n, dtype=np.float32) if own_weight is None else np.asarray(own_weight, dtype=np.float32)
    parts = [(codes, own)] if partner is None else [(codes, own), (codes[partner], 1.0 - own)]
    for y, lam in parts:
        at = np.flatnonzero(y >= 0)
        targets[at, y[at]] += (1.0 - label_smoothing) * lam[at]
        mass[at] += lam[at]
    if label_smoothing:
        targets += (label_smoothing / n_classes) * mass[:, None]
    if weight is not None:
        targets *= weight
    return targets


#: Cells per contiguous block read from a reference on disk, and blocks shuffled together in memory
#: (block-shuffled sampling as in scDataset / annbatch: random block order, then random cells within
#: a buffer of several blocks). 16 × 1,024 cells of 3,000 genes at 4% non-zero values is ~16 MB.
STREAM_BLOCK_CELLS = 1024


STREAM_BUFFER_BLOCKS = 16

#: With the minibatch worker process and the shift augmentation, on a reference with at least this many
#: stored values per cell (mean over the training cells) the worker only draws each batch's shift
#: (:meth:`Objective.shifted`) and the training process makes the network input from it
#: (:meth:`Objective.network_input`) while the worker draws the next; below it the worker does both.
#: The draws grow with the stored values, so on such references the worker set the pace and the
#: training process waited. The trained network is the same either way (the same computations; tested).
#: Measured on 2 cores, 22 references (API contract, "Where training time goes on the slowest references"):
#: 1,137-3,489 values per cell trained 8-24% faster split, 64-822 values per cell 2-24% slower.
#: ``0``: always; ``inf``: never.
SPLIT_SHIFT_ABOVE_VALUES = 1000.0


def shuffled_minibatches(source: MatrixSource, cells: np.ndarray, batch_size: int, rng: np.random.Generator,
                         n_batches: int | None = None) -> Iterator[tuple[np.ndarray, Any]]:
    """One epoch of shuffled minibatches of ``cells`` (sorted row numbers): ``(rows, block)`` pairs.

    In memory, every minibatch is a uniform random draw without replacement (rows sorted
    within the batch). On disk (``source.backed``), rows are read as contiguous blocks of
    :data:`STREAM_BLOCK_CELLS` cells in random block order; :data:`STREAM_BUFFER_BLOCKS`
    blocks at a time are mixed and dealt into minibatches, so each epoch reads the file
    once, sequentially per block, with memory bounded by the buffer. ``n_batches`` stops
    the epoch after that many minibatches (distributed ranks must take equal steps).
    Every random choice comes from ``rng``, so a seed reproduces the epoch.
    """
    emitted = 0
    if not source.backed:
        order = rng.permutation(cells)
        for start in range(0, len(order), batch_size):
            if n_batches is not None and emitted >= n_batches:
                return
            rows = np.sort(order[start : start + batch_size])
            yield rows, source.rows(rows)
            emitted += 1
        return
    blocks = [cells[i : i + STREAM_BLOCK_CELLS] for i in range(0, len(cells), STREAM_BLOCK_CELLS)]
    block_order = rng.permutation(len(blocks))
    carry_rows: np.ndarray | None = None
    carry_block: Any = None
    for b0 in range(0, len(blocks), STREAM_BUFFER_BLOCKS):
        picked = [blocks[i] for i in block_order[b0 : b0 + STREAM_BUFFER_BLOCKS]]
        parts_rows, parts = [], []
        for rows in picked:
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            chunk = source.rows(slice(lo, hi))
            parts.append(chunk if hi - lo == len(rows) else chunk[rows - lo])
            parts_rows.append(rows)
        if carry_rows is not None:
            parts_rows.append(carry_rows)
            parts.append(carry_block)
        buf_rows = np.concatenate(parts_rows)
        buffer = sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.vstack(parts)
        mix = rng.permutation(len(buf_rows))
        last = b0 + STREAM_BUFFER_BLOCKS >= len(blocks)
        n_full = len(mix) if last else (len(mix) // batch_size) * batch_size
        for start in range(0, n_full, batch_size):
            if n_batches is not None and emitted >= n_batches:
                return
            take = np.sort(mix[start : min(start + batch_size, n_full)])
            yield buf_rows[take], buffer[take]
            emitted += 1
        rest = np.sort(mix[n_full:])
        carry_rows, carry_block = (buf_rows[rest], buffer[rest]) if len(rest) else (None, None)


@dataclass
class Minibatch:
    """One prepared minibatch: network input, cross-entropy targets and labelled cells per level, coordinates."""

    x: SparseInput | torch.Tensor
    #: Cross-entropy targets per level (:func:`soft_targets`: cells × classes, mixup and class weights included).
    targets: list[torch.Tensor]
    n_labelled: list[float]
    coords: dict[str, torch.Tensor]
    n_cells: int
    #: Mixup partner row, own weight and the partners' inverse permutation per cell
    #: (:func:`~atlasmtl.augment.mixup_pairs`), or ``None``.
    mix: tuple[torch.Tensor, ...] | None = None
    #: The encoder's dropout masks (:func:`~atlasmtl.network.dropout_keep`), or ``None`` (its layers draw).
    dropout_keep: list[torch.Tensor] | None = None


class Objective:
    """The training loss: label-smoothed, class-weighted cross-entropy per level plus MSE per coordinate head."""

    def __init__(self, ref: Reference, train_cells: np.ndarray, class_weight_power: float,
                 label_smoothing: float, dev: torch.device, augmentation: ShiftAugmentation | None = None,
                 rng: np.random.Generator | None = None, mixup_alpha: float = 0.0) -> None:
        self.ref, self.dev = ref, dev
        self.augmentation, self.rng = augmentation, rng or np.random.default_rng(0)
        # mixup partners and dropout masks come from generators of their own (:meth:`step_draws`)
        self.mixup_alpha, self.mix_rng = mixup_alpha, np.random.default_rng(1)
        self.dropout_rng = np.random.default_rng(2)
        #: ``(units, rate)`` per encoder dropout layer whose masks :meth:`step_draws` draws (set by :func:`fit`
        #: for CPU training; empty: the layers draw their own)
        self.dropout_widths: list[tuple[int, float]] = []
        # shifted batches are counts, whatever the reference holds
        self.counts_aligner = dataclasses.replace(ref.aligner, semantics="counts")
        zero = ref.aligner.zero_input()
        self.zero_input = None if zero is None else torch.from_numpy(zero).to(dev)
        # f(0) as one CSR row, appended to CPU training batches (SparseInput.zero_row)
        self.zero_row = None if zero is None or dev.type != "cpu" else sp.csr_matrix(zero[None, :].astype(np.float32))
        self.coord_std = ref.standardised_coords()
        self.label_smoothing = float(label_smoothing)
        self.n_classes = [len(ref.classes[col]) for col in ref.label_columns]
        #: Cross-entropy class weights per level (NumPy: :func:`soft_targets` runs in the minibatch worker), or ``None``.
        self.class_weights = [
            None if (w := class_weights(ref.codes[train_cells, j], k, class_weight_power, torch.device("cpu"))) is None
            else w.numpy()
            for j, k in enumerate(self.n_classes)
        ]

    def transform(self, block: Any, train: bool = False) -> tuple[sp.csr_matrix, sp.csr_matrix | None]:
        """The network input of the rows ``block``: sparse offset input (exact for every transform;
        see :class:`~atlasmtl.network.SparseInput`) and, when training on the CPU, its transpose.

        With ``train=True`` and augmentation on, it is a shifted copy (:func:`simulate_shift`).
        When training on the CPU with an input transform whose ``f(0)`` is not 0, the matrix
        ends with ``f(0)`` as one extra row (:attr:`SparseInput.zero_row
        <atlasmtl.network.SparseInput.zero_row>`). No per-cell Python; runs in the minibatch
        worker (a process or a thread), or split: :meth:`shifted` there and :meth:`network_input` in
        the training process (:data:`SPLIT_SHIFT_ABOVE_VALUES`).
        """
        return self.network_input(self.shifted(block, train), train)

    def shifted(self, block: Any, train: bool = False) -> Any:
        """The rows ``block``, checked when streamed from disk (:func:`~atlasmtl.inputs.check_block`; a matrix in
        memory was checked whole before training); with ``train=True`` and augmentation on, a shifted copy
        (:func:`simulate_shift`, counts over all the reference's genes): the random half of
        :meth:`transform`, drawn from :attr:`rng`."""
        if self.ref.source.backed:
            check_block(block, self.ref.source.where, self.ref.semantics["semantics"])
        if train and self.augmentation is not None:
            return simulate_shift(block, self.ref.semantics["semantics"], self.rng, self.augmentation)
        return block

    def network_input(self, rows: Any, train: bool = False) -> tuple[sp.csr_matrix, sp.csr_matrix | None]:
        """The deterministic half of :meth:`transform`: rows from :meth:`shifted` → sparse offset input
        and, when training on the CPU, its transpose."""
        if train and self.augmentation is not None:
            x = self.counts_aligner.sparse_input(rows)
        else:
            x = self.ref.aligner.sparse_input(rows)
        if not (train and self.dev.type == "cpu"):
            return x, None
        if self.zero_row is not None:
            x = sp.vstack([x, self.zero_row], format="csr")
        # a batch the first layer multiplies densely needs no transpose (network.multiplies_densely)
        return x, None if multiplies_densely(x) else x.T.tocsr()

    def step_draws(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The random draws of one training step on the reference cells ``rows``, made beside the
        step (in the minibatch worker): mixup partners, own weights and the partners' inverse
        permutation (from :attr:`mix_rng`), the encoder's dropout masks (:attr:`dropout_widths`,
        from :attr:`dropout_rng`), and the cross-entropy targets they give (:meth:`targets`).
        Arrays with one row per cell (:class:`~atlasmtl.batch_worker.CsrSlots`)."""
        n_cells = len(rows)
        draws: dict[str, np.ndarray] = {}
        if self.mixup_alpha > 0 and n_cells > 1:
            partner, weight = mixup_pairs(n_cells, self.mixup_alpha, self.mix_rng)
            inverse = np.empty_like(partner)
            inverse[partner] = np.arange(n_cells)
            draws.update(partner=partner, weight=weight, inverse=inverse)
        for i, (width, rate) in enumerate(self.dropout_widths):
            draws[f"keep{i}"] = dropout_keep(self.dropout_rng, n_cells, width, rate)
        for j, targets in enumerate(self.targets(rows, draws.get("partner"), draws.get("weight"))):
            draws[f"target{j}"] = targets
        return draws

    def step_draw_fields(self) -> dict[str, tuple[Any, int]]:
        """Name → ``(dtype, width)`` of what :meth:`step_draws` returns (width 0: one value per cell)."""
        fields: dict[str, tuple[Any, int]] = {}
        if self.mixup_alpha > 0:
            fields.update(partner=(np.int64, 0), weight=(np.float32, 0), inverse=(np.int64, 0))
        for i, (width, _) in enumerate(self.dropout_widths):
            fields[f"keep{i}"] = (np.float32, width)
        for j, k in enumerate(self.n_classes):
            fields[f"target{j}"] = (np.float32, k)
        return fields

    def targets(self, rows: np.ndarray, partner: np.ndarray | None = None,
                weight: np.ndarray | None = None) -> list[np.ndarray]:
        """The cross-entropy targets of the reference cells ``rows`` per level (:func:`soft_targets`),
        mixed with their partners' when given."""
        codes = self.ref.codes[rows]
        return [soft_targets(codes[:, j], k, self.class_weights[j], self.label_smoothing, partner, weight)
                for j, k in enumerate(self.n_classes)]

    def minibatch(self, rows: np.ndarray, x: sp.csr_matrix, x_t: sp.csr_matrix | None = None,
                  draws: Mapping[str, np.ndarray] | None = None, train: bool = False) -> Minibatch:
        """The minibatch of reference cells ``rows`` whose input (and its transpose) is ``x`` (``x_t``;
        :meth:`transform`); with ``train=True``, with the step's random draws (:meth:`step_draws`,
        drawn now when not given)."""
        dev = self.dev
        codes = self.ref.codes[rows]
        labelled = np.maximum((codes >= 0).sum(axis=0), 1).astype(float).tolist()
        if train and draws is None:
            draws = self.step_draws(rows)
        draws = draws or {}
        targets = ([draws[f"target{j}"] for j in range(len(self.n_classes))] if "target0" in draws
                   else self.targets(rows, draws.get("partner"), draws.get("weight")))

        def tensor(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values).to(dev, non_blocking=True)

        mix = None
        if "partner" in draws:
            mix = (tensor(draws["partner"]), tensor(draws["weight"]), tensor(draws["inverse"]))
        keep = [tensor(draws[f"keep{i}"]) for i in range(len(self.dropout_widths))] if "keep0" in draws else None
        return Minibatch(
            x=SparseInput(x, self.zero_input, x_t, zero_row=x.shape[0] == len(rows) + 1),
            targets=[tensor(t) for t in targets],
            n_labelled=labelled,
            coords={n: tensor(v[rows]) for n, v in self.coord_std.items()},
            n_cells=len(rows),
            mix=mix,
            dropout_keep=keep,
        )

    def prepare(self, rows: np.ndarray, block: Any, train: bool = False) -> Minibatch:
        """The minibatch of reference cells ``rows`` (whose matrix rows are ``block``):
        :meth:`transform` then :meth:`minibatch`."""
        return self.minibatch(rows, *self.transform(block, train), train=train)

    def batch(self, rows: np.ndarray, train: bool = False) -> Minibatch:
        """:meth:`prepare` for rows read now (validation, tests)."""
        return self.prepare(rows, self.ref.source.rows(rows), train)

    def loss(self, net: nn.Module, batch: Minibatch) -> torch.Tensor:
        """The loss of a prepared minibatch (no host synchronisation), through autograd: per level the
        summed cross-entropy against :attr:`Minibatch.targets` over the labelled cells, plus the MSE of
        each coordinate head; for a mixed minibatch, each cell's loss is the mixture of its own and its
        partner's labels' losses (coordinate targets likewise). :meth:`step_by_hand` is the same loss."""
        out = net(batch.x, mix=batch.mix, dropout_keep=batch.dropout_keep)
        loss = torch.zeros((), device=self.dev)
        for j, lg in enumerate(out.logits):
            loss = loss - (batch.targets[j] * torch.log_softmax(lg, dim=1)).sum() / batch.n_labelled[j]
        for n in self.coord_std:
            target = batch.coords[n]
            if batch.mix is not None:
                partner, weight = batch.mix[:2]
                w = weight.unsqueeze(1)
                target = w * target + (1.0 - w) * target[partner]
            loss = loss + torch.mean((out.coords[n] - target) ** 2)
        return loss

    def step_by_hand(self, net: MultiTaskNetwork, batch: Minibatch, first_weight_t: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`loss` and its gradients without autograd (:meth:`MultiTaskNetwork.step_by_hand
        <atlasmtl.network.MultiTaskNetwork.step_by_hand>`, where ``step_by_hand_fits``); sets the
        parameters' ``grad`` and returns the loss."""
        def logit_gradients(logits: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
            loss, grads = torch.zeros(()), []
            for j, lg in enumerate(logits):
                target, scale = batch.targets[j], 1.0 / batch.n_labelled[j]
                log_p = torch.log_softmax(lg, dim=1)
                loss -= (target * log_p).sum() * scale
                # d/dz of -Σ target · log softmax(z): softmax(z) Σ target - target
                grads.append(log_p.exp_().mul_(target.sum(1, keepdim=True)).sub_(target).mul_(scale))
            return loss, grads

        return net.step_by_hand(batch.x, logit_gradients, mix=batch.mix, dropout_keep=batch.dropout_keep,
                                first_weight_t=first_weight_t)

    def __call__(self, net: nn.Module, rows: np.ndarray, train: bool = False) -> torch.Tensor:
        return self.loss(net, self.batch(rows, train))


#: Whether CPU training computes its steps without autograd where it can (:meth:`Objective.step_by_hand`).
HAND_STEP = True


class _AdamW:
    """AdamW (Adam with decoupled weight decay; plain Adam at ``weight_decay=0``) over a fixed list of
    parameters, stepped by PyTorch's functional AdamW (:func:`torch.optim.adamw.adamw`) with its fused
    single-kernel step where this PyTorch has one for the device (``foreach`` otherwise).

    The same update as :class:`torch.optim.AdamW` (default betas and eps) without its per-step
    bookkeeping (~0.07 ms of a ~2.9 ms CPU step), and without building a ``torch.optim.Optimizer``,
    whose first construction in a process imports ``torch._dynamo`` (~0.8 s: a tenth of the time
    a small reference trains in). ``lr`` may be changed between steps (the cosine schedule).
    """

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0) -> None:
        self.params: list[torch.Tensor] = list(params)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]
        self.fused: bool | None = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        at = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not at:
            return
        parts = ([self.params[i] for i in at], [self.params[i].grad for i in at], [self.exp_avg[i] for i in at],
                 [self.exp_avg_sq[i] for i in at], [], [self.steps[i] for i in at])
        options = dict(amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=self.weight_decay, eps=1e-8,
                       maximize=False)
        if self.fused:
            try:
                functional_adamw(*parts, fused=True, **options)
                return
            except RuntimeError:  # no fused kernel for this device in this PyTorch (CPU before 2.4); nothing was stepped
                self.fused = False
        functional_adamw(*parts, foreach=True, **options)


def _adam(params: Any, learning_rate: float, weight_decay: float = 0.0) -> _AdamW:
    """The optimiser training steps (:class:`_AdamW`)."""
    return _AdamW(params, learning_rate, weight_decay)


@contextlib.contextmanager
def _first_layer_stored_transposed(net: MultiTaskNetwork) -> Iterator[nn.Parameter]:
    """Store the first layer's weight transposed in memory (same values and shape) while training.

    The sparse first layer multiplies by ``W.T`` and produces the gradient as ``(x.T @ grad).T``;
    with ``W.T`` contiguous neither direction copies the 3,000 × 256 weight. Yields ``W.T`` as a
    contiguous parameter sharing ``W``'s memory, for the optimiser to update in place: PyTorch's
    fused Adam step copies a parameter that is not contiguous (and its gradient) every step
    (see :func:`_hand_over_first_gradient`). The usual layout is restored afterwards, so the trained
    network and its saved files are as always.
    """
    first = net.encoder.layers[0]
    with torch.no_grad():
        first.weight = nn.Parameter(first.weight.detach().t().contiguous().t())
    try:
        yield nn.Parameter(first.weight.detach().t())
    finally:
        with torch.no_grad():
            first.weight = nn.Parameter(first.weight.detach().contiguous())


def _hand_over_first_gradient(net: MultiTaskNetwork, weight_t: nn.Parameter) -> None:
    """Move the first layer's gradient to its transposed alias (a view, no copy) after ``backward``.

    The alias is what the optimiser steps; the layer's own ``grad`` is cleared so the next
    backward starts from nothing, as ``zero_grad(set_to_none=True)`` does for the others.
    """
    first = net.encoder.layers[0].weight
    weight_t.grad = None if first.grad is None else first.grad.t()
    first.grad = None


def fit(
    net: MultiTaskNetwork,
    objective: Objective,
    train_cells: np.ndarray,
    val_cells: np.ndarray,
    rng: np.random.Generator,
    *,
    batch_size: int,
    num_epochs: int,
    learning_rate: float,
    early_stopping_patience: int | None,
    show_progress: bool,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    min_steps: int = 0,
    bar: Any = None,
) -> list[dict[str, float]]:
    """The epoch loop (AdamW, shuffled minibatches, optional validation and early stopping).

    With ``bar`` (a progress bar shared by an ensemble's networks, planned at ``num_epochs`` for this
    one), the epochs advance it, and an early stop or ``min_steps``'s extra epochs correct its total;
    else, with ``show_progress``, the loop draws a bar of its own.

    Runs ``num_epochs`` epochs, or more when that gives fewer than ``min_steps``
    optimiser steps; with ``lr_schedule="cosine"`` the learning rate follows a
    cosine from ``learning_rate`` to 0 over all the steps of the run.

    Minibatches are read, augmented and transformed in a background thread one
    step ahead (:func:`prefetch`), or in a forked process (on a reference with many stored values
    per cell, the process reads and augments and this one transforms:
    :data:`SPLIT_SHIFT_ABOVE_VALUES`); the first layer is sparse
    (:class:`~atlasmtl.network.SparseInput`). Under ``torchrun`` (a
    :mod:`torch.distributed` group), each rank trains on its contiguous shard of
    ``train_cells`` with the same number of steps, and
    :class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients.

    Leaves ``net`` in eval mode with the best validation weights when early
    stopping is on; returns the loss history, one record per completed epoch.
    """
    n_val = len(val_cells)
    history: list[dict[str, float]] = []
    source, dev = objective.ref.source, objective.dev
    n_batches = None
    shard = train_cells
    if _dist.is_distributed():
        shard = train_cells[_dist.shard_slice(len(train_cells))]
        smallest = min(len(range(len(train_cells))[_dist.shard_slice(len(train_cells), r)])
                       for r in range(_dist.world_size()))
        n_batches = max(1, -(-smallest // batch_size))
    steps_per_epoch = n_batches if n_batches is not None else -(-len(shard) // batch_size)
    planned_epochs, num_epochs = num_epochs, max(num_epochs, -(-min_steps // steps_per_epoch))
    # the worker thread draws every shuffle and augmentation from its own generator, so how far
    # it runs ahead never changes the random numbers anything else sees
    stream_seed = int(rng.integers(2**63))
    batch_rng = np.random.default_rng([stream_seed, _dist.rank()])
    objective.rng = batch_rng
    objective.mix_rng = np.random.default_rng([stream_seed, _dist.rank(), 1])
    objective.dropout_rng = np.random.default_rng([stream_seed, _dist.rank(), 2])
    # on the CPU the worker draws the dropout masks too (PyTorch's CPU generator is slow); elsewhere the layers do
    widths = net.encoder.dropout_widths()
    objective.dropout_widths = widths if dev.type == "cpu" and all(p > 0 for _, p in widths) else []
    with _first_layer_stored_transposed(net) as first_weight_t:
        model: nn.Module = net
        if _dist.is_distributed():
            model = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        first_weight = net.encoder.layers[0].weight
        optimiser = _adam([first_weight_t if p is first_weight else p for p in model.parameters()],
                          learning_rate, weight_decay)
        total_steps = num_epochs * steps_per_epoch
        best_val, best_state, stale = np.inf, None, 0
        # on the CPU, steps are computed by hand where the network allows (MultiTaskNetwork.step_by_hand;
        # decided on the first minibatch: every one of a run is prepared alike); DistributedDataParallel
        # averages gradients through autograd's hooks, so it keeps autograd
        by_hand: bool | None = None if dev.type == "cpu" and model is net and HAND_STEP else False

        # on a reference with many stored values per cell the worker only draws each minibatch's shift and
        # the training process turns it into the network input (SPLIT_SHIFT_ABOVE_VALUES): the same result
        forked = dev.type == "cpu" and use_worker_process(source.backed, _dist.is_distributed())
        split = forked and objective.augmentation is not None \
            and mean_stored_values(source.matrix, shard) >= SPLIT_SHIFT_ABOVE_VALUES

        def epochs() -> Iterator[tuple[np.ndarray, sp.csr_matrix, sp.csr_matrix | None, dict] | None]:
            for _ in range(num_epochs):
                for rows, block in shuffled_minibatches(source, shard, batch_size, batch_rng, n_batches):
                    if split:
                        yield rows, objective.shifted(block, train=True), None, objective.step_draws(rows)
                    else:
                        yield (rows, *objective.transform(block, train=True), objective.step_draws(rows))
                yield None  # end of epoch

        if forked:
            max_nnz = max_batch_nonzeros(source.matrix, shard, batch_size)
            if split:  # the shifted counts over all the reference's genes (the shift never adds a value)
                slots = CsrSlots(4, batch_size, source.n_vars, max_nnz, objective.step_draw_fields())
            else:
                extra = 0 if objective.zero_row is None else 1  # the f(0) row (SparseInput.zero_row)
                n_genes = objective.ref.n_genes  # the network input's width (the model's genes)
                slots = CsrSlots(4, batch_size + extra, n_genes, max_nnz + extra * n_genes,
                                 objective.step_draw_fields())
            prepared = forked_prefetch(epochs, slots)
        else:
            prepared = prefetch(epochs())

        def minibatches() -> Iterator[Minibatch | None]:
            with contextlib.closing(prepared):  # stops the worker on any exit
                for item in prepared:
                    if item is None:
                        yield None
                    elif split:  # the slot's views are read before the next item is asked for
                        rows, counts, _, draws = item
                        yield objective.minibatch(rows, *objective.network_input(counts, train=True), draws,
                                                  train=True)
                    else:
                        yield objective.minibatch(*item, train=True)

        own_bar = bar is None
        if own_bar:
            bar = progress(range(num_epochs), desc="atlasmtl training", enabled=show_progress, unit="epoch")
        elif num_epochs != planned_epochs:
            bar.total += num_epochs - planned_epochs
            bar.refresh()
        with contextlib.closing(minibatches()) as stream:
            epoch, step = 0, 0
            total, n_seen, t_epoch = torch.zeros((), device=dev), 0, time.perf_counter()
            c_epoch = time.process_time()
            model.train()
            for batch in stream:
                if batch is not None:
                    step += 1
                    if by_hand is None:
                        by_hand = net.step_by_hand_fits(batch.x, batch.dropout_keep)
                    if by_hand:
                        loss = objective.step_by_hand(net, batch, first_weight_t)  # sets every grad
                        if not torch.isfinite(loss):
                            _diverged(float(loss), epoch, step, learning_rate)
                    else:
                        optimiser.zero_grad(set_to_none=True)
                        loss = objective.loss(model, batch)
                        if dev.type == "cpu" and not torch.isfinite(loss):  # free on the CPU; once per epoch on a GPU
                            _diverged(float(loss.detach()), epoch, step, learning_rate)
                        loss.backward()
                        _hand_over_first_gradient(net, first_weight_t)
                    optimiser.step()
                    if lr_schedule == "cosine":  # CosineAnnealingLR's closed form, from learning_rate to 0
                        done = (epoch * steps_per_epoch + step) / total_steps
                        optimiser.lr = learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
                    total += loss.detach() * batch.n_cells
                    n_seen += batch.n_cells
                    continue
                train_loss = float(total) / max(n_seen, 1)
                if not np.isfinite(train_loss):
                    _diverged(train_loss, epoch, None, learning_rate)
                record = {"epoch": epoch + 1, "train_loss": train_loss,
                          "seconds": round(time.perf_counter() - t_epoch, 3),
                          "cpu_seconds": round(time.process_time() - c_epoch, 3)}
                if n_val:
                    net.eval()
                    with torch.no_grad():
                        vt, vn = 0.0, 0
                        for start in range(0, n_val, 4096):
                            rows = val_cells[start : start + 4096]
                            vt += float(objective(net, rows)) * len(rows)
                            vn += len(rows)
                    record["val_loss"] = vt / vn
                    if record["val_loss"] < best_val - 1e-6:
                        best_val, best_state, stale = record["val_loss"], copy.deepcopy(net.state_dict()), 0
                    else:
                        stale += 1
                    model.train()
                history.append(record)
                bar.update(1)
                bar.set_postfix({k: round(v, 4) for k, v in record.items() if k not in ("epoch", "seconds", "cpu_seconds")})
                epoch, step = epoch + 1, 0
                total, n_seen, t_epoch = torch.zeros((), device=dev), 0, time.perf_counter()
                c_epoch = time.process_time()
                if early_stopping_patience is not None and n_val and stale >= early_stopping_patience:
                    break
        if own_bar:
            bar.close()
        elif epoch < num_epochs:  # stopped early: the shared bar skips this network's remaining epochs
            bar.total -= num_epochs - epoch
            bar.refresh()
    if best_state is not None and early_stopping_patience is not None:
        net.load_state_dict(best_state)
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        raise TrainingError(
            f"Training diverged: the network's weights became non-finite with learning_rate={learning_rate:g}. "
            "Use a smaller learning_rate (the default is 1e-3); no model was returned."
        )
    net.eval()
    return history


def _diverged(value: float, epoch: int, step: int | None, learning_rate: float) -> None:
    where = f"epoch {epoch + 1}" + (f", minibatch {step}" if step is not None else "")
    raise TrainingError(
        f"Training diverged: the loss became non-finite ({value}) at {where}, with learning_rate={learning_rate:g}. "
        "Use a smaller learning_rate (the default is 1e-3); no model was returned."
    )
