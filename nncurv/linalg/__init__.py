"""Algorithms on operators: eigenvalues, trace, diagonal and spectral density."""

from nncurv.linalg._checks import NonFiniteError, check_symmetric
from nncurv.linalg._results import DiagonalResult, EigenResult, TraceResult
from nncurv.linalg.eigen import eigenvalues

__all__ = [
    "DiagonalResult",
    "EigenResult",
    "NonFiniteError",
    "TraceResult",
    "check_symmetric",
    "eigenvalues",
]
