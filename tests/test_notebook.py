"""atlasmtl in a real Jupyter kernel: progress bars and summaries appear by default, and nothing warns."""

from __future__ import annotations

import sys

import nbformat
import pytest
from nbclient import NotebookClient

from atlasmtl import runtime

from .conftest import REPO


def _execute(sources: list[str], tmp_path) -> list:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return [cell.outputs for cell in nb.cells]


def _text(outputs, name: str) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == name)


def test_progress_and_summary_in_a_kernel_and_no_tqdm_warning(tmp_path):
    setup = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
             "import atlasmtl\nfrom tests.synthetic import SYNTHETIC_LEVELS, synthetic_adata\n"
             "adata = synthetic_adata(n_obs=120)")
    quiet = ("model = atlasmtl.build_model(adata, SYNTHETIC_LEVELS, num_epochs=2, show_progress=False, "
             "show_summary=False)\nresult = atlasmtl.predict(model, adata, show_progress=False, show_summary=False)")
    default = "model = atlasmtl.build_model(adata, SYNTHETIC_LEVELS, num_epochs=2)\nresult = atlasmtl.predict(model, adata)"
    _, quiet_out, default_out = _execute([setup, quiet, default], tmp_path)
    assert not [o for o in quiet_out if o.output_type == "error"]
    assert quiet_out == [], quiet_out  # show_progress=False: no bar, no summary, no TqdmWarning
    assert not [o for o in default_out if o.output_type == "error"]
    everything = str(default_out)
    assert "TqdmWarning" not in everything and "IProgress" not in everything
    # the summaries, on by default in a kernel
    stdout = _text(default_out, "stdout")
    assert "atlasmtl training finished" in stdout and "atlasmtl prediction" in stdout
    # the bars: a widget with ipywidgets installed, tqdm's text bar on stderr without
    widgets = [o for o in default_out if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    stderr = _text(default_out, "stderr")
    assert widgets or ("atlasmtl training" in stderr and "atlasmtl predict" in stderr), default_out


def test_progress_picks_the_widget_bar_only_in_a_kernel_with_ipywidgets(monkeypatch):
    from tqdm.std import tqdm as text_bar

    monkeypatch.setattr(runtime, "in_notebook", lambda: False)
    assert type(runtime.progress(range(2))) is text_bar
    monkeypatch.setattr(runtime, "in_notebook", lambda: True)
    monkeypatch.setattr(runtime, "_widgets_available", lambda: False)
    assert type(runtime.progress(range(2))) is text_bar
    assert runtime.resolve_flag(None) is True  # summaries and bars on by default in a kernel
    assert runtime.resolve_flag(False) is False
    monkeypatch.setattr(runtime, "in_notebook", lambda: False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert runtime.resolve_flag(None) is False  # scripts and pipelines stay quiet


@pytest.fixture(autouse=True)
def _kernel_available():
    from jupyter_client.kernelspec import KernelSpecManager

    assert "python3" in KernelSpecManager().find_kernel_specs(), \
        "no python3 Jupyter kernel: pip install ipykernel (part of the test extra)"
