"""atlasmtl: multi-level single-cell reference mapping.

Two calls::

    model = atlasmtl.build_model(adata_ref, label_columns=["anno_lv1", "anno_lv2"])
    result = atlasmtl.predict(model, adata_query)

The modules follow the pipeline, and imports only point down it (see
``documents/design/architecture.md``): :mod:`~atlasmtl.inputs` (matrices) →
:mod:`~atlasmtl.genes` (gene alignment and the input transform) →
:mod:`~atlasmtl.network` → :mod:`~atlasmtl.training` / :mod:`~atlasmtl.prediction`
→ :mod:`~atlasmtl.gating` and :mod:`~atlasmtl.knn` → :mod:`~atlasmtl.calls` /
:mod:`~atlasmtl.result` (writeback) → :mod:`~atlasmtl.report`;
:mod:`~atlasmtl.metrics` (:func:`evaluate`) and :mod:`~atlasmtl.pl` (plots) read results.
"""

from typing import TYPE_CHECKING

from . import exceptions
from ._version import __version__
from .exceptions import AtlasMTLError

# The public API is imported on first use (PEP 562), so that ``import atlasmtl`` and the
# command line's --help / --version do not pay for PyTorch, anndata and scanpy up front.
_LAZY = {
    "build_model": ("training", "build_model"),
    "predict": ("prediction", "predict"),
    "TrainedModel": ("model", "TrainedModel"),
    "PredictionResult": ("result", "PredictionResult"),
    "evaluate": ("metrics", "evaluate"),
    "evaluation_table": ("metrics", "evaluation_table"),
    "metrics": ("metrics", None),
    "pl": ("pl", None),
    "report": ("report", None),
    "datasets": ("datasets", None),
    "distributed": ("distributed", None),
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import datasets, distributed, metrics, pl, report
    from .metrics import evaluate, evaluation_table
    from .model import TrainedModel
    from .prediction import predict
    from .result import PredictionResult
    from .training import build_model


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'atlasmtl' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "__version__",
    "AtlasMTLError",
    "PredictionResult",
    "TrainedModel",
    "build_model",
    "datasets",
    "distributed",
    "evaluate",
    "evaluation_table",
    "exceptions",
    "metrics",
    "pl",
    "predict",
    "report",
]
