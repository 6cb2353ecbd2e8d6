"""nncurv: the curvature of neural networks in PyTorch."""

from nncurv.operators import CallableOperator, LinearOperator, MatrixOperator

__version__ = "0.1.0"

__all__ = ["CallableOperator", "LinearOperator", "MatrixOperator", "__version__"]
