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
