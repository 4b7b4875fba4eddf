"""Model artifacts: atomic, checksummed saving and code-free loading.

Files written by ``model.save("dir/foo.pth")``:

``foo.pth``
    Network weights (a ``state_dict``; loaded with ``weights_only=True``).
``foo_metadata.pkl``
    Metadata and training configuration.
``foo_reference.pkl``
    KNN reference data (only with ``reference_storage="external"``).
``foo_manifest.json``
    Schema version, atlasmtl version, relative file names, SHA-256 per file, creation time.

The pickles hold only plain Python values (dict, list, str, numbers, bytes);
numpy arrays are stored as tagged ``(dtype, shape, bytes)`` records. They are
read with an unpickler that refuses every global, so a file cannot run code
when loaded, and a numpy upgrade cannot break loading.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ._version import __version__
from .exceptions import ArtifactError, ChecksumMismatchError, ParameterError, SchemaVersionError, UnsafeArtifactError
from .io import atomic_write, from_plain, to_plain

#: Version of the artifact layout; bump on incompatible changes.
SCHEMA_VERSION = 1
#: Where the KNN reference is stored: its own file, or inside the metadata file.
REFERENCE_STORAGE = ("external", "full")


class ModelParts(NamedTuple):
    """What a model file holds, as plain parts; :meth:`TrainedModel.load` builds the model from them."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    reference: dict[str, Any]


# ---------------------------------------------------------------- plain-data decoding
class _NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that refuses every class/function reference (so nothing can be executed)."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeArtifactError(
            f"The model file references {module}.{name}; atlasmtl model files hold data only, so this "
            "file was not written by atlasmtl (or was tampered with) and is refused."
        )


def safe_loads(data: bytes, what: str) -> Any:
    try:
        return from_plain(_NoGlobalsUnpickler(io.BytesIO(data)).load())
    except UnsafeArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{what} is truncated or corrupted ({type(exc).__name__}: {exc}); save the model again.") from exc


# ---------------------------------------------------------------- file names
def artifact_paths(path: str | os.PathLike) -> dict[str, Path]:
    """File names that go with a weights path: ``foo.pth`` → ``foo_metadata.pkl`` etc."""
    p = Path(path)
    if p.suffix != ".pth":
        p = p.with_suffix(".pth") if p.suffix else p.with_name(p.name + ".pth")
    stem = p.stem
    return {
        "weights": p,
        "metadata": p.with_name(f"{stem}_metadata.pkl"),
        "reference": p.with_name(f"{stem}_reference.pkl"),
        "manifest": p.with_name(f"{stem}_manifest.json"),
    }


# ---------------------------------------------------------------- save
def save_model(
    path: str | os.PathLike,
    parts: ModelParts,
    reference_storage: str | None = None,
) -> dict[str, str]:
    """Write weights, metadata, reference and manifest atomically; see module docstring."""
    storage = reference_storage or parts.metadata["train_config"].get("reference_storage", "external")
    if storage not in REFERENCE_STORAGE:
        raise ParameterError(f"reference_storage={storage!r} must be 'external' or 'full'.")
    paths = artifact_paths(path)
    buf = io.BytesIO()
    torch.save(parts.state_dict, buf)
    metadata = dict(parts.metadata)
    metadata["reference_storage"] = storage
    if storage == "full":
        metadata["reference"] = parts.reference
    payloads = {
        "weights": buf.getvalue(),
        "metadata": pickle.dumps(to_plain(metadata), protocol=4),
    }
    if storage == "external":
        payloads["reference"] = pickle.dumps(to_plain(parts.reference), protocol=4)
    files = {}
    for role, data in payloads.items():
        atomic_write(paths[role], data)
        files[role] = {"file": paths[role].name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {
        "format": "atlasmtl-model",
        "schema_version": SCHEMA_VERSION,
        "atlasmtl_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reference_storage": storage,
        "files": files,
    }
    # The manifest goes last: until it is replaced, an old manifest's checksums refuse the new files.
    atomic_write(paths["manifest"], json.dumps(manifest, indent=2).encode())
    if storage == "full" and paths["reference"].exists():
        paths["reference"].unlink()  # a stale external reference must not linger beside a full save
    return {role: str(paths[role]) for role in ["weights", "metadata", "reference", "manifest"] if role in files or role == "manifest"}


# ---------------------------------------------------------------- load
def _resolve_manifest(path: Path) -> Path:
    if not path.exists():
        raise ArtifactError(f"No such model file: {str(path)!r}.")
    if path.suffix == ".json":
        return path
    if path.suffix == ".pth":
        manifest = artifact_paths(path)["manifest"]
        if not manifest.exists():
            raise ArtifactError(
                f"{path.name} has no manifest beside it ({manifest.name}); the manifest carries the checksums "
                "atlasmtl needs to load a model safely. Save the model again with model.save()."
            )
        return manifest
    raise ArtifactError(f"{str(path)!r} is neither a model manifest (.json) nor weights (.pth).")


def _member(directory: Path, entry: dict, role: str) -> tuple[Path, bytes]:
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
    data = target.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        raise ChecksumMismatchError(
            f"{name} does not match the checksum in the manifest (file changed, truncated or corrupted after "
            "saving). Restore the original files or save the model again."
        )
    return target, data


def read_model(path: str | os.PathLike) -> ModelParts:
    """Read and check a model's files (manifest or weights path); see :meth:`TrainedModel.load`."""
    manifest_path = _resolve_manifest(Path(path))
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path.name} is not a valid manifest ({exc}); save the model again.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "atlasmtl-model":
        raise ArtifactError(f"{manifest_path.name} is not an atlasmtl model manifest.")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise SchemaVersionError(
            f"{manifest_path.name} uses artifact schema {version!r} (written by atlasmtl "
            f"{manifest.get('atlasmtl_version')}); this atlasmtl {__version__} reads schema ≤ {SCHEMA_VERSION}. "
            "Upgrade atlasmtl (pip install -U atlasmtl) to load it."
        )
    files = manifest.get("files", {})
    if not isinstance(files, dict) or "weights" not in files or "metadata" not in files:
        raise ArtifactError(f"{manifest_path.name} does not list the weights and metadata files.")
    directory = manifest_path.parent
    _, weights_bytes = _member(directory, files["weights"], "weights")
    _, meta_bytes = _member(directory, files["metadata"], "metadata")
    metadata = safe_loads(meta_bytes, files["metadata"]["file"])
    if "reference" in files:
        _, ref_bytes = _member(directory, files["reference"], "reference")
        reference = safe_loads(ref_bytes, files["reference"]["file"])
    elif "reference" in metadata:
        reference = metadata.pop("reference")
    else:
        raise ArtifactError(f"{manifest_path.name} lists no KNN reference and the metadata holds none.")
    try:
        state = torch.load(io.BytesIO(weights_bytes), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"{files['weights']['file']} could not be read as weights ({exc}).") from exc
    metadata.pop("reference_storage", None)
    return ModelParts(state, metadata, reference)
