"""Shared fixtures and the test-data lookup.

Data, in the order it is looked for:

- ``tests/data/`` — a small fixture committed with the project (Symphony PBMC,
  822 KB; see ``tests/data/README.md``), so the suite passes on a fresh clone;
- scanpy's ``pbmc68k_reduced`` (ships inside scanpy);
- the larger shared datasets in ``$ATLASMTL_SHARED_DATA`` (default
  ``../shared/data`` beside the checkout). Tests that need them carry
  ``@pytest.mark.shared_data("file.h5ad", ...)`` and are skipped, with the
  reason, when a file is absent.

``ATLASMTL_REQUIRE_SHARED_DATA=1`` turns every skip into a failure, so a run
with the shared data (CI) proves that nothing was skipped.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import pytest

import atlasmtl
from atlasmtl.datasets import pbmc68k_reference_query

from .synthetic import SYNTHETIC_LEVELS, synthetic_adata

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DATA = REPO / "tests" / "data"
SHARED_DATA = Path(os.environ.get("ATLASMTL_SHARED_DATA", REPO.parent / "shared" / "data"))
REQUIRE_SHARED_DATA = os.environ.get("ATLASMTL_REQUIRE_SHARED_DATA", "").strip() not in ("", "0")

# Processes the tests start (the command line, the demo, torchrun) import this checkout's atlasmtl, as the tests
# themselves do, not whichever one is installed (an editable install of another checkout or worktree).
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                          if p and Path(p).resolve() != REPO])

#: Label levels of the two real datasets the tests use most.
LEVELS = ["lineage", "bulk_labels"]  # pbmc68k_reduced split (atlasmtl.datasets.pbmc68k_reference_query)
SYMPHONY_LEVELS = ["cell_type_broad", "cell_type"]


def data_file(name: str) -> Path:
    """Path of a test dataset: the committed fixture, else the shared data folder (skip when absent)."""
    for folder in (FIXTURE_DATA, SHARED_DATA):
        if (folder / name).is_file():
            return folder / name
    _missing([name])
    raise AssertionError("unreachable")


def data_dir_with(name: str) -> Path:
    """The folder holding ``name`` (for subprocesses that take a data folder, like the benchmark)."""
    return data_file(name).parent


def _missing(names: list[str]) -> None:
    reason = (f"needs the shared test data {', '.join(names)} in {SHARED_DATA} "
              "(set ATLASMTL_SHARED_DATA to the folder that has it)")
    if REQUIRE_SHARED_DATA:
        pytest.fail(f"{reason}; ATLASMTL_REQUIRE_SHARED_DATA is set", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("shared_data")
    if marker is not None:
        absent = [name for name in marker.args if not (FIXTURE_DATA / name).is_file()
                  and not (SHARED_DATA / name).is_file()]
        if absent:
            _missing(absent)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_SHARED_DATA and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped although ATLASMTL_REQUIRE_SHARED_DATA is set: {reason}"


# ---------------------------------------------------------------- real data
@pytest.fixture(scope="session")
def symphony() -> ad.AnnData:
    """Symphony PBMC (1,200 cells, log CP10k, three 10x chemistries)."""
    return ad.read_h5ad(data_file("symphony_pbmc_small.h5ad"))


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
        LEVELS,
        coord_targets={"latent": "X_ref_latent", "umap": "X_umap"},
        num_epochs=20,
        show_progress=False,
        show_summary=False,
    )


@pytest.fixture(scope="session")
def pbmc_result(pbmc_model, pbmc_split):
    """The default-settings prediction of the pbmc68k query (read-only: copy before changing)."""
    return atlasmtl.predict(pbmc_model, pbmc_split[1], show_progress=False, show_summary=False)


@pytest.fixture(scope="session")
def symphony_model(symphony_split):
    ref, _ = symphony_split
    return atlasmtl.build_model(ref, SYMPHONY_LEVELS, num_epochs=20, show_progress=False, show_summary=False)


@pytest.fixture
def query_copy(pbmc_split):
    return pbmc_split[1].copy()


# ---------------------------------------------------------------- synthetic data (fast unit tests)
@pytest.fixture(scope="session")
def synthetic_split():
    """Synthetic reference (240 cells) and query (120 cells) with levels ``coarse`` → ``fine``."""
    adata = synthetic_adata(n_obs=360, random_state=0)
    return adata[:240].copy(), adata[240:].copy()


@pytest.fixture(scope="session")
def synthetic_model(synthetic_split):
    return atlasmtl.build_model(synthetic_split[0], SYNTHETIC_LEVELS, coord_targets={"umap": "X_umap"},
                                num_epochs=5, batch_size=32, learning_rate=0.01, hidden_sizes=(32, 16),
                                show_progress=False, show_summary=False)


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


# ---------------------------------------------------------------- helpers
def held_out_logits(model, ref, copies=0, rng=None):
    """The codes and the model's logits per level on its held-out reference cells (``copies`` > 0: that
    many shifted copies, drawn from ``rng`` as build_model draws them), through the model's genes and statistics."""
    import torch

    from atlasmtl.network import SparseInput
    from atlasmtl.reference import prepare_reference
    from atlasmtl.training import shifted_logits

    tc = model.train_config
    r = prepare_reference(ref, model.label_columns, None, layer=None, use_raw=False, input_transform=tc["input_transform"],
                          n_top_genes=tc["n_top_genes"], gene_selection=tc["gene_selection"])
    assert [str(g) for g in r.source.var_names[r.genes]] == list(model.genes)
    held = r.cells[~model.reference["training_cell"]]
    if copies:
        rows, logits = shifted_logits(model.network, r, torch.device("cpu"), held, copies, rng)
    else:
        zero = r.aligner.zero_input()
        with torch.no_grad():
            out = model.network(SparseInput(r.aligner.sparse_input(r.source.rows(held)),
                                            None if zero is None else torch.from_numpy(zero)))
        rows, logits = held, [lg.numpy() for lg in out.logits]
    return [r.codes[rows, j] for j in range(len(model.label_columns))], logits
