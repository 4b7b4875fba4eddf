"""The README's quick start runs exactly as written, on real data."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import scanpy as sc

import atlasmtl
from atlasmtl.demo import run_demo

from .conftest import REPO


def _readme_python_block() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "build_model" in b and "TrainedModel.load" in b)


def _four_level_split():
    """pbmc68k_reduced with four real annotation columns as anno_lv1..anno_lv4."""
    full = sc.datasets.pbmc68k_reduced()
    from atlasmtl.datasets import pbmc68k_reference_query

    ref, query = pbmc68k_reference_query()
    for adata in (ref, query):
        obs = full.obs.loc[adata.obs_names]
        adata.obs["anno_lv1"] = adata.obs["lineage"]
        adata.obs["anno_lv2"] = adata.obs["bulk_labels"]
        adata.obs["anno_lv3"] = adata.obs["bulk_labels"] + " | " + obs["phase"].astype(str).to_numpy()
        adata.obs["anno_lv4"] = "cluster " + obs["louvain"].astype(str).to_numpy()
    return ref, query


def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    adata_ref, adata_query = _four_level_split()
    truth = adata_query.obs.copy()
    adata_query.obs = adata_query.obs[[]]
    adata_query.obs["user_note"] = "keep me"
    monkeypatch.chdir(tmp_path)
    namespace = {"atlasmtl": atlasmtl, "adata_ref": adata_ref, "adata_query": adata_query}
    exec(_readme_python_block(), namespace)

    for name in ["model.pth", "model_metadata.pkl", "model_reference.pkl", "model_manifest.json", "predictions.csv"]:
        assert (tmp_path / name).is_file(), name
    annotated = namespace["adata_query"]
    assert annotated.obs["user_note"].eq("keep me").all()
    for level in ["anno_lv1", "anno_lv2", "anno_lv3", "anno_lv4"]:
        assert f"pred_{level}" in annotated.obs
    assert "atlasmtl" in annotated.uns
    labels = namespace["labels"]
    assert list(labels.columns) == [f"pred_anno_lv{i}" for i in range(1, 5)]
    csv = pd.read_csv(tmp_path / "predictions.csv", index_col=0)
    assert list(csv.index) == list(annotated.obs_names)
    assert (csv["pred_anno_lv2"].to_numpy() == labels["pred_anno_lv2"].astype(str).to_numpy()).all()
    # real mapping quality on the coarse and fine levels
    acc1 = np.mean(labels["pred_anno_lv1"].astype(str).to_numpy() == truth["anno_lv1"].to_numpy())
    acc2 = np.mean(labels["pred_anno_lv2"].astype(str).to_numpy() == truth["anno_lv2"].to_numpy())
    assert acc1 > 0.85 and acc2 > 0.6, (acc1, acc2)
    out = capsys.readouterr().out
    assert "atlasmtl model" in out and "atlasmtl prediction" in out and "throughput" in out


def test_demo_reports_accuracy():
    scores = run_demo(num_epochs=20, quiet=True)
    assert set(scores) == {"lineage", "bulk_labels"}
    assert scores["lineage"]["accuracy"] > 0.85
    assert scores["bulk_labels"]["accuracy"] > 0.6
    assert 0.5 < scores["bulk_labels"]["coverage"] <= 1.0


def test_demo_command_prints_per_level_table():
    proc = subprocess.run(
        [sys.executable, "-m", "atlasmtl.demo", "--num-epochs", "10"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "macro-F1" in proc.stdout and "bulk_labels" in proc.stdout and "atlasmtl prediction" in proc.stdout
