"""Lightning callbacks of nncurv (``pip install nncurv[lightning]``).

:class:`CurvatureMonitor` logs curvature metrics to TensorBoard during training; the metric
classes are its building blocks and the base for custom metrics.
"""

from nncurv.callbacks._metrics import (
    CurvatureMetric,
    GradientCurvature,
    HessianDiagonal,
    HessianTrace,
    InformationMetric,
    JacobianNorm,
    LayerCurvature,
    MetricContext,
    MetricOutput,
    MinEigenvalue,
    SpectralDensityMetric,
    TopEigenvalues,
)
from nncurv.callbacks._schedule import OverheadBudget, StepSchedule
from nncurv.callbacks.curvature_monitor import CurvatureMonitor

__all__ = [
    "CurvatureMetric",
    "CurvatureMonitor",
    "GradientCurvature",
    "HessianDiagonal",
    "HessianTrace",
    "InformationMetric",
    "JacobianNorm",
    "LayerCurvature",
    "MetricContext",
    "MetricOutput",
    "MinEigenvalue",
    "OverheadBudget",
    "SpectralDensityMetric",
    "StepSchedule",
    "TopEigenvalues",
]
