"""notebooks/tutorial.ipynb: committed executed (GitHub shows its outputs), and it still runs top to bottom."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import LEVELS

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tutorial.ipynb"


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _check_outputs(nb) -> None:
    for cell in _code_cells(nb):
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
        stderr = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stderr")
        assert "Warning" not in stderr, (cell.source, stderr)
        if cell.source.startswith(("atlasmtl.pl.", "sc.pl.")):  # one figure per plotting cell
            assert len([o for o in cell.outputs if "image/png" in o.get("data", {})]) == 1, cell.source


def test_tutorial_is_stored_executed_and_small():
    """Re-execute with nbclient (cells cleared, run in a scratch folder), then merge each cell's consecutive
    stream outputs and keep what follows each line's last carriage return, as Jupyter saves them."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), "execute it top to bottom"
    _check_outputs(nb)
    assert any("X_pred_umap" in c.source and "sc.pl.embedding" in c.source for c in cells)
    assert NOTEBOOK.stat().st_size < 600_000, "keep figures at modest dpi"
    # executed with today's defaults (it showed binary input for a week after zscore became the default)
    import inspect

    import atlasmtl

    streams = "".join(o.get("text", "") for c in cells for o in c.outputs if o.output_type == "stream")
    default = inspect.signature(atlasmtl.build_model).parameters["input_transform"].default
    assert f"input transform  : {default}" in streams, "re-execute the notebook (see the test's docstring)"
    assert "\r" not in streams, "store streams as Jupyter shows them (progress bars collapsed)"


@pytest.mark.slow
def test_tutorial_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in _code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    # run the notebook's cells, then ask the same kernel for the numbers (no test-only cell in the notebook)
    probe = nbformat.v4.new_code_cell(
        "import json; print(json.dumps({lv: evaluation['levels'][lv]['accuracy'] for lv in levels}))")
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        nb.cells.append(probe)  # appended to the in-memory copy only
        client.execute_cell(probe, len(nb.cells) - 1)
    _check_outputs(nb)
    accuracy = json.loads(probe.outputs[0]["text"])
    # a real mapping: the coarse level is nearly always right, the fine level mostly
    assert accuracy["lineage"] > 0.85 and accuracy["bulk_labels"] > 0.6, accuracy
    assert set(accuracy) == set(LEVELS)
    out = tmp_path / "atlasmtl_tutorial"
    assert sorted(p.name for p in out.iterdir()) == ["model", "predictions.csv", "query_annotated.h5ad", "report.html"]
    assert (out / "report.html").read_text().count("<img ") == 9  # with the novelty figure


@pytest.fixture(autouse=True)
def _kernel_available():
    from jupyter_client.kernelspec import KernelSpecManager

    assert "python3" in KernelSpecManager().find_kernel_specs(), \
        "no python3 Jupyter kernel: pip install ipykernel (part of the test extra)"
