"""Process-group helpers for training and predicting on several processes (``torchrun``).

atlasmtl runs distributed work on PyTorch's own engine: ``torchrun`` starts one
process per GPU (or per CPU worker), each with the environment variables
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
:func:`init_from_env` joins that process group (NCCL on CUDA, gloo on CPU);
the other helpers answer "who am I" and "which part of the data is mine", and
behave as a single process of rank 0 when no group was started, so the same
code runs with and without ``torchrun``.
"""

from __future__ import annotations

import atexit
import gc
import os
import zlib
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from .exceptions import DeviceError, ParameterError

if TYPE_CHECKING:  # annotations only: the model, results and anndata load when predict_distributed runs
    import anndata as ad

    from .model import TrainedModel
    from .result import PredictionResult

__all__ = [
    "launched_by_torchrun",
    "init_from_env",
    "is_distributed",
    "rank",
    "local_rank",
    "world_size",
    "is_main_process",
    "barrier",
    "shard_slice",
    "all_reduce_sum",
    "destroy",
    "predict_distributed",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether the environment holds the variables ``torchrun`` sets.

    Returns
    -------
    bool
        True when ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` are all set.
    """
    return all(v in os.environ for v in _TORCHRUN_VARS)


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process.

    Returns
    -------
    bool
        True inside a group (:func:`init_from_env` or the caller's own ``init_process_group``).
    """
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the group.

    Returns
    -------
    int
        The rank, from 0 to :func:`world_size` - 1; 0 without a group.
    """
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group.

    Returns
    -------
    int
        The group's size; 1 without a group.
    """
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its machine: the GPU it should use.

    Returns
    -------
    int
        ``LOCAL_RANK`` from the environment; 0 when it is unset (no ``torchrun``) or not an integer.
    """
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    """Whether this is the process that writes files and prints.

    Returns
    -------
    bool
        True on rank 0, and in a plain single process.
    """
    return rank() == 0


def init_from_env(backend: str | None = None, device: str | torch.device = "auto",
                  timeout_minutes: float = 30.0) -> torch.device:
    """Join the process group ``torchrun`` describes in the environment; return this rank's device.

    Parameters
    ----------
    backend
        ``"gloo"``, ``"nccl"`` or ``None`` (NCCL when the device is CUDA, gloo otherwise).
    device
        ``"auto"`` (CUDA ``LOCAL_RANK`` when CUDA is available, else CPU), ``"cpu"`` or ``"cuda"``.
        With CUDA each process uses GPU ``LOCAL_RANK``.
    timeout_minutes
        How long collective operations wait for the other ranks before failing.

    Returns
    -------
    torch.device
        The device this rank computes on.

    Raises
    ------
    ParameterError
        When the ``torchrun`` environment variables are missing or ``backend`` is unknown.
    DeviceError
        When ``device="cuda"`` is asked for and this machine has no GPU for ``LOCAL_RANK``.

    Notes
    -----
    Calling it again in a process whose group is already initialised returns the
    device without re-initialising. A group it started is left at interpreter exit
    if the script has not called :func:`destroy` itself. Multi-node runs need nothing more than
    ``torchrun --nnodes N --node_rank i --master_addr HOST --master_port PORT``.
    """
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ParameterError(f"backend={backend!r} is not supported; use 'gloo' (CPU), 'nccl' (CUDA) or None (automatic).")
    if not dist.is_available():  # pragma: no cover - every standard torch build has it
        raise ParameterError("This PyTorch build has no torch.distributed support; install a standard PyTorch wheel.")
    kind = str(device).split(":")[0]
    if kind not in ("auto", "cpu", "cuda"):
        raise ParameterError(f"device={device!r} is not recognised; use 'auto', 'cpu' or 'cuda'.")
    use_cuda = torch.cuda.is_available() if kind == "auto" else kind == "cuda"
    if use_cuda:
        if not torch.cuda.is_available() or local_rank() >= torch.cuda.device_count():
            raise DeviceError(
                f"device={device!r} needs CUDA device {local_rank()} (LOCAL_RANK) but this machine has "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; start at most that many processes "
                "per node (torchrun --nproc_per_node) or use device='cpu'."
            )
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if is_distributed():
        return dev
    if not launched_by_torchrun():
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
        raise ParameterError(
            f"Distributed mode needs the environment torchrun sets ({', '.join(missing)} missing); launch with "
            "`torchrun --nproc_per_node=N ...` (see the README's 'Distributed training'), or drop --distributed."
        )
    dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"),
                            timeout=timedelta(minutes=timeout_minutes))
    atexit.register(_leave_at_exit)
    return dev


def _leave_at_exit() -> None:
    """Leave the process group before the interpreter tears down (registered by :func:`init_from_env`).

    A gloo worker thread frees each collective's tensors a moment after the collective returns. A script that
    ends right after one (``build_model`` refusing mismatched options, ``predict_distributed`` on a rank other
    than 0) could reach interpreter teardown first; the thread then found no Python to return the tensors to
    and aborted the process ("terminate called without an active exception"), so ``torchrun`` reported a
    finished run as failed. Destroying the group joins those threads first. A finished
    ``DistributedDataParallel`` lingers in reference cycles that hold the group, hence the collection.
    """
    if is_distributed():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank arrives here (a no-op without a group)."""
    if is_distributed():
        dist.barrier()


def shard_slice(n: int, rank_: int | None = None, world_size_: int | None = None) -> slice:
    """This rank's contiguous share of ``n`` items, as a slice.

    The first ``n % world_size`` ranks get one item more, so shares differ by at
    most one and together cover ``range(n)`` exactly once.

    Parameters
    ----------
    n
        Number of items (cells, rows of a file).
    rank_, world_size_
        Override the process group's rank and size (for planning or tests).

    Returns
    -------
    slice
        ``slice(start, stop)`` of this rank's items (empty when ``n`` is smaller than the rank).

    Raises
    ------
    ParameterError
        ``n`` is negative, ``world_size`` below 1, or ``rank`` outside ``[0, world_size)``.
    """
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world_size_ is None else int(world_size_)
    if n < 0 or w < 1 or not 0 <= r < w:
        raise ParameterError(f"shard_slice needs n >= 0 and 0 <= rank < world_size (got n={n}, rank={r}, world_size={w}).")
    base, extra = divmod(int(n), w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def check_same_inputs(inputs: Mapping[str, Any]) -> None:
    """A :class:`~atlasmtl.exceptions.ParameterError` on every process when the processes were given different
    ``inputs`` (name → any value with a stable ``repr``: shapes, names, parameters): one all-reduce of a
    checksum per name, so a stale copy of the file on one node or other options on one rank fail at once,
    with the names that differ, instead of inside PyTorch or gloo (or, for a seed, not at all)."""
    if not is_distributed():
        return
    names = sorted(inputs)
    mine = np.array([zlib.crc32(repr(inputs[n]).encode()) for n in names], dtype=np.float64)
    differ = [n for n, total, own in zip(names, all_reduce_sum(mine), mine) if total != own * world_size()]
    if differ:
        raise ParameterError(f"The {world_size()} processes were given different {', '.join(differ)}: every process "
                             "of a distributed run needs the same file (the same copy on every node) and options.")


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum of a NumPy array over all ranks (the array itself without a group).

    Sums in float64 (on the rank's GPU under NCCL); every rank gets the same result. A
    collective: every rank of the group must call it, with an array of the same shape.

    Parameters
    ----------
    values
        This rank's values (any shape; converted to float64).

    Returns
    -------
    numpy.ndarray
        float64, the shape of ``values``: the sum over the ranks; without a group, ``values``
        as float64 (the same array when it already was).
    """
    values = np.asarray(values, dtype=np.float64)
    if not is_distributed():
        return values
    on_gpu = dist.get_backend() == "nccl"
    tensor = torch.from_numpy(values.copy())
    if on_gpu:
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def destroy() -> None:
    """Leave the process group (a no-op without one)."""
    if is_distributed():
        dist.destroy_process_group()


# ---------------------------------------------------------------- distributed prediction
def predict_distributed(model: TrainedModel, adata: ad.AnnData | str | os.PathLike,
                        **kwargs: Any) -> PredictionResult | None:
    """:func:`atlasmtl.predict` with every ``torchrun`` process mapping its own slice of the query.

    Each rank streams the contiguous share of the cells :func:`shard_slice`
    gives it (read backed from an ``.h5ad`` path, or from a shared AnnData),
    runs the network, the KNN vote and the novelty search on it, and sends its
    per-cell outputs (plain arrays) to rank 0 with ``gather_object``; rank 0
    then applies the gate and the hierarchy to the whole table, exactly as a
    single process does (the novelty score's query-level location is taken
    over every cell), so the calls are identical to :func:`atlasmtl.predict`'s.

    Parameters
    ----------
    model
        A :class:`~atlasmtl.TrainedModel` (each rank loads its own copy; a saved
        model's embedding is memory-mapped, so ranks on one machine share its pages).
    adata
        Query ``.h5ad`` path (recommended: each rank reads only its rows) or AnnData.
    **kwargs
        Any :func:`atlasmtl.predict` option. ``device="auto"`` gives each rank
        GPU ``LOCAL_RANK`` when CUDA is available.

    Returns
    -------
    PredictionResult or None
        The whole query's result on rank 0; ``None`` on the other ranks.

    Raises
    ------
    ParameterError
        An option :func:`atlasmtl.predict` does not take. Any error :func:`atlasmtl.predict` or
        :func:`init_from_env` raises passes through.

    Notes
    -----
    Without a process group (a plain ``python`` run) it joins the one
    ``torchrun`` describes in the environment; in a single process without
    ``torchrun`` it is :func:`atlasmtl.predict`. Launch, for example::

        torchrun --nproc_per_node=4 -m atlasmtl.cli predict --distributed --model m/ --query q.h5ad --out p.csv
    """
    from .prediction import _predict_part, predict

    if not is_distributed():
        if not launched_by_torchrun():
            return predict(model, adata, **kwargs)
        kwargs["device"] = init_from_env(device=kwargs.get("device", "auto"))
    elif kwargs.get("device", "auto") == "auto" and torch.cuda.is_available():
        kwargs["device"] = torch.device("cuda", local_rank())
    defaults = {k: v.default for k, v in _predict_signature().parameters.items() if k not in ("model", "adata")}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise ParameterError(f"predict_distributed got unknown options {sorted(unknown)}; it takes atlasmtl.predict's.")
    options = {**defaults, **kwargs}
    if rank() != 0:
        options["show_progress"] = options["show_summary"] = False
    return _predict_part(model, adata, rows=lambda n: shard_slice(n), gather=_gather_outputs, **options)


def _predict_signature():  # noqa: ANN202
    import inspect

    from .prediction import predict

    return inspect.signature(predict)


def _gather_outputs(buffers, runtime):  # noqa: ANN001, ANN202
    """Collect every rank's per-cell outputs on rank 0, in rank order (= cell order); ``None`` elsewhere."""
    import numpy as np

    plain = {"levels": buffers.levels, "no_signal": buffers.no_signal, "coords": buffers.coords,
             "view_points": buffers.view_points, "n_searched": buffers.n_searched, "runtime": runtime}
    parts = [None] * world_size() if rank() == 0 else None
    dist.gather_object(plain, parts, dst=0)
    if rank() != 0:
        return None
    for field, values in buffers.levels.items():
        for key in values:
            values[key] = np.concatenate([p["levels"][field][key] for p in parts])
    buffers.no_signal = np.concatenate([p["no_signal"] for p in parts])
    buffers.view_points = np.concatenate([p["view_points"] for p in parts])
    buffers.coords = {name: np.concatenate([p["coords"][name] for p in parts]) for name in buffers.coords}
    buffers.n_searched = sum(p["n_searched"] for p in parts)
    times = [p["runtime"] for p in parts]
    joined = dict(runtime)
    joined.update(
        n_cells=sum(t["n_cells"] for t in times),
        elapsed_seconds=max(t["elapsed_seconds"] for t in times),
        process_peak_rss_mb=max(t["process_peak_rss_mb"] for t in times),
        phase_peak_rss_mb=max(t["phase_peak_rss_mb"] for t in times),
        knn_cells_searched=buffers.n_searched,
        ranks=world_size(),
    )
    joined["throughput_cells_per_second"] = (round(joined["n_cells"] / joined["elapsed_seconds"], 1)
                                             if joined["elapsed_seconds"] else None)
    return buffers, joined
