"""The network: a shared encoder, one classification head per level, optional coordinate heads."""

from __future__ import annotations

from typing import NamedTuple, Sequence

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


class _ScipySparseLinear(torch.autograd.Function):
    """``x @ W.T + W @ x0`` on the CPU for a scipy CSR ``x``, with the weight gradient.

    Both directions are scipy CSR × dense products (``x @ W.T`` and ``x.T @ grad``);
    on 2 cores at 3,000 genes and 4% non-zero values this is 2-3× faster than
    PyTorch's CSR kernels, whose backward copies the weight several times per step.
    The ``W @ x0`` term's gradient (an outer product) is added into the same buffer.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, zero_input: torch.Tensor | None,  # type: ignore[override]
                rows: sp.csr_matrix, rows_t: sp.csr_matrix | None) -> torch.Tensor:
        ctx.rows, ctx.rows_t = rows, rows_t
        ctx.save_for_backward(zero_input)
        w_t = weight.detach().t().numpy()  # a view when the weight is stored transposed (training does)
        out = torch.from_numpy(np.asarray(rows @ w_t, dtype=np.float32))
        if zero_input is not None:
            out += weight.detach() @ zero_input
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (zero_input,) = ctx.saved_tensors
        grad = grad.contiguous()
        rows_t = ctx.rows_t if ctx.rows_t is not None else ctx.rows.T.tocsr()
        grad_w_t = torch.from_numpy(np.asarray(rows_t @ grad.numpy(), dtype=np.float32))  # genes × hidden
        if zero_input is not None:
            grad_w_t.addr_(zero_input, grad.sum(0))
        return grad_w_t.t(), None, None, None


def _torch_csr(rows: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    return torch.sparse_csr_tensor(
        torch.from_numpy(rows.indptr.astype(np.int64)), torch.from_numpy(rows.indices.astype(np.int64)),
        torch.from_numpy(np.asarray(rows.data, dtype=np.float32)), size=rows.shape,
    ).to(device)


def sparse_linear(x: SparseInput, layer: nn.Linear) -> torch.Tensor:
    """The first layer on a :class:`SparseInput`: exactly ``layer(dense x)``, without forming dense ``x``.

    On the CPU the products are scipy's; on a GPU, PyTorch's CSR kernels (cuSPARSE).
    """
    weight = layer.weight
    if weight.device.type == "cpu":
        out = _ScipySparseLinear.apply(weight, x.zero_input, x.rows, x.rows_t)
    else:
        out = torch.sparse.mm(_torch_csr(x.rows, weight.device), weight.t())
        if x.zero_input is not None:
            out = out + weight @ x.zero_input
    return out + layer.bias


class Encoder(nn.Module):
    """Stack of ``Linear → ReLU → Dropout`` blocks shared by every head."""

    def __init__(self, n_genes: int, hidden_sizes: Sequence[int], dropout_rate: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_genes
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout_rate)]
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


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
        dropout_rate: float = 0.3,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(n_genes, hidden_sizes, dropout_rate)
        width = self.encoder.out_features
        self.label_heads = nn.ModuleList([nn.Linear(width, k) for k in n_classes])
        self.coord_heads = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dims))
                for name, dims in coord_dims.items()
            }
        )

    def forward(
        self, x: torch.Tensor | SparseInput, first_weight_t: torch.Tensor | None = None
    ) -> NetworkOutput:
        """Return ``(embedding, logits per level, standardised coordinates per target)``.

        ``x`` is a dense tensor, a :class:`SparseInput` (training; any transform) or a
        sparse CSR tensor (inference with a transform that keeps zeros). For sparse
        input the first layer is a sparse × dense product; ``first_weight_t`` (the
        first layer's weight, transposed and contiguous, prepared once per prediction
        run) serves the CSR-tensor case.
        """
        if isinstance(x, SparseInput):
            z = self.encoder.layers[1:](sparse_linear(x, self.encoder.layers[0]))
        elif x.layout == torch.sparse_csr:
            first = self.encoder.layers[0]
            w_t = first.weight.t().contiguous() if first_weight_t is None else first_weight_t
            z = self.encoder.layers[1:](torch.sparse.mm(x, w_t) + first.bias)
        else:
            z = self.encoder(x)
        logits = [head(z) for head in self.label_heads]
        coords = {name: head(z) for name, head in self.coord_heads.items()}
        return NetworkOutput(z, logits, coords)
