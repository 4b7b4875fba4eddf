"""Runtime plumbing: devices, threads, progress bars and resource monitoring."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import sys
import threading
import time
from typing import Any, Iterator

import numpy as np
import psutil
import torch

from .exceptions import DeviceError, ParameterError
from .validation import as_bool

def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a :class:`torch.device`) into a :class:`torch.device`.

    Raises
    ------
    ParameterError
        For an unknown device string.
    DeviceError
        For a CUDA device this machine does not have.
    """
    if isinstance(device, torch.device):
        device = str(device)
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", device) if isinstance(device, str) else None
    if match is None or (match.group(1) == "auto" and match.group(2) is not None):
        raise ParameterError(
            f"device={device!r} is not recognised; use one of 'auto', 'cpu', 'cuda' or 'cuda:N' (N = GPU index)."
        )
    kind = match.group(1)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device={device!r} was requested but no CUDA device is available to PyTorch "
            f"(torch {torch.__version__}); use device='auto' or device='cpu'."
        )
    index = int(match.group(2) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"device={device!r} was requested but this machine has {count} CUDA device(s) "
            f"(cuda:0 to cuda:{count - 1}); use device='cuda' or one of those."
        )
    return torch.device("cuda", index)


def available_cpus() -> int:
    """Number of CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def resolve_num_threads(num_threads: int | str) -> int:
    """Cap ``num_threads`` at the CPUs available; ``"max"`` means 80% of them."""
    cpus = available_cpus()
    if isinstance(num_threads, str) and num_threads == "max":
        return max(1, int(cpus * 0.8))
    if isinstance(num_threads, (bool, np.bool_)) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise ParameterError(f"num_threads={num_threads!r} must be a positive integer or 'max'.")
    return min(int(num_threads), cpus)


#: glibc's ``malloc_trim`` once looked up (``False`` where the C library has none).
_MALLOC_TRIM: Any = None


def release_freed_memory() -> None:
    """Hand memory the process has freed back to the operating system (glibc's ``malloc_trim``).

    Large temporary arrays freed between training phases otherwise stay in the C heap (glibc
    raises its ``mmap`` threshold after the first large frees, so later arrays come from the
    heap, whose freed pages it keeps), and each phase's temporaries then stack on top of the
    last one's. A no-op where the C library has no ``malloc_trim`` (macOS, musl, Windows).
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError, TypeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(n)`` and restore the old value."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, classic notebook, VS Code, Colab)."""
    ipython = sys.modules.get("IPython")  # never imported here: a kernel has always imported it already
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # noqa: BLE001 - an odd IPython is simply not a notebook
        return False


def interactive() -> bool:
    """True in a Jupyter kernel or when stderr is an interactive terminal."""
    if in_notebook():
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def resolve_flag(flag: bool | None, name: str = "flag") -> bool:
    """``None`` means "on in a notebook or an interactive terminal, off in scripts and pipelines"; otherwise
    ``True`` or ``False`` (a :class:`ParameterError` for anything else: ``"no"`` would read as on)."""
    flag = as_bool(name, flag, allow_none=True)
    return interactive() if flag is None else flag


def _widgets_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


def progress(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool = True, unit: str = "it"):
    """A tqdm progress bar (with ETA), or a silent pass-through when ``enabled`` is false.

    In a Jupyter kernel with ipywidgets (``pip install atlasmtl[notebook]``) the bar is a widget;
    elsewhere, including a kernel without ipywidgets, it is tqdm's text bar on stderr, which
    notebooks show too. ``tqdm.auto`` is not used: it warns (``TqdmWarning: IProgress not found``)
    in a kernel without ipywidgets even when no bar is drawn.
    """
    notebook = enabled and in_notebook()
    if notebook and _widgets_available():
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    # a finished bar stays in a notebook's output (a record of the run); a terminal's line is cleared
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit=unit, file=sys.stderr, leave=notebook)


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process since it started, in MiB."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kb / 1024.0


class ResourceMonitor:
    """Measure wall time, peak RSS and GPU peak memory of a block of work.

    The process peak RSS (``ru_maxrss``) is a lifetime figure; the monitor also
    samples the RSS in a background thread so the peak *during* the block is
    known (``phase_peak_rss_mb``).
    """

    def __init__(self, device: torch.device | None = None, interval: float = 0.05) -> None:
        self.device = device
        self.interval = interval
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_rss_mb = 0.0
        self.phase_peak_rss_mb = 0.0
        self.elapsed_seconds = 0.0
        self._t0 = 0.0

    def _rss_mb(self) -> float:
        return self._proc.memory_info().rss / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.phase_peak_rss_mb = max(self.phase_peak_rss_mb, self._rss_mb())

    def __enter__(self) -> "ResourceMonitor":
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start_rss_mb = self._rss_mb()
        self.phase_peak_rss_mb = self.start_rss_mb
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.elapsed_seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.phase_peak_rss_mb = max(self.phase_peak_rss_mb, self._rss_mb())

    def gpu_peak_mb(self) -> float | None:
        if self.device is not None and self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return None

    def summary(self, n_cells: int) -> dict[str, Any]:
        """Runtime figures for ``n_cells`` processed during the block."""
        elapsed = self.elapsed_seconds
        return {
            "elapsed_seconds": round(elapsed, 4),
            "n_cells": int(n_cells),
            "throughput_cells_per_second": round(n_cells / elapsed, 1) if elapsed > 0 else None,
            "process_peak_rss_mb": round(process_peak_rss_mb(), 1),
            "phase_peak_rss_mb": round(self.phase_peak_rss_mb, 1),
            "phase_rss_increase_mb": round(self.phase_peak_rss_mb - self.start_rss_mb, 1),
            "gpu_peak_memory_mb": None if self.gpu_peak_mb() is None else round(self.gpu_peak_mb(), 1),
        }


def gpu_name(device: torch.device) -> str | None:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return None


def runtime_section(runtime: dict[str, Any], unit: str = "cells") -> dict[str, Any]:
    """The printed form of a :meth:`ResourceMonitor.summary` (plus device fields): plain words for keys,
    units in the values, nothing that is ``None``.

    ``unit`` names what was counted: ``"cells"`` for prediction, ``"cell-epochs"`` for training
    (cells × epochs, so a throughput of 1,000 cell-epochs/s is 100 cells through 10 epochs per second).
    """
    rt = {k: v for k, v in runtime.items() if v is not None}
    out: dict[str, Any] = {}
    if "elapsed_seconds" in rt:
        out["time"] = f"{rt['elapsed_seconds']:,.2f} s"
    if "n_cells" in rt:
        out[unit] = f"{rt['n_cells']:,}"
    if "throughput_cells_per_second" in rt:
        out["throughput"] = f"{rt['throughput_cells_per_second']:,.0f} {unit}/s"
    for key, label in (("phase_peak_rss_mb", "peak memory"), ("phase_rss_increase_mb", "memory added"),
                       ("process_peak_rss_mb", "process peak memory"), ("gpu_peak_memory_mb", "GPU peak memory")):
        if key in rt:
            out[label] = f"{rt[key]:,.0f} MB"
    for key, label in (("device", "device"), ("gpu", "GPU"), ("threads", "threads"), ("cpu count", "CPUs"),
                       ("knn_cells_searched", "cells searched by KNN")):
        if key in rt:
            out[label] = f"{rt[key]:,}" if isinstance(rt[key], int) else rt[key]
    return out


def format_sections(title: str, sections: dict[str, dict[str, Any]]) -> str:
    """Render nested dicts as a compact sectioned text block; ``None`` values are left out."""
    lines = [title, "=" * len(title)]
    for name, values in sections.items():
        values = {k: v for k, v in (values or {}).items() if v is not None}
        if not values:
            continue
        lines.append(f"[{name}]")
        width = max(len(str(k)) for k in values)
        for key, value in values.items():
            if isinstance(value, bool):
                value = "yes" if value else "no"
            elif isinstance(value, float):
                value = f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.1f}"
            elif isinstance(value, (list, tuple)):
                value = ", ".join(map(str, value))
            lines.append(f"  {str(key).ljust(width)} : {value}")
    return "\n".join(lines)
