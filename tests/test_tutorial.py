"""notebooks/tutorial.ipynb runs top to bottom on real data (so it cannot go stale), and is stored without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tutorial.ipynb"


def test_tutorial_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip the outputs before committing"


def test_tutorial_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's working folder goes under tmp_path
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # every plotting cell displayed exactly one figure
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.startswith("atlasmtl.pl."):
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert len(images) == 1, cell.source
    summary = json.loads(nb.cells[-1].outputs[-1]["text"].strip().splitlines()[-1])
    # a real mapping: the coarse level is nearly always right, the fine level mostly
    assert summary["lineage"]["accuracy"] > 0.85
    assert summary["bulk_labels"]["accuracy"] > 0.6
    report = Path(summary["report"])
    assert report.is_relative_to(tmp_path) and report.stat().st_size > 100_000
    assert report.read_text().count("<img ") == 8
    assert sorted(p.name for p in report.parent.iterdir()) == [
        "annotated.h5ad", "model", "predictions.csv", "report.html"]


@pytest.fixture(autouse=True)
def _kernel_available():
    from jupyter_client.kernelspec import KernelSpecManager

    assert "python3" in KernelSpecManager().find_kernel_specs(), \
        "no python3 Jupyter kernel: pip install ipykernel (part of the test extra)"
