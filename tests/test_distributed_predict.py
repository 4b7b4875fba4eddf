"""Distributed prediction (issue 13): two gloo processes under torchrun give the single process's calls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import atlasmtl
from atlasmtl import cli, distributed

FIXTURE = Path(__file__).parent / "data" / "symphony_pbmc_small.h5ad"
LEVELS = ["cell_type_broad", "cell_type"]


@pytest.fixture(scope="module")
def symphony_model_dir(tmp_path_factory):
    import anndata as ad

    ref = ad.read_h5ad(FIXTURE)
    ref = ref[ref.obs["dataset"] != "3pv1"].copy()
    model = atlasmtl.build_model(ref, LEVELS, num_epochs=3, hidden_sizes=(64, 32), num_threads=1,
                                 show_progress=False, show_summary=False)
    out = tmp_path_factory.mktemp("model")
    model.save(out / "model.pth")
    return out


def test_without_torchrun_it_is_plain_predict(symphony_model_dir, monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    model = atlasmtl.TrainedModel.load(symphony_model_dir)
    kwargs = dict(num_threads=1, show_progress=False, show_summary=False)
    a = distributed.predict_distributed(model, FIXTURE, **kwargs)
    b = atlasmtl.predict(model, FIXTURE, **kwargs)
    pd.testing.assert_frame_equal(a.to_dataframe("full"), b.to_dataframe("full"))
    out = Path(symphony_model_dir) / "predictions.csv"
    assert cli.main(["predict", "--model", str(symphony_model_dir), "--query", str(FIXTURE), "--distributed",
                     "--num-threads", "1", "--out", str(out)]) == 0
    assert re.search(r"warning: --distributed without torchrun: .* this one process .*`torchrun --nproc_per_node=N",
                     capsys.readouterr().err)
    assert len(pd.read_csv(out, index_col=0)) == 1200  # the whole query, from one process
    with pytest.raises(atlasmtl.exceptions.ParameterError, match="unknown options"):
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "1")
        monkeypatch.setattr(distributed, "init_from_env", lambda **_: "cpu")
        distributed.predict_distributed(model, FIXTURE, knn="all")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--batch-key", "dataset"]], ids=["one batch", "batch key"])
def test_torchrun_two_gloo_processes_match_single_process(symphony_model_dir, tmp_path, extra):
    """Rank 0 joins the ranks' outputs before the gate, so the calls equal a single process's; with a batch key
    too (every rank reads the whole obs column; rank 0 judges each batch alone)."""
    single, split = tmp_path / "single.csv", tmp_path / "distributed.csv"
    common = ["--model", str(symphony_model_dir), "--query", str(FIXTURE), "--mode", "full", "--include-coords",
              "--num-threads", "1", *extra]
    assert cli.main(["predict", *common, "--out", str(single), "--quiet"]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(atlasmtl.__file__).parent.parent), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "atlasmtl.cli", "predict", "--distributed", *common, "--out", str(split), "--quiet"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = pd.read_csv(single, index_col=0), pd.read_csv(split, index_col=0)
    assert len(b) == 1200
    pd.testing.assert_frame_equal(a, b)
