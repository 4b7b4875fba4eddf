"""The network: a shared encoder, one classification head per level, optional coordinate heads."""

from __future__ import annotations

from typing import NamedTuple, Sequence

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
        self, x: torch.Tensor, first_weight_t: torch.Tensor | None = None
    ) -> NetworkOutput:
        """Return ``(embedding, logits per level, standardised coordinates per target)``.

        ``x`` may be a sparse CSR tensor (inference): the first layer is then a
        sparse × dense product with ``first_weight_t`` (the first layer's
        weight, transposed and contiguous, prepared once per prediction run).
        """
        if x.layout == torch.sparse_csr:
            first = self.encoder.layers[0]
            w_t = first.weight.t().contiguous() if first_weight_t is None else first_weight_t
            z = self.encoder.layers[1:](torch.sparse.mm(x, w_t) + first.bias)
        else:
            z = self.encoder(x)
        logits = [head(z) for head in self.label_heads]
        coords = {name: head(z) for name, head in self.coord_heads.items()}
        return NetworkOutput(z, logits, coords)
