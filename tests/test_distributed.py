"""Process-group helpers (atlasmtl.distributed) without torchrun: a single-process gloo group."""

from __future__ import annotations

import socket

import pytest
import torch

from atlasmtl import distributed
from atlasmtl.exceptions import ParameterError


def test_shard_slice_covers_every_item_once():
    for n in (0, 1, 7, 10, 1001):
        for w in (1, 2, 3, 8):
            parts = [distributed.shard_slice(n, r, w) for r in range(w)]
            covered = [i for s in parts for i in range(n)[s]]
            assert covered == list(range(n))
            sizes = [s.stop - s.start for s in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ParameterError):
        distributed.shard_slice(10, 2, 2)


def test_single_process_defaults():
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.shard_slice(5) == slice(0, 5)
    distributed.barrier()  # no-op


def test_init_without_torchrun_is_a_clear_error(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ParameterError, match="torchrun"):
        distributed.init_from_env(device="cpu")
    with pytest.raises(ParameterError, match="backend"):
        distributed.init_from_env(backend="mpi")


def test_distributed_training_needs_a_fixed_random_state(symphony_split):
    """random_state=None under torchrun let each process draw its own seed: each held out other calibration
    cells, so cells one process calibrated on another trained on, and the recorded seed was rank 0's alone."""
    import atlasmtl

    with pytest.raises(ParameterError, match="random_state=None with distributed=True"):
        atlasmtl.build_model(symphony_split[0], ["cell_type"], distributed=True, random_state=None)


def test_init_from_env_joins_a_gloo_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    try:
        dev = distributed.init_from_env(device="cpu")
        assert dev == torch.device("cpu")
        assert distributed.is_distributed() and distributed.world_size() == 1 and distributed.rank() == 0
        assert torch.distributed.get_backend() == "gloo"
        assert distributed.init_from_env(device="cpu") == dev  # idempotent
        distributed.barrier()
        assert distributed.shard_slice(9) == slice(0, 9)
    finally:
        distributed.destroy()
    assert not distributed.is_distributed()


# ---------------------------------------------------------------- DDP training under torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_train_as_well_as_one(symphony_split, tmp_path):
    """`atlasmtl train --distributed` under `torchrun --nproc_per_node=2` (gloo, CPU): rank 0 writes a model
    in the usual format, and it maps the held-out chemistry as well as single-process training. The ranks'
    per-gene sums are combined, so they select the same genes (1,000 of the fixture's 1,767) as one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    import atlasmtl

    from .conftest import SYMPHONY_LEVELS

    ref, query = symphony_split
    ref.write_h5ad(tmp_path / "ref.h5ad")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    options = ["--labels", ",".join(SYMPHONY_LEVELS), "--num-epochs", "15", "--num-threads", "1", "--n-top-genes", "1000",
               "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         f"--master_port={_free_port()}", "-m", "atlasmtl.cli", "train", "--reference", str(tmp_path / "ref.h5ad"),
         "--out", str(tmp_path / "ddp") + "/", "--distributed", *options],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    report = json.loads(proc.stdout)  # one object: the other rank writes nothing (both printed one until 2026-12-07)
    assert report["ok"] and report["command"] == "train" and "rank" not in report
    ddp = atlasmtl.TrainedModel.load(tmp_path / "ddp")
    assert ddp.train_config["distributed"] == {"world_size": 2, "backend": "gloo"}
    single = atlasmtl.build_model(ref, SYMPHONY_LEVELS, num_epochs=15, num_threads=1, n_top_genes=1000,
                                  show_progress=False, show_summary=False)
    assert len(single.genes) == 1000 and ddp.genes == single.genes
    truth = query.obs[SYMPHONY_LEVELS[-1]].astype(str).to_numpy()

    def accuracy(model):
        result = atlasmtl.predict(model, query, show_progress=False)
        return float(np.mean(np.asarray(result.labels(SYMPHONY_LEVELS[-1])).astype(str) == truth))

    acc_ddp, acc_single = accuracy(ddp), accuracy(single)
    assert acc_single > 0.7
    assert abs(acc_ddp - acc_single) <= 0.05, (acc_ddp, acc_single)


def test_all_reduce_sum_without_a_group_is_the_array():
    import numpy as np

    assert np.array_equal(distributed.all_reduce_sum(np.array([1.0, 2.5])), [1.0, 2.5])


@pytest.mark.slow
def test_processes_given_different_inputs_fail_together(symphony_split, tmp_path):
    """Other options on one rank (or a stale copy of the file on one node) failed inside PyTorch's DDP or gloo
    ('Connection closed by peer'), or, for a seed, passed silently; every process now names what differs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    symphony_split[0].write_h5ad(tmp_path / "ref.h5ad")
    script = tmp_path / "mismatch.py"
    script.write_text(
        "import os, sys, atlasmtl\n"
        "from atlasmtl.exceptions import ParameterError\n"
        "epochs = 2 if os.environ['RANK'] == '0' else 3\n"
        "try:\n"
        "    atlasmtl.build_model(sys.argv[1], ['cell_type'], num_epochs=epochs, distributed=True, num_threads=1,\n"
        "                         show_progress=False, show_summary=False)\n"
        "except ParameterError as exc:\n"
        "    open(f\"refused{os.environ['RANK']}.txt\", 'w').write(str(exc))\n")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                           f"--master_port={_free_port()}", str(script), str(tmp_path / "ref.h5ad")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # each process refused, with the name of what differs
        assert (tmp_path / f"refused{rank}.txt").read_text().startswith("The 2 processes were given different options")


@pytest.mark.slow
def test_a_script_ending_right_after_a_collective_exits_cleanly(tmp_path):
    """A gloo worker thread frees a collective's tensors a moment after the collective returns; a script that
    ended right then reached interpreter teardown first, and the thread aborted the process ('terminate called
    without an active exception': 3 of 20 runs of this script before the fix), so torchrun reported a finished
    run as failed. init_from_env now leaves the group at exit, which joins those threads first."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ends.py"
    script.write_text("import numpy as np\nfrom atlasmtl import distributed\ndistributed.init_from_env(device='cpu')\n"
                      "distributed.all_reduce_sum(np.ones(1000))\ndistributed.check_same_inputs({'x': 1})\n")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    for _ in range(6):  # the abort was a race: each run had about a 15% chance of it
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                               f"--master_port={_free_port()}", str(script)],
                              env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-3000:]
