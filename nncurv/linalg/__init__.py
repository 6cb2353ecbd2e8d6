"""Algorithms on operators: eigenvalues, trace, diagonal and spectral density."""

from nncurv.linalg._checks import NonFiniteError, check_symmetric
from nncurv.linalg._results import DiagonalResult, EigenResult, TraceResult
from nncurv.linalg.density import SpectralDensity, plot_spectral_density, spectral_density
from nncurv.linalg.diagonal import diagonal, exact_diagonal, hutchinson_diagonal, xdiag
from nncurv.linalg.eigen import eigenvalues
from nncurv.linalg.ggn_diagonal import ggn_diagonal
from nncurv.linalg.trace import (
    deflated_hutchinson_trace,
    exact_trace,
    hutchinson_trace,
    hutchpp_trace,
    trace,
    xtrace,
)

__all__ = [
    "DiagonalResult",
    "EigenResult",
    "NonFiniteError",
    "SpectralDensity",
    "TraceResult",
    "check_symmetric",
    "diagonal",
    "eigenvalues",
    "exact_diagonal",
    "deflated_hutchinson_trace",
    "exact_trace",
    "ggn_diagonal",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "plot_spectral_density",
    "spectral_density",
    "trace",
    "xdiag",
    "xtrace",
]
