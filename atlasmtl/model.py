"""``TrainedModel``: the trained network plus everything prediction needs."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .artifacts import ModelParts, read_model, save_model
from .exceptions import ArtifactError
from .knn import ReferenceSearch, index_reference, needs_index
from .network import EnsembleNetwork, MultiTaskNetwork, NetworkOutput, build_network
from .runtime import format_sections, runtime_section


class TrainedModel:
    """A trained atlasmtl model.

    Create one with :func:`atlasmtl.build_model` or :meth:`TrainedModel.load`.

    Attributes
    ----------
    network
        The :class:`~atlasmtl.network.MultiTaskNetwork`, or the
        :class:`~atlasmtl.network.EnsembleNetwork` of several (on CPU, eval mode).
    metadata
        Genes, label encoders, input transform, coordinate statistics, hierarchy
        and the training configuration (plain Python values and numpy arrays).
    reference
        KNN reference data: the reference cells' embedding (``"embedding"``,
        float16; memory-mapped when loaded from a saved model), integer label
        codes per level (``"labels"``), which cells trained the network
        (``"training_cell"``), each cell's coordinate targets (``"coords"``,
        name → cells × dims float32, from which ``predict`` places query cells;
        models saved before it have none) and, above
        :data:`~atlasmtl.knn.EXACT_SEARCH_MAX_CELLS` cells, the neighbour index
        (``"index"``; see :func:`~atlasmtl.knn.index_reference`).
    """

    def __init__(self, network: MultiTaskNetwork | EnsembleNetwork, metadata: dict[str, Any], reference: dict[str, Any]) -> None:
        self.network = network.cpu().eval()
        self.metadata = metadata
        self.reference = reference
        self._search: ReferenceSearch | None = None

    # ------------------------------------------------------------------ properties
    @property
    def label_columns(self) -> list[str]:
        """Annotation levels, coarse to fine."""
        return list(self.metadata["label_columns"])

    @property
    def classes(self) -> dict[str, list[str]]:
        """Class names per level (the label encoders; a copy: the model's own lists stay as trained)."""
        return {lv: list(names) for lv, names in self.metadata["classes"].items()}

    @property
    def genes(self) -> list[str]:
        """Training genes, in network input order."""
        return list(self.metadata["genes"])

    @property
    def coord_targets(self) -> dict[str, str]:
        """Coordinate heads: name → reference ``obsm`` key."""
        return dict(self.metadata["coord_targets"])

    @property
    def train_config(self) -> dict[str, Any]:
        """Training parameters, timings and resource figures."""
        return self.metadata["train_config"]

    @property
    def hierarchy(self) -> dict[str, dict[str, str]]:
        """For each level that nests in the previous one: child label → parent label (a copy)."""
        return {lv: dict(pairs) for lv, pairs in self.metadata.get("hierarchy", {}).items()}

    # ------------------------------------------------------------------ artifacts
    def save(self, path: str | os.PathLike, reference_storage: str | None = None) -> dict[str, str]:
        """Write the model's artifacts: into a folder, or next to a weights path (``foo.pth`` → ``foo_metadata.pkl`` ...).

        Parameters
        ----------
        path
            The weights file, e.g. ``"model_dir/model.pth"``, or a folder: an existing one or a
            path ending in ``/`` (the files are then ``<folder>/model.pth``, ``<folder>/model_metadata.pkl`` ...).
            A new name without a suffix, ``"m"``, stands for ``"m.pth"`` (files beside it, loaded again by
            ``load("m")``); the command line's ``--out m`` makes a folder instead, as ``save("m/")`` does.
            An existing model of that name is replaced crash-safely: at every moment
            either the old or the new model is whole on disk.
        reference_storage
            ``"external"`` (separate ``*_reference.pkl``) or ``"full"`` (embedded in the metadata);
            defaults to the value chosen at training.

        Returns
        -------
        Paths of the written files by role (``weights``, ``metadata``, ``reference``, ``embedding``,
        ``manifest``; with ``reference_storage="full"`` only those written).
        """
        parts = ModelParts(self.network.state_dict(), self.metadata, self.reference)
        return save_model(path, parts, reference_storage=reference_storage)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainedModel":
        """Load a model from its folder, its manifest (``*_manifest.json``) or its weights file (``*.pth``).

        ``path`` may also be the folder holding one model, or the name without a suffix that :meth:`save` was
        given (``save("m")`` writes ``m.pth``, ``m_manifest.json`` ...). Checksums, the files'
        identity (model id and role) and the metadata schema are verified, and
        nothing in the files is executed.

        Parameters
        ----------
        path
            The ``*_manifest.json`` (the stable entry point), the ``.pth`` beside it, or a folder
            holding exactly one ``*_manifest.json``.

        Returns
        -------
        TrainedModel
            The model, predicting exactly what the saved one did.

        Raises
        ------
        ChecksumMismatchError
            A file's size or SHA-256 differs from the manifest's.
        UnsafeArtifactError
            A pickle referencing a class or function, shared references, a compressed weights
            archive, or a manifest entry that is not a plain file name in the manifest's folder.
        SchemaVersionError
            An unknown schema version.
        ArtifactError
            Missing, truncated, corrupted, mixed or schema-violating files; an empty path, a folder
            without a model, or a path that is not a regular file.
        """
        return cls.from_parts(read_model(path))

    @classmethod
    def from_parts(cls, parts: ModelParts) -> "TrainedModel":
        """Build the model from the plain parts a model file holds (weights, metadata, KNN reference).

        Parameters
        ----------
        parts
            A :class:`~atlasmtl.artifacts.ModelParts`: the network's ``state_dict``, the
            ``metadata`` (its ``"architecture"`` builds the network) and the KNN ``reference``,
            as :func:`~atlasmtl.artifacts.read_model` returns them.

        Returns
        -------
        TrainedModel
            The model, its network on the CPU in eval mode.

        Raises
        ------
        ArtifactError
            The weights do not fit the architecture the metadata describes.
        """
        network = build_network(parts.metadata["architecture"])
        try:
            network.load_state_dict(parts.state_dict)
        except RuntimeError as exc:
            raise ArtifactError(f"The weights do not fit the architecture in the metadata ({exc}).") from exc
        return cls(network, parts.metadata, parts.reference)

    # ------------------------------------------------------------------ reporting
    def resource_summary(self) -> dict[str, dict[str, Any]]:
        """Sections of the printed model summary (plain-word keys; see ``train_config`` for the raw figures).

        Returns
        -------
        dict
            Section → ``{line name: value}``, in print order: ``model`` (levels, coordinate heads,
            genes, architecture, input transform), ``training`` (cells, epochs, device, time and
            memory) and ``knn reference`` (cells, space, neighbour label agreement).
        """
        cfg = self.train_config
        arch = self.metadata["architecture"]
        stored = cfg.get("resource_summary", {})
        training = {
            "reference cells": stored.get("training cells"),
            "validation cells": stored.get("validation cells") or None,
            "unlabelled cells dropped": stored.get("dropped unlabelled cells") or None,
            "epochs": stored.get("epochs completed"),
        }
        runtime = dict(cfg.get("runtime_summary", {}))
        for key in ("device", "gpu", "threads", "cpu count"):
            runtime.setdefault(key, stored.get(key))
        agreement = cfg.get("knn_space", {}).get("neighbour_label_agreement")
        return {
            "model": {
                "levels": ", ".join(f"{c} ({len(self.classes[c])})" for c in self.label_columns),
                "coordinate heads": ", ".join(self.coord_targets) or "none",
                "genes": _genes_line(len(self.metadata["genes"]), stored.get("reference genes"),
                                     cfg.get("gene_selection", "variable")),
                "hidden sizes": arch["hidden_sizes"],
                "ensemble members": arch.get("ensemble_size", 1),
                "input transform": self.metadata["input_transform"],
                "trained on": self.metadata.get("train_semantics", {}).get("semantics"),
            },
            "training": {**training, **runtime_section(runtime, unit="cell-epochs")},
            "knn reference": {
                "cells": int(self.reference["embedding"].shape[0]),
                "space": cfg.get("knn_space", {}).get("space"),
                "label agreement of 15 neighbours": None if agreement is None else f"{agreement:.1%}",
            },
        }

    def show_resource_usage(self) -> None:
        """Print a compact, sectioned summary of the model and its training run."""
        print(format_sections("atlasmtl model", self.resource_summary()))

    def __repr__(self) -> str:
        levels = ", ".join(f"{c}: {len(self.classes[c])}" for c in self.label_columns)
        return (
            f"TrainedModel({len(self.metadata['genes'])} genes; levels {levels}; "
            f"coords {list(self.coord_targets) or 'none'}; "
            f"{self.reference['embedding'].shape[0]} reference cells)"
        )

    # ------------------------------------------------------------------ internals
    def neighbour_search(self) -> ReferenceSearch:
        """The search over the KNN reference (built once per model object and cached).

        A model saved before neighbour indexes existed (artifact schema 1–2) with
        more reference cells than exact search handles gets its index here, on
        first use; saving the model again stores it.

        Returns
        -------
        ReferenceSearch
            The model's :class:`~atlasmtl.knn.ReferenceSearch` (the same object on every call).
        """
        if self._search is None:
            if needs_index(self.reference):
                self.reference = index_reference(self.reference, self.label_columns)
            self._search = ReferenceSearch(self.reference, self.label_columns)
        return self._search

    def encode(self, x: np.ndarray | torch.Tensor, device: torch.device | None = None) -> NetworkOutput:
        """Run the network on a dense batch of network inputs.

        Parameters
        ----------
        x
            Cells × model genes, already aligned to ``model.genes`` and transformed as the model's
            ``input_transform`` reads them (this is the network's input, not an expression matrix).
        device
            Where to run (default: the tensor's own device, CPU for an array).

        Returns
        -------
        NetworkOutput
            ``(embedding, logits, coords)`` as torch tensors: the encoder output,
            logits per level, and standardised coordinates per coordinate head.
            It unpacks like a tuple.
        """
        with torch.no_grad():
            t = torch.as_tensor(x, dtype=torch.float32, device=device)
            return self.network(t)


def _genes_line(n_model: int, n_reference: int | None, gene_selection: str = "variable") -> str | int:
    """The model's genes, and of how many reference genes they were selected (``n_top_genes``), and how
    (``gene_selection``; models saved before it existed chose the most variable)."""
    if n_reference is None or n_reference == n_model:
        return n_model
    chosen = "most variable and label-informative" if gene_selection == "variable+labels" else "most variable"
    return f"{n_model} {chosen} of {n_reference}"
