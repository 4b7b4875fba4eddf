"""Prediction: stream the query through gene alignment, the network, the gate and KNN."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from . import __version__
from .exceptions import InputError, ParameterError
from .gating import GatingConfig, apply_gate, low_confidence, top_two
from .genes import GeneAligner, build_aligner
from .inputs import (
    MatrixSource,
    check_finite,
    check_semantics_usable,
    detect_semantics,
    get_matrix_source,
    h5ad_query_source,
    open_anndata,
    validate_values,
)
from .knn import NeighbourIndex, normalise_rows, vote
from .model import TrainedModel
from .result import PredictionResult
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


def _network_input(aligner: GeneAligner, block: Any, dev: torch.device) -> torch.Tensor:
    """Sparse blocks stay sparse (CSR tensor; the first layer is a sparse product), dense ones dense."""
    if sp.issparse(block):
        x = aligner.transform_sparse(block)
        x.sort_indices()  # canonical CSR from scipy: the invariants hold, so torch need not re-check them
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                torch.from_numpy(x.indptr.astype(np.int64)),
                torch.from_numpy(x.indices.astype(np.int64)),
                torch.from_numpy(x.data),
                size=x.shape,
                check_invariants=False,
            ).to(dev)
    return torch.from_numpy(aligner.transform(block)).to(dev)


def _neighbour_index(model: TrainedModel, n_jobs: int) -> NeighbourIndex:
    """Build the model's KNN index once and cache it on the model."""
    key = "encoder"
    if key not in model._knn_indexes:
        model._knn_indexes[key] = NeighbourIndex(model.reference["embedding"], random_state=0, n_jobs=n_jobs)
    return model._knn_indexes[key]


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
        Vote fraction needed to accept the vote; a low-confidence cell below it becomes Unknown.
    confidence_high
        Calls with confidence (top probability) below this are low-confidence.
    confidence_low
        Calls with confidence below this are Unknown (unless a KNN vote rescues them).
    margin_threshold
        Calls with margin (top1 − top2 probability) below this are low-confidence.
    batch_size
        Cells per inference batch.
    num_threads
        CPU threads (capped at the CPUs available; ``"max"`` = 80% of them).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    show_progress
        Batch progress bar with ETA on stderr; ``None`` = only in an interactive terminal.
    show_summary
        Print a compact summary at the end; ``None`` = only in an interactive terminal.

    Returns
    -------
    PredictionResult
    """
    gate = GatingConfig(confidence_high, confidence_low, margin_threshold, knn_correction, knn_k, knn_conf_low)
    gate.validate()
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ParameterError(f"batch_size={batch_size!r} must be a positive integer.")
    if not isinstance(model, TrainedModel):
        raise ParameterError(f"model must be a TrainedModel (from build_model or TrainedModel.load), not {type(model).__name__}.")
    dev = resolve_device(device)
    n_threads = resolve_num_threads(num_threads)
    show_progress, show_summary = resolve_flag(show_progress), resolve_flag(show_summary)

    if isinstance(adata, (str, os.PathLike)):
        opened = h5ad_query_source(adata, layer=layer, use_raw=use_raw)
    else:
        adata = open_anndata(adata)
        opened = contextlib.nullcontext((adata.obs_names, get_matrix_source(adata, layer=layer, use_raw=use_raw)))
    with opened as (obs_names, source):
        return _predict_source(model, obs_names, source, gate, dev, n_threads, show_progress, show_summary,
                               layer=layer, use_raw=use_raw, gene_map=gene_map,
                               min_gene_overlap=min_gene_overlap, batch_size=batch_size)


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
) -> PredictionResult:
    """The prediction pipeline on an opened matrix; see :func:`predict`."""
    if not obs_names.is_unique:
        raise InputError("Query obs_names are not unique; call adata.obs_names_make_unique() first.")
    if not source.var_names.is_unique:
        raise InputError("Query var_names are not unique; call adata.var_names_make_unique() first.")
    validate_values(source)
    semantics = detect_semantics(source)
    input_transform = model.metadata["input_transform"]
    check_semantics_usable(semantics["semantics"], input_transform, source.where)
    if input_transform == "float" and semantics["semantics"] != "lognorm":
        semantics["normalisation"] = "query normalised to 1e4 total per cell, then log1p, to match the model"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aligner = build_aligner(
            model.genes,
            model.metadata["gene_namespace"],
            model.metadata.get("gene_alt_ids", {}),
            source,
            input_transform,
            semantics["semantics"],
            gene_map=gene_map,
            min_gene_overlap=min_gene_overlap,
        )
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    gene_report = dict(aligner.report)
    gene_report["warnings"] = [str(w.message) for w in caught]

    levels = model.label_columns
    n = source.n_obs
    out = {
        lv: {
            "raw": np.empty(n, dtype=np.int32),
            "conf": np.empty(n, dtype=np.float32),
            "margin": np.empty(n, dtype=np.float32),
            "knn": np.full(n, -1, dtype=np.int32),
            "knn_frac": np.full(n, np.nan, dtype=np.float32),
            "covered": np.zeros(n, dtype=bool),
        }
        for lv in levels
    }
    coords = {name: np.empty((n, d), dtype=np.float32) for name, d in model.metadata["architecture"]["coord_dims"].items()}
    n_searched = 0
    net = model.network.to(dev).eval()
    first_weight_t = net.encoder.layers[0].weight.detach().t().contiguous()
    monitor = ResourceMonitor(dev)
    try:
        with torch_threads(n_threads), monitor, torch.no_grad():
            index = _neighbour_index(model, n_threads) if gate.knn_correction != "off" else None
            bar = progress(total=n, desc="atlasmtl predict", enabled=show_progress, unit="cells")
            for start, stop, block in source.iter_chunks(batch_size):
                if source.backed:
                    check_finite(block, source.where)
                z, logits, pred = net(_network_input(aligner, block, dev), first_weight_t)
                any_low = np.zeros(stop - start, dtype=bool)
                for lv, lg in zip(levels, logits):
                    probs = torch.softmax(lg, dim=1).cpu().numpy()
                    code, conf, margin = top_two(probs)
                    o = out[lv]
                    o["raw"][start:stop], o["conf"][start:stop], o["margin"][start:stop] = code, conf, margin
                    any_low |= low_confidence(conf, margin, gate)
                for name, values in pred.items():
                    stats = model.metadata["coord_stats"][name]
                    coords[name][start:stop] = values.cpu().numpy() * stats["std"] + stats["mean"]
                if index is not None:
                    search = np.flatnonzero(any_low) if gate.knn_correction == "low_conf_only" else np.arange(stop - start)
                    if len(search):
                        emb = normalise_rows(z[torch.from_numpy(search).to(dev)].cpu().numpy())
                        nbr, _ = index.query(emb, gate.knn_k)
                        n_searched += len(search)
                        for lv in levels:
                            o = out[lv]
                            rows = start + search
                            if gate.knn_correction == "low_conf_only":
                                rows = rows[low_confidence(o["conf"][rows], o["margin"][rows], gate)]
                                sel = rows - start
                                nbr_lv = nbr[np.searchsorted(search, sel)]
                            else:
                                nbr_lv = nbr
                            code, frac = vote(nbr_lv, model.reference["labels"][lv], len(model.classes[lv]))
                            o["knn"][rows], o["knn_frac"][rows], o["covered"][rows] = code, frac, True
                bar.update(stop - start)
            bar.close()
    finally:
        model.network.cpu()

    results = {}
    for lv in levels:
        o = out[lv]
        gated = apply_gate(o["raw"], o["conf"], o["margin"], o["knn"], np.nan_to_num(o["knn_frac"]), o["covered"], gate)
        results[lv] = {
            "code": gated["code"],
            "raw_code": o["raw"],
            "conf": o["conf"],
            "margin": o["margin"],
            "knn_code": o["knn"],
            "knn_vote_frac": o["knn_frac"],
            "is_unknown": gated["is_unknown"],
            "is_low_conf": gated["is_low_conf"],
            "used_knn": gated["used_knn"],
        }
    runtime = monitor.summary(n)
    runtime.update({"device": dev.type, "gpu": gpu_name(dev), "threads": n_threads, "cpu count": available_cpus(),
                    "knn_cells_searched": int(n_searched)})
    metadata = {
        "atlasmtl_version": __version__,
        "settings": {
            "knn_correction": gate.knn_correction,
            "knn_k": gate.knn_k,
            "knn_conf_low": gate.knn_conf_low,
            "confidence_high": gate.confidence_high,
            "confidence_low": gate.confidence_low,
            "margin_threshold": gate.margin_threshold,
            "input_transform": input_transform,
            "layer": layer,
            "use_raw": use_raw,
            "min_gene_overlap": min_gene_overlap,
            "batch_size": batch_size,
        },
        "genes": gene_report,
        "input": semantics,
        "model_input": model.metadata.get("train_semantics", {}),
        "prediction_runtime": runtime,
        "versions": dict(model.train_config.get("versions", {}), atlasmtl_prediction=__version__),
        "label_columns": levels,
        "coord_targets": model.coord_targets,
    }
    result = PredictionResult(
        obs_names=np.asarray(obs_names),
        classes={lv: list(model.classes[lv]) for lv in levels},
        levels=results,
        coords=coords,
        metadata=metadata,
        hierarchy=model.hierarchy,
    )
    if show_summary:
        result.show_resource_usage()
    return result
