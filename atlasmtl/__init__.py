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

from . import exceptions, metrics, pl
from ._version import __version__
from .exceptions import AtlasMTLError
from .metrics import evaluate, evaluation_table
from .model import TrainedModel
from .prediction import predict
from .result import PredictionResult
from .training import build_model

__all__ = [
    "__version__",
    "AtlasMTLError",
    "PredictionResult",
    "TrainedModel",
    "build_model",
    "evaluate",
    "evaluation_table",
    "exceptions",
    "metrics",
    "pl",
    "predict",
]
