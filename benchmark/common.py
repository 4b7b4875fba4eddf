"""Shared helpers for the benchmark: paths, case files, prediction tables, timing.

This module is imported both by the main environment (atlasmtl, kNN, logistic
regression, evaluation) and by the peers' environment (CellTypist, scANVI,
symphonypy), so it depends only on numpy, scipy, pandas, h5py and anndata.

Case layout (``benchmark/work/cases/<case>/``):

- ``case.json``: name, title, levels (coarse → fine), batch key, whether raw
  counts exist, coordinate targets, novel labels, semi-synthetic flag, sizes.
- ``ref.h5ad``: reference cells. ``X`` = log1p of counts per 10k over the
  case's genes (pbmc68k_reduced: the log-normalised values scanpy ships);
  ``layers["counts"]`` = integer counts when the case has them; ``obs`` =
  label columns + batch; ``obsm["X_umap"]`` when the case has a coordinate target.
- ``query.h5ad``: query cells, same genes and matrices, ``obs`` = batch only.
- ``truth.csv.gz``: the query's true labels (read by the evaluation only).
- ``truth_coords.npz``: the query's true coordinates (when the case has them).
"""

from __future__ import annotations

import argparse

import json
import os
import resource
import time
from pathlib import Path
from typing import Any, Iterator

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = Path(os.environ.get("ATLASMTL_BENCH_WORK", BENCH_DIR / "work"))
PEERS_PYTHON = Path(os.environ.get("ATLASMTL_PEERS_ENV", BENCH_DIR / ".envs" / "peers")) / "bin" / "python"


def shared_data_dir() -> Path:
    """The project's shared real datasets (``../shared/data`` from the repository root)."""
    return Path(os.environ.get("ATLASMTL_SHARED_DATA", REPO_DIR / ".." / "shared" / "data")).resolve()


# --------------------------------------------------------------------------- json
def to_builtin(obj: Any) -> Any:
    """Make nested results JSON-serialisable (numpy scalars/arrays → Python values; NaN → None)."""
    if isinstance(obj, dict):
        return {str(k): to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_builtin(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_builtin(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_builtin(obj), indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- case files
def lognorm_cp10k(counts: sp.csr_matrix) -> sp.csr_matrix:
    """log1p of counts scaled to 10,000 per cell (sparse in, sparse out, float32)."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    out = sp.diags(scale.astype(np.float32)) @ counts
    out = sp.csr_matrix(out, dtype=np.float32)
    np.log1p(out.data, out=out.data)
    return out


def load_case(case_dir: Path) -> dict[str, Any]:
    """Read ``case.json``."""
    return read_json(Path(case_dir) / "case.json")


def read_cells(path: Path, matrix: str = "X", obs: bool = True, obsm: bool = True) -> ad.AnnData:
    """Read one ``.h5ad`` with only the matrix asked for (``"X"`` or ``"counts"``) in ``X``.

    Reading a single matrix keeps the memory of the 1M-cell cases to what the method needs.
    """
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        key = "X" if matrix == "X" else f"layers/{matrix}"
        if key not in f:
            raise KeyError(f"{path} has no matrix {key!r}")
        X = read_elem(f[key])
        var = read_elem(f["var"])
        obs_df = read_elem(f["obs"]) if obs else pd.DataFrame(index=read_elem(f["obs"]).index)
        obsm_d = {k: read_elem(f["obsm"][k]) for k in f["obsm"]} if obsm and "obsm" in f else {}
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        if X.nnz < 2**31 - 1 and (X.indptr.dtype != np.int32 or X.indices.dtype != np.int32):
            # the chunked writer stores int64 indptr; scipy itself would use int32 here. Mixed index
            # dtypes make scipy copy the whole index array on every row selection, and make CellTypist
            # densify, so every method gets the canonical int32 form.
            X.indptr = X.indptr.astype(np.int32)
            X.indices = X.indices.astype(np.int32)
    return ad.AnnData(X=X, obs=obs_df, var=var, obsm=obsm_d)


def read_study_case(case_dir: Path, reference: bool = True
                    ) -> tuple[dict[str, Any], ad.AnnData | None, ad.AnnData, pd.DataFrame]:
    """``(case.json, reference, query without obsm, truth)`` of a prepared case: what the research
    scripts of ``benchmark/experiments`` train and score on (``reference=False``: the reference is not
    read, ``None`` stands for it)."""
    case_dir = Path(case_dir)
    return (load_case(case_dir), read_cells(case_dir / "ref.h5ad") if reference else None,
            read_cells(case_dir / "query.h5ad", obsm=False), read_truth(case_dir))


def open_set_truth(spec: dict[str, Any], truth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(novel, finest truth, labels)`` of a case for the open-set probes: which query cells have a true
    label the case lists as novel at some level, the finest level's truth with those cells set to
    ``Unknown`` (abstaining on them is right), and the sorted labels that truth holds."""
    novel = np.zeros(len(truth), dtype=bool)
    for level, missing in (spec.get("novel") or {}).items():
        novel |= np.isin(truth[level].astype(str).to_numpy(), missing)
    finest = truth[spec["levels"][-1]].astype(str).to_numpy().copy()
    finest[novel] = "Unknown"
    return novel, finest, sorted(set(finest))


def probe_parser(doc: str, first: str = "cases") -> argparse.ArgumentParser:
    """The command line of the probes that read prepared cases and saved default models:
    ``<first> <seeds> OUT --cases-dir DIR --models DIR`` (``first``: comma-separated cases, or what the probe
    takes in their place); the caller adds its own options and parses."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument(first)
    ap.add_argument("seeds")
    ap.add_argument("out")
    ap.add_argument("--cases-dir", type=Path, required=True)
    ap.add_argument("--models", type=Path, required=True)
    return ap


def probe_arguments(argv: list[str]) -> tuple[list[str], list[int], Path, Path, Path]:
    """``(cases, seeds, out, models, work)`` from a post-hoc probe's command line
    ``<case,case,...> <seed,seed,...> OUT MODELS [WORK]`` (``WORK`` defaults to ``/work/bench_work``)."""
    work = Path(argv[5]) if len(argv) > 5 else Path("/work/bench_work")
    return argv[1].split(","), [int(s) for s in argv[2].split(",")], Path(argv[3]), Path(argv[4]), work


def read_truth(case_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(Path(case_dir) / "truth.csv.gz", index_col=0)
    df.index = df.index.astype(str)
    return df.astype(str)


class H5adWriter:
    """Write an ``.h5ad`` whose sparse matrices arrive in row chunks (never held whole).

    ``X`` and any ``layers`` are CSR matrices appended chunk by chunk; ``obs`` is
    written at the end (it is small next to the matrices).
    """

    def __init__(self, path: Path, var: pd.DataFrame, layers: tuple[str, ...] = ()) -> None:
        from anndata.io import write_elem

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = h5py.File(self.path, "w")
        self.f.attrs["encoding-type"] = "anndata"
        self.f.attrs["encoding-version"] = "0.1.0"
        self.n_vars = var.shape[0]
        write_elem(self.f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "uns"):
            write_elem(self.f, key, {})
        write_elem(self.f, "layers", {})
        self.groups = {"X": self._csr_group("X")}
        for name in layers:
            self.groups[name] = self._csr_group(f"layers/{name}")
        self.n_obs = 0
        self.obs_parts: list[pd.DataFrame] = []

    def _csr_group(self, key: str) -> h5py.Group:
        g = self.f.create_group(key)
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        g.create_dataset("indptr", data=np.zeros(1, dtype=np.int64), maxshape=(None,), chunks=(1 << 16,))
        return g

    @staticmethod
    def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
        n = ds.shape[0]
        ds.resize((n + len(values),))
        ds[n:] = values

    def add(self, obs: pd.DataFrame, matrices: dict[str, sp.csr_matrix]) -> None:
        """Append a chunk of cells: ``obs`` rows and one CSR matrix per group (``"X"`` and layers)."""
        if set(matrices) != set(self.groups):
            raise ValueError(f"chunk has matrices {sorted(matrices)}, writer expects {sorted(self.groups)}")
        for name, m in matrices.items():
            m = sp.csr_matrix(m)
            m.sort_indices()
            g = self.groups[name]
            offset = g["indptr"][-1]
            self._append(g["data"], m.data.astype(np.float32))
            self._append(g["indices"], m.indices.astype(np.int32))
            self._append(g["indptr"], (m.indptr[1:] + offset).astype(np.int64))
        self.obs_parts.append(obs)
        self.n_obs += obs.shape[0]

    def close(self, obsm: dict[str, np.ndarray] | None = None) -> None:
        from anndata.io import write_elem

        for g in self.groups.values():
            g.attrs["shape"] = np.array([self.n_obs, self.n_vars], dtype=np.int64)
        obs = pd.concat(self.obs_parts) if self.obs_parts else pd.DataFrame()
        write_elem(self.f, "obs", obs)
        if obsm:
            del self.f["obsm"]
            write_elem(self.f, "obsm", obsm)
        self.f.close()


# --------------------------------------------------------------------------- predictions
def write_predictions(path: Path, obs_names, levels: list[str], pred: dict[str, np.ndarray], conf: dict[str, np.ndarray],
                      raw: dict[str, np.ndarray] | None = None, novelty: dict[str, np.ndarray] | None = None,
                      neighbourhood: dict[str, np.ndarray] | None = None) -> None:
    """Write the cells × (``pred_<level>``, ``conf_<level>``) table every method produces.

    ``raw`` (atlasmtl only): the network's own top label per level, written as
    ``pred_<level>_raw`` so that calibration is judged against the call the
    confidence belongs to (the final label may come from the KNN vote or be Unknown).
    ``novelty`` (atlasmtl only): its novelty score per level (``novelty_<level>``), which
    ``atlasmtl.evaluate`` ranks for the novel-type AUROC instead of 1 − confidence;
    ``neighbourhood`` (atlasmtl only): its neighbourhood novelty (``neighbourhood_novelty_<level>``, the
    evaluation's ``auroc_neighbourhood``).
    """
    cols: dict[str, Any] = {}
    for lv in levels:
        cols[f"pred_{lv}"] = np.asarray(pred[lv]).astype(str)
        cols[f"conf_{lv}"] = np.asarray(conf[lv], dtype=np.float64)
        if raw is not None:
            cols[f"pred_{lv}_raw"] = np.asarray(raw[lv]).astype(str)
        if novelty is not None and lv in novelty:
            cols[f"novelty_{lv}"] = np.asarray(novelty[lv], dtype=np.float64)
        if neighbourhood is not None and lv in neighbourhood:
            cols[f"neighbourhood_novelty_{lv}"] = np.asarray(neighbourhood[lv], dtype=np.float64)
    df = pd.DataFrame(cols, index=pd.Index(np.asarray(obs_names).astype(str), name="cell"))
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, compression="gzip")


def read_predictions(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, index_col=0, keep_default_na=False)
    df.index = df.index.astype(str)
    for c in df.columns:
        if c.startswith("pred_"):
            df[c] = df[c].astype(str)
    return df


def derive_parent(levels: list[str], hierarchy: dict[str, dict[str, str]], classes: list[str], probs: np.ndarray):
    """Labels and confidences of every level from the finest level's class probabilities.

    For peers that model only the finest level (scANVI): a parent's probability
    is the sum of its children's, following the reference's own hierarchy.
    """
    fine = levels[-1]
    pred = {fine: np.asarray(classes)[probs.argmax(axis=1)]}
    conf = {fine: probs.max(axis=1)}
    child_probs, child_names = probs, list(classes)
    for j in range(len(levels) - 1, 0, -1):
        child, parent = levels[j], levels[j - 1]
        mapping = hierarchy[child]
        parents = sorted(set(mapping[c] for c in child_names))
        p = np.zeros((probs.shape[0], len(parents)))
        for k, c in enumerate(child_names):
            p[:, parents.index(mapping[c])] += child_probs[:, k]
        pred[parent], conf[parent] = np.asarray(parents)[p.argmax(axis=1)], p.max(axis=1)
        child_probs, child_names = p, parents
    return pred, conf


def reference_hierarchy(obs: pd.DataFrame, levels: list[str]) -> dict[str, dict[str, str]] | None:
    """child → parent per level when every child label has exactly one parent in ``obs``; else None."""
    out = {}
    for j in range(1, len(levels)):
        pairs = obs[[levels[j], levels[j - 1]]].astype(str).drop_duplicates()
        if not pairs[levels[j]].is_unique:
            return None
        out[levels[j]] = dict(zip(pairs[levels[j]], pairs[levels[j - 1]]))
    return out


# --------------------------------------------------------------------------- measurement
def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB): ``VmHWM`` of ``/proc/self/status``.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: on Linux it keeps the high-water
    mark of the process image replaced by ``exec``, i.e. the RSS of the (large)
    parent at fork time, so every subprocess of a big parent would report at least
    the parent's size. ``VmHWM`` belongs to the fresh address space made by ``exec``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def children_peak_rss_mb() -> float:
    """Largest peak RSS among this process's finished child processes (e.g. joblib workers), MB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


class Timer:
    """``with Timer() as t: ...``; ``t.seconds`` afterwards."""

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)
