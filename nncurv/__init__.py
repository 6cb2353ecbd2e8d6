"""nncurv: the curvature of neural networks in PyTorch.

Layers: the functional view (:class:`CurvatureProblem`), operators (:class:`HessianOperator`,
:class:`GGNOperator`, ...), algorithms on operators (:mod:`nncurv.linalg`), and consumers (the
Lightning callback in :mod:`nncurv.callbacks`, landscape analysis, examples).
"""

from nncurv.batches import BatchFormat, DictBatch
from nncurv.operators import (
    CallableOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    ParameterOperator,
    ggn,
    hessian,
)
from nncurv.problem import Batch, CurvatureProblem

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BatchFormat",
    "CallableOperator",
    "CurvatureProblem",
    "DictBatch",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "ParameterOperator",
    "__version__",
    "ggn",
    "hessian",
]
