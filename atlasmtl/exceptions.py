"""Exceptions raised by atlasmtl.

Every error atlasmtl raises on purpose derives from :class:`AtlasMTLError`, so a
pipeline can catch them all with one ``except`` clause. Each message names the
problem and the likely fix.
"""

from __future__ import annotations

__all__ = [
    "AtlasMTLError",
    "InputError",
    "EmptyDataError",
    "InvalidValuesError",
    "LabelError",
    "CoordinateError",
    "GeneAlignmentError",
    "MatrixSemanticsError",
    "ParameterError",
    "DeviceError",
    "TrainingError",
    "OutputError",
    "ArtifactError",
    "ChecksumMismatchError",
    "UnsafeArtifactError",
    "SchemaVersionError",
]


class AtlasMTLError(Exception):
    """Base class of every error atlasmtl raises on purpose."""


class InputError(AtlasMTLError, ValueError):
    """The AnnData (or file) given as reference or query cannot be used as is."""


class EmptyDataError(InputError):
    """The AnnData has no cells or no genes."""


class InvalidValuesError(InputError):
    """The expression matrix holds NaN, infinite or negative values where they are not allowed."""


class LabelError(InputError):
    """A label column is missing, empty or has a single class."""


class CoordinateError(InputError):
    """A coordinate target (``obsm`` key) is missing, misshapen or holds NaN."""


class GeneAlignmentError(InputError):
    """Too few of the model's genes can be found in the query."""


class MatrixSemanticsError(InputError):
    """The matrix holds values the model cannot use (e.g. scaled/centred data)."""


class ParameterError(AtlasMTLError, ValueError):
    """A parameter value is out of range or unknown."""


class DeviceError(AtlasMTLError, RuntimeError):
    """The requested compute device is not available."""


class TrainingError(AtlasMTLError, RuntimeError):
    """Training failed to produce a usable network (e.g. the loss became non-finite)."""


class OutputError(AtlasMTLError, OSError):
    """A result or model cannot be written where asked (empty path, not a folder, no permission, disk full)."""


class ArtifactError(AtlasMTLError, OSError):
    """A saved model cannot be read: missing, truncated or corrupted files."""


class ChecksumMismatchError(ArtifactError):
    """A model file's SHA-256 does not match the one recorded in the manifest."""


class UnsafeArtifactError(ArtifactError):
    """A model file tries to execute code or point outside its directory."""


class SchemaVersionError(ArtifactError):
    """A model was written with an artifact schema this atlasmtl cannot read."""


# ---------------------------------------------------------------- warnings
def user_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` that points at the first frame outside atlasmtl.

    A warning then names the user's line (their ``build_model(...)`` call), not atlasmtl's
    internals, however deep the call that raised it. As pandas' ``find_stack_level`` does.
    """
    import inspect
    import os

    package_dir = os.path.dirname(os.path.abspath(__file__))
    frame = inspect.currentframe()
    level = 0
    try:
        while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package_dir + os.sep):
            frame = frame.f_back
            level += 1
    finally:
        del frame
    return level
