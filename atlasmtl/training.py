"""Training: ``build_model`` fits the shared encoder, label heads and coordinate heads.

:func:`build_model` = :func:`~atlasmtl.reference.prepare_reference` (checks, labels,
coordinates, genes; the matrix checks are the ones :func:`atlasmtl.predict` runs) →
:func:`~atlasmtl.training_loop.fit` (the epoch loop, once per ensemble member) →
:func:`embed_reference` (the KNN space) → :func:`calibrate` (temperatures and the
novelty nulls on held-out cells; on a small reference the temperatures cross-fitted
with networks trained with other cells held out) → :func:`describe` (the model's metadata).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import time
import warnings
import zlib
from typing import Any, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp
import torch

from ._version import __version__
from .artifacts import REFERENCE_STORAGE, new_model_id
from .augment import ShiftAugmentation, simulate_shift
from .exceptions import ParameterError, user_stacklevel
from .genes import (DETECTION_SAMPLE_CELLS, GENE_SELECTIONS, INPUT_TRANSFORMS, alternative_ids, detect_namespace,
                    detection_profile)
from .io import open_anndata
from .inputs import h5ad_reference_source
from . import calibration as _calibration  # its SHIFTED_* settings are read when a model is built
from .calibration import calibration_split, expected_calibration_error, fit_temperature, softmax
from .hierarchy import decode_paths, level_paths
from .knn import (
    EmbeddingFile,
    ReferenceSearch,
    agreement_cells,
    index_reference,
    neighbour_label_agreement,
    normalise_rows,
)
from .novelty import NOVELTY_K, fit_input_view, log_distance, null_summary
from .validation import as_bool, as_choice, as_float, as_int, as_int_list, as_random_state
from .model import TrainedModel
from .reference import Reference, ReferenceOnDisk, prepare_reference, reference_rows
from .training_loop import Objective, fit
from . import distributed as _dist
from .network import MAX_ENSEMBLE_SIZE, EnsembleNetwork, MultiTaskNetwork, SparseInput
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


def check_network_memory(n_genes: int, hidden_sizes: Sequence[int], n_classes: Sequence[int], members: int) -> None:
    """A :class:`ParameterError` when the networks cannot fit in the memory available: each member's weights
    (float32), and for the member in training its gradients and the optimiser's two moments too."""
    widths = [int(n_genes), *[int(h) for h in hidden_sizes]]
    n_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:])) + sum(widths[-1] * k + k for k in n_classes)
    need = 4 * n_params * (members + 3)
    available = psutil.virtual_memory().available
    if need > available:
        raise ParameterError(
            f"hidden_sizes={tuple(int(h) for h in hidden_sizes)} on {n_genes:,} genes makes networks of "
            f"{n_params:,} weights; {members} of them need about {need / 2**30:.1f} GiB to train, more than the "
            f"{available / 2**30:.1f} GiB of memory available. Use smaller hidden sizes (the default is (256, 128)), "
            "fewer genes (n_top_genes) or fewer members (ensemble_size)."
        )


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


def _members(cells: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """``np.isin(cells, subset)`` for sorted ``cells`` holding every row of ``subset`` (no sort of both arrays)."""
    flag = np.zeros(len(cells), dtype=bool)
    flag[np.searchsorted(cells, subset)] = True
    return flag


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
        temperature per level, fitted on the logits of shifted copies of them
        (:data:`~atlasmtl.calibration.SHIFTED_COPIES`; thinned, genes missing),
        makes the confidence match accuracy on a shifted query, and their
        distances to the training cells of their predicted class are the null
        for the novelty score. Under
        :data:`~atlasmtl.calibration.CROSSFIT_BELOW_CELLS` (500) held-out cells
        the temperatures are cross-fitted: ``round(1 / calibration_fraction) - 1``
        more networks (the first :data:`~atlasmtl.calibration.CROSSFIT_MEMBERS`
        (2) members of the model's ensemble) are trained, each with another group
        of cells held out, and every group's copies are fitted on under the network
        that did not train on them (a ten-member model trains 8 more members; the
        model's own network is unchanged). The held-out cells
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
        Seed for initialisation, shuffling and dropout: CPU training is bit-for-bit reproducible, except for
        calls running at once in threads of one process, which share PyTorch's global generator (run them one
        after another or in separate processes).
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
            return build_model(ReferenceOnDisk(lite, source), **args)
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
    distributed = as_bool("distributed", distributed)
    if distributed and random_state is None:
        raise ParameterError("random_state=None with distributed=True: each process would draw its own seed, hold "
                             "out other calibration cells and train another model; pass an integer (e.g. 0).")
    random_state, seed = as_random_state(random_state)
    dev = _dist.init_from_env(device=device) if distributed else resolve_device(device)
    n_threads = resolve_num_threads(num_threads)
    if distributed and dev.type == "cpu":  # the processes of one machine share its cores
        n_threads = max(1, min(n_threads, available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    show_progress, show_summary = resolve_flag(show_progress, "show_progress"), resolve_flag(show_summary, "show_summary")
    if isinstance(adata, ReferenceOnDisk):
        adata, source = adata.table, adata.source
    else:
        adata, source = open_anndata(adata), None
    if distributed:  # every process must train on the same cells with the same options
        names = adata.var_names if source is None else source.var_names
        gene_sum = zlib.crc32("\n".join(map(str, names)).encode())
        _dist.check_same_inputs({"cells": adata.n_obs, "genes": (len(names), gene_sum),
                                 "label_columns": list(label_columns), "coord_targets": coord_targets, "layer": layer,
                                 "use_raw": use_raw, "random_state": seed, "options": sorted(p.items())})

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
    check_network_memory(ref.n_genes, hidden_sizes, [len(ref.classes[c]) for c in ref.label_columns],
                         resolve_ensemble_size(p["ensemble_size"], len(train_cells)))
    if early_stopping_patience is not None and n_val == 0:
        warnings.warn("early_stopping_patience is set but val_fraction is 0: early stopping is disabled.", stacklevel=user_stacklevel())
    augmentation = ShiftAugmentation() if augment else None
    release_freed_memory()  # each phase's temporaries would otherwise stay in the C heap under the next's
    objective = Objective(ref, train_cells, class_weight_power, label_smoothing, dev, augmentation, rng, mixup_alpha)

    monitor = ResourceMonitor(dev)
    t_start = time.perf_counter()
    def train_network(objective: Objective, cells: np.ndarray, fit_rng: np.random.Generator, torch_seed: int,
                      show: bool, max_members: int | None = None,
                      ) -> tuple[MultiTaskNetwork | EnsembleNetwork, list[dict[str, Any]], int]:
        """The network trained on ``cells`` (``ensemble_size`` members, at most ``max_members``), its history
        and its member count."""
        n_members = resolve_ensemble_size(p["ensemble_size"], len(cells))
        n_members = n_members if max_members is None else max(1, min(n_members, max_members))
        members, history = [], []
        # one bar for the whole ensemble (ten bars one after another filled a notebook's output)
        bar = progress(total=n_members * num_epochs, desc="atlasmtl training", enabled=show, unit="epoch")
        try:
            for member in range(n_members):  # member 0 is the network a single-network model would have
                if n_members > 1:
                    bar.set_description(f"atlasmtl training (network {member + 1}/{n_members})")
                torch.manual_seed(torch_seed + 1_000_003 * member)
                net = MultiTaskNetwork(
                    ref.n_genes,
                    [len(ref.classes[c]) for c in ref.label_columns],
                    {n: values.shape[1] for n, values in ref.coords.items()},
                    hidden_sizes,
                    dropout_rate,
                ).to(dev)
                if distributed:  # each rank draws its own dropout masks (on a GPU; on the CPU fit's generators do)
                    torch.manual_seed(torch_seed + 1_000_003 * member + 7919 * _dist.rank())
                # the prefetch thread prepares the next minibatch on a core of its own
                with torch_threads(max(1, n_threads - 1)):
                    records = fit(net, objective, cells, val_cells, fit_rng, batch_size=batch_size,
                                  num_epochs=num_epochs, learning_rate=learning_rate, weight_decay=weight_decay,
                                  lr_schedule=lr_schedule, min_steps=min_steps,
                                  early_stopping_patience=early_stopping_patience, show_progress=show, bar=bar)
                history += [dict(r, member=member) for r in records] if n_members > 1 else records
                members.append(net)
        finally:
            bar.close()
        return (members[0] if n_members == 1 else EnsembleNetwork(members).eval()), history, n_members

    with torch_threads(n_threads), torch.random.fork_rng(devices=[]), monitor:
        net, history, n_members = train_network(objective, train_cells, rng, seed,
                                                show_progress and _dist.is_main_process())
        cell_epochs = len(train_cells) * len(history)  # and the cross-fitting networks' below: the block's work
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
             "training_cell": _members(ref.cells, train_cells),
             "coords": {name: np.ascontiguousarray(values[ref.cells], dtype=np.float32)
                        for name, values in ref.coords.items()}},
            ref.label_columns, random_state=seed % 2**32)
        del embedding  # the indexed reference holds its own copy (in list order)
        # on disk, calibration searches the temporary file list by list (nothing stays mapped);
        # the model keeps a read-only memory map of it
        search = ReferenceSearch(reference, ref.label_columns)
        release_freed_memory()
        index_seconds = time.perf_counter() - t_index
        phase_seconds["index"] = index_seconds
        at = np.searchsorted(keep, calib_pos)
        # the temperatures are fitted on shifted copies of the held-out cells (calibration.SHIFTED_COPIES), drawn
        # from a generator of their own so no other random draw of the model changes
        copies = _calibration.SHIFTED_COPIES
        fit_rows = (shifted_logits(net, ref, dev, calib_cells, copies, np.random.default_rng([seed % 2**32, 0xCA1]))
                    if copies > 0 and len(calib_cells) else None)
        crossfit = None
        if 0 < len(calib_cells) < _calibration.CROSSFIT_BELOW_CELLS and n_val == 0 and not distributed:
            # cross-fitted temperatures: each further group of cells held out from a network of its own (the same
            # recipe, generators of its own, so the model's network and every other draw are unchanged)
            t_cross, model_cell_epochs = time.perf_counter(), cell_epochs
            groups = _calibration.crossfit_groups(ref.codes[ref.cells, -1], _members(ref.cells, calib_cells),
                                                  calibration_fraction, np.random.default_rng([seed % 2**32, 0xF01D]))
            parts = [fit_rows if fit_rows is not None else (calib_cells, [lg[at] for lg in logits])]
            fold_members = 0
            for k, group in enumerate(groups):
                fold_cells, fold_held = ref.cells[~group], ref.cells[group]
                fold_rng = np.random.default_rng([seed % 2**32, 0xF01D, k + 1])
                fold_objective = Objective(ref, fold_cells, class_weight_power, label_smoothing, dev, augmentation,
                                           fold_rng, mixup_alpha)
                fold_net, fold_history, fold_members = train_network(fold_objective, fold_cells, fold_rng,
                                                                     seed + 104_729 * (k + 1), False,
                                                                     _calibration.CROSSFIT_MEMBERS)
                del fold_objective
                cell_epochs += len(fold_cells) * len(fold_history)
                parts.append(held_out_rows(fold_net, ref, dev, fold_held, copies,
                                           np.random.default_rng([seed % 2**32, 0xCA1, k + 1])))
                del fold_net
            fit_rows = (np.concatenate([c for c, _ in parts]),
                        [np.concatenate([lg[j] for _, lg in parts]) for j in range(len(ref.label_columns))])
            del parts
            crossfit = ({"networks": len(groups), "members": fold_members, "cells": int(len(np.unique(fit_rows[0]))),
                         "cell_epochs": int(cell_epochs - model_cell_epochs),
                         "seconds": round(time.perf_counter() - t_cross, 3)} if groups else None)
        calibration, novelty = calibrate(ref, kept[at], [lg[at] for lg in logits], train_cells, calib_cells, search,
                                         random_state=seed % 2**32, fit_rows=fit_rows, shifted=copies > 0,
                                         crossfit=crossfit)
        del fit_rows
        on_disk = isinstance(reference["embedding"], EmbeddingFile)
        if on_disk:
            reference = dict(reference, embedding=reference["embedding"].finish())
    train_seconds = time.perf_counter() - t_start
    phase_seconds["crossfit"] = crossfit["seconds"] if crossfit else 0.0
    phase_seconds["calibrate"] = (train_seconds - phase_seconds["fit"] - phase_seconds["embed"] - phase_seconds["index"]
                                  - phase_seconds["crossfit"])
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
        "runtime_summary": monitor.summary(cell_epochs),
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
    metadata["gene_detection"] = gene_detection(ref, train_cells, seed)
    model = TrainedModel(net, metadata, reference)
    if not on_disk:  # else the model builds its search over the memory map when it first predicts
        model._search = search
    if show_summary:
        print(format_sections("atlasmtl training finished", model.resource_summary()))
    return model


# ---------------------------------------------------------------- embed, calibrate and describe
def gene_detection(ref: Reference, cells: np.ndarray, seed: int) -> dict[str, Any] | None:
    """The reference's :func:`~atlasmtl.genes.detection_profile` (``metadata["gene_detection"]``, read by
    prediction's unmeasured-gene check) on at most :data:`~atlasmtl.genes.DETECTION_SAMPLE_CELLS` of the
    training cells ``cells``, drawn from a generator of its own; ``None`` for a reference that holds neither
    counts nor log-normalised values."""
    semantics = ref.semantics["semantics"]
    if semantics not in ("counts", "lognorm") or len(cells) == 0:
        return None
    rng = np.random.default_rng([seed % 2**32, 0xDE7EC7])
    sample = np.sort(rng.choice(cells, min(len(cells), DETECTION_SAMPLE_CELLS), replace=False))
    blocks = [ref.aligner.model_counts(reference_rows(ref, sample[start : start + 4096]))
              for start in range(0, len(sample), 4096)]
    return detection_profile(sp.vstack(blocks, format="csr"))


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


def shifted_logits(net: MultiTaskNetwork | EnsembleNetwork, ref: Reference, dev: torch.device, cells: np.ndarray,
                   copies: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """The network's logits per level on ``copies`` shifted copies of the reference cells ``cells``
    (:func:`~atlasmtl.augment.simulate_shift` with the training augmentation's defaults), at most
    :data:`~atlasmtl.calibration.SHIFTED_MAX_ROWS` rows (a random sample of ``cells`` beyond it).
    Returns ``(row cells, logits per level)``; every random draw comes from ``rng``."""
    cells = np.sort(cells)
    if copies * len(cells) > _calibration.SHIFTED_MAX_ROWS:
        cells = np.sort(rng.choice(cells, max(1, _calibration.SHIFTED_MAX_ROWS // copies), replace=False))
    counts_aligner = dataclasses.replace(ref.aligner, semantics="counts")  # shifted rows are pseudo-counts
    zero = counts_aligner.zero_input()
    zero = None if zero is None else torch.from_numpy(zero).to(dev)
    augmentation = ShiftAugmentation()
    # read once (at most SHIFTED_MAX_ROWS // copies cells), shifted ``copies`` times
    blocks = [(cells[start : start + 4096], reference_rows(ref, cells[start : start + 4096]))
              for start in range(0, len(cells), 4096)]
    rows, logits = [], [[] for _ in ref.label_columns]
    with torch.no_grad():
        for _ in range(copies):
            for block_cells, values in blocks:
                block = simulate_shift(values, ref.semantics["semantics"], rng, augmentation)
                out = net(SparseInput(counts_aligner.sparse_input(block), zero))
                for j, lg in enumerate(out.logits):
                    logits[j].append(lg.cpu().numpy())
                rows.append(block_cells)
    empty = [np.zeros((0, len(ref.classes[c])), dtype=np.float32) for c in ref.label_columns]
    return (np.concatenate(rows) if rows else cells[:0],
            [np.concatenate(lg) if lg else e for lg, e in zip(logits, empty)])


def held_out_rows(net: MultiTaskNetwork | EnsembleNetwork, ref: Reference, dev: torch.device, cells: np.ndarray,
                  copies: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """The rows a temperature is fitted on for the held-out reference cells ``cells`` under ``net``, which
    did not train on them: ``(row cells, logits per level)`` of ``copies`` shifted copies of them
    (:func:`shifted_logits`), or with ``copies=0`` of the cells as they are."""
    if copies > 0:
        return shifted_logits(net, ref, dev, cells, copies, rng)
    cells = np.sort(cells)
    zero = ref.aligner.zero_input()
    zero = None if zero is None else torch.from_numpy(zero).to(dev)
    logits = [[] for _ in ref.label_columns]
    with torch.no_grad():
        for start in range(0, len(cells), 4096):
            out = net(SparseInput(ref.aligner.sparse_input(reference_rows(ref, cells[start : start + 4096])), zero))
            for j, lg in enumerate(out.logits):
                logits[j].append(lg.cpu().numpy())
    return cells, [np.concatenate(lg) if lg else np.zeros((0, len(ref.classes[c])), dtype=np.float32)
                   for lg, c in zip(logits, ref.label_columns)]


def calibrate(
    ref: Reference,
    embedding: np.ndarray,
    logits: list[np.ndarray],
    train_cells: np.ndarray,
    calib_cells: np.ndarray,
    search: ReferenceSearch,
    random_state: int = 0,
    fit_rows: tuple[np.ndarray, list[np.ndarray]] | None = None,
    shifted: bool = True,
    crossfit: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit one temperature per level and the novelty score's nulls on the held-out cells.

    ``embedding`` and ``logits`` (one array per level) hold the rows of ``calib_cells``, in order.
    ``fit_rows`` (:func:`held_out_rows`: the cell of each row and the logits per level, under a network
    that did not train on that cell) is what the temperatures are fitted on when given: shifted copies
    of the held-out cells (``shifted``), and with cross-fitting (``crossfit``: its networks, members, cells and
    seconds, for the report) those of every group of cells held out in turn; else the held-out cells as
    they are.

    Returns ``(calibration, novelty)``: ``calibration["temperatures"]`` (level →
    T) and ``calibration["report"]`` (held-out cells, shifted rows, cross-fitting, temperatures,
    top-label ECE before and after on the held-out cells, and on the rows fitted on when shifted); ``novelty``
    holds ``k`` and, per level, the median and scale of the held-out cells' log distance
    to the ``k`` nearest training cells of their predicted class (``None`` without
    held-out cells), searched with
    :meth:`~atlasmtl.knn.ReferenceSearch.search`, as prediction does, and the
    :class:`~atlasmtl.novelty.InputView` (``input_view``, fitted on the training
    cells' and held-out cells' network input; ``None`` without held-out cells).
    """
    levels = ref.label_columns
    pos = np.arange(len(calib_cells))
    temperatures, ece = {}, {}
    probs = []
    use_rows = fit_rows is not None and len(fit_rows[0]) > 0
    # the prior on accuracy counts held-out cells, not their copies
    copies = len(fit_rows[0]) // len(np.unique(fit_rows[0])) if use_rows else 1
    for j, lv in enumerate(levels):
        codes = ref.codes[calib_cells, j]
        if use_rows:
            row_codes = ref.codes[fit_rows[0], j]
            t = fit_temperature(fit_rows[1][j], row_codes, copies=copies)
        else:
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
            if use_rows and shifted and (row_codes >= 0).any():
                ps = softmax(fit_rows[1][j][row_codes >= 0].astype(np.float64), t)
                ece[lv]["calibrated_shifted"] = round(
                    expected_calibration_error(ps.max(axis=1), ps.argmax(axis=1) == row_codes[row_codes >= 0]), 4)
    report = {"held_out_cells": int(len(calib_cells)),
              "shifted_rows": int(len(fit_rows[0])) if use_rows and shifted else 0, "crossfit": crossfit,
              "temperatures": {k: round(v, 4) for k, v in temperatures.items()}, "ece_held_out": ece}
    novelty: dict[str, Any] = {"k": NOVELTY_K, "null": None, "input_view": None}
    if len(pos):
        decoded = decode_paths(probs, level_paths(levels, ref.classes, ref.hierarchy))
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
        "hierarchy": ref.hierarchy,
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
