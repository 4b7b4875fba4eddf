"""Training: ``build_model`` fits the shared encoder, label heads and coordinate heads.

:func:`build_model` = :func:`prepare_reference` (checks, labels, coordinates;
the matrix checks are the ones :func:`atlasmtl.predict` runs) → :func:`fit`
(the epoch loop) → :func:`embed_reference` (the KNN space) → :func:`describe`
(the model's metadata).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from ._version import __version__
from .artifacts import REFERENCE_STORAGE, new_model_id
from .calls import UNKNOWN, check_writeback_names
from .augment import ShiftAugmentation, simulate_shift
from .exceptions import CoordinateError, InputError, LabelError, ParameterError, TrainingError, user_stacklevel
from .genes import (
    INPUT_TRANSFORMS,
    GeneAligner,
    alternative_ids,
    detect_namespace,
    identity_aligner,
    log_gene_statistics,
)
from .io import open_anndata
from .inputs import MatrixSource, check_finite, checked_semantics, get_matrix_source
from .calibration import calibration_split, expected_calibration_error, fit_temperature, softmax
from .hierarchy import decode_paths, level_paths
from .knn import NeighbourIndex, neighbour_label_agreement, normalise_rows
from .novelty import NOVELTY_K, class_distance, log_distance, null_summary
from .validation import as_bool, as_choice, as_float, as_int, as_int_list, as_random_state
from .model import TrainedModel
from .network import MultiTaskNetwork
from .runtime import (
    ResourceMonitor,
    available_cpus,
    format_sections,
    gpu_name,
    progress,
    resolve_device,
    resolve_flag,
    resolve_num_threads,
    torch_threads,
)



def check_training_parameters(**p: Any) -> dict[str, Any]:
    """Check every training parameter up front; returns them as plain Python values."""
    return {
        "batch_size": as_int("batch_size", p["batch_size"]),
        "num_epochs": as_int("num_epochs", p["num_epochs"]),
        "dropout_rate": as_float("dropout_rate", p["dropout_rate"], 0.0, 1.0, high_open=True),
        "learning_rate": as_float("learning_rate", p["learning_rate"], 0.0, low_open=True),
        "label_smoothing": as_float("label_smoothing", p["label_smoothing"], 0.0, 1.0, high_open=True),
        "class_weight_power": as_float("class_weight_power", p["class_weight_power"], 0.0, 1.0),
        "val_fraction": as_float("val_fraction", p["val_fraction"], 0.0, 1.0, high_open=True),
        "calibration_fraction": as_float("calibration_fraction", p["calibration_fraction"], 0.0, 1.0, high_open=True),
        "early_stopping_patience": as_int("early_stopping_patience", p["early_stopping_patience"], allow_none=True),
        "hidden_sizes": as_int_list("hidden_sizes", p["hidden_sizes"]),
        "reference_storage": as_choice("reference_storage", p["reference_storage"], REFERENCE_STORAGE),
        "input_transform": as_choice("input_transform", p["input_transform"], INPUT_TRANSFORMS),
        "use_raw": as_bool("use_raw", p["use_raw"]),
        "augment": as_bool("augment", p["augment"]),
    }


def encode_labels(adata: ad.AnnData, label_columns: Sequence[str]) -> tuple[dict[str, list[str]], np.ndarray, dict]:
    """Integer codes (n_cells × n_levels, -1 = unlabelled) and class names per level."""
    if isinstance(label_columns, str):
        label_columns = [label_columns]
    if not label_columns:
        raise LabelError("label_columns is empty; name at least one obs column holding reference labels.")
    if len(set(label_columns)) != len(label_columns):
        raise LabelError(f"label_columns={list(label_columns)} names a column twice.")
    classes: dict[str, list[str]] = {}
    codes = np.full((adata.n_obs, len(label_columns)), -1, dtype=np.int64)
    unlabelled: dict[str, int] = {}
    for j, col in enumerate(label_columns):
        if col not in adata.obs.columns:
            raise LabelError(
                f"Label column {col!r} is not in adata.obs; available columns: {list(adata.obs.columns)[:20]}."
            )
        values = adata.obs[col]
        missing = values.isna().to_numpy()
        if missing.all():
            raise LabelError(f"Label column {col!r} holds no labels (all values are NaN); fill it or drop the level.")
        cat = pd.Categorical(values.astype(str).where(~missing))
        names = [str(c) for c in cat.categories]
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
        codes[:, j] = cat.codes
        unlabelled[col] = int(missing.sum())
    return classes, codes, unlabelled


def class_weights(codes: np.ndarray, n_classes: int, power: float, device: torch.device) -> torch.Tensor | None:
    """Cross-entropy class weights ∝ frequency ** -power, scaled so the average weight per cell is 1."""
    if power == 0:
        return None
    counts = np.bincount(codes[codes >= 0], minlength=n_classes).astype(np.float64)
    weights = (counts.sum() / np.maximum(counts, 1)) ** power
    weights *= counts.sum() / max((weights * counts).sum(), 1e-12)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def infer_hierarchy(label_columns: Sequence[str], classes: dict, codes: np.ndarray) -> dict[str, dict[str, str]]:
    """For each level whose labels nest in the previous level's, map child → parent label."""
    hierarchy: dict[str, dict[str, str]] = {}
    for j in range(1, len(label_columns)):
        both = (codes[:, j] >= 0) & (codes[:, j - 1] >= 0)
        pairs = pd.DataFrame({"child": codes[both, j], "parent": codes[both, j - 1]}).drop_duplicates()
        if len(pairs) and pairs["child"].is_unique:
            parent_names, child_names = classes[label_columns[j - 1]], classes[label_columns[j]]
            hierarchy[label_columns[j]] = {
                child_names[c]: parent_names[p] for c, p in zip(pairs["child"], pairs["parent"])
            }
    return hierarchy


def _numeric_coordinates(values: Any, what: str) -> np.ndarray:
    """Coordinates (cells × dims) as float64, from an array, a DataFrame or a sparse matrix."""
    if sp.issparse(values):
        values = values.toarray()  # cells × a few dimensions: small
    try:
        return np.asarray(values.to_numpy() if isinstance(values, pd.DataFrame) else values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CoordinateError(f"{what} does not hold numbers ({exc}); pass a numeric cells × dims array.") from None


def _coordinate_targets(adata: ad.AnnData, coord_targets: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
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
    adata: ad.AnnData,
    label_columns: Sequence[str],
    coord_targets: Mapping[str, str] | None = None,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    hidden_sizes: Sequence[int] = (256, 128),
    dropout_rate: float = 0.3,
    batch_size: int = 256,
    num_epochs: int = 40,
    learning_rate: float = 1e-3,
    label_smoothing: float = 0.1,
    class_weight_power: float = 0.5,
    input_transform: str = "zscore",
    augment: bool = True,
    val_fraction: float = 0.0,
    calibration_fraction: float = 0.2,
    early_stopping_patience: int | None = None,
    reference_storage: str = "external",
    num_threads: int | str = 10,
    device: str = "auto",
    show_progress: bool | None = None,
    show_summary: bool | None = None,
    random_state: int = 0,
) -> TrainedModel:
    """Train an atlasmtl model on a labelled reference.

    Parameters
    ----------
    adata
        Reference AnnData (in memory or backed); cells × genes, raw counts or log-normalised values.
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
    hidden_sizes
        Encoder layer widths (each ``Linear → ReLU → Dropout``).
    dropout_rate
        Dropout after each encoder layer.
    batch_size
        Cells per training minibatch.
    num_epochs
        Passes over the reference.
    learning_rate
        Adam learning rate.
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
        CPU threads (capped at the CPUs available; ``"max"`` = 80% of them).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    show_progress
        Epoch progress bar with ETA on stderr; ``None`` = on in a notebook or an interactive terminal.
    show_summary
        Print a compact summary at the end; ``None`` = on in a notebook or an interactive terminal.
    random_state
        Seed for initialisation, shuffling and dropout.

    Returns
    -------
    TrainedModel
    """
    p = check_training_parameters(
        batch_size=batch_size,
        num_epochs=num_epochs,
        dropout_rate=dropout_rate,
        learning_rate=learning_rate,
        label_smoothing=label_smoothing,
        class_weight_power=class_weight_power,
        val_fraction=val_fraction,
        calibration_fraction=calibration_fraction,
        early_stopping_patience=early_stopping_patience,
        hidden_sizes=hidden_sizes,
        reference_storage=reference_storage,
        input_transform=input_transform,
        use_raw=use_raw,
        augment=augment,
    )
    batch_size, num_epochs, hidden_sizes = p["batch_size"], p["num_epochs"], p["hidden_sizes"]
    dropout_rate, learning_rate, label_smoothing = p["dropout_rate"], p["learning_rate"], p["label_smoothing"]
    class_weight_power, val_fraction, calibration_fraction = p["class_weight_power"], p["val_fraction"], p["calibration_fraction"]
    early_stopping_patience, reference_storage = p["early_stopping_patience"], p["reference_storage"]
    input_transform, use_raw, augment = p["input_transform"], p["use_raw"], p["augment"]
    random_state, seed = as_random_state(random_state)
    dev = resolve_device(device)
    n_threads = resolve_num_threads(num_threads)
    show_progress, show_summary = resolve_flag(show_progress), resolve_flag(show_summary)
    adata = open_anndata(adata)

    ref = prepare_reference(adata, label_columns, coord_targets, layer=layer, use_raw=use_raw,
                            input_transform=input_transform)
    rng = np.random.default_rng(seed)
    n_val = int(round(len(ref.cells) * val_fraction))
    if n_val >= len(ref.cells):
        raise ParameterError(
            f"val_fraction={val_fraction} holds out all {len(ref.cells)} labelled reference cells, leaving none to "
            "train on; use a smaller val_fraction (e.g. 0.1)."
        )
    perm = rng.permutation(ref.cells)
    val_cells, train_cells = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if n_val:
        calib_cells, calib_source = val_cells, "validation cells (val_fraction)"
    else:
        held = calibration_split(ref.codes[train_cells, -1], calibration_fraction, rng)
        calib_cells, train_cells = train_cells[held], train_cells[~held]
        calib_source = "calibration split (calibration_fraction, stratified by the finest level)"
    if early_stopping_patience is not None and n_val == 0:
        warnings.warn("early_stopping_patience is set but val_fraction is 0: early stopping is disabled.", stacklevel=user_stacklevel())
    augmentation = ShiftAugmentation() if augment else None
    objective = _Objective(ref, train_cells, class_weight_power, label_smoothing, dev, augmentation, rng)

    monitor = ResourceMonitor(dev)
    t_start = time.perf_counter()
    with torch_threads(n_threads), torch.random.fork_rng(devices=[]), monitor:
        torch.manual_seed(seed)
        net = MultiTaskNetwork(
            ref.source.n_vars,
            [len(ref.classes[c]) for c in ref.label_columns],
            {n: values.shape[1] for n, values in ref.coords.items()},
            hidden_sizes,
            dropout_rate,
        ).to(dev)
        history = fit(net, objective, train_cells, val_cells, rng, batch_size=batch_size, num_epochs=num_epochs,
                      learning_rate=learning_rate, early_stopping_patience=early_stopping_patience,
                      show_progress=show_progress)
        embedding, logits = embed_reference(net, ref, dev)
        calibration, novelty = calibrate(ref, embedding, logits, train_cells, calib_cells)
    train_seconds = time.perf_counter() - t_start
    epochs_done = len(history)
    agreement = neighbour_label_agreement(embedding, ref.codes[ref.cells, -1], k=15, random_state=seed % 2**32)

    train_config = {
        "label_columns": ref.label_columns,
        "coord_targets": {k: (v if isinstance(v, str) else "<array>") for k, v in (coord_targets or {}).items()},
        "layer": layer,
        "use_raw": use_raw,
        "hidden_sizes": hidden_sizes,
        "dropout_rate": dropout_rate,
        "batch_size": batch_size,
        "num_epochs": num_epochs,
        "learning_rate": learning_rate,
        "label_smoothing": label_smoothing,
        "class_weight_power": class_weight_power,
        "input_transform": input_transform,
        "augment": augment,
        "val_fraction": val_fraction,
        "calibration_fraction": calibration_fraction,
        "early_stopping_patience": early_stopping_patience,
        "reference_storage": reference_storage,
        "num_threads": n_threads,
        "device": str(dev),
        "random_state": random_state,
        "seed": seed,
        "train_seconds": round(train_seconds, 3),
        "history": history,
        "resource_summary": {
            "training cells": int(len(train_cells)),
            "validation cells": int(n_val),
            "calibration cells": int(len(calib_cells)),
            "dropped unlabelled cells": ref.dropped,
            "genes": int(ref.source.n_vars),
            "device": dev.type,
            "cpu count": available_cpus(),
            "threads": n_threads,
            "gpu": gpu_name(dev),
            "epochs completed": epochs_done,
        },
        "runtime_summary": monitor.summary(len(train_cells) * epochs_done),
        "knn_space": {"space": "encoder output, L2-normalised", "neighbour_label_agreement": agreement},
        "unlabelled_cells_per_level": ref.unlabelled,
        "calibration": dict(calibration["report"], source=calib_source),
        "versions": _versions(),
    }
    train_config["runtime_summary"]["throughput_unit"] = "cell-epochs per second"
    metadata = describe(ref, coord_targets, hidden_sizes, dropout_rate, train_config)
    metadata["calibration"] = {"temperatures": calibration["temperatures"] if len(calib_cells) else {}}
    metadata["novelty"] = novelty
    model = TrainedModel(net, metadata,
                         {"embedding": embedding,
                          "labels": {c: ref.codes[ref.cells, j].astype(np.int32) for j, c in enumerate(ref.label_columns)},
                          "training_cell": np.isin(ref.cells, train_cells)})
    if show_summary:
        print(format_sections("atlasmtl training finished", model.resource_summary()))
    return model


# ---------------------------------------------------------------- prepare
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

    def standardised_coords(self) -> dict[str, np.ndarray]:
        """Coordinate targets standardised with :attr:`coord_stats` (what the coordinate heads learn)."""
        return {n: ((v - self.coord_stats[n]["mean"]) / self.coord_stats[n]["std"]).astype(np.float32)
                for n, v in self.coords.items()}


def prepare_reference(
    adata: ad.AnnData,
    label_columns: Sequence[str] | str,
    coord_targets: Mapping[str, Any] | None,
    *,
    layer: str | None,
    use_raw: bool,
    input_transform: str,
) -> Reference:
    """Check the reference, encode its labels and coordinates and pick the cells to train on.

    The matrix checks (values, semantics) are the ones :func:`atlasmtl.predict` runs on a query.
    """
    source = get_matrix_source(adata, layer=layer, use_raw=use_raw)
    if not adata.obs_names.is_unique:
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
    cells = np.flatnonzero(has_label)
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
    aligner = identity_aligner(source.n_vars, input_transform, semantics["semantics"])
    if input_transform == "zscore":
        aligner.gene_mean, aligner.gene_std = log_gene_statistics(source, aligner, cells)
    return Reference(source, semantics, aligner, label_columns, classes, codes, unlabelled, coords, coord_stats,
                     cells, dropped)


# ---------------------------------------------------------------- fit
def reference_rows(ref: Reference, rows: np.ndarray) -> Any:
    """Reference rows as read for the network, checked for NaN/inf (streamed data is checked only here)."""
    block = ref.source.rows(rows)
    check_finite(block, ref.source.where)
    return block


class _Objective:
    """The training loss: label-smoothed, class-weighted cross-entropy per level plus MSE per coordinate head."""

    def __init__(self, ref: Reference, train_cells: np.ndarray, class_weight_power: float,
                 label_smoothing: float, dev: torch.device, augmentation: ShiftAugmentation | None = None,
                 rng: np.random.Generator | None = None) -> None:
        self.ref, self.dev = ref, dev
        self.augmentation, self.rng = augmentation, rng or np.random.default_rng(0)
        # shifted batches are counts, whatever the reference holds
        self.counts_aligner = dataclasses.replace(ref.aligner, semantics="counts")
        self.coord_std = ref.standardised_coords()
        self.losses = [
            nn.CrossEntropyLoss(
                weight=class_weights(ref.codes[train_cells, j], len(ref.classes[col]), class_weight_power, dev),
                ignore_index=-1,
                reduction="sum",
                label_smoothing=label_smoothing,
            )
            for j, col in enumerate(ref.label_columns)
        ]

    def batch(self, rows: np.ndarray, train: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Network input, label codes and standardised coordinates of the reference cells ``rows``.

        With ``train=True`` and augmentation on, the input is a shifted copy (:func:`simulate_shift`).
        """
        ref, dev = self.ref, self.dev
        block = reference_rows(ref, rows)
        if train and self.augmentation is not None:
            shifted = simulate_shift(block, ref.semantics["semantics"], self.rng, self.augmentation)
            x = torch.from_numpy(self.counts_aligner.transform(shifted)).to(dev)
        else:
            x = torch.from_numpy(ref.aligner.transform(block)).to(dev)
        y = torch.from_numpy(ref.codes[rows]).to(dev)
        c = {n: torch.from_numpy(v[rows]).to(dev) for n, v in self.coord_std.items()}
        return x, y, c

    def __call__(self, net: MultiTaskNetwork, rows: np.ndarray, train: bool = False) -> torch.Tensor:
        x, y, c = self.batch(rows, train)
        _, logits, pred = net(x)
        loss = torch.zeros((), device=self.dev)
        for j, lg in enumerate(logits):
            n_valid = int((y[:, j] >= 0).sum())
            if n_valid:
                loss = loss + self.losses[j](lg, y[:, j]) / n_valid
        for n in self.coord_std:
            loss = loss + torch.mean((pred[n] - c[n]) ** 2)
        return loss


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
) -> list[dict[str, float]]:
    """The epoch loop (Adam, shuffled minibatches, optional validation and early stopping).

    Leaves ``net`` in eval mode with the best validation weights when early
    stopping is on; returns the loss history, one record per completed epoch.
    """
    n_val = len(val_cells)
    history: list[dict[str, float]] = []
    optimiser = torch.optim.Adam(net.parameters(), lr=learning_rate)
    best_val, best_state, stale = np.inf, None, 0
    bar = progress(range(num_epochs), desc="atlasmtl training", enabled=show_progress, unit="epoch")
    for epoch in bar:
        net.train()
        order = rng.permutation(train_cells)
        total, n_seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            rows = np.sort(order[start : start + batch_size])
            optimiser.zero_grad(set_to_none=True)
            loss = objective(net, rows, train=True)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"Training diverged: the loss became non-finite ({float(loss.detach())}) at epoch {epoch + 1}, "
                    f"minibatch {start // batch_size + 1}, with learning_rate={learning_rate:g}. Use a smaller "
                    "learning_rate (the default is 1e-3); no model was returned."
                )
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(rows)
            n_seen += len(rows)
        record = {"epoch": epoch + 1, "train_loss": total / max(n_seen, 1)}
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
        history.append(record)
        bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
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


# ---------------------------------------------------------------- embed and describe
def embed_reference(net: MultiTaskNetwork, ref: Reference, dev: torch.device) -> tuple[np.ndarray, list[np.ndarray]]:
    """The used reference cells in the KNN space (encoder output, L2-normalised; cells × last hidden size)
    and their logits per level (what calibration reads for the held-out cells)."""
    embedding = np.zeros((len(ref.cells), net.encoder.out_features), dtype=np.float32)
    logits = [np.zeros((len(ref.cells), len(ref.classes[c])), dtype=np.float32) for c in ref.label_columns]
    with torch.no_grad():
        for start in range(0, len(ref.cells), 4096):
            rows = ref.cells[start : start + 4096]
            out = net(torch.from_numpy(ref.aligner.transform(reference_rows(ref, rows))).to(dev))
            embedding[start : start + len(rows)] = out.embedding.cpu().numpy()
            for j, lg in enumerate(out.logits):
                logits[j][start : start + len(rows)] = lg.cpu().numpy()
    return normalise_rows(embedding), logits


def calibrate(
    ref: Reference,
    embedding: np.ndarray,
    logits: list[np.ndarray],
    train_cells: np.ndarray,
    calib_cells: np.ndarray,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit one temperature per level and the novelty null on the held-out cells.

    Returns ``(calibration, novelty)``: ``calibration["temperatures"]`` (level →
    T) and ``calibration["report"]`` (held-out cells, temperatures, top-label ECE
    before and after); ``novelty`` holds ``k`` and, per level, the median and
    scale of the held-out cells' log distance to the ``k`` nearest training cells
    of their predicted class (``None`` without held-out cells).
    """
    levels = ref.label_columns
    pos = np.searchsorted(ref.cells, calib_cells)
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
    novelty: dict[str, Any] = {"k": NOVELTY_K, "null": None}
    if len(pos):
        decoded = decode_paths(probs, level_paths(levels, ref.classes, infer_hierarchy(levels, ref.classes, ref.codes)))
        train_pos = np.searchsorted(ref.cells, train_cells)
        null = {}
        for j, lv in enumerate(levels):
            train_codes = ref.codes[train_cells, j]

            def index_of(c: int, j_codes=train_codes) -> NeighbourIndex | None:
                members = train_pos[j_codes == c]
                return NeighbourIndex(embedding[members]) if len(members) else None

            dist = class_distance(embedding[pos], decoded[j], index_of, NOVELTY_K)
            null[lv] = null_summary(log_distance(dist))
        novelty["null"] = null
    return {"temperatures": temperatures, "report": report}, novelty


def describe(
    ref: Reference,
    coord_targets: Mapping[str, Any] | None,
    hidden_sizes: list[int],
    dropout_rate: float,
    train_config: dict[str, Any],
) -> dict[str, Any]:
    """The model's metadata: genes, label encoders, input transform, coordinates, hierarchy, architecture."""
    genes = [str(g) for g in ref.source.var_names]
    return {
        "model_id": new_model_id(),  # the identity every saved file of this model carries
        "atlasmtl_version": __version__,
        "genes": genes,
        "gene_namespace": detect_namespace(genes),
        "gene_alt_ids": alternative_ids(ref.source.var),
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
            "n_genes": int(ref.source.n_vars),
            "n_classes": [len(ref.classes[c]) for c in ref.label_columns],
            "coord_dims": {n: int(v.shape[1]) for n, v in ref.coords.items()},
            "hidden_sizes": hidden_sizes,
            "dropout_rate": float(dropout_rate),
        },
        "train_config": train_config,
    }


def _versions() -> dict[str, str]:
    import scipy
    import sklearn

    return {
        "atlasmtl": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "anndata": importlib.metadata.version("anndata"),
        "scikit-learn": sklearn.__version__,
        "pandas": pd.__version__,
        "platform": platform.platform(),
    }
