"""Prediction: stream the query through gene alignment, the network, the gate and KNN.

:func:`predict` = :func:`prepare_query` (values, semantics, gene aligner) → per
batch :func:`_infer` (network calls and the low-confidence mask, computed once)
→ per block of :data:`~atlasmtl.knn.SEARCH_BLOCK` cells :func:`_search_block`
(novelty distances and the KNN votes for the cells the gate sends, in one
reference search) → :func:`_assemble` (the gate's final
:class:`~atlasmtl.calls.LevelCalls` per level).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Any, Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ._version import __version__
from .exceptions import InputError, ParameterError, user_stacklevel
from .calibration import softmax
from .gating import GatingConfig, apply_gate, call_confidence, low_confidence
from .hierarchy import decode_paths, level_paths, parent_codes
from .genes import UNMEASURED_MIN_EXPECTED, WARN_OVERLAP, GeneAligner, build_aligner, unmeasured_genes
from .io import open_anndata, read_h5ad_obs
from .calls import LevelCalls, dominant_of
from .inputs import (MatrixSource, check_block, checked_semantics, get_matrix_source, h5ad_query_source, raw_hint,
                     sample_rows)
from .knn import COORDINATE_SOURCES, SEARCH_BLOCK, ReferenceSearch, neighbour_coordinates, normalise_rows, vote
from .novelty import (COARSE_FLAG_VIEW_OFFSET, INPUT_VIEW_CONFIDENCE_GUARD, KNN_VOTE_MAX_CONFIDENCE_DROP,
                      KNN_VOTE_MAX_Z, NEIGHBOURHOOD_K, NOVELTY_CONFIDENCE_GUARD, NOVELTY_THRESHOLD,
                      QUERY_ONLY_MAX_LOCATION, QUERY_ONLY_MIN_CELLS, QUERY_ONLY_MIN_HELD, QUERY_ONLY_SHARE, InputView,
                      held_out_weights, log_distance, neighbourhood_novelty, neighbourhood_pool, novelty_z,
                      query_only_location, query_only_share)
from .model import TrainedModel
from .network import NetworkOutput, SparseInput
from .result import PredictionResult
from .validation import as_bool, as_choice, as_float, as_int
from .runtime import (
    ResourceMonitor,
    available_cpus,
    gpu_name,
    progress,
    resolve_device,
    resolve_flag,
    resolve_num_threads,
    torch_threads,
)


def _network_input(aligner: GeneAligner, block: Any, dev: torch.device,
                   zero_input: torch.Tensor | None = None) -> tuple[torch.Tensor | SparseInput, np.ndarray]:
    """The network input of a block and, per cell, whether any model gene is detected.

    Sparse blocks stay sparse for every input transform: a :class:`~atlasmtl.network.SparseInput`
    holding ``f(x) - f(0)`` (non-zero only where the cell has counts) and ``f(0)`` (``zero_input``,
    :meth:`~atlasmtl.genes.GeneAligner.zero_input` as a tensor), so the first layer is a sparse
    product plus a bias and the dense ``zscore`` matrix is never formed. Dense blocks stay dense.
    """
    if sp.issparse(block):
        x = aligner.sparse_input(block)
        x.sort_indices()
        detected = np.diff(x.indptr) > 0 if aligner.keeps_zeros else aligner.detected(block)
        return SparseInput(x, zero_input), detected
    x = aligner.transform(block)
    detected = (x != 0).any(axis=1) if aligner.keeps_zeros else aligner.detected(block)
    return torch.from_numpy(x).to(dev), detected


def _gene_stats(model: TrainedModel) -> dict[str, np.ndarray | None]:
    """The model's per-gene mean and standard deviation (``zscore`` models), as float32 arrays."""
    stats = model.metadata.get("gene_stats")
    if not stats:
        return {"gene_mean": None, "gene_std": None}
    return {"gene_mean": np.asarray(stats["mean"], dtype=np.float32),
            "gene_std": np.asarray(stats["std"], dtype=np.float32)}


class _Decoder:
    """What turns one batch's logits into calls and places: temperatures, nested-level paths, parents, class
    counts, the novelty nulls and the reference coordinates."""

    def __init__(self, model: TrainedModel, novelty_threshold: float | None, coordinates: str | None = None) -> None:
        levels = model.label_columns
        temps = (model.metadata.get("calibration") or {}).get("temperatures") or {}
        self.temperatures = [float(temps.get(lv, 1.0)) for lv in levels]
        self.runs = level_paths(levels, model.classes, model.hierarchy)
        self.parent_of = {
            lv: parent_codes(model.classes[lv], model.classes[levels[j - 1]], model.hierarchy[lv])
            for j, lv in enumerate(levels) if j and lv in model.hierarchy
        }
        self.class_counts = {lv: np.bincount(model.reference["labels"][lv][model.reference["labels"][lv] >= 0],
                                             minlength=len(model.classes[lv])) for lv in levels}
        novelty = model.metadata.get("novelty") or {}
        self.null = novelty.get("null") if novelty_threshold is not None else None
        self.novelty_k = int(novelty.get("k", 10))
        stored_view = novelty.get("input_view") if self.null is not None else None
        #: The novelty score's input view (models saved before it have none: the embedding view alone).
        self.input_view = InputView(stored_view) if stored_view else None
        #: The reference cells' coordinates query cells are placed from (``None``: the heads place them).
        self.place = model.reference["coords"] if coordinates == "neighbours" else None


def _reference_classes(model: TrainedModel, decoder: _Decoder) -> dict[str, dict[str, Any]]:
    """Per level, what the result's readers need to know of each class (``result.metadata["reference_classes"]``):
    its reference cells (``cells``) and whether the input view scores calls into it (``input_view``; ``None``
    for a model without a view). A type the reference lacks called as a class the view does not score is
    judged by the embedding and by the query-only check (:func:`_query_only_flags`; the report's novelty
    table shows both)."""
    view = decoder.input_view
    return {lv: {"cells": decoder.class_counts[lv].astype(int).tolist(),
                 "input_view": None if view is None else view.scores(lv, len(model.classes[lv])).tolist()}
            for lv in model.label_columns}


def predict(
    model: TrainedModel,
    adata: ad.AnnData | str | os.PathLike,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_map: Any = None,
    min_gene_overlap: float = 0.5,
    knn_correction: str = "low_conf_only",
    knn_k: int = 15,
    knn_conf_low: float = 0.6,
    confidence_high: float = 0.7,
    confidence_low: float = 0.4,
    margin_threshold: float = 0.2,
    novelty_threshold: float | None = NOVELTY_THRESHOLD,
    neighbourhood_k: int | None = NEIGHBOURHOOD_K,
    batch_key: str | None = None,
    coordinates: str = "auto",
    batch_size: int = 4096,
    num_threads: int | str = 10,
    device: str = "auto",
    show_progress: bool | None = None,
    show_summary: bool | None = None,
) -> PredictionResult:
    """Annotate every query cell at every level, place it on the reference coordinates, and abstain where unsure.

    Parameters
    ----------
    model
        A :class:`TrainedModel`.
    adata
        Query AnnData (in memory or backed) or the path of an ``.h5ad`` file (read backed, in chunks).
    layer
        Read values from ``adata.layers[layer]`` instead of ``X``.
    use_raw
        Read values (and genes) from ``adata.raw`` instead of ``X``.
    gene_map
        Query gene name → model gene name (dict, DataFrame or CSV/TSV path), for different namespaces.
    min_gene_overlap
        Refuse queries holding fewer than this fraction of the model's genes (0 disables).
    knn_correction
        ``"off"``, ``"low_conf_only"`` (only low-confidence cells are searched) or ``"all"``.
    knn_k
        Reference neighbours that vote for a searched cell.
    knn_conf_low
        Vote fraction needed to accept the vote. An accepted vote confirms the network's call (it
        never replaces it): a confirmed call stands even below ``confidence_low``.
    confidence_high
        Calls with confidence (the calibrated probability of the call) below this are low-confidence.
    confidence_low
        Calls with confidence below this are Unknown (unless a KNN vote confirms them).
    margin_threshold
        Calls with margin (the call's probability minus the best other class's; negative where joint decoding
        of nested levels chose another class than the level's top one) below this are low-confidence.
    novelty_threshold
        A cell whose novelty score (robust z-score of its distance to the
        reference cells of its called class, against held-out reference cells)
        exceeds this is novel at that level: Unknown there and below, and the KNN
        vote cannot relabel it; not when its call's calibrated probability is at
        least :data:`~atlasmtl.novelty.NOVELTY_CONFIDENCE_GUARD` (0.9). The same
        threshold applies to the input view (:class:`~atlasmtl.novelty.InputView`,
        distance in a PCA of the network input), whose largest z over the levels
        makes only the finest call Unknown, without that guard. Above the finest
        level a cell is novel only where the input view, where it scores the
        call, also puts it above the threshold
        (:data:`~atlasmtl.novelty.COARSE_FLAG_VIEW_OFFSET`): a known type in
        another state keeps its coarse call. ``None`` disables novelty detection (a value below 0
        is refused: it would call most known cells novel).
    neighbourhood_k
        Query cells (the cell included) whose novelty z-scores are averaged into each cell's
        ``neighbourhood_novelty`` (nearest in the input view's PCA of the query; above
        :data:`~atlasmtl.novelty.NEIGHBOURHOOD_MAX_CELLS` usable cells, among a random sample of
        that many). It ranks groups of query cells the reference lacks better than the per-cell
        score. At the finest level, a cell whose neighbourhood's mean z exceeds ``novelty_threshold``
        is novel there (Unknown; its coarser calls stay): the typical cell of its group is far from
        the reference. ``None`` or 0 skips it (the column is NaN, and no cell is flagged by it; nor
        by the query-only check, whose share counts :data:`~atlasmtl.novelty.NEIGHBOURHOOD_K` cells
        whatever this is and is averaged over this many).
    batch_key
        An ``obs`` column naming each query cell's sample or batch (``None``, the default: the query is one
        batch). The novelty scores are located at the query, so that a whole query from another platform is
        not called novel; with ``batch_key`` each batch is located, and its neighbourhoods and query-only
        groups are found, among its own cells, as if it were mapped alone, so that a batch shallower or
        noisier than the others is not called novel beside them. Calls, confidences, the KNN vote and the
        coordinates do not depend on it. A batch made mostly of a type the reference lacks hides it, as a
        whole query does (the README's Known limits), and a batch of a few cells locates its cells at
        themselves (fewer than :data:`BATCH_MIN_CELLS` warn). ``result.metadata["batches"]`` counts each
        batch's cells and holds its query-only record.
    coordinates
        Where a query cell's coordinates (one per ``coord_targets`` name of the model) come from:
        ``"neighbours"``, the mean of the coordinates of its ``knn_k`` nearest reference cells in the
        KNN space (every cell with signal is searched for them, whatever ``knn_correction``; cells
        without signal get NaN); ``"heads"``, the coordinate heads' regression (drawn toward the
        middle of the reference where a cell is ambiguous); ``"auto"`` (default), neighbours where
        the model stores its reference cells' coordinates (models built since they are stored),
        else the heads. Ignored by a model without coordinate heads.
    batch_size
        Cells per inference batch.
    num_threads
        CPU threads (capped at the CPUs available; ``"max"`` = 80% of them).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    show_progress
        Batch progress bar with ETA on stderr; ``None`` = on in a notebook or an interactive terminal.
    show_summary
        Print a compact summary at the end; ``None`` = on in a notebook or an interactive terminal.

    Returns
    -------
    PredictionResult
    """
    return _predict_part(model, adata, layer=layer, use_raw=use_raw, gene_map=gene_map, min_gene_overlap=min_gene_overlap,
                         knn_correction=knn_correction, knn_k=knn_k, knn_conf_low=knn_conf_low,
                         confidence_high=confidence_high, confidence_low=confidence_low,
                         margin_threshold=margin_threshold, novelty_threshold=novelty_threshold,
                         neighbourhood_k=neighbourhood_k, batch_key=batch_key, coordinates=coordinates,
                         batch_size=batch_size, num_threads=num_threads, device=device, show_progress=show_progress,
                         show_summary=show_summary)


def _predict_part(
    model: TrainedModel,
    adata: ad.AnnData | str | os.PathLike,
    *,
    rows: Callable[[int], slice] | None = None,
    gather: Callable[["_Buffers", dict[str, Any]], tuple["_Buffers", dict[str, Any]] | None] | None = None,
    layer: str | None,
    use_raw: bool,
    gene_map: Any,
    min_gene_overlap: float,
    knn_correction: str,
    knn_k: int,
    knn_conf_low: float,
    confidence_high: float,
    confidence_low: float,
    margin_threshold: float,
    novelty_threshold: float | None,
    batch_size: int,
    num_threads: int | str,
    device: str | torch.device,
    show_progress: bool | None,
    show_summary: bool | None,
    neighbourhood_k: int | None = NEIGHBOURHOOD_K,
    batch_key: str | None = None,
    coordinates: str = "auto",
) -> PredictionResult | None:
    """:func:`predict`, optionally on a part of the cells: ``rows(n_cells)`` picks the rows this
    process streams, and ``gather(buffers, runtime)`` joins every process's outputs (``None`` on
    processes that do not assemble the result; see :func:`atlasmtl.distributed.predict_distributed`)."""
    gate = GatingConfig(confidence_high, confidence_low, margin_threshold, knn_correction, knn_k, knn_conf_low).validate()
    batch_size = as_int("batch_size", batch_size)
    min_gene_overlap = as_float("min_gene_overlap", min_gene_overlap, 0.0, 1.0)
    use_raw = as_bool("use_raw", use_raw)
    if novelty_threshold is not None:
        novelty_threshold = as_float("novelty_threshold", novelty_threshold)
        if novelty_threshold < 0:  # "-1 to disable" would call most known cells novel
            raise ParameterError(f"novelty_threshold={novelty_threshold!r} is below 0: it is a robust z-score (default "
                                 f"{NOVELTY_THRESHOLD}), and below 0 most known cells would be called novel. Use "
                                 "novelty_threshold=None to switch novelty detection off.")
    neighbourhood_k = 0 if neighbourhood_k is None else as_int("neighbourhood_k", neighbourhood_k, minimum=0)
    if not isinstance(model, TrainedModel):
        hint = ""
        if isinstance(model, (str, os.PathLike)):  # the model folder, as the command line takes it
            hint = f": load it first, model = atlasmtl.TrainedModel.load({str(model)!r})"
        elif isinstance(adata, TrainedModel):
            hint = ": the arguments are swapped, predict(model, adata)"
        raise ParameterError(f"model must be a TrainedModel (from build_model or TrainedModel.load), not "
                             f"{type(model).__name__}{hint}.")
    coordinates = _coordinate_source(model, as_choice("coordinates", coordinates, COORDINATE_SOURCES))
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    n_threads = resolve_num_threads(num_threads)
    show_progress, show_summary = resolve_flag(show_progress, "show_progress"), resolve_flag(show_summary, "show_summary")

    if batch_key is not None and not isinstance(batch_key, str):
        raise ParameterError(f"batch_key must be the name of an obs column (a str) or None, not "
                             f"{type(batch_key).__name__}.")
    if isinstance(adata, (str, os.PathLike)):
        opened = h5ad_query_source(adata, layer=layer, use_raw=use_raw)
        batches = None if batch_key is None else query_batches(read_h5ad_obs(adata), batch_key)
    else:
        adata = open_anndata(adata)
        opened = contextlib.nullcontext((adata.obs_names, get_matrix_source(adata, layer=layer, use_raw=use_raw)))
        batches = None if batch_key is None else query_batches(adata.obs, batch_key)
    with opened as (obs_names, source):
        return _predict_source(model, obs_names, source, gate, dev, n_threads, show_progress, show_summary,
                               layer=layer, use_raw=use_raw, gene_map=gene_map,
                               min_gene_overlap=min_gene_overlap, batch_size=batch_size,
                               novelty_threshold=novelty_threshold, neighbourhood_k=neighbourhood_k,
                               coordinates=coordinates, rows=rows, gather=gather, batches=batches,
                               batch_key=batch_key)


def prepare_query(
    model: TrainedModel, source: MatrixSource, gene_map: Any, min_gene_overlap: float
) -> tuple[GeneAligner, dict[str, Any], dict[str, Any]]:
    """Check the query's values, detect what they hold and align its genes to the model's.

    Returns ``(aligner, semantics, gene report)``; alignment warnings are re-issued
    to the caller and recorded in the gene report.
    """
    if not source.var_names.is_unique:
        raise InputError("Query var_names are not unique; call adata.var_names_make_unique() first.")
    input_transform = model.metadata["input_transform"]
    sample = sample_rows(source)  # read once: semantics detection and the unmeasured-gene check
    semantics = checked_semantics(source, input_transform, sample)
    sample = source.natural_log1p_cp10k(sample)  # log values of another base or total, as every later read
    if input_transform != "binary" and semantics["semantics"] != "lognorm":
        semantics["normalisation"] = "query normalised to 1e4 total per cell, then log1p, to match the model"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aligner = _build_query_aligner(model, source, input_transform, semantics, gene_map, min_gene_overlap)
        # under WARN_OVERLAP the aligner's own warning or error names adata.raw; above it, only this warning
        hint = raw_hint(source, model.genes, aligner.report.get("n_matched"))
        if hint and aligner.report.get("overlap_fraction", 1.0) >= WARN_OVERLAP:
            warnings.warn(f"{aligner.report.get('n_missing', 0)} of the model's genes are missing from the query and "
                          "are read as not expressed." + hint, UserWarning, stacklevel=2)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=user_stacklevel())
    gene_report = dict(aligner.report)
    gene_report["warnings"] = [str(w.message) for w in caught]
    unmeasured = _unmeasured_check(model, sample, aligner, semantics["semantics"])
    if unmeasured is not None:
        gene_report["unmeasured"] = unmeasured
        if unmeasured["lacks_genes"]:
            message = (
                f"{unmeasured['genes_unexpectedly_zero']} of the {unmeasured['genes_expected']} model genes the query "
                f"holds and its cells should detect at their depth (each in at least {UNMEASURED_MIN_EXPECTED:.0f} of the "
                f"{unmeasured['cells_sampled']} cells sampled) are detected in none "
                f"({unmeasured['share_unexpectedly_zero']:.0%}): the query seems not to have measured them (for example, "
                "columns of zeros added to match the reference's genes). They are read as not expressed, so expect "
                "less accurate calls; see the gene report's 'unmeasured' entry."
            )
            warnings.warn(message, UserWarning, stacklevel=user_stacklevel())
            gene_report["warnings"].append(message)
    return aligner, semantics, gene_report


def _build_query_aligner(model: TrainedModel, source: MatrixSource, input_transform: str, semantics: dict[str, Any],
                         gene_map: Any, min_gene_overlap: float) -> GeneAligner:
    return build_aligner(model.genes, model.metadata["gene_namespace"], model.metadata.get("gene_alt_ids", {}), source,
                         input_transform, semantics["semantics"], gene_map=gene_map,
                         min_gene_overlap=min_gene_overlap, **_gene_stats(model))


def _unmeasured_check(model: TrainedModel, sample: Any, aligner: GeneAligner,
                      semantics: str) -> dict[str, Any] | None:
    """:func:`~atlasmtl.genes.unmeasured_genes` on ``sample``, the query rows semantics detection read
    (:func:`~atlasmtl.inputs.sample_rows`), or ``None`` for a model saved without a detection profile or a query
    that holds neither counts nor log-normalised values."""
    profile = model.metadata.get("gene_detection")
    if not profile or semantics not in ("counts", "lognorm"):
        return None
    present = None if aligner.aggregation is None else np.asarray(aligner.aggregation.sum(axis=0)).ravel() > 0
    return unmeasured_genes(profile, aligner.model_counts(sample), present)


def _coordinate_source(model: TrainedModel, asked: str) -> str | None:
    """Where the query's coordinates come from (``predict(coordinates=)``): ``"neighbours"`` or ``"heads"``;
    ``None`` for a model without coordinate heads."""
    if not model.coord_targets:
        return None
    stored = bool(model.reference.get("coords"))
    if asked == "neighbours" and not stored:
        raise ParameterError(
            "coordinates='neighbours' needs the reference cells' coordinates, which this model does not store (it "
            "was saved before atlasmtl kept them); use coordinates='heads', or rebuild the model with build_model.")
    if asked == "auto":
        return "neighbours" if stored else "heads"
    return asked


class _Buffers:
    """Per-cell outputs of the streaming loop, filled batch by batch (field names as in :class:`LevelCalls`)."""

    def __init__(self, model: TrainedModel, n: int) -> None:
        self.levels = {
            lv: {
                "raw": np.empty(n, dtype=np.int32),
                "conf": np.empty(n, dtype=np.float32),
                "margin": np.empty(n, dtype=np.float32),
                "is_low_conf": np.empty(n, dtype=bool),
                "knn": np.full(n, -1, dtype=np.int32),
                "knn_vote_frac": np.full(n, np.nan, dtype=np.float32),
                "covered": np.zeros(n, dtype=bool),
                "distance": np.full(n, np.nan, dtype=np.float64),
                "input_distance": np.full(n, np.nan, dtype=np.float64),
                "input_distance_residual": np.full(n, np.nan, dtype=np.float64),
                "input_matched": np.zeros(n, dtype=bool),
            }
            for lv in model.label_columns
        }
        self.no_signal = np.zeros(n, dtype=bool)
        #: The input view's PCA coordinates of every cell (cells × components; filled when the view is used
        #: and the neighbourhood novelty is asked for, else 0 columns).
        self.view_points = np.zeros((n, 0), dtype=np.float32)
        #: What the query-only check found (:func:`_query_only_candidates`, :func:`_query_only_flags`; empty when
        #: it is off).
        self.query_only: dict[str, Any] = {}
        #: Per coordinate head, cells × dims; NaN until placed (cells without signal stay unplaced when placed
        #: from reference neighbours).
        self.coords = {
            name: np.full((n, d), np.nan, dtype=np.float32)
            for name, d in model.metadata["architecture"]["coord_dims"].items()
        }
        self.n_searched = 0

    def subset(self, rows: np.ndarray) -> "_Buffers":
        """The per-cell outputs of the cells at ``rows`` (copies), with an empty query-only record."""
        part = object.__new__(_Buffers)
        part.levels = {lv: {k: v[rows] for k, v in fields.items()} for lv, fields in self.levels.items()}
        part.no_signal, part.view_points = self.no_signal[rows], self.view_points[rows]
        part.coords = {name: v[rows] for name, v in self.coords.items()}
        part.query_only, part.n_searched = {}, 0
        return part


#: ``predict(..., batch_key=...)`` warns of batches with fewer cells than this (their novelty location is their own).
BATCH_MIN_CELLS = 20


def query_batches(obs: pd.DataFrame, batch_key: str) -> tuple[np.ndarray, list[str]]:
    """Each query cell's batch code (0, 1, ... in order of first appearance) and the batch names, from the
    ``obs`` column ``batch_key`` (see :func:`predict`)."""
    if batch_key not in obs.columns:
        shown = ", ".join(map(repr, list(obs.columns)[:10])) or "none"
        raise InputError(f"batch_key={batch_key!r} is not a column of the query's obs (it has {shown}"
                         f"{', ...' if len(obs.columns) > 10 else ''}): name the column that holds each cell's sample "
                         "or batch, or leave batch_key out to treat the query as one batch.")
    values = obs[batch_key]
    missing = int(values.isna().sum())
    if missing:
        raise InputError(f"batch_key={batch_key!r}: {missing} query cell(s) have no value in that column; give them "
                         "one (e.g. their sample's name) or leave batch_key out.")
    codes, names = pd.factorize(values.astype(str), sort=False)
    sizes = np.bincount(codes, minlength=len(names))
    small = np.flatnonzero(sizes < BATCH_MIN_CELLS)
    if len(small):
        shown = ", ".join(f"{names[i]!r} ({sizes[i]})" for i in small[:3])
        warnings.warn(f"batch_key={batch_key!r}: {len(small)} of the {len(names)} batches hold fewer than "
                      f"{BATCH_MIN_CELLS} cells (e.g. {shown}). Each batch is judged among its own cells, so in so "
                      "few the novelty scores are located at the cells themselves and seldom call one novel: give "
                      "batch_key a column of samples, not of cells or small groups.", UserWarning,
                      stacklevel=user_stacklevel())
    return codes.astype(np.int64), [str(n) for n in names]


def _infer(
    model: TrainedModel,
    output: NetworkOutput,
    detected: np.ndarray,
    gate: GatingConfig,
    decoder: _Decoder,
    buffers: _Buffers,
    rows: slice,
) -> np.ndarray:
    """Network calls of one batch: calibrated probabilities, the jointly decoded path, confidence,
    margin and the low-confidence mask per level, and the heads' de-standardised coordinates (unless the
    cells are placed from their reference neighbours). Returns the batch's any-level low-confidence mask
    (cells without signal excluded)."""
    levels = model.label_columns
    probs = [softmax(lg.detach().cpu().numpy().astype(np.float64), t) for lg, t in zip(output.logits, decoder.temperatures)]
    codes = decode_paths(probs, decoder.runs)
    confs = [call_confidence(p, c) for p, c in zip(probs, codes)]
    no_signal = ~detected
    for conf, _ in confs:
        no_signal |= ~np.isfinite(conf)
    buffers.no_signal[rows] = no_signal
    any_low = np.zeros(rows.stop - rows.start, dtype=bool)
    for lv, code, (conf, margin) in zip(levels, codes, confs):
        low = low_confidence(conf, margin, gate) & ~no_signal
        o = buffers.levels[lv]
        o["raw"][rows], o["conf"][rows], o["margin"][rows], o["is_low_conf"][rows] = code, conf, margin, low
        any_low |= low
    if decoder.place is None:  # else the cells are placed from their reference neighbours (_search_block)
        for name, values in output.coords.items():
            stats = model.metadata["coord_stats"][name]
            buffers.coords[name][rows] = values.cpu().numpy() * stats["std"] + stats["mean"]
    return any_low


def _search_block(
    model: TrainedModel,
    search: ReferenceSearch,
    points: np.ndarray,
    any_low: np.ndarray,
    gate: GatingConfig,
    decoder: _Decoder,
    buffers: _Buffers,
    start: int,
) -> None:
    """Reference searches of a block of cells (``points``: their L2-normalised embeddings, from row
    ``start``), all in one :meth:`~atlasmtl.knn.ReferenceSearch.search`: each cell's novelty distance
    per level (to the nearest training cells of its call there), the ``knn_k`` nearest reference cells
    of every cell with signal when the model places coordinates from them (``decoder.place``;
    :func:`~atlasmtl.knn.neighbour_coordinates`), and the KNN votes of the cells the gate sends (all, or
    the low-confidence ones; never cells without signal), level by level. Votes are class-balanced; at
    a level nested in the previous one only the children of the cell's call there may win. The gate
    (:func:`~atlasmtl.gating.apply_gate`) accepts a vote only where it confirms the call."""
    stop = start + len(any_low)
    usable = ~buffers.no_signal[start:stop]
    voters = np.zeros(len(usable), dtype=bool)
    if gate.knn_correction != "off":
        voters = any_low & usable if gate.knn_correction == "low_conf_only" else usable.copy()
    search_rows = np.flatnonzero(usable if decoder.place is not None else voters)
    search_rows = search_rows if len(search_rows) else None
    class_codes = {}
    if decoder.null is not None:
        for lv in model.label_columns:
            if lv in decoder.null:
                class_codes[lv] = np.where(usable, buffers.levels[lv]["raw"][start:stop], -1)
    if search_rows is None and not class_codes:
        return
    neighbours, distances = search.search(points, search_rows, gate.knn_k, class_codes, decoder.novelty_k)
    for lv, dist in distances.items():
        buffers.levels[lv]["distance"][start:stop] = dist
    if search_rows is None:
        return
    if decoder.place is not None:
        for name, reference_coords in decoder.place.items():
            buffers.coords[name][start + search_rows] = neighbour_coordinates(neighbours, reference_coords)
    searched = voters[search_rows]  # the searched cells the gate sends to the vote
    if not searched.any():
        return
    search_rows, neighbours = search_rows[searched], neighbours[searched]
    buffers.n_searched += len(search_rows)
    previous = None
    for lv in model.label_columns:
        o = buffers.levels[lv]
        cells = start + search_rows
        voting = o["is_low_conf"][cells] if gate.knn_correction == "low_conf_only" else np.ones(len(search_rows), dtype=bool)
        allowed = None
        if lv in decoder.parent_of and previous is not None:
            allowed = decoder.parent_of[lv][None, :] == previous[voting][:, None]
        rows, nbr = cells[voting], neighbours[voting]
        code, frac = vote(nbr, model.reference["labels"][lv], len(model.classes[lv]),
                          class_counts=decoder.class_counts[lv], allowed=allowed)
        o["knn"][rows], o["knn_vote_frac"][rows], o["covered"][rows] = code, frac, True
        previous = o["raw"][cells].astype(np.int64)  # the vote never changes a call: the next level nests in it


def _input_view_block(view: InputView, x: SparseInput | torch.Tensor, zero: np.ndarray | None,
                      buffers: _Buffers, rows: slice) -> None:
    """The input view's log distance per level for one batch (to the kept reference cells of each
    cell's call there, in the PCA and with the residual; :meth:`~atlasmtl.novelty.InputView.log_distances`),
    from its network input; its PCA coordinates go to ``buffers.view_points`` when that has columns."""
    points = view.project(x.rows, zero) if isinstance(x, SparseInput) else view.project(x.cpu().numpy())
    if buffers.view_points.shape[1]:
        buffers.view_points[rows] = points[:, : buffers.view_points.shape[1]]
    usable = ~buffers.no_signal[rows]
    for lv in view.levels:
        o = buffers.levels[lv]
        calls = np.where(usable, o["raw"][rows], -1)
        o["input_distance"][rows], o["input_distance_residual"][rows], o["input_matched"][rows] = \
            view.log_distances(points, calls, lv)


def _typical_confidence(calls: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Per cell, the median finite confidence of the query's cells given the same call (NaN where none)."""
    out = np.full(len(calls), np.nan, dtype=np.float64)
    finite = np.isfinite(conf)
    for c in np.unique(calls[finite]):
        members = calls == c
        out[members] = np.median(conf[members & finite])
    return out


def _assemble(model: TrainedModel, buffers: _Buffers, gate: GatingConfig, decoder: _Decoder,
              novelty_threshold: float | None, neighbourhood_k: int = 0) -> dict[str, LevelCalls]:
    """The gate's final calls per level, coarse to fine: the network's calls, the KNN votes, the
    novelty flags (Unknown that no vote can relabel; above the finest level only where the input view
    agrees, :data:`~atlasmtl.novelty.COARSE_FLAG_VIEW_OFFSET`), cells without signal, and the hierarchy
    (a level nested in an Unknown parent is Unknown; a call whose parent disagrees is Unknown);
    then each level's neighbourhood novelty (``neighbourhood_k`` query neighbours; 0: none), whose
    finest-level value above ``novelty_threshold`` makes the finest call novel (Unknown)."""
    calls: dict[str, LevelCalls] = {}
    parent: LevelCalls | None = None
    view_at: dict[str, np.ndarray] = {}  # the input view's z per level: it judges coarse flags (see InputView)
    if decoder.input_view is not None:
        for lv in decoder.input_view.levels:
            called = np.where(buffers.no_signal, -1, buffers.levels[lv]["raw"])
            view_at[lv] = decoder.input_view.score(buffers.levels[lv]["input_distance"],
                                                   buffers.levels[lv]["input_distance_residual"], called, lv,
                                                   matched=buffers.levels[lv]["input_matched"])
    # ... and its largest z over the levels judges the finest call
    view_z = np.fmax.reduce(list(view_at.values())) if view_at else None
    for lv in model.label_columns:
        o = buffers.levels[lv]
        z = np.full(len(o["raw"]), np.nan, dtype=np.float32)
        novel = np.zeros(len(o["raw"]), dtype=bool)
        if decoder.null is not None and lv in decoder.null and decoder.null[lv].get("n"):
            score, _ = novelty_z(log_distance(o["distance"]), decoder.null[lv], o["raw"])
            conf = np.nan_to_num(o["conf"], nan=0.0)
            novel = (np.nan_to_num(score, nan=-np.inf) > novelty_threshold) & (conf < NOVELTY_CONFIDENCE_GUARD)
            if COARSE_FLAG_VIEW_OFFSET is not None and lv != model.label_columns[-1] and lv in view_at:
                # near its coarse class in the input (a known type in another state): the coarse call stands
                novel &= ~(view_at[lv] <= novelty_threshold + COARSE_FLAG_VIEW_OFFSET)
            if view_z is not None and lv == model.label_columns[-1]:  # the finest score is the larger z
                novel |= (np.nan_to_num(view_z, nan=-np.inf) > novelty_threshold) & (conf < INPUT_VIEW_CONFIDENCE_GUARD)
                score = np.fmax(score, view_z)
            z = score.astype(np.float32)
        nested = parent is not None and lv in decoder.parent_of
        if nested:
            novel |= parent.is_novel
        abstain = novel | buffers.no_signal
        if nested:
            abstain = abstain | parent.is_unknown
        covered = o["covered"]
        if KNN_VOTE_MAX_Z != float("inf"):  # a vote does not vouch for a cell that stands out this far
            covered = covered & ~(np.nan_to_num(z, nan=-np.inf) > KNN_VOTE_MAX_Z)
        if KNN_VOTE_MAX_CONFIDENCE_DROP != float("inf"):  # ... nor for one far less sure than its class's cells
            covered = covered & ~(o["conf"] < _typical_confidence(o["raw"], o["conf"]) - KNN_VOTE_MAX_CONFIDENCE_DROP)
        gated = apply_gate(o["raw"], o["conf"], o["margin"], o["knn"], np.nan_to_num(o["knn_vote_frac"]),
                           covered, gate, low=o["is_low_conf"], abstain=abstain)
        code, unknown = gated["code"], gated["is_unknown"]
        if nested:  # safety net: a call whose parent call disagrees is not a path of the reference
            clash = (code >= 0) & (parent.pred >= 0) & (decoder.parent_of[lv][np.maximum(code, 0)] != parent.pred)
            code[clash], unknown = -1, unknown | clash
        calls[lv] = LevelCalls(
            pred=code,
            conf=o["conf"],
            margin=o["margin"],
            is_unknown=unknown,
            raw=o["raw"],
            knn=o["knn"],
            knn_vote_frac=o["knn_vote_frac"],
            is_low_conf=gated["is_low_conf"],
            used_knn=gated["used_knn"] & ~unknown,
            novelty=z,
            is_novel=novel,
        )
        parent = calls[lv]
    if neighbourhood_k and buffers.view_points.shape[1]:
        scores = {lv: c.novelty for lv, c in calls.items() if np.isfinite(c.novelty).any()}
        finest_level = model.label_columns[-1]
        finest = calls[finest_level]
        n_finest = len(model.classes[finest_level])
        candidates = _query_only_candidates(decoder.input_view, finest.raw, buffers.no_signal, finest_level, n_finest,
                                            buffers.query_only) if novelty_threshold is not None else None
        # the share counts the NEIGHBOURHOOD_K nearest cells whatever neighbourhood_k averages: with a few, it
        # only asks whether the nearest other cell is a query cell, true of most cells in a query larger than
        # the held record
        query_only = _query_only_share(decoder.input_view, buffers, finest.raw, n_finest, NEIGHBOURHOOD_K) \
            if candidates is not None and candidates.any() else None
        if query_only is not None:
            scores[_QUERY_ONLY] = query_only  # averaged over the same neighbours, in the same search
        averaged = neighbourhood_novelty(buffers.view_points, scores, ~buffers.no_signal, neighbourhood_k)
        smoothed = averaged.pop(_QUERY_ONLY, None)
        for lv, values in averaged.items():
            calls[lv].neighbourhood_novelty = values
        if novelty_threshold is not None:  # a neighbourhood novel on average makes the finest call Unknown
            flagged = np.nan_to_num(finest.neighbourhood_novelty, nan=-np.inf) > novelty_threshold
            if smoothed is not None:  # ... and so does a group of query cells alone, called as an unscored class
                flagged |= _query_only_flags(smoothed, finest.raw, candidates, n_finest, buffers.query_only)
            finest.is_novel = finest.is_novel | flagged
            finest.is_unknown = finest.is_unknown | flagged
            finest.used_knn = finest.used_knn & ~flagged
            finest.pred = np.where(flagged, -1, finest.pred).astype(finest.pred.dtype)
    return calls


def _assemble_by_batch(model: TrainedModel, buffers: _Buffers, batches: tuple[np.ndarray, list[str]],
                       gate: GatingConfig, decoder: _Decoder, novelty_threshold: float | None, neighbourhood_k: int,
                       metadata: dict[str, Any]) -> dict[str, LevelCalls]:
    """:func:`_assemble` on each batch's cells on their own (``predict(..., batch_key=...)``), joined in the query's
    order. ``metadata`` gets ``batches`` (per batch its cells, each level's share of them ``Unknown``, its query-only
    record and, where it is called mostly as one class, :func:`~atlasmtl.calls.dominant_of` as
    ``mostly_one_call``) and ``query_only`` (the records' counts summed; no location, which is each batch's own);
    ``buffers.query_only`` stays empty."""
    codes, names = batches
    if len(codes) != len(buffers.no_signal):
        raise InputError(f"batch_key gives {len(codes)} values for {len(buffers.no_signal)} query cells.")
    parts, record = [], {}
    for code, name in enumerate(names):
        rows = np.flatnonzero(codes == code)
        part = buffers.subset(rows)
        parts.append((rows, _assemble(model, part, gate, decoder, novelty_threshold, neighbourhood_k)))
        record[name] = {"cells": int(len(rows)),
                        "unknown": {lv: round(float(np.mean(c.is_unknown)), 4) for lv, c in parts[-1][1].items()},
                        **({"query_only": part.query_only} if part.query_only else {})}
        one = dominant_of({lv: c.raw for lv, c in parts[-1][1].items()}, model.classes,
                          metadata.get("reference_classes"))
        if one is not None:
            record[name]["mostly_one_call"] = dict(zip(("level", "label", "share", "reference_share"), one))
    calls: dict[str, LevelCalls] = {}
    for lv in model.label_columns:
        fields = {}
        for f in dataclasses.fields(LevelCalls):
            first = np.asarray(getattr(parts[0][1][lv], f.name))
            whole = np.empty((len(codes),) + first.shape[1:], dtype=first.dtype)
            for rows, part_calls in parts:
                whole[rows] = getattr(part_calls[lv], f.name)
            fields[f.name] = whole
        calls[lv] = LevelCalls(**fields)
    metadata["batches"] = record
    runs = [r["query_only"] for r in record.values() if "query_only" in r]
    if runs:
        metadata["query_only"] = {**runs[0], "location": None, "candidates": sum(r["candidates"] for r in runs),
                                  "flagged": sum(r["flagged"] for r in runs)}
    return calls


#: ``predict`` warns when at least this share of the query's cells detect none of the model's genes (they end
#: Unknown; ``result.metadata["cells_without_signal"]`` counts them always).
NO_SIGNAL_WARN_SHARE = 0.05

#: The key under which the query-only share rides along in the neighbourhood search's scores.
_QUERY_ONLY = "\x00query_only"


def _query_only_candidates(view: InputView | None, raw_calls: np.ndarray, no_signal: np.ndarray, level: str,
                           n_classes: int, record: dict[str, Any]) -> np.ndarray | None:
    """The finest calls the query-only check may withdraw, whatever their share: with signal, into a class the
    input view does not score but at least :data:`~atlasmtl.novelty.QUERY_ONLY_MIN_HELD` cells of the model's held
    record are called as (else none of its cells can mix), and at least
    :data:`~atlasmtl.novelty.QUERY_ONLY_MIN_CELLS` cells of the same call. ``None`` where the check is off
    (``QUERY_ONLY_SHARE`` ``None``, or a model whose input view holds no held-out cells). Where there is none, the check cannot flag a cell and its search is skipped
    (``record`` then says so: ``location`` ``None``, ``candidates`` 0)."""
    if QUERY_ONLY_SHARE is None or view is None or view.held_points is None or not len(view.held_points):
        return None
    judged = ~view.scores(level, n_classes)  # classes the input view does not score ...
    if QUERY_ONLY_MIN_HELD is not None:  # ... that the held record represents
        held = view.held_calls[view.held_calls >= 0]
        judged &= np.bincount(held, minlength=n_classes)[:n_classes] >= QUERY_ONLY_MIN_HELD
    into = np.zeros(len(raw_calls), dtype=bool)
    into[raw_calls >= 0] = judged[raw_calls[raw_calls >= 0]]
    into &= ~no_signal
    groups = np.bincount(raw_calls[into], minlength=n_classes)  # a group, not a few stray cells, per call
    into &= np.isin(raw_calls, np.flatnonzero(groups >= QUERY_ONLY_MIN_CELLS))
    record.update(location=None, flagged=0, candidates=int(into.sum()), share_above=QUERY_ONLY_SHARE,
                  max_location=QUERY_ONLY_MAX_LOCATION, min_cells=QUERY_ONLY_MIN_CELLS, min_held=QUERY_ONLY_MIN_HELD)
    return into


def _query_only_share(view: InputView, buffers: _Buffers, raw_calls: np.ndarray, n_classes: int,
                      k: int) -> np.ndarray:
    """Per query cell, its :func:`~atlasmtl.novelty.query_only_share` (NaN outside the neighbourhood search's
    indexed cells)."""
    usable = ~buffers.no_signal
    pool = neighbourhood_pool(usable)
    weights = held_out_weights(view.held_calls, raw_calls[usable], n_classes)
    share = np.full(len(usable), np.nan)
    share[pool] = query_only_share(buffers.view_points[pool], view.held_points, weights, k)
    return share


def _query_only_flags(smoothed: np.ndarray, raw_calls: np.ndarray, candidates: np.ndarray, n_classes: int,
                      record: dict[str, Any]) -> np.ndarray:
    """The finest calls the query-only share makes novel: among the candidates (:func:`_query_only_candidates`),
    in a neighbourhood of query cells alone (:data:`~atlasmtl.novelty.QUERY_ONLY_SHARE`), in a query that mixes
    with the reference (:data:`~atlasmtl.novelty.QUERY_ONLY_MAX_LOCATION`), where at least
    :data:`~atlasmtl.novelty.QUERY_ONLY_MIN_CELLS` cells of the same call pass. ``record`` gets the location and
    the count (``result.metadata["query_only"]``)."""
    usable = np.isfinite(smoothed)  # the cells with signal (NaN where it has none)
    location = query_only_location(smoothed[usable], raw_calls[usable])
    flagged = candidates & usable & (np.nan_to_num(smoothed, nan=-np.inf) > QUERY_ONLY_SHARE) \
        & (location < QUERY_ONLY_MAX_LOCATION)
    groups = np.bincount(raw_calls[flagged], minlength=n_classes)  # a group, not a few stray cells, per call
    flagged &= np.isin(raw_calls, np.flatnonzero(groups >= QUERY_ONLY_MIN_CELLS))
    record.update(location=None if not np.isfinite(location) else round(location, 4), flagged=int(flagged.sum()))
    return flagged


def _predict_source(
    model: TrainedModel,
    obs_names: pd.Index,
    source: MatrixSource,
    gate: GatingConfig,
    dev: torch.device,
    n_threads: int,
    show_progress: bool,
    show_summary: bool,
    *,
    layer: str | None,
    use_raw: bool,
    gene_map: Any,
    min_gene_overlap: float,
    batch_size: int,
    novelty_threshold: float | None = NOVELTY_THRESHOLD,
    neighbourhood_k: int = NEIGHBOURHOOD_K,
    coordinates: str | None = None,
    rows: Callable[[int], slice] | None = None,
    gather: Callable[[_Buffers, dict[str, Any]], tuple[_Buffers, dict[str, Any]] | None] | None = None,
    batches: tuple[np.ndarray, list[str]] | None = None,
    batch_key: str | None = None,
) -> PredictionResult | None:
    """The prediction pipeline on an opened matrix; see :func:`predict` and :func:`_predict_part`
    (``batches``: :func:`query_batches` of the whole query, or ``None``)."""
    if not obs_names.is_unique:
        raise InputError("Query obs_names are not unique; call adata.obs_names_make_unique() first.")
    aligner, semantics, gene_report = prepare_query(model, source, gene_map, min_gene_overlap)

    n = source.n_obs
    part = rows(n) if rows is not None else slice(0, n)
    buffers = _Buffers(model, part.stop - part.start)
    decoder = _Decoder(model, novelty_threshold, coordinates)
    if neighbourhood_k and decoder.input_view is not None:
        buffers.view_points = np.zeros((len(buffers.no_signal), decoder.input_view.n_components), dtype=np.float32)
    net = model.network.to(dev).eval()
    zero = aligner.zero_input()
    zero_input = None if zero is None else torch.from_numpy(zero).to(dev)
    monitor = ResourceMonitor(dev)
    try:
        with torch_threads(n_threads), monitor, torch.no_grad():
            searching = gate.knn_correction != "off" or decoder.null is not None or decoder.place is not None
            search = model.neighbour_search() if searching else None
            bar = progress(total=part.stop - part.start, desc="atlasmtl predict", enabled=show_progress, unit="cells")
            pending: list[tuple[int, np.ndarray, np.ndarray]] = []  # (start, points, any_low) awaiting a search

            def flush() -> None:
                if pending:
                    _search_block(model, search, np.concatenate([p[1] for p in pending]),
                                  np.concatenate([p[2] for p in pending]), gate, decoder, buffers, pending[0][0])
                    pending.clear()

            for first in range(part.start, part.stop, batch_size):
                last = min(first + batch_size, part.stop)
                block = source.rows(slice(first, last))
                start, stop = first - part.start, last - part.start
                if source.backed:  # in memory, checked whole before (inputs.validate_values)
                    check_block(block, source.where, semantics["semantics"])
                x, detected = _network_input(aligner, block, dev, zero_input)
                output = net(x)
                any_low = _infer(model, output, detected, gate, decoder, buffers, slice(start, stop))
                if decoder.input_view is not None:
                    _input_view_block(decoder.input_view, x, zero, buffers, slice(start, stop))
                if search is not None:
                    pending.append((start, normalise_rows(output.embedding.detach().cpu().numpy()), any_low))
                    if sum(len(p[2]) for p in pending) >= SEARCH_BLOCK:
                        flush()
                bar.update(stop - start)
            flush()
            bar.close()
    finally:
        model.network.cpu()

    runtime = monitor.summary(part.stop - part.start)
    runtime.update({"device": dev.type, "gpu": gpu_name(dev), "threads": n_threads, "cpu count": available_cpus(),
                    "knn_cells_searched": int(buffers.n_searched)})
    if gather is not None:
        joined = gather(buffers, runtime)
        if joined is None:
            return None
        buffers, runtime = joined
    levels = model.label_columns
    metadata = {
        "atlasmtl_version": __version__,
        "model_id": model.metadata.get("model_id"),  # which model made the calls (the report checks it)
        "settings": {
            **dataclasses.asdict(gate),
            "novelty_threshold": novelty_threshold if decoder.null is not None else None,
            "neighbourhood_k": neighbourhood_k if buffers.view_points.shape[1] else None,
            "coordinates": coordinates,
            "temperatures": dict(zip(levels, decoder.temperatures)),
            "input_transform": model.metadata["input_transform"],
            "layer": layer,
            "use_raw": use_raw,
            "min_gene_overlap": min_gene_overlap,
            "batch_size": batch_size,
            "batch_key": batch_key,
        },
        "genes": gene_report,
        "input": semantics,
        "model_input": model.metadata.get("train_semantics", {}),
        "prediction_runtime": runtime,
        "versions": dict(model.train_config.get("versions", {}), atlasmtl_prediction=__version__),
        "label_columns": levels,
        "coord_targets": model.coord_targets,
        "reference_classes": _reference_classes(model, decoder),
    }
    without_signal = int(buffers.no_signal.sum())
    metadata["cells_without_signal"] = without_signal
    if without_signal >= NO_SIGNAL_WARN_SHARE * max(len(buffers.no_signal), 1):
        warnings.warn(
            f"{without_signal} of the {len(buffers.no_signal)} query cells ({without_signal / len(buffers.no_signal):.0%}) "
            "detect none of the model's genes (or gave no finite confidence) and are Unknown at every level. Check "
            "that the matrix (X, a layer, raw) and the gene names are the ones the model expects, and remove empty "
            "cells (e.g. sc.pp.filter_cells(query, min_genes=1)).", UserWarning, stacklevel=user_stacklevel())
    with torch_threads(n_threads):  # the neighbourhood search runs on torch
        if batches is None:
            calls = _assemble(model, buffers, gate, decoder, novelty_threshold, neighbourhood_k)
        else:
            calls = _assemble_by_batch(model, buffers, batches, gate, decoder, novelty_threshold, neighbourhood_k,
                                       metadata)
    if buffers.query_only:
        metadata["query_only"] = buffers.query_only
    result = PredictionResult(
        obs_names=np.asarray(obs_names),
        classes={lv: list(model.classes[lv]) for lv in levels},
        levels=calls,
        coords=buffers.coords,
        metadata=metadata,
        hierarchy=model.hierarchy,
    )
    if show_summary:
        result.show_resource_usage()
    return result
