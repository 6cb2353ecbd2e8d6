"""nncurv: the curvature of neural networks in PyTorch.

Layers: the functional view (:class:`CurvatureProblem`), operators (:class:`HessianOperator`,
:class:`GGNOperator`, ...), algorithms on operators (:mod:`nncurv.linalg`), and consumers (the
Lightning callback in :mod:`nncurv.callbacks`, landscape analysis, examples).
"""

from nncurv import linalg
from nncurv.batches import BatchFormat, DictBatch
from nncurv.contractive import (
    ContractiveLoss,
    contractive_penalty,
    higher_order_penalty,
    sigmoid_closed_form,
)
from nncurv.information import (
    InformationMetrics,
    InformationOperator,
    empirical_fisher,
    fisher_information,
    information_metrics,
    observed_information,
    standard_errors,
)
from nncurv.jacobians import (
    FrobeniusResult,
    LinearizationResult,
    SpectralNormResult,
    jacobian_frobenius_sq,
    layer_jacobian,
    layer_jvp,
    layer_vjp,
    linearization_error,
    singular_values,
    spectral_norm,
)
from nncurv.linalg import (
    DiagonalResult,
    EigenResult,
    NonFiniteError,
    SpectralDensity,
    TraceResult,
    diagonal,
    eigenvalues,
    ggn_diagonal,
    plot_spectral_density,
    spectral_density,
    trace,
)
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
    "ContractiveLoss",
    "DiagonalResult",
    "EigenResult",
    "NonFiniteError",
    "SpectralDensity",
    "TraceResult",
    "diagonal",
    "eigenvalues",
    "ggn_diagonal",
    "linalg",
    "plot_spectral_density",
    "spectral_density",
    "trace",
    "FrobeniusResult",
    "InformationMetrics",
    "InformationOperator",
    "empirical_fisher",
    "fisher_information",
    "information_metrics",
    "observed_information",
    "standard_errors",
    "LinearizationResult",
    "SpectralNormResult",
    "contractive_penalty",
    "higher_order_penalty",
    "jacobian_frobenius_sq",
    "layer_jacobian",
    "layer_jvp",
    "layer_vjp",
    "linearization_error",
    "sigmoid_closed_form",
    "singular_values",
    "spectral_norm",
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
