"""Model artifacts: crash-safe, checksummed saving and code-free, checked loading.

Files written by ``model.save("dir/foo.pth")`` (or ``model.save("dir")`` for an
existing folder, which writes ``dir/model.pth`` and its companions):

``foo.pth``
    Network weights (a ``state_dict`` with the model's identity; loaded with ``weights_only=True``).
``foo_metadata.pkl``
    Metadata and training configuration.
``foo_reference.pkl``
    KNN reference data: label codes per level, training flags and the
    neighbour index (only with ``reference_storage="external"``).
``foo_embedding.npy``
    The KNN reference embedding (cells × last hidden size, float16, rows in
    the index's list order; only with ``reference_storage="external"``). A
    plain ``.npy`` array, read with ``allow_pickle=False`` and memory-mapped, so
    a million-cell reference costs no heap memory on load.
``foo_manifest.json``
    Schema version, model id, atlasmtl version, creation time, and per file its
    role, relative name, size and SHA-256.

**Identity.** Every model has a ``model_id``; the manifest and every file carry
it together with the file's role (``weights``, ``metadata``, ``reference``), so
files of two models mixed in one folder, or a manifest entry that points at the
wrong file, are refused even when the checksums were recomputed. The embedding
(a bare array) is bound to its model through the reference file, which records
its SHA-256, dtype and shape.

**Data, not code.** The pickles hold only plain Python values (dict, list, str,
numbers, bytes); numpy arrays are stored as tagged ``(dtype, shape, bytes)``
records. They are read with an unpickler that refuses every global, so a file
cannot run code when loaded, and decoding refuses shared references and deep
nesting, so memory stays within the file's size (:func:`~atlasmtl.io.from_plain`).
The weights archive must hold uncompressed entries only (what ``torch.save``
writes), so it cannot expand either. Before use, the parts are checked against
the schema (:func:`check_parts`): required keys and types, genes and classes
against the architecture, reference labels in range, finite weights.

**Crash-safe overwrite.** The manifest is the commit point. New files are first
written under hidden staged names; the manifest is then replaced by one naming
the staged files; the final names are replaced (hard links of the staged files,
so the staged files stay intact); finally the manifest is replaced by one naming
the final files and the staged files are removed. A save killed at any moment
leaves one whole model (the old one or the new one) loadable; leftovers of a
killed save are removed by the next save to the same name. Each final name's old
file is kept (``.<name>.<token>.old``) until the second commit, so a save that
fails after the first (a companion file that cannot be replaced, a full disk)
puts the old files and the old manifest back: the old model, as it was.

**Neighbour index.** References above
:data:`~atlasmtl.knn.EXACT_SEARCH_MAX_CELLS` cells carry the lists of a
:class:`~atlasmtl.knn.ListIndex` (``reference["index"]``: centroids, list
offsets, probes), built at training, so prediction never builds an index. On
load the index is checked against the reference: offsets cover the cells in
order, centroids are finite and of the embedding's width, and no list mixes
labels or training and held-out cells.

Schema versions: 1 (atlasmtl 0.1.0: no model id, no roles) and 2 (identity;
float32 embedding inside the reference file, no index: models above the exact
search limit build it on first use) are still read; 3 adds the embedding file
and the index.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import io
import json
import os
import pickle
import re
import secrets
import uuid
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ._version import __version__
from .calls import check_writeback_names
from .exceptions import (
    ArtifactError,
    AtlasMTLError,
    ChecksumMismatchError,
    OutputError,
    ParameterError,
    SchemaVersionError,
    UnsafeArtifactError,
)
from .genes import INPUT_TRANSFORMS, NAMESPACES
from .network import MAX_ENSEMBLE_SIZE
from .io import atomic_write, check_input_file, file_mode, from_plain, output_error, prepare_output, to_plain

#: Version of the artifact layout; bump on incompatible changes.
SCHEMA_VERSION = 3
#: Schema versions this atlasmtl reads.
READABLE_SCHEMAS = (1, 2, 3)
#: Where the KNN reference is stored: its own file, or inside the metadata file.
REFERENCE_STORAGE = ("external", "full")
#: File roles, in the order they are written.
ROLES = ("weights", "metadata", "reference", "embedding")
#: dtypes a stored KNN embedding may have.
EMBEDDING_DTYPES = ("float16", "float32")
#: A manifest larger than this is not an atlasmtl manifest.
MAX_MANIFEST_BYTES = 1 << 20


class ModelParts(NamedTuple):
    """What a model file holds, as plain parts; :meth:`TrainedModel.load` builds the model from them."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    reference: dict[str, Any]


def new_model_id() -> str:
    """A fresh model identity (random UUID, hex)."""
    return uuid.uuid4().hex


# ---------------------------------------------------------------- plain-data decoding
class _NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that refuses every class/function reference (so nothing can be executed)."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeArtifactError(
            f"The model file references {module}.{name}; atlasmtl model files hold data only, so this "
            "file was not written by atlasmtl (or was tampered with) and is refused."
        )


def safe_loads(data: bytes, what: str) -> Any:
    """Unpickle plain data without globals, flat and bounded (see :func:`~atlasmtl.io.from_plain`)."""
    try:
        return from_plain(_NoGlobalsUnpickler(io.BytesIO(data)).load())
    except UnsafeArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{what} is truncated or corrupted ({type(exc).__name__}: {exc}); save the model again.") from exc


def _load_weights(data: bytes, name: str) -> Any:
    """``torch.load(weights_only=True)`` of an archive whose entries are stored uncompressed (no zip bomb)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            compressed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"{name} is not a PyTorch weights archive ({exc}); save the model again.") from exc
    if compressed:
        raise UnsafeArtifactError(
            f"{name} holds compressed entries ({compressed[:3]}), which torch.save never writes and which could "
            "expand without bound; refusing it."
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights only load failed" in str(exc).lower():  # PyTorch's refusal of a pickled global
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            raise UnsafeArtifactError(
                f"{name} holds Python objects, not only tensors"
                + (f" (it names {found.group(1)})" if found else "")
                + "; loading it could run code, so atlasmtl refuses it. Load models only from sources you trust, "
                "and save them with model.save()."
            ) from None
        raise ArtifactError(f"{name} could not be read as weights ({type(exc).__name__}); save the model again.") from exc


# ---------------------------------------------------------------- file names
def artifact_paths(path: str | os.PathLike) -> dict[str, Path]:
    """File names that go with a weights path: ``foo.pth`` → ``foo_metadata.pkl`` etc.

    An existing folder, or a path ending in ``/``, stands for ``<folder>/model.pth``; a name without a
    suffix for ``<name>.pth``. Another suffix is an :class:`~atlasmtl.exceptions.OutputError`: replacing it
    made ``"run_v1.2"`` write ``run_v1.pth``, over another model.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ParameterError(f"The model path must be a file or folder name, not {type(path).__name__}.")
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise OutputError("The model path is empty; give a file name such as 'model_dir/model.pth'.")
    p = Path(text)
    if p.is_dir() or text.endswith(("/", os.sep)):
        p = p / "model.pth"
    elif not p.suffix:
        p = p.with_name(p.name + ".pth")
    elif p.suffix != ".pth":
        raise OutputError(f"The model path {text!r} ends in {p.suffix!r}; give a folder (e.g. {text}/ or "
                          f"{str(p.with_suffix(''))}/) or a weights name ending in .pth "
                          f"(e.g. {str(p.with_suffix('.pth'))}), as the command line's --out.")
    stem = p.stem
    return {
        "weights": p,
        "metadata": p.with_name(f"{stem}_metadata.pkl"),
        "reference": p.with_name(f"{stem}_reference.pkl"),
        "embedding": p.with_name(f"{stem}_embedding.npy"),
        "manifest": p.with_name(f"{stem}_manifest.json"),
    }


# ---------------------------------------------------------------- save
def _write_new_file(path: Path, data: "bytes | _StreamedArray") -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync; mode from the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
    with os.fdopen(fd, "wb") as fh:
        if isinstance(data, bytes):
            fh.write(data)
        else:
            data.write_to(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _copy_new_file(source: Path, path: Path) -> None:
    """Create ``path`` (it must not exist) as a copy of ``source``, in chunks, and fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
    with os.fdopen(fd, "wb") as fh, open(source, "rb") as src:
        for chunk in iter(lambda: src.read(1 << 22), b""):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())


def _link_or_copy(source: Path, target: Path) -> None:
    """Create ``target`` (it must not exist) holding ``source``'s content: a hard link, or a copy where the file
    system has none (a partial copy, a full disk, is removed)."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EACCES):
            raise
        try:
            _copy_new_file(source, target)
        except BaseException:
            target.unlink(missing_ok=True)
            raise


def _install(staged: Path, final: Path, token: str) -> None:
    """Atomically make ``final`` hold the content of ``staged``, keeping ``staged`` intact."""
    tmp = final.with_name(f".{final.name}.{token}.tmp")
    _link_or_copy(staged, tmp)
    try:
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def refuse_foreign_files(paths: dict[str, Path]) -> None:
    """An :class:`OutputError` when a file the save would replace exists but is not part of an atlasmtl model
    (no atlasmtl manifest beside it): a user's own ``model.pth`` checkpoint is never overwritten."""
    existing = [p for role, p in paths.items() if role != "manifest" and p.is_file()]
    if not existing:
        return
    try:
        manifest = json.loads(paths["manifest"].read_bytes())
        ours = isinstance(manifest, dict) and manifest.get("format") == "atlasmtl-model"
    except (OSError, ValueError, RecursionError):
        ours = False
    if not ours:
        raise OutputError(
            f"Cannot write the model to {str(paths['weights'])!r}: {str(existing[0])!r} exists and is not part of an "
            f"atlasmtl model (there is no atlasmtl manifest {paths['manifest'].name} beside it). Choose another name, "
            "or move that file away first. Nothing was replaced."
        )


def _referenced(manifest_path: Path) -> set[str]:
    """File names the manifest on disk names (empty when there is none or it cannot be read)."""
    try:
        files = json.loads(manifest_path.read_text()).get("files", {})
        return {e["file"] for e in files.values() if isinstance(e, dict) and isinstance(e.get("file"), str)}
    except (OSError, ValueError, AttributeError, RecursionError):
        return set()


def _leftovers(paths: dict[str, Path]) -> list[Path]:
    """Staged, temporary and kept files of earlier saves to these names (``.<name>.<token>.staged|.tmp|.old``)."""
    folder = paths["weights"].parent
    prefixes = tuple(f".{p.name}." for p in paths.values())
    return [folder / n for n in os.listdir(folder)
            if n.startswith(prefixes) and n.endswith((".staged", ".tmp", ".old"))]


@contextlib.contextmanager
def _folder_lock(folder: Path, shared: bool = False):
    """Hold a lock on ``folder`` (POSIX ``flock``): exclusive for a save, so saves into one folder do
    not interleave, or ``shared`` for a load, so no save commits while a model's files are read.

    A killed process releases it; where locking is not available the call goes on unlocked (loads
    then rely on re-reading when the manifest changed under them).
    """
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def save_model(
    path: str | os.PathLike,
    parts: ModelParts,
    reference_storage: str | None = None,
) -> dict[str, str]:
    """Write weights, metadata, reference and manifest crash-safely; see the module docstring."""
    if reference_storage is not None and reference_storage not in REFERENCE_STORAGE:
        raise ParameterError(f"reference_storage={reference_storage!r} must be 'external', 'full' or None.")
    storage = reference_storage or parts.metadata["train_config"].get("reference_storage", "external")
    if storage not in REFERENCE_STORAGE:
        raise ParameterError(f"reference_storage={storage!r} must be 'external' or 'full'.")
    paths = artifact_paths(path)
    prepare_output(paths["weights"], "model")
    refuse_foreign_files(paths)
    model_id = parts.metadata.get("model_id") or new_model_id()

    def stamp(role: str) -> dict[str, str]:
        return {"model_id": model_id, "role": role}

    buf = io.BytesIO()
    torch.save({"atlasmtl_artifact": stamp("weights"), "state_dict": parts.state_dict}, buf)
    metadata = dict(parts.metadata, model_id=model_id, artifact=stamp("metadata"), reference_storage=storage)
    if storage == "full":
        metadata["reference"] = parts.reference
    payloads = {"weights": buf.getvalue(), "metadata": pickle.dumps(to_plain(metadata), protocol=4)}
    if storage == "external":
        embedding, record = _embedding_payload(parts.reference["embedding"])
        reference = {k: v for k, v in parts.reference.items() if k != "embedding"}
        payloads["reference"] = pickle.dumps(
            to_plain(dict(reference, embedding_file=record, artifact=stamp("reference"))), protocol=4)
        payloads["embedding"] = embedding

    def manifest(names: dict[str, str]) -> bytes:
        files = {role: {"role": role, "file": names[role],
                        "sha256": hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else data.sha256,
                        "bytes": len(data) if isinstance(data, bytes) else data.nbytes}
                 for role, data in payloads.items()}
        return json.dumps({
            "format": "atlasmtl-model",
            "schema_version": SCHEMA_VERSION,
            "model_id": model_id,
            "atlasmtl_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "reference_storage": storage,
            "files": files,
        }, indent=2).encode()

    folder, token = paths["weights"].parent, secrets.token_hex(6)
    staged = {role: paths[role].with_name(f".{paths[role].name}.{token}.staged") for role in payloads}
    with _folder_lock(folder):
        _commit(paths, payloads, staged, manifest, token)
        for p in _leftovers(paths):
            p.unlink(missing_ok=True)
        if storage == "full":  # a stale external reference must not linger beside a full save
            paths["reference"].unlink(missing_ok=True)
            paths["embedding"].unlink(missing_ok=True)
    return {role: str(paths[role]) for role in [*ROLES, "manifest"] if role in payloads or role == "manifest"}


#: Embedding rows written (and hashed) at a time when saving: ~8 MB at 128 float16 columns.
_SAVE_ROW_CHUNK = 32_768


class _StreamedArray:
    """An array's ``.npy`` file content, written and hashed in chunks of rows (never whole in memory).

    Saving a million-cell reference would otherwise hold its embedding twice more in memory (the
    ``.npy`` bytes and their copy). The content is exactly what ``np.save`` writes.
    """

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
        self.header = header.getvalue()
        digest = hashlib.sha256(self.header)
        for chunk in self._chunks():
            digest.update(chunk)
        self.sha256 = digest.hexdigest()
        self.nbytes = len(self.header) + int(arr.nbytes)

    def _chunks(self) -> Any:
        for start in range(0, self.arr.shape[0], _SAVE_ROW_CHUNK):
            yield np.ascontiguousarray(self.arr[start : start + _SAVE_ROW_CHUNK]).tobytes()

    def write_to(self, fh: Any) -> None:
        fh.write(self.header)
        for chunk in self._chunks():
            fh.write(chunk)


def _embedding_payload(embedding: Any) -> tuple[_StreamedArray, dict[str, Any]]:
    """The embedding's ``.npy`` content (float16 unless it is float32 already; streamed) and the record
    binding it to the model. A memory-mapped embedding is read in chunks of rows, not loaded."""
    arr = embedding if isinstance(embedding, np.ndarray) else np.asarray(embedding)
    if arr.dtype.name not in EMBEDDING_DTYPES:
        arr = arr.astype(np.float16)
    if not arr.flags.c_contiguous:  # the header must describe rows written in C order
        arr = np.ascontiguousarray(arr)
    data = _StreamedArray(arr)
    return data, {"sha256": data.sha256, "dtype": arr.dtype.name, "shape": list(arr.shape)}


def _commit(paths: dict[str, Path], payloads: dict[str, Any], staged: dict[str, Path], manifest: Any,
            token: str) -> None:
    """Stage, commit (manifest → staged files), install the final names, commit again (manifest → final names).

    Before a final name is replaced, the file it holds is kept under ``.<name>.<token>.old`` (a hard link, or a
    copy where the file system has none). If anything fails after the first commit, every replaced file gets its
    old content back and the old manifest is rewritten: a failed save leaves the old model as it was.
    """
    folder = paths["weights"].parent
    old_manifest = paths["manifest"].read_bytes() if paths["manifest"].exists() else None
    committed, installed, kept = False, [], {}
    try:
        for role, data in payloads.items():
            _write_new_file(staged[role], data)
        _fsync_folder(folder)
        # commit 1: the manifest names the staged files; until here the old model was untouched
        atomic_write(paths["manifest"], manifest({r: p.name for r, p in staged.items()}), "model manifest")
        committed = True
        for role in payloads:
            if paths[role].exists():
                kept[role] = paths[role].with_name(f".{paths[role].name}.{token}.old")
                _link_or_copy(paths[role], kept[role])
            installed.append(role)
            _install(staged[role], paths[role], token)
        # commit 2: the manifest names the final files
        atomic_write(paths["manifest"], manifest({r: paths[r].name for r in payloads}), "model manifest")
        committed = False
        _fsync_folder(folder)
    except BaseException as exc:
        restore_error = _roll_back(paths, old_manifest, installed, kept) if committed else None
        in_use = _referenced(paths["manifest"])
        for p in [*staged.values(), *kept.values()]:
            if p.name not in in_use and p.exists():
                p.unlink()
        if restore_error is not None:
            raise OutputError(
                f"Cannot write the model to {str(paths['weights'])!r}: {exc}; and the earlier model's files could not "
                f"be put back ({restore_error}). The manifest {paths['manifest'].name} names the new model's complete "
                "files (hidden names ending in .staged), so the new model loads; fix the cause and save again to give "
                "its files their final names."
            ) from exc
        if isinstance(exc, OSError) and not isinstance(exc, AtlasMTLError):
            raise output_error(exc, paths["weights"], "model") from exc
        raise
    for p in kept.values():
        p.unlink(missing_ok=True)


def _roll_back(paths: dict[str, Path], old_manifest: bytes | None, installed: list[str],
               kept: dict[str, Path]) -> str | None:
    """Undo a save that failed after its first commit: each final name it may have replaced gets its old file
    back (or is removed where there was none), then the old manifest (or none) is restored. Returns ``None``,
    or what went wrong while restoring."""
    try:
        for role in installed:
            if role in kept:
                os.replace(kept[role], paths[role])
            else:
                paths[role].unlink(missing_ok=True)
        if old_manifest is None:
            paths["manifest"].unlink(missing_ok=True)
        else:
            atomic_write(paths["manifest"], old_manifest, "model manifest")
        _fsync_folder(paths["weights"].parent)
    except (OSError, AtlasMTLError) as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- load
def _resolve_manifest(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ParameterError(f"The model path must be a file or folder name, not {type(path).__name__}.")
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise ArtifactError("The model path is empty; give a model manifest (*_manifest.json), weights (*.pth) "
                            "or the folder holding one model.")
    p = Path(text)
    if p.is_dir():
        manifests = sorted(p.glob("*_manifest.json"))
        if len(manifests) != 1:
            raise ArtifactError(
                f"{text!r} is a folder holding {len(manifests)} model manifests (*_manifest.json)"
                + ("; it holds no model." if not manifests else "; name the manifest file.")
            )
        p = manifests[0]
    elif not p.exists():
        if not p.suffix and not text.endswith(("/", os.sep)) and artifact_paths(p)["manifest"].exists():
            p = artifact_paths(p)["manifest"]  # the name save() was given: save("m") wrote m.pth, m_manifest.json
        else:
            raise ArtifactError(f"No such model file: {text!r}.")
    if p.suffix == ".pth":
        manifest = artifact_paths(p)["manifest"]
        if not manifest.exists():
            raise ArtifactError(
                f"{p.name} has no manifest beside it ({manifest.name}); the manifest carries the checksums "
                "atlasmtl needs to load a model safely. Save the model again with model.save()."
            )
        p = manifest
    elif p.suffix != ".json":
        raise ArtifactError(f"{text!r} is neither a model manifest (.json) nor weights (.pth).")
    return check_input_file(p, "model manifest", ArtifactError)


def _member_path(directory: Path, entry: Any, role: str) -> tuple[str, Path]:
    """The checked path of a manifest entry: a plain file in the model's folder, of the recorded size."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise UnsafeArtifactError(
            f"The manifest's {role} entry {name!r} is not a plain file name in the model's directory; refusing it."
        )
    target = (directory / name).resolve()
    if target.parent != directory.resolve():
        raise UnsafeArtifactError(f"The manifest's {role} file {name!r} points outside its directory; refusing it.")
    if not target.exists():
        raise ArtifactError(f"The model's {role} file {name!r} is missing from {str(directory)!r}.")
    check_input_file(target, f"model's {role} file", ArtifactError)
    size = entry.get("bytes")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise ArtifactError(f"The manifest records {size!r} as the size of {name}, which is not a number of bytes; "
                            "the manifest is damaged. Save the model again.")
    if isinstance(size, int) and target.stat().st_size != size:
        raise ChecksumMismatchError(
            f"{name} has {target.stat().st_size} bytes, not the {size} recorded in the manifest (file changed, "
            "truncated or replaced after saving). Restore the original files or save the model again."
        )
    return name, target


def _checksum_error(name: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"{name} does not match the checksum in the manifest (file changed, truncated or corrupted after "
        "saving). Restore the original files or save the model again."
    )


def _member(directory: Path, entry: Any, role: str) -> tuple[str, bytes]:
    name, target = _member_path(directory, entry, role)
    data = target.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise _checksum_error(name)
    return name, data


def _mapped_embedding(directory: Path, entry: Any, record: Any, ref_name: str) -> tuple[str, np.ndarray]:
    """The embedding file, checksummed (streamed), matched to the reference's record, and memory-mapped read-only."""
    name, target = _member_path(directory, entry, "embedding")
    digest = hashlib.sha256()
    with open(target, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != entry.get("sha256"):
        raise _checksum_error(name)
    if not isinstance(record, dict) or record.get("sha256") != entry.get("sha256"):
        raise ArtifactError(
            f"{name} (the embedding) belongs to another model: it is not the one {ref_name} (the reference) was saved "
            "with, so files of two models are mixed. Restore this model's own files or save it again."
        )
    try:
        arr = np.load(target, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise ArtifactError(f"{name} is not a readable .npy array ({exc}); save the model again.") from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.name not in EMBEDDING_DTYPES or arr.dtype.name != record.get("dtype") \
            or list(arr.shape) != record.get("shape"):
        raise ArtifactError(f"{name} holds a {getattr(arr, 'dtype', '?')} array of shape {getattr(arr, 'shape', '?')}, "
                            f"not the {record.get('dtype')} {record.get('shape')} the reference records; save the model again.")
    return name, arr


def _check_identity(stamp: Any, model_id: str, role: str, name: str) -> None:
    """A schema-2 file's ``{"model_id", "role"}`` must match the manifest's entry."""
    if not isinstance(stamp, dict):
        raise ArtifactError(
            f"The manifest's {role} entry names {name}, which carries no atlasmtl identity (not a {role} file "
            "of a schema-2 model). Restore the model's own files or save it again."
        )
    if stamp.get("role") != role:
        raise ArtifactError(
            f"The manifest's {role} entry names {name}, which holds the model's {stamp.get('role')!r} file, "
            f"not its {role}. Restore the manifest or save the model again."
        )
    if stamp.get("model_id") != model_id:
        raise ArtifactError(
            f"{name} (the {role}) belongs to another model (model id {stamp.get('model_id')!r}; the manifest is for "
            f"{model_id!r}): files of two models are mixed. Restore this model's own files or save it again."
        )


def _manifest_bytes(manifest_path: Path) -> bytes:
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{manifest_path.name} is larger than any atlasmtl manifest; refusing it.")
    return manifest_path.read_bytes()


def read_model(path: str | os.PathLike) -> ModelParts:
    """Read and check a model's files (manifest, weights path, or its folder); see :meth:`TrainedModel.load`.

    The files are read under a shared lock on their folder, so a save (which holds the
    exclusive lock) cannot commit half-way through. Where locking is not available, a
    save that commits while the files are being read changes the manifest; the read
    then starts again (up to three times) instead of failing.
    """
    manifest_path = _resolve_manifest(path)
    for attempt in range(3):
        with _folder_lock(manifest_path.parent, shared=True):
            raw = _manifest_bytes(manifest_path)
            try:
                return _read_parts(manifest_path, raw)
            except ArtifactError:
                if attempt == 2 or _manifest_bytes(manifest_path) == raw:
                    raise


def _read_parts(manifest_path: Path, raw: bytes) -> ModelParts:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path.name} is not a valid manifest ({exc}); save the model again.") from exc
    except RecursionError as exc:  # nesting no manifest has, deep enough to exhaust the parser's stack
        raise ArtifactError(f"{manifest_path.name} is not a valid manifest (nested too deeply to read); "
                            "save the model again.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "atlasmtl-model":
        raise ArtifactError(f"{manifest_path.name} is not an atlasmtl model manifest.")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{manifest_path.name}'s schema_version {version!r} is not a schema number; the manifest "
                            "is damaged. Save the model again.")
    if version not in READABLE_SCHEMAS:
        raise SchemaVersionError(
            f"{manifest_path.name} uses artifact schema {version!r} (written by atlasmtl "
            f"{manifest.get('atlasmtl_version')}); this atlasmtl {__version__} reads schemas {READABLE_SCHEMAS}. "
            "Upgrade atlasmtl (pip install -U atlasmtl) to load it."
        )
    files = manifest.get("files", {})
    if not isinstance(files, dict) or "weights" not in files or "metadata" not in files:
        raise ArtifactError(f"{manifest_path.name} does not list the weights and metadata files.")
    unknown_roles = set(files) - set(ROLES)
    if unknown_roles:
        raise ArtifactError(f"{manifest_path.name} lists files of unknown roles {sorted(unknown_roles)}.")
    model_id = manifest.get("model_id")
    if version >= 2:
        if not isinstance(model_id, str) or not model_id:
            raise ArtifactError(f"{manifest_path.name} has no model id; save the model again.")
        for role, entry in files.items():
            if not isinstance(entry, dict) or entry.get("role") != role:
                raise ArtifactError(f"{manifest_path.name}: the {role} entry does not declare the role {role!r}.")
    directory = manifest_path.parent
    emb_name = None
    weights_name, weights_bytes = _member(directory, files["weights"], "weights")
    meta_name, meta_bytes = _member(directory, files["metadata"], "metadata")
    state = _load_weights(weights_bytes, weights_name)
    metadata = safe_loads(meta_bytes, meta_name)
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{meta_name} (the metadata) does not hold a metadata record; save the model again.")
    if "reference" in files:
        ref_name, ref_bytes = _member(directory, files["reference"], "reference")
        reference = safe_loads(ref_bytes, ref_name)
        if "embedding" in files and isinstance(reference, dict):
            emb_name, reference["embedding"] = _mapped_embedding(directory, files["embedding"],
                                                                 reference.pop("embedding_file", None), ref_name)
        elif "embedding" in files:
            raise ArtifactError(f"{ref_name} (the reference) does not hold a reference record; save the model again.")
    elif "embedding" in files:
        raise ArtifactError(f"{manifest_path.name} lists an embedding file without a reference file.")
    elif "reference" in metadata:
        ref_name, reference = meta_name, metadata.pop("reference")
    else:
        raise ArtifactError(f"{manifest_path.name} lists no KNN reference and the metadata holds none.")
    if version >= 2:
        _check_identity(state.get("atlasmtl_artifact") if isinstance(state, dict) else None, model_id, "weights",
                        weights_name)
        _check_identity(metadata.pop("artifact", None), model_id, "metadata", meta_name)
        if "reference" in files:
            _check_identity(reference.pop("artifact", None) if isinstance(reference, dict) else None, model_id,
                            "reference", ref_name)
        state = state["state_dict"]
    metadata.pop("reference_storage", None)
    if version < 2 or not metadata.get("model_id"):
        metadata["model_id"] = new_model_id()  # schema 1 had no identity: the loaded model gets one
    names = {"weights": weights_name, "metadata": meta_name, "reference": ref_name, "embedding": emb_name or ref_name}
    check_parts(state, metadata, reference, names)
    return ModelParts(state, metadata, reference)


# ---------------------------------------------------------------- schema check
class _Damaged(Exception):
    """A schema violation in one file (caught and turned into an :class:`ArtifactError` naming it)."""


def _need(record: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in record:
        raise _Damaged(f"{what} lacks the key {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _Damaged(f"{what}[{key!r}] is a {type(value).__name__}, not {getattr(kind, '__name__', kind)}")
    return value


def _str_list(value: Any, what: str, non_empty: bool = True) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (non_empty and not value):
        raise _Damaged(f"{what} is not a{' non-empty' if non_empty else ''} list of strings")
    return value


def _check_index(reference: dict, levels: list[str]) -> None:
    """The neighbour index (:func:`~atlasmtl.knn.index_reference`) fits the reference it indexes."""
    index, embedding = reference["index"], reference["embedding"]
    n, width = embedding.shape
    if not isinstance(index, dict) or index.get("kind") != "lists":
        raise _Damaged("reference['index'] is not a list index")
    centroids, offsets = index.get("centroids"), index.get("offsets")
    for key in ("n_probe", "n_probe_class"):
        probes = index.get(key, 1)
        if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
            raise _Damaged(f"reference['index'][{key!r}] is not a positive integer")
    if not isinstance(offsets, np.ndarray) or offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 2 \
            or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        raise _Damaged(f"reference['index']['offsets'] do not cut the {n} reference cells into lists in order")
    if not isinstance(centroids, np.ndarray) or centroids.shape != (len(offsets) - 1, width) \
            or not np.issubdtype(centroids.dtype, np.floating) or not np.isfinite(centroids).all():
        raise _Damaged(f"reference['index']['centroids'] are not {len(offsets) - 1} finite points of width {width}")
    starts = np.repeat(offsets[:-1], np.diff(offsets))  # each row's list start
    keys = [reference["labels"][lv] for lv in levels]
    if reference.get("training_cell") is not None:
        keys.append(reference["training_cell"])
    for key in keys:
        if (key != key[starts]).any():
            raise _Damaged("a list of reference['index'] mixes labels or training and held-out cells")


def _check_input_view(view: Any, levels: list[str], n_genes: int, n_classes: list[int]) -> None:
    """The novelty score's input view (:class:`~atlasmtl.novelty.InputView`) fits the model."""
    what = "metadata['novelty']['input_view']"
    if not isinstance(view, dict):
        raise _Damaged(f"{what} is not a record")
    components, mean, points = (_need(view, key, np.ndarray, what) for key in ("components", "mean", "points"))
    k = view.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise _Damaged(f"{what}['k'] is not a positive integer")
    residual, class_scale = view.get("residual", False), view.get("class_scale", False)
    if not isinstance(residual, bool) or not isinstance(class_scale, bool):
        raise _Damaged(f"{what}['residual'] or ['class_scale'] is not true or false")
    if components.ndim != 2 or components.shape[1] != n_genes or mean.shape != (n_genes,) \
            or points.ndim != 2 or points.shape[1] != components.shape[0] + int(residual):
        raise _Damaged(f"{what} holds a PCA that does not fit the model's {n_genes} genes")
    if not all(np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() for a in (components, mean, points)):
        raise _Damaged(f"{what} holds non-numeric, NaN or infinite coordinates")
    held = view.get("held")
    if held is not None:
        held_points, held_calls = (_need(held, key, np.ndarray, f"{what}['held']") if isinstance(held, dict) else None
                                   for key in ("points", "calls"))
        if held_points is None or held_points.ndim != 2 or held_points.shape[1] != components.shape[0] \
                or not np.issubdtype(held_points.dtype, np.floating) or not np.isfinite(held_points).all() \
                or held_calls.shape != (len(held_points),) or held_calls.dtype.kind not in "iu" \
                or (held_calls.size and (held_calls.min() < -1 or held_calls.max() >= n_classes[-1])):
            raise _Damaged(f"{what}['held'] is not the held-out cells' finite PCA coordinates and a finest class "
                           f"code in [-1, {n_classes[-1]}) per cell")
    members, stats = _need(view, "members", dict, what), _need(view, "levels", dict, what)
    if not set(members) <= set(levels) or set(stats) != set(members):
        raise _Damaged(f"{what} names levels other than the model's {levels}")
    for level, n in zip(levels, n_classes):
        if level not in members:
            continue
        codes = members[level]
        if not isinstance(codes, np.ndarray) or codes.shape != (len(points),) or codes.dtype.kind not in "iu" \
                or (codes.size and (codes.min() < -1 or codes.max() >= n)):
            raise _Damaged(f"{what}['members'][{level!r}] is not a class code in [-1, {n}) per kept cell")
        level_stats = stats[level]
        if level_stats is None:
            continue
        _check_view_scores(level_stats, n, f"{what}['levels'][{level!r}]", class_scale)
        residual_stats = level_stats.get("residual")
        if residual_stats is not None or (residual and "residual" not in level_stats):
            if not residual:
                raise _Damaged(f"{what}['levels'][{level!r}] holds a residual score the view does not compute")
            _check_view_scores(residual_stats, n, f"{what}['levels'][{level!r}]['residual']", class_scale)


def _check_view_scores(stats: Any, n: int, what: str, class_scale: bool) -> None:
    """One input-view score of a level: a location (and with ``class_scale`` a positive spread) per class,
    a finite offset and a positive scale."""

    def per_class(key: str) -> bool:
        values = stats.get(key) if isinstance(stats, dict) else None
        return isinstance(values, np.ndarray) and values.shape == (n,) and np.issubdtype(values.dtype, np.floating) \
            and not np.isinf(values).any() and (key == "location" or not (values <= 0).any())

    if not per_class("location") or (class_scale and not per_class("spread")) \
            or not all(isinstance(stats.get(key), (int, float)) for key in ("offset", "scale")) \
            or not np.isfinite(stats["offset"]) or not stats["scale"] > 0:
        raise _Damaged(f"{what} is not a location{' and spread' if class_scale else ''} per class with a finite offset "
                       "and scale")


def _check_gene_detection(profile: Any, n_genes: int) -> None:
    """``metadata["gene_detection"]`` (:func:`~atlasmtl.genes.detection_profile`): shares in [0, 1] per model
    gene and a positive median depth; models saved before it have none."""
    what = "metadata['gene_detection']"
    if not isinstance(profile, dict):
        raise _Damaged(f"{what} is not a dict")
    for key in ("detected", "count_share"):
        try:
            values = np.asarray(profile.get(key), dtype=np.float64)
        except (TypeError, ValueError):
            raise _Damaged(f"{what}[{key!r}] is not numbers") from None
        if values.shape != (n_genes,) or not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
            raise _Damaged(f"{what}[{key!r}] is not {n_genes} shares between 0 and 1")
    depth = profile.get("median_depth")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not np.isfinite(depth) or not depth > 0:
        raise _Damaged(f"{what}['median_depth'] is not a positive number")


def check_parts(state: Any, metadata: dict, reference: Any, names: dict[str, str]) -> None:
    """Check the loaded parts against the schema before anything uses them.

    Raises :class:`~atlasmtl.exceptions.ArtifactError` naming the file (by role)
    and the problem: a missing key, a wrong type, genes or classes that do not
    match the architecture, reference labels out of range, non-finite weights.
    """
    role = "metadata"
    try:
        arch = _need(metadata, "architecture", dict, "metadata")
        genes = _str_list(_need(metadata, "genes", list, "metadata"), "metadata['genes']")
        levels = _str_list(_need(metadata, "label_columns", list, "metadata"), "metadata['label_columns']")
        classes = _need(metadata, "classes", dict, "metadata")
        if _need(metadata, "input_transform", str, "metadata") not in INPUT_TRANSFORMS:
            raise _Damaged(f"metadata['input_transform'] = {metadata['input_transform']!r} is not one of {INPUT_TRANSFORMS}")
        if _need(metadata, "gene_namespace", str, "metadata") not in NAMESPACES:
            raise _Damaged(f"metadata['gene_namespace'] = {metadata['gene_namespace']!r} is not one of {NAMESPACES}")
        coord_targets = _need(metadata, "coord_targets", dict, "metadata")
        coord_stats = _need(metadata, "coord_stats", dict, "metadata")
        _need(metadata, "train_config", dict, "metadata")
        for key in ("gene_alt_ids", "hierarchy", "train_semantics"):
            if key in metadata and not isinstance(metadata[key], dict):
                raise _Damaged(f"metadata[{key!r}] is not a dict")
        n_genes = _need(arch, "n_genes", int, "metadata['architecture']")
        n_classes = _need(arch, "n_classes", list, "metadata['architecture']")
        coord_dims = _need(arch, "coord_dims", dict, "metadata['architecture']")
        hidden = _need(arch, "hidden_sizes", list, "metadata['architecture']")
        _need(arch, "dropout_rate", (int, float), "metadata['architecture']")
        if not hidden or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise _Damaged("metadata['architecture']['hidden_sizes'] is not a list of positive integers")
        members = arch.get("ensemble_size", 1)
        if not isinstance(members, int) or isinstance(members, bool) or not 1 <= members <= MAX_ENSEMBLE_SIZE:
            raise _Damaged(f"metadata['architecture']['ensemble_size'] is not a number of networks (1 to {MAX_ENSEMBLE_SIZE})")
        if len(genes) != n_genes:
            raise _Damaged(f"metadata['genes'] lists {len(genes)} genes but the network takes {n_genes}")
        if metadata.get("gene_detection") is not None:
            _check_gene_detection(metadata["gene_detection"], n_genes)
        if len(set(genes)) != len(genes):
            raise _Damaged("metadata['genes'] repeats gene names")
        if len(n_classes) != len(levels) or set(classes) != set(levels):
            raise _Damaged(f"metadata['classes'] and the architecture do not match the levels {levels}")
        for level, n in zip(levels, n_classes):
            names_ = _str_list(classes[level], f"metadata['classes'][{level!r}]")
            if len(names_) != n:
                raise _Damaged(f"metadata['classes'][{level!r}] has {len(names_)} classes but the network has {n}")
        if set(coord_dims) != set(coord_stats) or set(coord_dims) != set(coord_targets):
            raise _Damaged("metadata['coord_stats'], ['coord_targets'] and the architecture name different coordinate heads")
        for name, dims in coord_dims.items():
            stats = coord_stats[name]
            if not isinstance(dims, int) or dims < 1 or not isinstance(stats, dict):
                raise _Damaged(f"the coordinate head {name!r} is malformed")
            for key in ("mean", "std"):
                value = stats.get(key)
                if not isinstance(value, np.ndarray) or value.shape != (dims,) or not np.isfinite(value).all():
                    raise _Damaged(f"metadata['coord_stats'][{name!r}][{key!r}] is not {dims} finite numbers")
        try:
            check_writeback_names(levels, list(coord_dims))
        except AtlasMTLError as exc:
            raise _Damaged(str(exc)) from None

        role = "reference"
        if not isinstance(reference, dict):
            raise _Damaged("the reference is not a record")
        embedding = _need(reference, "embedding", np.ndarray, "reference")
        labels = _need(reference, "labels", dict, "reference")
        role = "embedding"
        width = hidden[-1] * members
        if embedding.ndim != 2 or embedding.shape[1] != width or not np.issubdtype(embedding.dtype, np.floating):
            raise _Damaged(f"reference['embedding'] has shape {embedding.shape}; expected cells × {width} floats")
        for start in range(0, embedding.shape[0], 1 << 18):  # in blocks: a memory-mapped embedding stays on disk
            if not np.isfinite(embedding[start : start + (1 << 18)]).all():
                raise _Damaged("reference['embedding'] holds NaN or infinite values")
        role = "reference"
        if set(labels) != set(levels):
            raise _Damaged(f"reference['labels'] has levels {sorted(labels)}, not {levels}")
        for level, n in zip(levels, n_classes):
            codes = labels[level]
            if not isinstance(codes, np.ndarray) or codes.shape != (embedding.shape[0],) or codes.dtype.kind not in "iu":
                raise _Damaged(f"reference['labels'][{level!r}] is not one integer code per reference cell "
                               f"({embedding.shape[0]})")
            if codes.size and (codes.min() < -1 or codes.max() >= n):
                raise _Damaged(f"reference['labels'][{level!r}] holds codes outside [-1, {n})")
        training = reference.get("training_cell")
        if training is not None and (not isinstance(training, np.ndarray) or training.dtype != bool
                                     or training.shape != (embedding.shape[0],)):
            raise _Damaged(f"reference['training_cell'] is not one flag per reference cell ({embedding.shape[0]})")
        coords = reference.get("coords")
        if coords is not None:
            if not isinstance(coords, dict) or set(coords) != set(coord_dims):
                raise _Damaged("reference['coords'] does not name the model's coordinate heads "
                               f"({sorted(coord_dims)})")
            for name, dims in coord_dims.items():
                values = coords[name]
                if (not isinstance(values, np.ndarray) or values.shape != (embedding.shape[0], dims)
                        or values.dtype != np.float32 or not np.isfinite(values).all()):
                    raise _Damaged(f"reference['coords'][{name!r}] is not {dims} finite float32 coordinates per "
                                   f"reference cell ({embedding.shape[0]})")
        if reference.get("index") is not None:
            _check_index(reference, levels)

        role = "metadata"
        temps = (metadata.get("calibration") or {}).get("temperatures") or {}
        if not isinstance(temps, dict) or any(lv not in levels or not isinstance(t, (int, float)) or not np.isfinite(t)
                                              or t <= 0 for lv, t in temps.items()):
            raise _Damaged("metadata['calibration']['temperatures'] is not one positive number per level")
        null = (metadata.get("novelty") or {}).get("null") or {}
        if not isinstance(null, dict) or any(lv not in levels or not isinstance(v, dict)
                                             or not all(isinstance(v.get(k), (int, float)) for k in ("median", "scale", "n"))
                                             or (v.get("n") and not (np.isfinite(v["median"]) and v["scale"] > 0))
                                             for lv, v in null.items()):
            raise _Damaged("metadata['novelty']['null'] is not a median, scale and count per level")
        view = (metadata.get("novelty") or {}).get("input_view")
        if view is not None:
            _check_input_view(view, levels, n_genes, n_classes)
        role = "reference"

        role = "weights"
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise _Damaged("the weights are not a state_dict of tensors")
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise _Damaged(f"the weights hold NaN or infinite values (in {bad[:3]})")
    except _Damaged as exc:
        raise ArtifactError(
            f"The model's {role} file ({names.get(role, role)}) is damaged: {exc}. Restore the model's original "
            "files or save it again."
        ) from None
