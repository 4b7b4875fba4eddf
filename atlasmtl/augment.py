"""Training-time shift simulation: the reference made to look like other protocols and panels.

A query rarely has the reference's depth or gene panel: droplet protocols
detect a fraction of the genes of a plate protocol, and some genes are not
measured at all. During training, each minibatch of reference cells is turned
into pseudo-counts, and

- half of its cells are binomially thinned to a random fraction of their depth
  (log-uniform in ``[min_depth, 1]``), as sequencing a cell less deeply would;
- a random fraction (uniform in ``[0, max_gene_dropout]``) of the genes is set
  to zero for the whole batch, as a panel that lacks them would;
- optionally (``gene_scale_sd > 0``), every gene of the batch is multiplied by
  its own log-normal factor (log-sd uniform in ``[0, gene_scale_sd]``), as a
  protocol or species that captures each gene with its own efficiency would;
- optionally (``ambient_fraction > 0``), a share of the cells gains ambient RNA
  before thinning: counts drawn from the batch's pooled profile, a uniform
  ``[0, max_ambient]`` share of the cell's new depth, as the free-floating
  transcripts of a droplet protocol add them.

The network then sees the same cell types at many depths and panels and learns
features that survive both. Only training batches are augmented; the
reference embedding, validation loss and predictions use the cells as they are.

Mixup (:func:`mixup_pairs`; ``build_model(mixup_alpha=...)``) is the other
training-time change: each cell of a minibatch is mixed with another cell of the
same batch, ``λ x_i + (1 - λ) x_j`` in the network's input space, and its loss is
the same mixture of the two cells' losses (Zhang et al. 2018; as in scNym,
Kimmel & Kelley 2021). The network learns to answer between the reference's
types with probabilities in proportion, not to draw sharp boundaries through
the empty space where a shifted query's cells fall. The first layer is linear,
so the mixing is applied to its output (:class:`atlasmtl.network.MultiTaskNetwork`),
which is the same and costs nothing of the sparse input's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from .inputs import pseudo_counts


@dataclass(frozen=True)
class ShiftAugmentation:
    """How strongly training batches are shifted (see the module docstring).

    Attributes
    ----------
    thin_fraction
        Share of the cells in a batch that are thinned.
    min_depth
        A thinned cell keeps a log-uniform fraction of its counts in ``[min_depth, 1]``.
    max_gene_dropout
        Each batch loses a uniform ``[0, max_gene_dropout]`` fraction of its genes.
    gene_scale_sd
        Each batch's genes are scaled by ``exp(N(0, s))`` with ``s`` uniform in
        ``[0, gene_scale_sd]`` (0 = off).
    ambient_fraction
        Share of the cells in a batch that gain ambient RNA (0 = off): Poisson(``a``)
        counts, each of a gene drawn from the batch's pooled counts, with ``a`` the
        cell's depth × ``ρ / (1 − ρ)``, so that ``ρ`` of its new depth is ambient.
    max_ambient
        ``ρ`` is uniform in ``[0, max_ambient]`` (< 1).
    """

    thin_fraction: float = 0.5
    min_depth: float = 0.1
    max_gene_dropout: float = 0.3
    gene_scale_sd: float = 0.0
    ambient_fraction: float = 0.0
    max_ambient: float = 0.3


def mixup_pairs(n_cells: int, alpha: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mixup partners and weights for a minibatch of ``n_cells``.

    Parameters
    ----------
    n_cells
        Cells in the minibatch.
    alpha
        Beta(alpha, alpha) concentration (> 0); smaller mixes less.
    rng
        Random generator (the training's own).

    Returns
    -------
    partner
        Row of each cell's partner in the batch (a random permutation; int64).
    weight
        Each cell's own weight ``λ = max(b, 1 - b)``, ``b ~ Beta(alpha, alpha)``
        (float32, in ``[0.5, 1]``): the cell stays the larger part of its mixture.
    """
    partner = rng.permutation(n_cells).astype(np.int64)
    b = rng.beta(alpha, alpha, size=n_cells)
    return partner, np.maximum(b, 1.0 - b).astype(np.float32)


def simulate_shift(block: Any, semantics: str, rng: np.random.Generator,
                   config: ShiftAugmentation = ShiftAugmentation()) -> sp.csr_matrix:
    """A shifted copy of a reference row block, as counts (thinned cells, unmeasured genes).

    Parameters
    ----------
    block
        Rows of the reference matrix (sparse or dense), in the reference's semantics.
    semantics
        What the rows hold (``"counts"``, ``"lognorm"`` or ``"other"``).
    rng
        Random generator (the training's own, so a seed reproduces the run).
    config
        Augmentation strengths.

    Returns
    -------
    scipy.sparse.csr_matrix
        Counts of the same shape; feed them to the model with ``"counts"`` semantics.
    """
    counts = pseudo_counts(block, semantics)
    n_cells, n_genes = counts.shape
    if config.ambient_fraction > 0 and counts.nnz:
        counts = add_ambient(counts, rng, config.ambient_fraction, config.max_ambient)
    if config.thin_fraction > 0 and counts.nnz:
        thinned = rng.random(n_cells) < config.thin_fraction
        depth = np.exp(rng.uniform(np.log(config.min_depth), 0.0, size=int(thinned.sum())))
        lengths = np.diff(counts.indptr)
        values = np.repeat(thinned, lengths)  # the thinned cells' stored values (the others keep theirs)
        counts.data[values] = rng.binomial(counts.data[values].astype(np.int64), np.repeat(depth, lengths[thinned]))
    if config.max_gene_dropout > 0 and counts.nnz:
        lost = rng.random(n_genes) < rng.uniform(0.0, config.max_gene_dropout)
        counts.data[lost[counts.indices]] = 0.0
    if config.gene_scale_sd > 0 and counts.nnz:
        sd = rng.uniform(0.0, config.gene_scale_sd)
        counts.data *= np.exp(rng.normal(0.0, sd, size=n_genes)).astype(np.float32)[counts.indices]
    counts.eliminate_zeros()
    return counts


def add_ambient(counts: sp.csr_matrix, rng: np.random.Generator, fraction: float, max_share: float) -> sp.csr_matrix:
    """Counts with ambient RNA added to a random ``fraction`` of the cells, from the rows' own pool.

    Parameters
    ----------
    counts
        Cells × genes counts (CSR; not modified).
    rng
        Random generator.
    fraction
        Share of the cells that are contaminated.
    max_share
        A contaminated cell's ambient share ``ρ`` of its new depth is uniform in ``[0, max_share]``.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``counts`` plus, for each contaminated cell, Poisson(depth × ρ / (1 − ρ)) counts whose genes are drawn
        in proportion to the rows' pooled counts (the "soup" of SoupX and CellBender).
    """
    n_cells, n_genes = counts.shape
    pool = np.cumsum(np.asarray(counts.sum(axis=0), dtype=np.float64).ravel())
    cells = np.flatnonzero(rng.random(n_cells) < fraction)
    rho = rng.uniform(0.0, max_share, size=len(cells))
    depth = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()[cells]
    n_added = rng.poisson(depth * rho / (1.0 - rho))
    genes = np.searchsorted(pool, rng.random(int(n_added.sum())) * pool[-1], side="right")
    added = sp.csr_matrix((np.ones(len(genes), dtype=np.float32), (np.repeat(cells, n_added), genes)),
                          shape=(n_cells, n_genes))  # a gene drawn twice for a cell is summed
    return sp.csr_matrix(counts + added, dtype=np.float32)
