r"""The linear-operator protocol that every nncurv algorithm consumes.

An operator is anything with ``shape``, ``dtype``, ``device`` and a matrix-vector product.
Algorithms (eigensolvers, trace, diagonal and density estimators) take an operator and know
nothing of models, which is what lets each be tested against a matrix with a known answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["LinearOperator", "MatrixOperator", "CallableOperator"]


class LinearOperator:
    r"""A square linear map :math:`A: \mathbb{R}^n \to \mathbb{R}^n` known through its products.

    Subclasses implement :meth:`_matvec` and may override :meth:`_matmat` when a batched product
    is cheaper than repeated ones. The public :meth:`matvec` / :meth:`matmat` check their input
    (shape, dtype, device) before any work is done and count products in :attr:`num_matvecs`.

    Attributes:
        shape: ``(n, n)``.
        dtype: Floating dtype of vectors the operator accepts and returns.
        device: Device of vectors the operator accepts and returns.
        is_symmetric: Whether the operator is symmetric by construction (Hessians, GGNs).
        num_matvecs: Number of matrix-vector products computed so far (a column of ``matmat``
            counts as one).
    """

    is_symmetric: bool = True

    def __init__(self, n: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"operator dimension must be a positive integer, got {n!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"operator dtype must be floating point, got {dtype!r}")
        self.shape: tuple[int, int] = (n, n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0
        self.matmat_chunk_size: int | None = 16

    # ------------------------------------------------------------------ subclass hooks
    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    # ------------------------------------------------------------------ checks
    def _check_vector(self, v: Any, name: str, ndim: int) -> None:
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        n = self.shape[1]
        if v.ndim != ndim or v.shape[0] != n:
            want = f"({n},)" if ndim == 1 else f"({n}, k)"
            raise ValueError(f"{name} must have shape {want}, got {tuple(v.shape)}")
        if v.dtype != self.dtype:
            raise TypeError(f"{name} must have dtype {self.dtype}, got {v.dtype}")
        if v.device != self.device:
            raise ValueError(f"{name} must be on device {self.device}, got {v.device}")

    # ------------------------------------------------------------------ public API
    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A @ v`` for a vector ``v`` of shape ``(n,)``."""
        self._check_vector(v, "v", 1)
        out = self._matvec(v)
        self.num_matvecs += 1
        return out

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``A @ V`` for a matrix ``V`` of shape ``(n, k)``.

        Columns are processed in chunks of :attr:`matmat_chunk_size` (``None``: all at once) so
        that memory is bounded by the chunk, not by ``k``.
        """
        self._check_vector(V, "V", 2)
        k = V.shape[1]
        if k == 0:
            return V.clone()
        chunk = self.matmat_chunk_size or k
        parts = [self._matmat(V[:, i : i + chunk]) for i in range(0, k, chunk)]
        self.num_matvecs += k
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def __matmul__(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.ndim == 2:
            return self.matmat(x)
        return self.matvec(x)

    def to_dense(self) -> Tensor:
        """Return the operator as a dense ``(n, n)`` tensor (``matmat`` of the identity)."""
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def to_scipy(self) -> Any:
        """Return a ``scipy.sparse.linalg.LinearOperator`` wrapping this operator.

        Vectors cross from NumPy to the operator's device and dtype on every product; use it for
        interoperability, not speed.
        """
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def mv(x: Any) -> Any:
            t = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(t).detach().cpu().numpy()

        def mm(X: Any) -> Any:
            t = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.matmat(t).detach().cpu().numpy()

        # the transpose is known only for a symmetric operator; SciPy raises where it needs it
        rmv = mv if self.is_symmetric else None
        return ScipyLinearOperator(self.shape, matvec=mv, matmat=mm, rmatvec=rmv, dtype=np_dtype)

    def new_generator(self, seed: int = 0) -> torch.Generator:
        """Return a ``torch.Generator`` on the operator's device, seeded with ``seed``."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.shape[0]}, dtype={self.dtype}, device={self.device})"


def sym_tolerance(dtype: torch.dtype) -> float:
    """Relative asymmetry above which a matrix or a computed projection is non-symmetric."""
    eps = torch.finfo(dtype).eps
    return max(100.0 * eps**0.5, 1e-6)


class MatrixOperator(LinearOperator):
    r"""An explicit dense matrix seen as an operator (tests, small problems, known spectra).

    Args:
        A: A square 2-D floating tensor.
        symmetric: Whether ``A`` is symmetric. When ``True`` it is checked against
            ``A.T`` (relative tolerance ``max(100 sqrt(eps), 1e-6)``), and a ``ValueError``
            names the asymmetry: every algorithm that assumes symmetry trusts the flag.

    Example:
        >>> import torch
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0])))
        >>> op @ torch.tensor([1.0, 1.0])
        tensor([3., 1.])
    """

    def __init__(self, A: Tensor, *, symmetric: bool = True) -> None:
        if not isinstance(A, Tensor):
            raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}")
        super().__init__(A.shape[0], dtype=A.dtype, device=A.device)
        if symmetric and A.numel() and A.is_floating_point():
            scale = float(A.abs().max())
            asym = float((A - A.T).abs().max())
            tol = sym_tolerance(A.dtype)
            # (non-finite entries are left to the algorithms, which report them as such)
            if math.isfinite(scale) and asym > tol * scale:
                raise ValueError(
                    f"A is not symmetric: max |A - A^T| = {asym:.3e} relative to max |A| = "
                    f"{scale:.3e} (tolerance {tol:.1e}); pass symmetric=False for a general matrix"
                )
        self.A = A
        self.is_symmetric = symmetric
        self.matmat_chunk_size = None

    def _matvec(self, v: Tensor) -> Tensor:
        return self.A @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V


class CallableOperator(LinearOperator):
    """An operator defined by a matvec callable (and optionally a matmat callable).

    Args:
        matvec: Function mapping a ``(n,)`` tensor to a ``(n,)`` tensor.
        n: Dimension.
        dtype: Dtype of the vectors.
        device: Device of the vectors.
        matmat: Optional function mapping ``(n, k)`` to ``(n, k)``.
        symmetric: Whether the map is symmetric.

    Example:
        >>> import torch
        >>> op = CallableOperator(lambda v: 2 * v, 3, dtype=torch.float32, device="cpu")
        >>> op.to_dense().diagonal()
        tensor([2., 2., 2.])
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        n: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        matmat: Callable[[Tensor], Tensor] | None = None,
        symmetric: bool = True,
    ) -> None:
        super().__init__(n, dtype=dtype, device=device)
        self._fn = matvec
        self._mm = matmat
        self.is_symmetric = symmetric

    def _matvec(self, v: Tensor) -> Tensor:
        return self._fn(v)

    def _matmat(self, V: Tensor) -> Tensor:
        if self._mm is not None:
            return self._mm(V)
        return super()._matmat(V)
