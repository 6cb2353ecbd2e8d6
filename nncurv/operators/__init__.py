"""Curvature operators: Hessian, GGN/Fisher and explicit matrices behind one protocol."""

from nncurv.operators.base import CallableOperator, LinearOperator, MatrixOperator

__all__ = ["CallableOperator", "LinearOperator", "MatrixOperator"]
