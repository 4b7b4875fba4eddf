"""atlasmtl: multi-level single-cell reference mapping.

Two calls::

    model = atlasmtl.build_model(adata_ref, label_columns=["anno_lv1", "anno_lv2"])
    result = atlasmtl.predict(model, adata_query)

Pipeline stages, one module each: :mod:`~atlasmtl.inputs` (matrices) →
:mod:`~atlasmtl.genes` (gene alignment) → :mod:`~atlasmtl.network` →
:mod:`~atlasmtl.training` / :mod:`~atlasmtl.prediction` → :mod:`~atlasmtl.gating`
and :mod:`~atlasmtl.knn` → :mod:`~atlasmtl.result` (writeback);
:mod:`~atlasmtl.artifacts` saves and loads models, :mod:`~atlasmtl.runtime`
measures time and memory.
"""

__version__ = "0.1.0"

from . import exceptions  # noqa: E402
from .exceptions import AtlasMTLError  # noqa: E402
from .evaluate import evaluate, evaluation_table  # noqa: E402
from .model import TrainedModel  # noqa: E402
from .prediction import predict  # noqa: E402
from .result import PredictionResult  # noqa: E402
from .training import build_model  # noqa: E402
from . import pl  # noqa: E402  (plots: atlasmtl.pl.<plot>(result, ...))

__all__ = [
    "__version__",
    "AtlasMTLError",
    "PredictionResult",
    "TrainedModel",
    "build_model",
    "exceptions",
    "predict",
]
