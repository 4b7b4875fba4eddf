"""Training: ``build_model`` fits the shared encoder, label heads and coordinate heads.

:func:`build_model` = :func:`prepare_reference` (checks, labels, coordinates;
the matrix checks are the ones :func:`atlasmtl.predict` runs) → :func:`fit`
(the epoch loop) → :func:`embed_reference` (the KNN space) → :func:`describe`
(the model's metadata).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.metadata
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn
from torch.optim.adamw import adamw as functional_adamw  # no torch._dynamo import, unlike the class

from ._version import __version__
from .artifacts import REFERENCE_STORAGE, new_model_id
from .calls import UNKNOWN, check_writeback_names
from .augment import ShiftAugmentation, mixup_pairs, simulate_shift
from .batch_worker import CsrSlots, forked_prefetch, max_batch_nonzeros, prefetch, use_worker_process
from .exceptions import CoordinateError, InputError, LabelError, ParameterError, TrainingError, user_stacklevel
from .genes import (
    GENE_SELECTIONS,
    INPUT_TRANSFORMS,
    GeneAligner,
    alternative_ids,
    detect_namespace,
    reference_gene_statistics,
    selection_aligner,
)
from .io import open_anndata
from .inputs import (
    MatrixSource,
    ReferenceTable,
    check_finite,
    checked_semantics,
    get_matrix_source,
    h5ad_reference_source,
)
from .calibration import calibration_split, expected_calibration_error, fit_temperature, softmax
from .hierarchy import decode_paths, level_paths
from .knn import (
    EmbeddingFile,
    ReferenceSearch,
    agreement_cells,
    index_reference,
    neighbour_label_agreement,
    normalise_rows,
    row_number_dtype,
)
from .novelty import NOVELTY_K, fit_input_view, log_distance, null_summary
from .validation import as_bool, as_choice, as_float, as_int, as_int_list, as_random_state
from .model import TrainedModel
from . import distributed as _dist
from .network import (MAX_ENSEMBLE_SIZE, EnsembleNetwork, MultiTaskNetwork, SparseInput, dropout_keep,
                      multiplies_densely)
from .runtime import (
    ResourceMonitor,
    available_cpus,
    format_sections,
    gpu_name,
    progress,
    release_freed_memory,
    resolve_device,
    resolve_flag,
    resolve_num_threads,
    torch_threads,
)



#: ``build_model(n_top_genes=...)``'s default: how many of the reference's genes the network reads
#: (``None``: every gene); ``gene_selection`` says which.
N_TOP_GENES: int | None = 5000
#: learning-rate schedules of :func:`build_model` (``lr_schedule``)
LR_SCHEDULES = ("constant", "cosine")
#: ``ensemble_size="auto"``: at most this many members ...
AUTO_ENSEMBLE_MAX = 10
#: ... and no more than fit this many training cells in all (one pass of every member), so an
#: automatic ensemble never costs more to train than one network on this many cells.
AUTO_ENSEMBLE_CELLS = 100_000


def checked_ensemble_size(ensemble_size: Any) -> int | str:
    """``"auto"`` or an integer ≥ 1, else a :class:`ParameterError`."""
    if isinstance(ensemble_size, str):
        if ensemble_size == "auto":
            return "auto"
        raise ParameterError(f"ensemble_size={ensemble_size!r} must be 'auto' or an integer ≥ 1.")
    return as_int("ensemble_size", ensemble_size, maximum=MAX_ENSEMBLE_SIZE)


def resolve_ensemble_size(ensemble_size: int | str, n_train_cells: int) -> int:
    """Members of the ensemble: ``ensemble_size`` itself, or for ``"auto"``
    ``AUTO_ENSEMBLE_CELLS // n_train_cells`` clipped to ``[1, AUTO_ENSEMBLE_MAX]``."""
    if ensemble_size == "auto":
        return int(min(AUTO_ENSEMBLE_MAX, max(1, AUTO_ENSEMBLE_CELLS // max(n_train_cells, 1))))
    return int(ensemble_size)


def check_training_parameters(**p: Any) -> dict[str, Any]:
    """Check every training parameter up front; returns them as plain Python values."""
    return {
        "batch_size": as_int("batch_size", p["batch_size"]),
        "num_epochs": as_int("num_epochs", p["num_epochs"]),
        "dropout_rate": as_float("dropout_rate", p["dropout_rate"], 0.0, 1.0, high_open=True),
        "learning_rate": as_float("learning_rate", p["learning_rate"], 0.0, low_open=True),
        "weight_decay": as_float("weight_decay", p["weight_decay"], 0.0),
        "lr_schedule": as_choice("lr_schedule", p["lr_schedule"], LR_SCHEDULES),
        "min_steps": as_int("min_steps", p["min_steps"], 0),
        "label_smoothing": as_float("label_smoothing", p["label_smoothing"], 0.0, 1.0, high_open=True),
        "class_weight_power": as_float("class_weight_power", p["class_weight_power"], 0.0, 1.0),
        "val_fraction": as_float("val_fraction", p["val_fraction"], 0.0, 1.0, high_open=True),
        "calibration_fraction": as_float("calibration_fraction", p["calibration_fraction"], 0.0, 1.0, high_open=True),
        "early_stopping_patience": as_int("early_stopping_patience", p["early_stopping_patience"], allow_none=True),
        "hidden_sizes": as_int_list("hidden_sizes", p["hidden_sizes"]),
        "n_top_genes": as_int("n_top_genes", p["n_top_genes"], allow_none=True),
        "gene_selection": as_choice("gene_selection", p["gene_selection"], GENE_SELECTIONS),
        "reference_storage": as_choice("reference_storage", p["reference_storage"], REFERENCE_STORAGE),
        "input_transform": as_choice("input_transform", p["input_transform"], INPUT_TRANSFORMS),
        "use_raw": as_bool("use_raw", p["use_raw"]),
        "augment": as_bool("augment", p["augment"]),
        "mixup_alpha": as_float("mixup_alpha", p["mixup_alpha"], 0.0),
        "ensemble_size": checked_ensemble_size(p["ensemble_size"]),
    }


def encode_labels(adata: ad.AnnData | ReferenceTable, label_columns: Sequence[str]) -> tuple[dict[str, list[str]], np.ndarray, dict]:
    """Integer codes (n_cells × n_levels, int32, -1 = unlabelled) and class names per level."""
    if isinstance(label_columns, str):
        label_columns = [label_columns]
    if not label_columns:
        raise LabelError("label_columns is empty; name at least one obs column holding reference labels.")
    if len(set(label_columns)) != len(label_columns):
        raise LabelError(f"label_columns={list(label_columns)} names a column twice.")
    classes: dict[str, list[str]] = {}
    codes = np.full((adata.n_obs, len(label_columns)), -1, dtype=np.int32)  # 4 bytes per cell and level
    unlabelled: dict[str, int] = {}
    for j, col in enumerate(label_columns):
        if col not in adata.obs.columns:
            available = adata.obs_columns if isinstance(adata, ReferenceTable) else list(adata.obs.columns)
            raise LabelError(
                f"Label column {col!r} is not in adata.obs; available columns: {available[:20]}."
            )
        values = adata.obs[col]
        missing = values.isna().to_numpy()
        if missing.all():
            raise LabelError(f"Label column {col!r} holds no labels (all values are NaN); fill it or drop the level.")
        if isinstance(values.dtype, pd.CategoricalDtype):  # from its codes: no string per cell
            level_codes, names = _categorical_codes(values.cat.codes.to_numpy(), values.cat.categories)
        else:
            cat = pd.Categorical(values.astype(str).where(~missing))
            level_codes, names = cat.codes, [str(c) for c in cat.categories]
        if UNKNOWN in names:
            raise LabelError(
                f"Label column {col!r} has a class named {UNKNOWN!r}, which atlasmtl reserves for the cells it "
                f"abstains on. Rename the class (e.g. 'Unassigned') or set those cells' label to NaN so they do "
                "not count for this level."
            )
        if len(names) < 2:
            raise LabelError(
                f"Label column {col!r} has a single class ({names[0]!r}); a classifier needs at least two. "
                "Drop this level or use a finer annotation."
            )
        classes[col] = names
        codes[:, j] = level_codes
        unlabelled[col] = int(missing.sum())
    return classes, codes, unlabelled


def _categorical_codes(codes: np.ndarray, categories: pd.Index) -> tuple[np.ndarray, list[str]]:
    """Codes and class names of a categorical label column, as ``pd.Categorical(values.astype(str))`` gives them
    (the categories in use, as strings, sorted; -1 = missing), computed from its codes."""
    used = np.flatnonzero(np.bincount(codes[codes >= 0], minlength=len(categories)))
    names, inverse = np.unique(np.array([str(c) for c in categories[used]], dtype=object), return_inverse=True)
    lookup = np.full(len(categories), -1, dtype=np.int32)
    lookup[used] = inverse.ravel()
    return np.where(codes >= 0, lookup[np.maximum(codes, 0)], -1), [str(c) for c in names]


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


def infer_hierarchy(label_columns: Sequence[str], classes: dict, codes: np.ndarray) -> dict[str, dict[str, str]]:
    """For each level whose labels nest in the previous level's, map child → parent label
    (pairs in order of first appearance). Cells are read in chunks of :data:`_HIERARCHY_CHUNK`
    (one int64 key per cell of a chunk), so the temporaries do not grow with the reference."""
    hierarchy: dict[str, dict[str, str]] = {}
    for j in range(1, len(label_columns)):
        n_parents = len(classes[label_columns[j - 1]])
        first: dict[int, tuple[int, int]] = {}  # pair key -> (chunk start, position in the chunk's labelled cells)
        for start in range(0, len(codes), _HIERARCHY_CHUNK):
            block = codes[start : start + _HIERARCHY_CHUNK]
            both = (block[:, j] >= 0) & (block[:, j - 1] >= 0)
            keys, at = np.unique(block[both, j].astype(np.int64) * n_parents + block[both, j - 1], return_index=True)
            for key, pos in zip(keys.tolist(), at.tolist()):
                first.setdefault(key, (start, pos))
        keys = np.array(sorted(first, key=first.__getitem__), dtype=np.int64)
        child, parent = keys // n_parents, keys % n_parents
        if len(keys) and len(np.unique(child)) == len(child):
            parent_names, child_names = classes[label_columns[j - 1]], classes[label_columns[j]]
            hierarchy[label_columns[j]] = {child_names[c]: parent_names[p] for c, p in zip(child.tolist(), parent.tolist())}
    return hierarchy


#: Cells per chunk when :func:`infer_hierarchy` reads the label codes.
_HIERARCHY_CHUNK = 262_144


def _members(cells: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """``np.isin(cells, subset)`` for sorted ``cells`` holding every row of ``subset`` (no sort of both arrays)."""
    flag = np.zeros(len(cells), dtype=bool)
    flag[np.searchsorted(cells, subset)] = True
    return flag


def _numeric_coordinates(values: Any, what: str) -> np.ndarray:
    """Coordinates (cells × dims) as float64, from an array, a DataFrame or a sparse matrix."""
    if sp.issparse(values):
        values = values.toarray()  # cells × a few dimensions: small
    try:
        return np.asarray(values.to_numpy() if isinstance(values, pd.DataFrame) else values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CoordinateError(f"{what} does not hold numbers ({exc}); pass a numeric cells × dims array.") from None


def _coordinate_targets(adata: ad.AnnData | ReferenceTable, coord_targets: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    if coord_targets is None:
        return {}
    if not isinstance(coord_targets, Mapping):
        raise ParameterError("coord_targets must be a dict of name → obsm key, e.g. {'umap': 'X_umap'}.")
    out = {}
    for name, key in coord_targets.items():
        if isinstance(key, str):
            if key not in adata.obsm:
                raise CoordinateError(
                    f"coord_targets[{name!r}] = {key!r} is not in adata.obsm; available keys: {list(adata.obsm.keys())}."
                )
            values = _numeric_coordinates(adata.obsm[key], f"coord_targets[{name!r}] = adata.obsm[{key!r}]")
        else:
            values = _numeric_coordinates(key, f"coord_targets[{name!r}]")
        if values.ndim != 2 or values.shape[0] != adata.n_obs:
            raise CoordinateError(
                f"coord_targets[{name!r}] has shape {values.shape}; it needs one row per cell ({adata.n_obs} rows)."
            )
        if not np.isfinite(values).all():
            raise CoordinateError(
                f"coord_targets[{name!r}] holds NaN or infinite values; compute the embedding for every cell first."
            )
        out[str(name)] = values
    return out


def build_model(
    adata: ad.AnnData | str | os.PathLike,
    label_columns: Sequence[str],
    coord_targets: Mapping[str, str] | None = None,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    n_top_genes: int | None = N_TOP_GENES,
    gene_selection: str = "variable+labels",
    hidden_sizes: Sequence[int] = (256, 128),
    dropout_rate: float = 0.5,
    batch_size: int = 256,
    num_epochs: int = 40,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    min_steps: int = 0,
    label_smoothing: float = 0.1,
    class_weight_power: float = 0.5,
    input_transform: str = "zscore",
    augment: bool = True,
    mixup_alpha: float = 0.4,
    ensemble_size: int | str = "auto",
    val_fraction: float = 0.0,
    calibration_fraction: float = 0.2,
    early_stopping_patience: int | None = None,
    reference_storage: str = "external",
    num_threads: int | str = 10,
    device: str = "auto",
    show_progress: bool | None = None,
    show_summary: bool | None = None,
    random_state: int = 0,
    distributed: bool = False,
) -> TrainedModel | None:
    """Train an atlasmtl model on a labelled reference.

    Parameters
    ----------
    adata
        Reference AnnData (in memory or backed), or the path to an ``.h5ad`` file; cells × genes,
        raw counts or log-normalised values. A path or a backed AnnData is trained from disk: only
        ``obs`` (and the ``obsm`` coordinate targets) are loaded, and each epoch reads the matrix in
        contiguous blocks of cells in random order, mixing several blocks in memory
        (block-shuffled sampling), so memory stays flat however many cells the file holds.
    label_columns
        ``obs`` columns with the annotation levels, coarse to fine (one or more).
        Cells with NaN at a level do not contribute to that level's loss.
    coord_targets
        Name → ``obsm`` key of reference coordinates to regress (e.g.
        ``{"latent": "X_ref_latent", "umap": "X_umap"}``); ``None`` for none.
    layer
        Read expression values from ``adata.layers[layer]`` instead of ``X``.
    use_raw
        Read expression values (and genes) from ``adata.raw`` instead of ``X``.
    n_top_genes
        Train on ``n_top_genes`` of the reference's genes, chosen by ``gene_selection``; the most
        variable are ranked by scanpy's ``flavor="seurat"``
        ranking (:func:`atlasmtl.genes.highly_variable_genes`, computed on the labelled cells in one
        streaming pass; each cell is still normalised over all its genes). A reference with no more
        genes keeps them all, as does ``None``. The genes not kept are not read from a query either:
        the model's genes are the kept ones. Evidence for the default in
        ``documents/design/api_contract.md`` ("Gene selection").
    gene_selection
        How the ``n_top_genes`` genes are chosen. ``"variable+labels"``: three quarters are the
        most variable (as above; :data:`atlasmtl.genes.LABEL_GENE_SHARE` = 0.25 are not), the rest
        the genes whose log1p values differ most between the finest level's labels (one-way ANOVA F
        statistic, as :func:`sklearn.feature_selection.f_classif`, from per-label sums of the same
        streaming pass). ``"variable"``: the most variable only
        (the default until 2026-12-04). Evidence in ``documents/design/api_contract.md``
        ("Genes that tell the labels apart").
    hidden_sizes
        Encoder layer widths (each ``Linear → ReLU → Dropout``).
    dropout_rate
        Dropout after each encoder layer.
    batch_size
        Cells per training minibatch.
    num_epochs
        Passes over the reference.
    learning_rate
        AdamW learning rate (the peak one with ``lr_schedule="cosine"``).
    weight_decay
        AdamW's decoupled weight decay (0 = plain Adam).
    lr_schedule
        ``"constant"`` or ``"cosine"`` (annealed per optimiser step from
        ``learning_rate`` to 0 over the whole run).
    min_steps
        Least number of optimiser steps: a small reference (few minibatches per
        epoch) is trained for more than ``num_epochs`` epochs until it gets this
        many steps; a large one is not affected. 0 disables.
    label_smoothing
        Cross-entropy label smoothing; keeps confidences from saturating, which
        makes them rank novel cells (unseen types) below known ones. 0 disables.
    class_weight_power
        Class weights ∝ (1 / class frequency) ** power, normalised to mean 1 over
        the cells: 0 = unweighted, 1 = fully balanced, 0.5 (default) helps rare
        types without distorting calibration much.
    input_transform
        ``"zscore"`` (log1p of counts per 10k, each gene standardised with the
        reference's mean and standard deviation and clipped to ±10), ``"float"``
        (log1p of counts per 10k) or ``"binary"`` (x > 0). ``"zscore"`` is the
        most robust to platform, depth, condition and species shifts in the
        project's benchmark (``documents/design/api_contract.md``).
    augment
        Train on shifted copies of the reference batches (binomial thinning of
        half the cells to 10–100% of their depth, a random 0–30% of genes
        unmeasured; :mod:`atlasmtl.augment`), so the network learns features that
        survive depth and gene-panel differences. ``False`` trains on the cells as they are.
    mixup_alpha
        Mixup (:func:`atlasmtl.augment.mixup_pairs`): each training cell is mixed
        with another cell of its minibatch, ``λ x_i + (1 - λ) x_j`` with
        ``λ = max(b, 1 - b)``, ``b ~ Beta(mixup_alpha, mixup_alpha)``, and learns the
        same mixture of the two cells' labels at every level. Smaller mixes less;
        ``0`` turns it off. The default (0.4) is chosen on the project's 15-case
        benchmark (``documents/design/api_contract.md``).
    ensemble_size
        Networks trained apart (own initialisation, minibatch order and dropout)
        and combined (:class:`~atlasmtl.network.EnsembleNetwork`: mean
        probability, side-by-side embedding for KNN and novelty, mean
        coordinates). ``"auto"`` (default) uses 100,000 // training cells members,
        between 1 and 10: ten up to 10,000 cells, where one network's accuracy
        depends most on its seed, one above 50,000 cells, so an automatic ensemble
        never trains longer than one network on 100,000 cells. An integer (1–64) fixes it.
    val_fraction
        Fraction of cells held out to monitor validation loss. When > 0, these
        cells also calibrate the model (see ``calibration_fraction``).
    calibration_fraction
        With ``val_fraction=0``: fraction of the cells of each finest-level class
        held out of training (classes under ``1 / calibration_fraction`` cells keep
        all theirs; at most 5,000 cells in all) to calibrate the model: one
        temperature per level, fitted on their logits, makes the confidence
        match accuracy, and their distances to the training cells of their
        predicted class are the null for the novelty score. The held-out cells
        join the KNN reference. 0 disables both (temperature 1, no novelty score).
    early_stopping_patience
        Stop after this many epochs without validation improvement (``None`` disables).
    reference_storage
        ``"external"`` (separate reference file) or ``"full"`` (inside the metadata file) when saving.
    num_threads
        CPU threads (capped at the CPUs available; ``"max"`` = 80% of them). During the
        epoch loop one of them prepares the next minibatch and PyTorch uses the rest.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    show_progress
        Epoch progress bar with ETA on stderr; ``None`` = on in a notebook or an interactive terminal.
    show_summary
        Print a compact summary at the end; ``None`` = on in a notebook or an interactive terminal.
    random_state
        Seed for initialisation, shuffling and dropout.
    distributed
        Train data-parallel across the processes ``torchrun`` started
        (:class:`torch.nn.parallel.DistributedDataParallel`; gloo on CPUs, NCCL on
        GPUs, one GPU per process): each process streams its own contiguous shard of
        the training cells and the gradients are averaged every step. Call it the
        same way in every process; pass the ``.h5ad`` path so each reads only its
        shard. ``num_threads`` is shared among the processes of a machine.

    Returns
    -------
    TrainedModel or None
        The model; with ``distributed=True``, only on rank 0 (the process that
        should save it); the other ranks get ``None``.
    """
    if isinstance(adata, (str, os.PathLike)):  # train from disk: labels in memory, the matrix read per block
        args = {k: v for k, v in locals().items() if k != "adata"}
        keys = [v for v in (coord_targets or {}).values() if isinstance(v, str)] if isinstance(coord_targets, Mapping) else []
        columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
        with h5ad_reference_source(adata, layer=layer, use_raw=use_raw, obsm_keys=keys, obs_keys=columns) as (lite, source):
            return build_model(_ReferenceOnDisk(lite, source), **args)
    p = check_training_parameters(
        batch_size=batch_size,
        num_epochs=num_epochs,
        dropout_rate=dropout_rate,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        lr_schedule=lr_schedule,
        min_steps=min_steps,
        label_smoothing=label_smoothing,
        class_weight_power=class_weight_power,
        val_fraction=val_fraction,
        calibration_fraction=calibration_fraction,
        early_stopping_patience=early_stopping_patience,
        hidden_sizes=hidden_sizes,
        n_top_genes=n_top_genes,
        gene_selection=gene_selection,
        reference_storage=reference_storage,
        input_transform=input_transform,
        use_raw=use_raw,
        augment=augment,
        mixup_alpha=mixup_alpha,
        ensemble_size=ensemble_size,
    )
    batch_size, num_epochs, hidden_sizes = p["batch_size"], p["num_epochs"], p["hidden_sizes"]
    dropout_rate, learning_rate, label_smoothing = p["dropout_rate"], p["learning_rate"], p["label_smoothing"]
    class_weight_power, val_fraction, calibration_fraction = p["class_weight_power"], p["val_fraction"], p["calibration_fraction"]
    early_stopping_patience, reference_storage = p["early_stopping_patience"], p["reference_storage"]
    input_transform, use_raw, augment = p["input_transform"], p["use_raw"], p["augment"]
    mixup_alpha = p["mixup_alpha"]
    weight_decay, lr_schedule, min_steps = p["weight_decay"], p["lr_schedule"], p["min_steps"]
    random_state, seed = as_random_state(random_state)
    distributed = as_bool("distributed", distributed)
    dev = _dist.init_from_env(device=device) if distributed else resolve_device(device)
    n_threads = resolve_num_threads(num_threads)
    if distributed and dev.type == "cpu":  # the processes of one machine share its cores
        n_threads = max(1, min(n_threads, available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    show_progress, show_summary = resolve_flag(show_progress), resolve_flag(show_summary)
    if isinstance(adata, _ReferenceOnDisk):
        adata, source = adata.table, adata.source
    else:
        adata, source = open_anndata(adata), None

    t_prepare = time.perf_counter()
    ref = prepare_reference(adata, label_columns, coord_targets, layer=layer, use_raw=use_raw,
                            input_transform=input_transform, source=source, n_top_genes=p["n_top_genes"],
                            gene_selection=p["gene_selection"])
    phase_seconds = {"prepare": time.perf_counter() - t_prepare}
    rng = np.random.default_rng(seed)
    n_val = int(round(len(ref.cells) * val_fraction))
    if n_val >= len(ref.cells):
        raise ParameterError(
            f"val_fraction={val_fraction} holds out all {len(ref.cells)} labelled reference cells, leaving none to "
            "train on; use a smaller val_fraction (e.g. 0.1)."
        )
    perm = rng.permutation(ref.cells)
    val_cells, train_cells = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    del perm
    if n_val:
        calib_cells, calib_source = val_cells, "validation cells (val_fraction)"
    else:
        held = calibration_split(ref.codes[train_cells, -1], calibration_fraction, rng)
        calib_cells, train_cells = train_cells[held], train_cells[~held]
        calib_source = "calibration split (calibration_fraction, stratified by the finest level)"
    if early_stopping_patience is not None and n_val == 0:
        warnings.warn("early_stopping_patience is set but val_fraction is 0: early stopping is disabled.", stacklevel=user_stacklevel())
    augmentation = ShiftAugmentation() if augment else None
    release_freed_memory()  # each phase's temporaries would otherwise stay in the C heap under the next's
    objective = _Objective(ref, train_cells, class_weight_power, label_smoothing, dev, augmentation, rng, mixup_alpha)

    monitor = ResourceMonitor(dev)
    t_start = time.perf_counter()
    with torch_threads(n_threads), torch.random.fork_rng(devices=[]), monitor:
        n_members = resolve_ensemble_size(p["ensemble_size"], len(train_cells))
        members, history = [], []
        for member in range(n_members):  # member 0 is the network a single-network model would have
            torch.manual_seed(seed + 1_000_003 * member)
            net = MultiTaskNetwork(
                ref.n_genes,
                [len(ref.classes[c]) for c in ref.label_columns],
                {n: values.shape[1] for n, values in ref.coords.items()},
                hidden_sizes,
                dropout_rate,
            ).to(dev)
            if distributed:  # each rank draws its own dropout masks (on a GPU; on the CPU fit's generators do)
                torch.manual_seed(seed + 1_000_003 * member + 7919 * _dist.rank())
            # the prefetch thread prepares the next minibatch on a core of its own
            with torch_threads(max(1, n_threads - 1)):
                records = fit(net, objective, train_cells, val_cells, rng, batch_size=batch_size, num_epochs=num_epochs,
                              learning_rate=learning_rate, weight_decay=weight_decay, lr_schedule=lr_schedule,
                              min_steps=min_steps, early_stopping_patience=early_stopping_patience,
                              show_progress=show_progress and _dist.is_main_process())
            history += [dict(r, member=member) for r in records] if n_members > 1 else records
            members.append(net)
        net = members[0] if n_members == 1 else EnsembleNetwork(members).eval()
        if not _dist.is_main_process():
            return None  # rank 0 embeds the reference, calibrates and returns the model
        phase_seconds["fit"] = time.perf_counter() - t_start
        release_freed_memory()
        # the float32 rows kept: the held-out cells (calibration) and the agreement diagnostic's cells
        calib_pos = np.searchsorted(ref.cells, calib_cells)
        fine_codes = ref.codes[ref.cells, -1]
        agreement_at = agreement_cells(fine_codes, k=15, max_cells=2000, random_state=seed % 2**32)
        pool = agreement_at[0] if agreement_at is not None else np.zeros(0, dtype=np.int64)
        keep = np.union1d(calib_pos, pool)
        embedding, kept, logits = embed_reference(net, ref, dev, keep)
        phase_seconds["embed"] = time.perf_counter() - t_start - phase_seconds["fit"]
        release_freed_memory()
        t_index = time.perf_counter()
        reference = index_reference(
            {"embedding": embedding,
             "labels": {c: ref.codes[ref.cells, j].astype(np.int32, copy=False) for j, c in enumerate(ref.label_columns)},
             "training_cell": _members(ref.cells, train_cells)},
            ref.label_columns, random_state=seed % 2**32)
        del embedding  # the indexed reference holds its own copy (in list order)
        # on disk, calibration searches the temporary file list by list (nothing stays mapped);
        # the model keeps a read-only memory map of it
        search = ReferenceSearch(reference, ref.label_columns)
        release_freed_memory()
        index_seconds = time.perf_counter() - t_index
        phase_seconds["index"] = index_seconds
        at = np.searchsorted(keep, calib_pos)
        calibration, novelty = calibrate(ref, kept[at], [lg[at] for lg in logits], train_cells, calib_cells, search,
                                         random_state=seed % 2**32)
        on_disk = isinstance(reference["embedding"], EmbeddingFile)
        if on_disk:
            reference = dict(reference, embedding=reference["embedding"].finish())
    train_seconds = time.perf_counter() - t_start
    phase_seconds["calibrate"] = train_seconds - phase_seconds["fit"] - phase_seconds["embed"] - phase_seconds["index"]
    t_agreement = time.perf_counter()
    epochs_done = max(r["epoch"] for r in history)
    agreement = neighbour_label_agreement(kept[np.searchsorted(keep, pool)], fine_codes, k=15, max_cells=2000,
                                          random_state=seed % 2**32, pool_only=True)
    phase_seconds["neighbour_label_agreement"] = time.perf_counter() - t_agreement

    train_config = {
        "label_columns": ref.label_columns,
        "coord_targets": {k: (v if isinstance(v, str) else "<array>") for k, v in (coord_targets or {}).items()},
        "layer": layer,
        "use_raw": use_raw,
        "n_top_genes": p["n_top_genes"],
        "gene_selection": p["gene_selection"],
        "hidden_sizes": hidden_sizes,
        "dropout_rate": dropout_rate,
        "batch_size": batch_size,
        "num_epochs": num_epochs,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "lr_schedule": lr_schedule,
        "min_steps": min_steps,
        "label_smoothing": label_smoothing,
        "class_weight_power": class_weight_power,
        "input_transform": input_transform,
        "augment": augment,
        "mixup_alpha": mixup_alpha,
        "ensemble_size": p["ensemble_size"],
        "val_fraction": val_fraction,
        "calibration_fraction": calibration_fraction,
        "early_stopping_patience": early_stopping_patience,
        "reference_storage": reference_storage,
        "num_threads": n_threads,
        "device": str(dev),
        "random_state": random_state,
        "seed": seed,
        "distributed": {"world_size": _dist.world_size(), "backend": str(torch.distributed.get_backend())}
        if _dist.is_distributed() else None,
        "train_seconds": round(train_seconds, 3),
        "phase_seconds": {k: round(v, 3) for k, v in phase_seconds.items()},
        "history": history,
        "resource_summary": {
            "training cells": int(len(train_cells)),
            "validation cells": int(n_val),
            "calibration cells": int(len(calib_cells)),
            "dropped unlabelled cells": ref.dropped,
            "genes": ref.n_genes,
            "reference genes": int(ref.source.n_vars),
            "device": dev.type,
            "cpu count": available_cpus(),
            "threads": n_threads,
            "gpu": gpu_name(dev),
            "epochs completed": epochs_done,
            "ensemble members": n_members,
        },
        "runtime_summary": monitor.summary(len(train_cells) * len(history)),
        "knn_space": {"space": "encoder output, L2-normalised", "neighbour_label_agreement": agreement,
                      "search": "exact" if search.lists is None else
                      f"lists ({len(search.lists.sizes)} lists, {search.lists.n_probe} probed)",
                      "index_seconds": round(index_seconds, 3)},
        "unlabelled_cells_per_level": ref.unlabelled,
        "calibration": dict(calibration["report"], source=calib_source),
        "versions": _versions(),
    }
    train_config["runtime_summary"]["throughput_unit"] = "cell-epochs per second"
    metadata = describe(ref, coord_targets, hidden_sizes, dropout_rate, train_config, n_members)
    metadata["calibration"] = {"temperatures": calibration["temperatures"] if len(calib_cells) else {}}
    metadata["novelty"] = novelty
    model = TrainedModel(net, metadata, reference)
    if not on_disk:  # else the model builds its search over the memory map when it first predicts
        model._search = search
    if show_summary:
        print(format_sections("atlasmtl training finished", model.resource_summary()))
    return model


# ---------------------------------------------------------------- prepare
@dataclass
class _ReferenceOnDisk:
    """A reference file opened for training from disk: its labels (``table``) and its matrix (``source``)."""

    table: ReferenceTable
    source: MatrixSource


@dataclass
class Reference:
    """The reference, checked and encoded: everything the fit loop and :func:`describe` read.

    Attributes
    ----------
    source
        The expression matrix (rows streamed per minibatch).
    semantics
        What the matrix holds (:func:`~atlasmtl.inputs.detect_semantics`), plus how it is normalised.
    aligner
        The reference's own gene aligner (identity order) carrying the input transform.
    label_columns, classes, codes
        Levels, class names per level, integer codes (cells × levels, -1 = unlabelled).
    unlabelled
        Cells without a label, per level.
    coords, coord_stats
        Coordinate targets (cells × dims) and their mean / std over the used cells.
    cells, dropped
        Cells with a label at some level (the ones used), and how many were dropped.
    genes
        Columns of ``source`` the network reads (sorted; every column unless ``n_top_genes`` selected
        fewer): the model's genes. :attr:`aligner` takes them from each row after normalising it over
        all its genes.
    """

    source: MatrixSource
    semantics: dict[str, Any]
    aligner: GeneAligner
    label_columns: list[str]
    classes: dict[str, list[str]]
    codes: np.ndarray
    unlabelled: dict[str, int]
    coords: dict[str, np.ndarray]
    coord_stats: dict[str, dict[str, np.ndarray]]
    cells: np.ndarray
    dropped: int
    genes: np.ndarray

    @property
    def n_genes(self) -> int:
        """Network input width: the model's genes."""
        return int(len(self.genes))

    def standardised_coords(self) -> dict[str, np.ndarray]:
        """Coordinate targets standardised with :attr:`coord_stats` (what the coordinate heads learn)."""
        return {n: ((v - self.coord_stats[n]["mean"]) / self.coord_stats[n]["std"]).astype(np.float32)
                for n, v in self.coords.items()}


def prepare_reference(
    adata: ad.AnnData | ReferenceTable,
    label_columns: Sequence[str] | str,
    coord_targets: Mapping[str, Any] | None,
    *,
    layer: str | None,
    use_raw: bool,
    input_transform: str,
    source: MatrixSource | None = None,
    n_top_genes: int | None = None,
    gene_selection: str = "variable",
) -> Reference:
    """Check the reference, encode its labels and coordinates and pick the cells and genes to train on.

    ``source`` is the expression matrix when it was opened apart from ``adata`` (a
    reference file read from disk, :func:`~atlasmtl.inputs.h5ad_reference_source`, whose
    labels and coordinates come as a :class:`~atlasmtl.inputs.ReferenceTable`).

    The matrix checks (values, semantics) are the ones :func:`atlasmtl.predict` runs on a query.
    With ``n_top_genes`` below the number of genes, the model keeps the reference's ``n_top_genes``
    most variable genes (:func:`~atlasmtl.genes.highly_variable_genes`, on the labelled cells), or
    with ``gene_selection="variable+labels"`` three quarters of them and a quarter the genes that tell
    the finest level's labels apart (:func:`~atlasmtl.genes.reference_gene_statistics`).
    """
    if source is None:
        source = get_matrix_source(adata, layer=layer, use_raw=use_raw)
    if isinstance(adata, ad.AnnData) and not adata.obs_names.is_unique:  # a ReferenceTable's were checked on reading
        raise InputError("Reference obs_names are not unique; call adata.obs_names_make_unique() first.")
    if not source.var_names.is_unique:
        raise InputError("Reference var_names are not unique; call adata.var_names_make_unique() first.")
    label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    if not all(isinstance(c, str) for c in label_columns):
        raise LabelError(f"label_columns={label_columns!r} must be obs column names (strings).")
    if coord_targets is not None and not isinstance(coord_targets, Mapping):
        raise ParameterError("coord_targets must be a dict of name → obsm key, e.g. {'umap': 'X_umap'}.")
    check_writeback_names(label_columns, [str(n) for n in (coord_targets or {})])
    classes, codes, unlabelled = encode_labels(adata, label_columns)
    coords = _coordinate_targets(adata, coord_targets)
    semantics = checked_semantics(source, input_transform)
    if input_transform != "binary" and semantics["semantics"] == "counts":
        semantics["normalisation"] = "total counts scaled to 1e4 per cell, then log1p" + (
            ", then each gene standardised (reference mean and std, clipped to ±10)" if input_transform == "zscore" else "")

    has_label = (codes >= 0).any(axis=1)
    cells = np.flatnonzero(has_label).astype(row_number_dtype(len(has_label)))
    dropped = int((~has_label).sum())
    if dropped:
        warnings.warn(f"{dropped} reference cell(s) have no label at any level and were dropped.", stacklevel=user_stacklevel())
    for col, n in unlabelled.items():
        if n and n > dropped:
            warnings.warn(
                f"{n} reference cell(s) have no label in {col!r}; they are not used for that level's loss.",
                stacklevel=user_stacklevel(),
            )

    coord_stats = {}
    for name, values in coords.items():
        mean = values[cells].mean(axis=0)
        std = values[cells].std(axis=0)
        std[std == 0] = 1.0
        coord_stats[name] = {"mean": mean.astype(np.float64), "std": std.astype(np.float64)}
    # under torchrun each rank reads its share of the cells and the per-gene sums are combined
    share = cells[_dist.shard_slice(len(cells))] if _dist.is_distributed() else cells
    reduce = _dist.all_reduce_sum if _dist.is_distributed() else None
    # one read of the reference ranks its genes and standardises the kept ones
    by_labels = gene_selection == "variable+labels"
    genes, gene_mean, gene_std = reference_gene_statistics(
        source, semantics["semantics"], share, n_top_genes, input_transform, reduce=reduce,
        labels=codes[share, -1] if by_labels else None, n_labels=len(classes[label_columns[-1]]) if by_labels else 0)
    aligner = selection_aligner(source.n_vars, genes, input_transform, semantics["semantics"])
    aligner.gene_mean, aligner.gene_std = gene_mean, gene_std
    return Reference(source, semantics, aligner, label_columns, classes, codes, unlabelled, coords, coord_stats,
                     cells, dropped, genes)


# ---------------------------------------------------------------- fit
def reference_rows(ref: Reference, rows: np.ndarray | slice) -> Any:
    """Reference rows as read for the network, checked for NaN/inf (streamed data is checked only here)."""
    block = ref.source.rows(rows)
    check_finite(block, ref.source.where)
    return block


#: Cells per contiguous block read from a reference on disk, and blocks shuffled together in memory
#: (block-shuffled sampling as in scDataset / annbatch: random block order, then random cells within
#: a buffer of several blocks). 16 × 1,024 cells of 3,000 genes at 4% non-zero values is ~16 MB.
STREAM_BLOCK_CELLS = 1024
STREAM_BUFFER_BLOCKS = 16


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


class _Objective:
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
        worker (a process or a thread).
        """
        ref = self.ref
        check_finite(block, ref.source.where)
        if train and self.augmentation is not None:
            x = self.counts_aligner.sparse_input(simulate_shift(block, ref.semantics["semantics"], self.rng,
                                                                self.augmentation))
        else:
            x = ref.aligner.sparse_input(block)
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


#: Whether CPU training computes its steps without autograd where it can (:meth:`_Objective.step_by_hand`).
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
    objective: _Objective,
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
) -> list[dict[str, float]]:
    """The epoch loop (AdamW, shuffled minibatches, optional validation and early stopping).

    Runs ``num_epochs`` epochs, or more when that gives fewer than ``min_steps``
    optimiser steps; with ``lr_schedule="cosine"`` the learning rate follows a
    cosine from ``learning_rate`` to 0 over all the steps of the run.

    Minibatches are read, augmented and transformed in a background thread one
    step ahead (:func:`prefetch`); the first layer is sparse
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
    num_epochs = max(num_epochs, -(-min_steps // steps_per_epoch))
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

        def epochs() -> Iterator[tuple[np.ndarray, sp.csr_matrix, sp.csr_matrix | None, dict] | None]:
            for _ in range(num_epochs):
                for rows, block in shuffled_minibatches(source, shard, batch_size, batch_rng, n_batches):
                    yield (rows, *objective.transform(block, train=True), objective.step_draws(rows))
                yield None  # end of epoch

        if dev.type == "cpu" and use_worker_process(source.backed, _dist.is_distributed()):
            extra = 0 if objective.zero_row is None else 1  # the f(0) row (SparseInput.zero_row)
            n_genes = objective.ref.n_genes  # the network input's width (the model's genes)
            slots = CsrSlots(4, batch_size + extra, n_genes,
                             max_batch_nonzeros(source.matrix, shard, batch_size) + extra * n_genes,
                             objective.step_draw_fields())
            prepared = forked_prefetch(epochs, slots)
        else:
            prepared = prefetch(epochs())

        def minibatches() -> Iterator[Minibatch | None]:
            with contextlib.closing(prepared):  # stops the worker on any exit
                for item in prepared:
                    yield None if item is None else objective.minibatch(*item, train=True)

        bar = progress(range(num_epochs), desc="atlasmtl training", enabled=show_progress, unit="epoch")
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
        bar.close()
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


# ---------------------------------------------------------------- embed and describe
def embed_reference(net: MultiTaskNetwork | EnsembleNetwork, ref: Reference, dev: torch.device,
                    keep: np.ndarray) -> tuple[EmbeddingFile, np.ndarray, list[np.ndarray]]:
    """The used reference cells in the KNN space (encoder output, L2-normalised; cells × last hidden size).

    The rows are written batch by batch as float16 (:data:`~atlasmtl.knn.EMBEDDING_DTYPE`) into an
    :class:`~atlasmtl.knn.EmbeddingFile`, on disk for references over
    :data:`~atlasmtl.knn.EXACT_SEARCH_MAX_CELLS` cells, so memory does not grow with the cells.
    ``keep`` (sorted positions in ``ref.cells``) names the few cells whose float32 embedding and
    logits per level are also returned (the held-out cells calibration reads and the cells of
    the neighbour-label-agreement diagnostic): ``(embedding, kept embedding, kept logits)``.
    """
    n, width = len(ref.cells), net.embedding_size
    embedding = EmbeddingFile.for_reference(n, width)
    kept = np.zeros((len(keep), width), dtype=np.float32)
    logits = [np.zeros((len(keep), len(ref.classes[c])), dtype=np.float32) for c in ref.label_columns]
    zero = ref.aligner.zero_input()
    zero = None if zero is None else torch.from_numpy(zero).to(dev)
    with torch.no_grad():
        for start in range(0, n, 4096):
            rows = ref.cells[start : start + 4096]
            out = net(SparseInput(ref.aligner.sparse_input(reference_rows(ref, rows)), zero))
            z = normalise_rows(out.embedding.cpu().numpy())
            embedding.write(z)
            lo, hi = np.searchsorted(keep, [start, start + len(rows)])
            kept[lo:hi] = z[keep[lo:hi] - start]
            for j, lg in enumerate(out.logits):
                logits[j][lo:hi] = lg.cpu().numpy()[keep[lo:hi] - start]
    return embedding, kept, logits


def calibrate(
    ref: Reference,
    embedding: np.ndarray,
    logits: list[np.ndarray],
    train_cells: np.ndarray,
    calib_cells: np.ndarray,
    search: ReferenceSearch,
    random_state: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit one temperature per level and the novelty score's nulls on the held-out cells.

    ``embedding`` and ``logits`` (one array per level) hold the rows of ``calib_cells``, in order.

    Returns ``(calibration, novelty)``: ``calibration["temperatures"]`` (level →
    T) and ``calibration["report"]`` (held-out cells, temperatures, top-label ECE
    before and after); ``novelty`` holds ``k`` and, per level, the median and
    scale of the held-out cells' log distance to the ``k`` nearest training cells
    of their predicted class (``None`` without held-out cells), searched with
    :meth:`~atlasmtl.knn.ReferenceSearch.search`, as prediction does, and the
    :class:`~atlasmtl.novelty.InputView` (``input_view``, fitted on the training
    cells' and held-out cells' network input; ``None`` without held-out cells).
    """
    levels = ref.label_columns
    pos = np.arange(len(calib_cells))
    temperatures, ece = {}, {}
    probs = []
    for j, lv in enumerate(levels):
        codes = ref.codes[calib_cells, j]
        t = fit_temperature(logits[j][pos], codes) if len(pos) else 1.0
        temperatures[lv] = t
        p = softmax(logits[j][pos].astype(np.float64), t)
        probs.append(p)
        known = codes >= 0
        if known.any():
            before = softmax(logits[j][pos][known].astype(np.float64))
            ece[lv] = {
                "uncalibrated": round(expected_calibration_error(before.max(axis=1), before.argmax(axis=1) == codes[known]), 4),
                "calibrated": round(expected_calibration_error(p[known].max(axis=1), p[known].argmax(axis=1) == codes[known]), 4),
            }
    report = {"held_out_cells": int(len(calib_cells)), "temperatures": {k: round(v, 4) for k, v in temperatures.items()},
              "ece_held_out": ece}
    novelty: dict[str, Any] = {"k": NOVELTY_K, "null": None, "input_view": None}
    if len(pos):
        decoded = decode_paths(probs, level_paths(levels, ref.classes, infer_hierarchy(levels, ref.classes, ref.codes)))
        _, dist = search.search(embedding[pos], None, 0, dict(zip(levels, decoded)), NOVELTY_K)
        novelty["null"] = {lv: null_summary(log_distance(dist[lv])) for lv in levels}
        train_sorted = np.sort(train_cells)
        order = np.argsort(calib_cells)
        aligner, source = ref.aligner, ref.source
        novelty["input_view"] = fit_input_view(
            lambda rows: aligner.transform(source.rows(rows)),
            lambda rows: aligner.sparse_input(source.rows(rows)),
            aligner.zero_input(),
            ref.n_genes,
            train_sorted,
            {lv: ref.codes[train_sorted, j] for j, lv in enumerate(levels)},
            {lv: len(ref.classes[lv]) for lv in levels},
            calib_cells[order],
            {lv: np.asarray(d)[order] for lv, d in zip(levels, decoded)},
            random_state,
        )
    return {"temperatures": temperatures, "report": report}, novelty


def describe(
    ref: Reference,
    coord_targets: Mapping[str, Any] | None,
    hidden_sizes: list[int],
    dropout_rate: float,
    train_config: dict[str, Any],
    ensemble_size: int = 1,
) -> dict[str, Any]:
    """The model's metadata: genes, label encoders, input transform, coordinates, hierarchy, architecture."""
    genes = [str(g) for g in ref.source.var_names[ref.genes]]
    return {
        "model_id": new_model_id(),  # the identity every saved file of this model carries
        "atlasmtl_version": __version__,
        "genes": genes,
        "gene_namespace": detect_namespace(genes),
        "gene_alt_ids": alternative_ids(ref.source.var.iloc[ref.genes]),
        "input_transform": ref.aligner.input_transform,
        "gene_stats": (
            {"mean": ref.aligner.gene_mean.tolist(), "std": ref.aligner.gene_std.tolist()}
            if ref.aligner.gene_mean is not None else None
        ),
        "train_semantics": ref.semantics,
        "label_columns": ref.label_columns,
        "classes": ref.classes,
        "hierarchy": infer_hierarchy(ref.label_columns, ref.classes, ref.codes),
        "coord_targets": {k: (v if isinstance(v, str) else k) for k, v in (coord_targets or {}).items()},
        "coord_stats": ref.coord_stats,
        "architecture": {
            "n_genes": ref.n_genes,
            "n_classes": [len(ref.classes[c]) for c in ref.label_columns],
            "coord_dims": {n: int(v.shape[1]) for n, v in ref.coords.items()},
            "hidden_sizes": hidden_sizes,
            "dropout_rate": float(dropout_rate),
            "ensemble_size": int(ensemble_size),
        },
        "train_config": train_config,
    }


def _package_version(name: str) -> str:
    """An installed distribution's version from its metadata, without importing it (scikit-learn's
    import took 0.7-1.6 s of a build_model that does not otherwise need it)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _versions() -> dict[str, str]:
    import scipy

    return {
        "atlasmtl": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "anndata": _package_version("anndata"),
        "scikit-learn": _package_version("scikit-learn"),
        "pandas": pd.__version__,
        "platform": platform.platform(),
    }
