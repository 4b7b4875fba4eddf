"""The README's quick start runs exactly as written, and the demo (run once) tells its story on one screen."""

from __future__ import annotations

import re
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from atlasmtl.datasets import pbmc68k_reference_query

from .conftest import LEVELS, REPO


def _readme_python_block() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "build_model" in b and "TrainedModel.load" in b)


def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_python_block(), "README.md", "exec"), namespace)

    for name in ["model.pth", "model_metadata.pkl", "model_reference.pkl", "model_embedding.npy", "model_manifest.json"]:
        assert (tmp_path / "model" / name).is_file(), name
    annotated = namespace["adata_query"]
    for level in LEVELS:
        assert f"pred_{level}" in annotated.obs and f"conf_{level}" in annotated.obs
    assert annotated.obsm["X_pred_umap"].shape == (annotated.n_obs, 2)
    csv = pd.read_csv(tmp_path / "predictions.csv", index_col=0)
    assert list(csv.index) == list(annotated.obs_names)
    assert (csv["pred_bulk_labels"].to_numpy() == annotated.obs["pred_bulk_labels"].astype(str).to_numpy()).all()
    # the printed number is the fine level's accuracy on the held-out labels, and a real mapping's
    printed = float(capsys.readouterr().out.strip().splitlines()[-1])
    truth = annotated.obs["bulk_labels"].astype(str).to_numpy()
    assert printed == pytest.approx(np.mean(annotated.obs["pred_bulk_labels"].astype(str).to_numpy() == truth))
    assert printed > 0.6
    lineage = np.mean(annotated.obs["pred_lineage"].astype(str) == annotated.obs["lineage"].astype(str))
    assert lineage > 0.85


@pytest.mark.slow
def test_demo_command_tells_the_story_and_writes_its_files(tmp_path):
    """The README's first command, run once: ``python -m atlasmtl.demo`` in an empty folder."""
    proc = subprocess.run([sys.executable, "-m", "atlasmtl.demo"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.strip().splitlines()
    assert len(lines) <= 25, out  # one screen
    assert "derived from bulk_labels" in out
    assert "Low-confidence:" in out and "KNN-confirmed:" in out
    assert "resource" not in out.lower() and "peak" not in out.lower()  # only with --show-resources
    folder = tmp_path / "atlasmtl_demo"
    assert sorted(p.name for p in folder.iterdir()) == ["model", "query_annotated.h5ad", "report.html"]
    assert (folder / "model" / "model_manifest.json").is_file()
    assert lines[-1] == f"Open the report:  python -m webbrowser {(folder / 'report.html').resolve().as_uri()}"
    assert "<img " in (folder / "report.html").read_text()
    # the table's accuracies are those of the written predictions against the held-back labels
    annotated = ad.read_h5ad(folder / "query_annotated.h5ad")
    _, query = pbmc68k_reference_query(random_state=0)
    assert list(annotated.obs_names) == list(query.obs_names)
    assert not set(LEVELS) & set(annotated.obs.columns)  # the labels were held back from the query
    table = {line.split()[0]: line.split()[1:] for line in lines if line.split() and line.split()[0] in LEVELS}
    for level, floor in (("lineage", 0.85), ("bulk_labels", 0.6)):
        accuracy = np.mean(annotated.obs[f"pred_{level}"].astype(str).to_numpy() == query.obs[level].to_numpy())
        assert float(table[level][0]) == pytest.approx(accuracy, abs=5e-4)
        assert accuracy > floor, (level, accuracy)
