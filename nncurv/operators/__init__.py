"""Curvature operators: Hessian, GGN/Fisher and explicit matrices behind one protocol."""

from nncurv.operators._parameter import ParameterOperator
from nncurv.operators.base import CallableOperator, LinearOperator, MatrixOperator
from nncurv.operators.ggn import GGNOperator, ggn
from nncurv.operators.hessian import HessianOperator, hessian

__all__ = [
    "CallableOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "ParameterOperator",
    "ggn",
    "hessian",
]
