"""The network: a shared encoder, one classification head per level, optional coordinate heads.

:class:`MultiTaskNetwork` is one such network; :class:`EnsembleNetwork` is several
of them, trained apart, answering as one (:func:`build_network` makes either from
the architecture a model stores).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn


class NetworkOutput(NamedTuple):
    """What the network returns for a batch (unpacks like ``z, logits, coords = ...``)."""

    #: Encoder output (cells × last hidden size), the space the KNN stage searches after L2 normalisation.
    embedding: torch.Tensor
    #: Logits per annotation level, coarse to fine.
    logits: list[torch.Tensor]
    #: Standardised coordinates per coordinate head.
    coords: dict[str, torch.Tensor]


class SparseInput(NamedTuple):
    """A sparse minibatch for the first layer, exact for every input transform.

    The first layer computes ``W x + b`` as ``W (x - x0) + (W x0 + b)``: ``rows``
    holds ``x - x0``, non-zero only where the cell's value is, and ``zero_input``
    is ``x0``, the input of a gene with no counts (``None`` when it is 0, as for
    the binary and float transforms; see
    :meth:`atlasmtl.genes.GeneAligner.sparse_input`).
    """

    #: cells × genes (scipy CSR, float32).
    rows: sp.csr_matrix
    #: ``x0`` per gene (float32 tensor on the network's device), or ``None`` for 0.
    zero_input: torch.Tensor | None = None
    #: The transpose of ``rows`` (genes × cells, CSR) when already computed (e.g. by a prefetch thread).
    rows_t: sp.csr_matrix | None = None
    #: ``rows`` ends with one extra row holding ``x0`` itself (and ``rows_t`` with that column), so the
    #: CPU products compute the ``W x0`` term and its gradient within the sparse products (training
    #: prepares batches this way; :meth:`atlasmtl.training_loop.Objective.transform`).
    zero_row: bool = False


#: Whether PyTorch's CPU sparse × dense products run on MKL (its x86 builds). Without MKL,
#: PyTorch's own CPU kernel is slower than scipy's, so the first layer uses scipy's products.
CPU_CSR_KERNELS = "torch" if torch.backends.mkl.is_available() else "scipy"
_csr_warning_seen = False


def _torch_csr(rows: sp.csr_matrix, device: torch.device | None = None) -> torch.Tensor:
    """A PyTorch CSR tensor over a scipy CSR matrix's arrays (no copy on the CPU for float32 data)."""
    global _csr_warning_seen
    indptr, indices = rows.indptr, rows.indices
    if indptr.dtype != indices.dtype:
        indptr, indices = indptr.astype(np.int64), indices.astype(np.int64)
    parts = (torch.from_numpy(indptr), torch.from_numpy(indices),
             torch.from_numpy(np.asarray(rows.data, dtype=np.float32)))
    if not _csr_warning_seen:  # PyTorch warns once per process that CSR tensors are "beta"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            out = torch.sparse_csr_tensor(*parts, size=rows.shape, check_invariants=False)
        _csr_warning_seen = True
    else:
        out = torch.sparse_csr_tensor(*parts, size=rows.shape, check_invariants=False)
    return out if device is None else out.to(device)


#: Above this share of stored values, a CPU product of a CSR block and the first layer's weight
#: (cells × genes times genes × hidden) multiplies densely instead (:func:`_csr_times_dense`). MKL's CSR
#: kernel slows down faster than linearly as the rows fill up, while the dense product costs the same at
#: any density: at 12,794 genes, 257 rows and 256 hidden units (the brain human → mouse reference, 27%
#: non-zero) 131 ms against 29 ms densely, one thread; at 1,767 genes and 12% (Symphony) 2.1 against
#: 2.8 ms. Full-length protocols (Smart-seq2, CEL-seq2) reach 20-40% on their expressed genes; droplet
#: data sits at 3-15%, where the CSR kernel stays. 2026-12-04, ``documents/design/api_contract.md``
#: ("Training throughput").
DENSE_ABOVE_FORWARD = 0.15
#: Above this share, a CPU training step densifies its minibatch once and computes both first-layer
#: products from it (the weight gradient's ``xᵀ g`` too, whose CSR kernel stays faster up to ~30%), and
#: the minibatch worker skips the transpose the CSR gradient needs (:func:`multiplies_densely`).
DENSE_ABOVE_STEP = 0.2
#: At most this many values (64 MiB of float32) are densified at once; a larger block goes in slices of
#: rows, so the memory stays bounded by the batch, never by the number of cells.
DENSE_SLICE_VALUES = 1 << 24


def multiplies_densely(rows: sp.csr_matrix) -> bool:
    """Whether a CPU training step multiplies the CSR minibatch ``rows`` densely, forward and back (more
    than :data:`DENSE_ABOVE_STEP` of its values stored, at most :data:`DENSE_SLICE_VALUES` values in
    all); then the step does not need the minibatch's transpose."""
    size = rows.shape[0] * rows.shape[1]
    return 0 < size <= DENSE_SLICE_VALUES and rows.nnz > DENSE_ABOVE_STEP * size


def _dense_rows(rows: sp.csr_matrix) -> torch.Tensor | None:
    """``rows`` as a dense float32 tensor when :func:`multiplies_densely`, else ``None``."""
    if not multiplies_densely(rows):
        return None
    return torch.from_numpy(np.asarray(rows.toarray(), dtype=np.float32))


def _csr_times_dense(rows: sp.csr_matrix, dense: torch.Tensor, dense_above: float = 1.0) -> torch.Tensor:
    """``rows @ dense`` on the CPU (float32): PyTorch's MKL kernel, or scipy's without MKL, or, when more
    than ``dense_above`` of ``rows``' values are stored, a dense product over slices of ``rows``
    (:data:`DENSE_ABOVE_FORWARD`, :data:`DENSE_SLICE_VALUES`)."""
    n_rows, n_cols = rows.shape
    if n_rows and n_cols and rows.nnz > dense_above * n_rows * n_cols:
        out = torch.empty((n_rows, dense.shape[1]), dtype=torch.float32)
        step = max(1, DENSE_SLICE_VALUES // n_cols)
        for first in range(0, n_rows, step):
            block = rows[first:first + step].toarray()
            torch.mm(torch.from_numpy(np.asarray(block, dtype=np.float32)), dense, out=out[first:first + step])
        return out
    if CPU_CSR_KERNELS == "torch":
        # into a new uninitialised tensor (beta=0 ignores its contents): torch.sparse.mm would zero a
        # result, compute into another and copy it over, doubling the time of the 3,000 × 256 gradient
        out = torch.empty((n_rows, dense.shape[1]), dtype=torch.float32)
        return torch.addmm(out, _torch_csr(rows), dense, beta=0, out=out)
    return torch.from_numpy(np.asarray(rows @ dense.numpy(), dtype=np.float32))


class _CsrLinear(torch.autograd.Function):
    """``x @ W.T + W @ x0`` on the CPU for a scipy CSR ``x``, with the weight gradient.

    Both directions are CSR × dense products (``x @ W.T`` and ``x.T @ grad``) with
    the transpose of ``x`` supplied in CSR form, or, for a minibatch that fills more
    than :data:`DENSE_ABOVE_STEP` of its values, dense products of ``dense``, the
    minibatch densified once (:func:`_dense_rows`; bounded by the batch, never by the
    number of cells); the 3,000 × 256 weight is never copied (PyTorch's own
    autograd through a CSR product copies it several times per step). The kernels
    are PyTorch's MKL ones (2-3× faster than scipy's on 2 cores at 3,000 genes and
    4% non-zero values; :data:`CPU_CSR_KERNELS`). With ``zero_row`` (see
    :class:`SparseInput`) the last row of ``x`` is ``x0``: its output row is the
    ``W @ x0`` term, added to every cell's, and the gradient's extra row, the sum
    of the cells' gradients, makes the same products return that term's gradient
    (``x0 ⊗ Σ grad``); otherwise the term and its outer product are computed apart.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, zero_input: torch.Tensor | None,  # type: ignore[override]
                rows: sp.csr_matrix, rows_t: sp.csr_matrix | None, zero_row: bool = False,
                dense: torch.Tensor | None = None) -> torch.Tensor:
        ctx.rows, ctx.rows_t, ctx.zero_row, ctx.dense = rows, rows_t, zero_row, dense
        ctx.save_for_backward(zero_input)
        return _first_layer_product(weight.detach(), zero_input, rows, zero_row, dense)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (zero_input,) = ctx.saved_tensors
        rows_t = ctx.rows_t if ctx.rows_t is not None or ctx.dense is not None else ctx.rows.T.tocsr()
        return (_first_layer_weight_grad_t(rows_t, grad, zero_input, ctx.zero_row, ctx.dense).t(),
                None, None, None, None, None)


def _first_layer_product(weight: torch.Tensor, zero_input: torch.Tensor | None, rows: sp.csr_matrix,
                         zero_row: bool, dense: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + W @ x0`` for the offset rows ``x`` (:class:`_CsrLinear`'s forward, no bias); ``dense``
    is ``x`` densified (:func:`_dense_rows`), when it is."""
    # W.T is contiguous when the weight is stored transposed (training does); else one copy per batch
    if dense is not None:
        out = dense @ weight.t()
    else:
        out = _csr_times_dense(rows, weight.t().contiguous(), DENSE_ABOVE_FORWARD)
    if zero_row:
        cells = out[:-1]  # the leading rows: a contiguous view
        cells += out[-1]
        return cells
    if zero_input is not None:
        out += weight @ zero_input
    return out


def _first_layer_weight_grad_t(rows_t: sp.csr_matrix | None, grad: torch.Tensor, zero_input: torch.Tensor | None,
                               zero_row: bool, dense: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of :func:`_first_layer_product`'s weight, transposed (genes × hidden, contiguous);
    from ``dense`` (the rows densified) when given, else from the rows' transpose ``rows_t``."""
    if zero_row:
        grad = torch.cat([grad, grad.sum(0, keepdim=True)])
    if dense is not None:
        grad_w_t = dense.t() @ grad
    else:
        grad_w_t = _csr_times_dense(rows_t, grad.contiguous())
    if zero_input is not None and not zero_row:
        grad_w_t.addr_(zero_input, grad.sum(0))
    return grad_w_t


class _MixRows(torch.autograd.Function):
    """``weight * h + (1 - weight) * h[partner]`` per row, for a permutation ``partner`` (mixup).

    The gradient is gathered through the inverse permutation (``inverse``, computed
    here when not given) instead of scattered back (what autograd does for
    ``h[partner]``), which is the slower half of the step's mixing.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, partner: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                inverse: torch.Tensor | None = None) -> torch.Tensor:
        out, inverse, w = _mix_rows(h, partner, weight, inverse)
        ctx.save_for_backward(inverse, w)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        inverse, w = ctx.saved_tensors
        return _mix_rows_grad(grad, inverse, w), None, None, None


def _mix_rows(h: torch.Tensor, partner: torch.Tensor, weight: torch.Tensor,
              inverse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`_MixRows`'s value, with what its gradient needs: ``(mixed rows, inverse permutation,
    own weights as a column)``; the inverse is computed when not given."""
    w = weight.unsqueeze(1)
    if inverse is None:
        inverse = torch.empty_like(partner)
        inverse[partner] = torch.arange(len(partner), device=partner.device)
    return torch.lerp(h.index_select(0, partner), h, w), inverse, w


def _mix_rows_grad(grad: torch.Tensor, inverse: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gradient of :class:`_MixRows` at its input (``w``: the own weights as a column)."""
    own = grad * w
    return own.add_((grad - own).index_select(0, inverse))


def sparse_linear(x: SparseInput, layer: nn.Linear) -> torch.Tensor:
    """The first layer on a :class:`SparseInput`: exactly ``layer(dense x)``, without forming dense ``x``.

    On the CPU, :class:`_CsrLinear`; on a GPU, PyTorch's CSR kernels (cuSPARSE).
    """
    weight = layer.weight
    if weight.device.type == "cpu":
        # densified once for both products when training on a dense batch; prediction (no gradient)
        # multiplies by the forward product's own rule (DENSE_ABOVE_FORWARD)
        dense = _dense_rows(x.rows) if torch.is_grad_enabled() and weight.requires_grad else None
        out = _CsrLinear.apply(weight, x.zero_input, x.rows, x.rows_t, x.zero_row, dense)
    else:
        out = torch.sparse.mm(_torch_csr(x.rows, weight.device), weight.t())
        if x.zero_row:
            out = out[:-1] + out[-1]
        elif x.zero_input is not None:
            out = out + weight @ x.zero_input
    return out + layer.bias


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` whose CPU mask is drawn as ``uniform >= p``.

    The same distribution (each unit kept with probability ``1 - p`` and scaled by
    ``1 / (1 - p)``) from the same generator, but PyTorch's CPU ``bernoulli_`` takes
    about twice as long as ``rand``. Other devices use PyTorch's fused dropout.
    atlasmtl's own CPU training does not draw here: the minibatch worker draws the
    masks beside the step (:func:`dropout_keep`, :meth:`Encoder.after_first`); this
    path serves a network trained in a loop of one's own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand(x.shape, dtype=x.dtype, device=x.device).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * keep


def dropout_keep(rng: np.random.Generator, n_cells: int, width: int, p: float) -> np.ndarray:
    """A dropout mask drawn with NumPy: ``1 / (1 - p)`` where a unit is kept (probability ``1 - p``), else 0.

    The minibatch worker draws these beside the training step (the training loop then
    multiplies, :meth:`Encoder.after_first`), so that the step does not spend its time
    in PyTorch's CPU random number generator. float32, ``n_cells × width``.
    """
    keep = rng.random((n_cells, width), dtype=np.float32) >= np.float32(p)
    return np.multiply(keep, np.float32(1.0 / (1.0 - p)), dtype=np.float32)


class Encoder(nn.Module):
    """Stack of ``Linear → ReLU → Dropout`` blocks shared by every head."""

    def __init__(self, n_genes: int, hidden_sizes: Sequence[int], dropout_rate: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_genes
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(), Dropout(dropout_rate)]
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def dropout_widths(self) -> list[tuple[int, float]]:
        """``(units, rate)`` of each dropout layer, in order (the masks :meth:`after_first` takes)."""
        widths, width = [], 0
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                width = layer.out_features
            elif isinstance(layer, nn.Dropout):
                widths.append((width, float(layer.p)))
        return widths

    def after_first(self, h: torch.Tensor, dropout_keep: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The encoder from the first layer's output on; in training, with the given dropout masks
        (:func:`dropout_keep`, one per dropout layer) instead of the layers' own draws."""
        if dropout_keep is None or not self.training:
            return self.layers[1:](h)
        masks = iter(dropout_keep)
        for layer in self.layers[1:]:
            h = h * next(masks) if isinstance(layer, nn.Dropout) else layer(h)
        return h


class MultiTaskNetwork(nn.Module):
    """Encoder plus heads.

    Parameters
    ----------
    n_genes
        Input width (training genes).
    n_classes
        Number of classes per annotation level, coarse to fine.
    coord_dims
        Output width per coordinate target (name → dimensions).
    hidden_sizes, dropout_rate
        Encoder architecture.
    """

    def __init__(
        self,
        n_genes: int,
        n_classes: Sequence[int],
        coord_dims: dict[str, int],
        hidden_sizes: Sequence[int] = (256, 128),
        dropout_rate: float = 0.5,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(n_genes, hidden_sizes, dropout_rate)
        width = self.embedding_size = self.encoder.out_features
        self.label_heads = nn.ModuleList([nn.Linear(width, k) for k in n_classes])
        self.coord_heads = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dims))
                for name, dims in coord_dims.items()
            }
        )

    def forward(
        self, x: torch.Tensor | SparseInput, first_weight_t: torch.Tensor | None = None,
        mix: Sequence[torch.Tensor] | None = None, dropout_keep: Sequence[torch.Tensor] | None = None,
    ) -> NetworkOutput:
        """Return ``(embedding, logits per level, standardised coordinates per target)``.

        ``x`` is a dense tensor, a :class:`SparseInput` (training; any transform) or a
        sparse CSR tensor (inference with a transform that keeps zeros). For sparse
        input the first layer is a sparse × dense product; ``first_weight_t`` (the
        first layer's weight, transposed and contiguous, prepared once per prediction
        run) serves the CSR-tensor case. ``mix = (partner, weight)`` (training with
        mixup; :func:`atlasmtl.augment.mixup_pairs`) answers for the mixed inputs
        ``weight * x + (1 - weight) * x[partner]``: the first layer is linear, so its
        output is mixed, exactly the same without forming the mixed input.
        """
        first = self.encoder.layers[0]
        if isinstance(x, SparseInput):
            h = sparse_linear(x, first)
        elif x.layout == torch.sparse_csr:
            w_t = first.weight.t().contiguous() if first_weight_t is None else first_weight_t
            h = torch.sparse.mm(x, w_t) + first.bias
        else:
            h = first(x)
        if mix is not None:
            h = _MixRows.apply(h, *mix)
        z = self.encoder.after_first(h, dropout_keep)
        logits = [head(z) for head in self.label_heads]
        coords = {name: head(z) for name, head in self.coord_heads.items()}
        return NetworkOutput(z, logits, coords)

    def step_by_hand_fits(self, x: Any, dropout_keep: Sequence[torch.Tensor] | None) -> bool:
        """Whether :meth:`step_by_hand` can compute this training step: a CPU network without coordinate
        heads, whose encoder is ``Linear → ReLU → Dropout`` blocks, on a :class:`SparseInput` with its
        transpose, with the dropout masks given (or no dropout)."""
        layers = list(self.encoder.layers)
        blocks = len(layers) // 3
        return (isinstance(x, SparseInput) and (x.rows_t is not None or multiplies_densely(x.rows))
                and not self.coord_heads
                and self.encoder.layers[0].weight.device.type == "cpu"
                and len(layers) == 3 * blocks
                and all(isinstance(layers[3 * i], nn.Linear) and isinstance(layers[3 * i + 1], nn.ReLU)
                        and isinstance(layers[3 * i + 2], nn.Dropout) for i in range(blocks))
                and (dropout_keep is not None and len(dropout_keep) == blocks
                     or all(float(layers[3 * i + 2].p) == 0.0 for i in range(blocks))))

    def step_by_hand(
        self, x: SparseInput, logit_gradients: Any, mix: Sequence[torch.Tensor] | None = None,
        dropout_keep: Sequence[torch.Tensor] | None = None, first_weight_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One training step's forward and backward pass written out, without autograd; returns the loss.

        The same function and gradients as ``forward`` in training mode followed by ``backward``
        (to rounding), in about 30 tensor operations instead of autograd's ~100 recorded ones,
        which on 2 CPU cores are a fifth of a minibatch's time. Only where
        :meth:`step_by_hand_fits`. ``logit_gradients(logits)`` returns ``(loss, gradient of
        the loss at each level's logits)``. Sets every parameter's ``grad``; the first layer's
        goes to ``first_weight_t`` (the weight's contiguous transposed alias that training
        steps, :func:`atlasmtl.training_loop._first_layer_stored_transposed`) when given.
        """
        linears = [layer for layer in self.encoder.layers if isinstance(layer, nn.Linear)]
        first = linears[0]
        dense = _dense_rows(x.rows)
        h = _first_layer_product(first.weight.detach(), x.zero_input, x.rows, x.zero_row, dense)
        h += first.bias.detach()
        if mix is not None:
            h, inverse, w = _mix_rows(h, mix[0], mix[1], mix[2] if len(mix) > 2 else None)
        outputs = []  # each block's output (ReLU then dropout), the next layer's input
        for i, layer in enumerate(linears):
            if i:
                h = torch.addmm(layer.bias.detach(), h, layer.weight.detach().t())
            h = torch.relu(h)
            if dropout_keep is not None:
                h.mul_(dropout_keep[i])
            outputs.append(h)
        logits = [torch.addmm(head.bias.detach(), h, head.weight.detach().t()) for head in self.label_heads]
        loss, grads = logit_gradients(logits)
        grad = None
        for head, g in zip(self.label_heads, grads):
            head.weight.grad, head.bias.grad = g.t() @ h, g.sum(0)
            grad = g @ head.weight.detach() if grad is None else grad.addmm_(g, head.weight.detach())
        for i in range(len(linears) - 1, -1, -1):
            if dropout_keep is not None:
                grad.mul_(dropout_keep[i])
            grad = torch.ops.aten.threshold_backward(grad, outputs[i], 0)  # the ReLU: where its output is > 0
            if i:
                layer = linears[i]
                layer.weight.grad, layer.bias.grad = grad.t() @ outputs[i - 1], grad.sum(0)
                grad = grad @ layer.weight.detach()
        if mix is not None:
            grad = _mix_rows_grad(grad, inverse, w)
        first.bias.grad = grad.sum(0)
        grad_w_t = _first_layer_weight_grad_t(x.rows_t, grad, x.zero_input, x.zero_row, dense)
        if first_weight_t is not None:
            first_weight_t.grad, first.weight.grad = grad_w_t, None
        else:
            first.weight.grad = grad_w_t.t()
        return loss


#: Most members an ensemble may have (a bound on what a model file can make the loader build).
MAX_ENSEMBLE_SIZE = 64


class EnsembleNetwork(nn.Module):
    """Several :class:`MultiTaskNetwork` members, trained apart, answering as one (a deep ensemble).

    The logits per level are the log of the members' mean probability (so a
    temperature calibrates the ensemble as it does one network), the embedding
    is the members' L2-normalised embeddings side by side, scaled by
    ``1/sqrt(members)`` (its cosine similarity is the members' mean cosine
    similarity), and the coordinates are the members' mean.

    Parameters
    ----------
    members
        Networks of the same architecture.
    """

    def __init__(self, members: Sequence[MultiTaskNetwork]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        self.members = nn.ModuleList(members)
        self.embedding_size = sum(m.embedding_size for m in members)

    def forward(self, x: torch.Tensor | SparseInput, first_weight_t: torch.Tensor | None = None) -> NetworkOutput:
        """The members' combined answer for a batch (``first_weight_t`` is ignored: members differ)."""
        outs = [m(x) for m in self.members]
        k = len(outs)
        embedding = torch.cat([nn.functional.normalize(o.embedding, dim=1) for o in outs], dim=1) / math.sqrt(k)
        logits = [
            torch.logsumexp(torch.stack([torch.log_softmax(o.logits[j], dim=1) for o in outs]), dim=0) - math.log(k)
            for j in range(len(outs[0].logits))
        ]
        coords = {name: torch.stack([o.coords[name] for o in outs]).mean(dim=0) for name in outs[0].coords}
        return NetworkOutput(embedding, logits, coords)


def member_networks(net: nn.Module) -> list[MultiTaskNetwork]:
    """The :class:`MultiTaskNetwork` members of ``net`` (itself when it is a single network)."""
    return list(net.members) if isinstance(net, EnsembleNetwork) else [net]


def build_network(architecture: Mapping[str, Any]) -> MultiTaskNetwork | EnsembleNetwork:
    """The (untrained) network a model's ``metadata["architecture"]`` describes.

    ``ensemble_size`` (absent in models saved before ensembles: 1) members of
    ``n_genes`` inputs, ``n_classes`` per level, ``coord_dims`` coordinate heads,
    ``hidden_sizes`` and ``dropout_rate``.
    """
    def member() -> MultiTaskNetwork:
        return MultiTaskNetwork(architecture["n_genes"], architecture["n_classes"], architecture["coord_dims"],
                                architecture["hidden_sizes"], architecture["dropout_rate"])
    size = int(architecture.get("ensemble_size", 1))
    return member() if size == 1 else EnsembleNetwork([member() for _ in range(size)])
