"""Shared fixtures: real datasets from ../shared/data and scanpy, and small trained models."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import pytest

import atlasmtl
from atlasmtl.datasets import pbmc68k_reference_query

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ATLASMTL_SHARED_DATA", REPO.parent / "shared" / "data"))
SYMPHONY_LEVELS = ["cell_type_broad", "cell_type"]


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.fail(f"Test data {path} is missing; set ATLASMTL_SHARED_DATA to the shared data folder.")
    return path


@pytest.fixture(scope="session")
def symphony() -> ad.AnnData:
    """Symphony PBMC (1,200 cells, log CP10k, three 10x chemistries)."""
    return ad.read_h5ad(shared_file("symphony_pbmc_small.h5ad"))


@pytest.fixture(scope="session")
def symphony_split(symphony):
    """Reference = 3pv2 + 5p, query = 3pv1 (leave one chemistry out)."""
    ref = symphony[symphony.obs["dataset"] != "3pv1"].copy()
    query = symphony[symphony.obs["dataset"] == "3pv1"].copy()
    return ref, query


@pytest.fixture(scope="session")
def pbmc_split():
    """pbmc68k_reduced split 70/30 with lineage → bulk_labels and UMAP/PCA coordinates."""
    return pbmc68k_reference_query()


@pytest.fixture(scope="session")
def pbmc_model(pbmc_split):
    ref, _ = pbmc_split
    return atlasmtl.build_model(
        ref,
        ["lineage", "bulk_labels"],
        coord_targets={"latent": "X_ref_latent", "umap": "X_umap"},
        num_epochs=20,
        show_progress=False,
        show_summary=False,
    )


@pytest.fixture(scope="session")
def symphony_model(symphony_split):
    ref, _ = symphony_split
    return atlasmtl.build_model(ref, SYMPHONY_LEVELS, num_epochs=20, show_progress=False, show_summary=False)


@pytest.fixture
def query_copy(pbmc_split):
    return pbmc_split[1].copy()


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield
