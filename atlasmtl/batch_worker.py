"""Workers that prepare training minibatches beside the training loop: a forked process, or a thread.

Preparing a minibatch (reading the rows, the shift augmentation, the input
transform, the transpose for the weight gradient) takes about half as long as
the training step on the CPU, and it is many short numpy/scipy calls that hold
Python's interpreter lock. In a prefetch *thread* (:func:`prefetch`)
those calls keep the training loop, which needs the lock between every PyTorch
operation, waiting: measured on 2 cores at 3,000 genes, a step took 3.8 ms alone
and 5.2-5.6 ms beside the thread (the thread's own work was 1.9 ms). In a process
of its own the same work runs beside the step without slowing it.

The worker is a ``fork`` of the training process (Linux), so it shares the
in-memory reference copy-on-write and draws from a copy of the same random
generator the thread would use: the minibatches, and so the trained network,
are identical. Each prepared minibatch (its CSR matrix, the transpose, the row
numbers, the per-cell arrays drawn with it) is written into one of a few slots
of an anonymous shared memory map and handed over by slot number, without
pickling; a batch too large for a slot (not expected: slots are sized for the
largest possible batch) is pickled through the pipe instead. Where ``fork`` is
not available, or the reference is read from disk (an open HDF5 file must not be
shared by two processes), under :mod:`torch.distributed`, or in a daemonic
process, training uses the thread
(:func:`prefetch`; :func:`use_worker_process` decides), as it does when the
fork itself fails (with a warning).
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import scipy.sparse as sp

from .exceptions import TrainingError

#: Environment variable that turns the worker process off (``thread``) for debugging.
WORKER_ENV = "ATLASMTL_BATCH_WORKER"
_ALIGN = 64


def prefetch(items: Iterator[Any], depth: int = 3) -> Iterator[Any]:
    """Run an iterator in a background thread, ``depth`` items ahead (reading, augmenting and
    transforming the next minibatches while the network trains on this one).

    Exceptions in the worker are raised in the consumer; leaving the loop early stops the worker.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((False, exc))

    worker = threading.Thread(target=work, name="atlasmtl-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.05)


def fork_available() -> bool:
    """Whether this platform can fork the training process (Linux; macOS and Windows spawn)."""
    return sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()


def use_worker_process(backed: bool, distributed: bool) -> bool:
    """Whether training prepares minibatches in a forked process rather than a thread."""
    if os.environ.get(WORKER_ENV, "").strip().lower() == "thread":
        return False
    # a daemonic process (e.g. a multiprocessing.Pool worker) may not start children
    return fork_available() and not backed and not distributed and not mp.current_process().daemon


def max_batch_nonzeros(matrix: Any, cells: np.ndarray, batch_size: int) -> int:
    """An upper bound on the stored values of any minibatch of ``batch_size`` of ``cells``.

    For an in-memory CSR matrix, the sum of the ``batch_size`` largest row counts
    (the transform and the augmentation only select, thin or rescale values, so they
    never add any); otherwise ``batch_size`` × the number of genes.
    """
    n = min(batch_size, len(cells))
    if sp.issparse(matrix) and matrix.format == "csr":
        per_row = np.diff(matrix.indptr)[cells]
        if len(per_row) > n:
            per_row = np.partition(per_row, len(per_row) - n)[-n:]
        return max(int(per_row.sum()), 1)
    return max(n * int(matrix.shape[1]), 1)


def mean_stored_values(matrix: Any, cells: np.ndarray, sample: int = 1000) -> float:
    """Mean stored (non-zero) values per row over ``cells`` of an in-memory matrix: from the CSR row
    pointers, or for a dense matrix counted on at most ``sample`` of the rows."""
    if len(cells) == 0:
        return 0.0
    if sp.issparse(matrix) and matrix.format == "csr":
        return float(np.diff(matrix.indptr)[cells].mean())
    rows = np.sort(cells[np.linspace(0, len(cells) - 1, min(sample, len(cells))).astype(int)])
    block = matrix[rows]
    stored = sp.csr_matrix(block).count_nonzero() if sp.issparse(block) else np.count_nonzero(np.asarray(block))
    return float(stored / len(rows))


class CsrSlots:
    """``n_slots`` buffers in one anonymous shared memory map (inherited by a forked child), each
    holding one minibatch: its row numbers, the batch as CSR (rows × genes), its transpose and
    per-cell arrays drawn beside it (``cell_fields``, e.g. mixup partners and dropout masks).

    Parameters
    ----------
    n_slots
        Number of buffers (minibatches in flight).
    max_rows, n_cols, max_nnz
        The largest batch: cells, CSR rows (cells, or one more when the batch carries an
        extra row), genes and stored values.
    cell_fields
        Name → ``(dtype, width)`` of each per-cell array (width 0: one value per cell, a
        vector); at most ``max_rows`` cells.
    """

    def __init__(self, n_slots: int, max_rows: int, n_cols: int, max_nnz: int,
                 cell_fields: Mapping[str, tuple[Any, int]] | None = None) -> None:
        self.max_rows, self.n_cols, self.max_nnz = max_rows, n_cols, max_nnz
        self.cell_fields = {name: (np.dtype(dtype), int(width)) for name, (dtype, width) in (cell_fields or {}).items()}
        layout = [("rows", np.int64, max_rows), ("indptr", np.int32, max_rows + 1), ("indices", np.int32, max_nnz),
                  ("data", np.float32, max_nnz), ("t_indptr", np.int32, n_cols + 1), ("t_indices", np.int32, max_nnz),
                  ("t_data", np.float32, max_nnz)]
        layout += [(f"cell:{name}", dtype, max_rows * max(width, 1)) for name, (dtype, width) in self.cell_fields.items()]
        self.fields: list[tuple[str, np.dtype, int, int]] = []
        offset = 0
        for name, dtype, count in layout:
            self.fields.append((name, np.dtype(dtype), count, offset))
            offset += -(-count * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
        self.slot_bytes = offset
        self.n_slots = n_slots
        self.buffer = mmap.mmap(-1, max(self.slot_bytes * n_slots, 1))  # MAP_SHARED | MAP_ANONYMOUS

    def _views(self, slot: int) -> dict[str, np.ndarray]:
        base = slot * self.slot_bytes
        return {name: np.frombuffer(self.buffer, dtype=dtype, count=count, offset=base + off)
                for name, dtype, count, off in self.fields}

    def fits(self, rows: np.ndarray, x: sp.csr_matrix, cells: Mapping[str, np.ndarray] | None = None) -> bool:
        """Whether a batch (its row numbers, CSR matrix and per-cell arrays) fits a slot."""
        for name, value in (cells or {}).items():
            field = self.cell_fields.get(name)
            if field is None or value.dtype != field[0] or value.shape != ((len(rows),) if field[1] == 0
                                                                             else (len(rows), field[1])):
                return False
        return len(rows) <= self.max_rows and x.shape[0] <= self.max_rows and x.shape[1] == self.n_cols \
            and x.nnz <= self.max_nnz and x.nnz < 2**31

    def write(self, slot: int, rows: np.ndarray, x: sp.csr_matrix, x_t: sp.csr_matrix | None,
              cells: Mapping[str, np.ndarray] | None = None) -> tuple[int, int, int, bool, tuple[str, ...]]:
        """Copy a batch into ``slot``; returns what :meth:`read` needs: ``(cells, CSR rows, stored values,
        has transpose, per-cell array names)``."""
        v = self._views(slot)
        n, n_x, nnz = len(rows), x.shape[0], x.nnz
        v["rows"][:n] = rows
        v["indptr"][: n_x + 1] = x.indptr
        v["indices"][:nnz] = x.indices
        v["data"][:nnz] = x.data
        if x_t is not None:
            v["t_indptr"][:] = x_t.indptr
            v["t_indices"][:nnz] = x_t.indices
            v["t_data"][:nnz] = x_t.data
        cells = cells or {}
        for name, value in cells.items():
            v[f"cell:{name}"][: value.size] = value.ravel()
        return n, n_x, nnz, x_t is not None, tuple(cells)

    def read(self, slot: int, meta: tuple[int, int, int, bool, tuple[str, ...]]
             ) -> tuple[np.ndarray, sp.csr_matrix, sp.csr_matrix | None, dict[str, np.ndarray]]:
        """The batch in ``slot`` as views (valid until the slot is handed back to the worker)."""
        n, n_x, nnz, has_t, names = meta
        v = self._views(slot)
        x = sp.csr_matrix((v["data"][:nnz], v["indices"][:nnz], v["indptr"][: n_x + 1]), shape=(n_x, self.n_cols),
                          copy=False)
        x_t = None
        if has_t:
            x_t = sp.csr_matrix((v["t_data"][:nnz], v["t_indices"][:nnz], v["t_indptr"]), shape=(self.n_cols, n_x),
                                copy=False)
        cells = {}
        for name in names:
            width = self.cell_fields[name][1]
            flat = v[f"cell:{name}"][: n * max(width, 1)]
            cells[name] = flat if width == 0 else flat.reshape(n, width)
        return v["rows"][:n], x, x_t, cells

    def close(self) -> None:
        try:
            self.buffer.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass


def _child(produce: Callable[[], Iterator[Any]], slots: CsrSlots, ready: Any, free: Any,
           parent_ends: tuple[Any, ...]) -> None:
    """The worker's loop: prepare each item of ``produce()``, wait for a free slot, fill it, announce it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training loop's to handle; it stops us
    for conn in parent_ends:  # so that if the training process dies, our reads end (EOFError) and we exit
        conn.close()
    try:
        for item in produce():
            if item is None:
                ready.send(("mark",))
                continue
            rows, x, x_t, cells = item
            if slots.fits(rows, x, cells):
                slot = free.recv()
                ready.send(("slot", slot, slots.write(slot, rows, x, x_t, cells)))
            else:
                ready.send(("inline", rows, x, x_t, cells))
        ready.send(("done",))
    except BaseException as exc:  # noqa: BLE001 - handed to the training loop
        # as it is, or as text when it does not pickle; nothing when the training loop is gone
        for message in (("error", exc), ("error", RuntimeError(f"{type(exc).__name__}: {exc}"))):
            try:
                ready.send(message)
                break
            except Exception:  # noqa: BLE001
                continue


Batch = tuple[np.ndarray, sp.csr_matrix, "sp.csr_matrix | None", dict[str, np.ndarray]]


def forked_prefetch(produce: Callable[[], Iterator[Batch | None]], slots: CsrSlots) -> Iterator[Batch | None]:
    """Run ``produce()`` in a forked process and yield its items here.

    Items are ``(row numbers, CSR batch, its transpose or None, per-cell arrays)``, or
    ``None`` (passed through, e.g. as an end-of-epoch mark). A yielded batch is a view into shared
    memory that stays valid until the next item is asked for. Exceptions in the worker
    are raised here; closing the generator (or leaving the loop) stops the worker and
    releases ``slots``.
    """
    ctx = mp.get_context("fork")
    ready_recv, ready_send = ctx.Pipe(duplex=False)
    free_recv, free_send = ctx.Pipe(duplex=False)
    for slot in range(slots.n_slots):
        free_send.send(slot)
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a multi-threaded process may deadlock the child; the child
        # runs only numpy/scipy code on arrays it inherited, never PyTorch or the thread pools
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        worker = ctx.Process(target=_child, args=(produce, slots, ready_send, free_recv, (ready_recv, free_send)), daemon=True,
                             name="atlasmtl-batch-worker")
        try:
            worker.start()
            failed = None
        except OSError as exc:  # no memory or process slots for a fork: the thread does the same work
            failed = exc
    if failed is not None:
        warnings.warn(f"atlasmtl could not start its minibatch worker process ({failed}); preparing minibatches "
                      "in a thread instead (slower, same result)", RuntimeWarning, stacklevel=2)
        for conn in (ready_recv, ready_send, free_recv, free_send):
            conn.close()
        slots.close()
        yield from prefetch(produce())
        return
    ready_send.close()  # so a worker that dies ends our reads with EOFError
    free_recv.close()
    held: int | None = None
    try:
        while True:
            if held is not None:
                try:
                    free_send.send(held)
                except BrokenPipeError:  # the worker has finished (or died: the next read says which)
                    pass
                held = None
            try:
                msg = ready_recv.recv()
            except EOFError:
                worker.join(5)
                raise TrainingError(
                    f"atlasmtl's minibatch worker process stopped unexpectedly (exit code {worker.exitcode}); "
                    f"if the machine ran out of memory, train with fewer genes or from disk, or set "
                    f"{WORKER_ENV}=thread"
                ) from None
            kind = msg[0]
            if kind == "slot":
                held = msg[1]
                yield slots.read(msg[1], msg[2])
            elif kind == "inline":
                yield msg[1], msg[2], msg[3], msg[4]
            elif kind == "mark":
                yield None
            elif kind == "done":
                return
            else:
                raise msg[1]
    finally:
        if worker.is_alive():
            worker.terminate()
        worker.join(5)
        for conn in (ready_recv, free_send):
            conn.close()
        slots.close()
