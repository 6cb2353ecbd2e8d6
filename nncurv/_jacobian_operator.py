r"""A batch of Jacobians known through products: the operator every norm estimator consumes.

:class:`PerSampleJacobian` holds :math:`J_b \in \mathbb{R}^{m \times n}` for samples
:math:`b = 1, \dots, B` and offers :math:`J_b V_b` (``matmat``) and :math:`J_b^\top U_b`
(``rmatmat``) for all samples at once. Three implementations: explicit matrices (tests and
references), ``torch.func`` transforms of a per-sample function under :func:`torch.vmap`, and
plain autograd on the whole batch.

Private module: built by :func:`nncurv._jacobian_core.per_sample_jacobian`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

__all__ = ["JacobianMode", "PerSampleJacobian", "DenseBatchedJacobian"]

JacobianMode = Literal["auto", "rev", "fwd"]


class PerSampleJacobian:
    r"""A batch of Jacobians :math:`J_b \in \mathbb{R}^{m \times n}`, known through products.

    Vectors are flattened per sample: ``matmat(V)`` maps ``V`` of shape ``(B, n, k)`` to
    :math:`J_b V_b` of shape ``(B, m, k)``; ``rmatmat(U)`` maps ``(B, m, k)`` to
    :math:`J_b^\top U_b` of shape ``(B, n, k)``. :attr:`num_products` counts per-sample products
    (a column of a ``matmat`` is one product, for all samples at once).

    Attributes:
        batch: Number of samples ``B``.
        in_dim: ``n``, the flattened input size of one sample.
        out_dim: ``m``, the flattened output size of one sample.
        in_shape: Per-sample input shape.
        out_shape: Per-sample output shape.
        dtype: Floating dtype of the products.
        device: Device of the products.
    """

    def __init__(
        self,
        *,
        batch: int,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.batch = batch
        self.in_shape = in_shape
        self.out_shape = out_shape
        self.in_dim = int(torch.Size(in_shape).numel())
        self.out_dim = int(torch.Size(out_shape).numel())
        self.dtype = dtype
        self.device = device
        self.num_products = 0

    def matmat(self, V: Tensor) -> Tensor:
        """Return :math:`J_b V_b` for ``V`` of shape ``(B, n, k)``."""
        self.num_products += V.shape[-1]
        return self._matmat(V)

    def rmatmat(self, U: Tensor) -> Tensor:
        r"""Return :math:`J_b^\top U_b` for ``U`` of shape ``(B, m, k)``."""
        self.num_products += U.shape[-1]
        return self._rmatmat(U)

    def dense(self, mode: JacobianMode = "auto") -> Tensor:
        """Return the Jacobians as a ``(B, m, n)`` tensor."""
        eye = torch.eye(self.in_dim, dtype=self.dtype, device=self.device)
        return self.matmat(eye.expand(self.batch, -1, -1))

    def evaluate(self, Z: Tensor | None = None) -> Tensor:
        """Return the flattened outputs ``(B, m)`` at points ``Z`` (``(B, n)``; default: base)."""
        raise NotImplementedError

    def base_points(self) -> Tensor:
        """Return the flattened points ``(B, n)`` where the Jacobians are taken."""
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def _rmatmat(self, U: Tensor) -> Tensor:
        raise NotImplementedError


class DenseBatchedJacobian(PerSampleJacobian):
    """Explicit Jacobians ``(B, m, n)`` seen as a :class:`PerSampleJacobian` (tests, references).

    Example:
        >>> import torch
        >>> op = DenseBatchedJacobian(torch.eye(3).expand(2, 3, 3))
        >>> op.matmat(torch.ones(2, 3, 1)).shape, op.num_products
        (torch.Size([2, 3, 1]), 1)
    """

    def __init__(self, J: Tensor) -> None:
        if not isinstance(J, Tensor) or J.ndim != 3:
            raise ValueError(f"J must be a (B, m, n) tensor, got {getattr(J, 'shape', J)!r}")
        super().__init__(
            batch=J.shape[0],
            in_shape=(J.shape[2],),
            out_shape=(J.shape[1],),
            dtype=J.dtype,
            device=J.device,
        )
        self.J = J

    def _matmat(self, V: Tensor) -> Tensor:
        return self.J @ V

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self.J.transpose(1, 2) @ U

    def dense(self, mode: JacobianMode = "auto") -> Tensor:
        """Return the stored Jacobians."""
        self.num_products += min(self.in_dim, self.out_dim)
        return self.J


class _FunctionalJacobian(PerSampleJacobian):
    """Jacobians of a per-sample function ``fn(z_b, extras_b) -> y_b`` (flat in, flat out)."""

    def __init__(
        self,
        fn: Callable[..., Tensor],
        points: Tensor,
        extras: tuple[Tensor, ...],
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
    ) -> None:
        super().__init__(
            batch=points.shape[0],
            in_shape=in_shape,
            out_shape=out_shape,
            dtype=points.dtype,
            device=points.device,
        )
        self.fn = fn
        self.points = points  # (B, n)
        self.extras = extras

    def evaluate(self, Z: Tensor | None = None) -> Tensor:
        """Return the flattened outputs ``(B, m)`` at points ``Z`` (default: base points)."""
        return vmap(self.fn)(self.points if Z is None else Z, *self.extras)

    def base_points(self) -> Tensor:
        """Return the flattened points ``(B, n)``."""
        return self.points

    def _matmat(self, V: Tensor) -> Tensor:
        fn = self.fn

        def one(z: Tensor, Vb: Tensor, *ex: Tensor) -> Tensor:
            def col(v: Tensor) -> Tensor:
                return jvp(lambda z_: fn(z_, *ex), (z,), (v,))[1]

            return vmap(col, in_dims=1, out_dims=1)(Vb)

        return vmap(one)(self.points, V, *self.extras)

    def _rmatmat(self, U: Tensor) -> Tensor:
        fn = self.fn

        def one(z: Tensor, Ub: Tensor, *ex: Tensor) -> Tensor:
            pullback = vjp(lambda z_: fn(z_, *ex), z)[1]
            return vmap(lambda u: pullback(u)[0], in_dims=1, out_dims=1)(Ub)

        return vmap(one)(self.points, U, *self.extras)

    def dense(self, mode: JacobianMode = "auto") -> Tensor:
        if mode == "auto":
            mode = "fwd" if self.in_dim < self.out_dim else "rev"
        if mode not in ("rev", "fwd"):
            raise ValueError(f"mode must be 'auto', 'rev' or 'fwd', got {mode!r}")
        transform = jacfwd if mode == "fwd" else jacrev
        self.num_products += self.in_dim if mode == "fwd" else self.out_dim
        return vmap(transform(self.fn, argnums=0))(self.points, *self.extras)


class _BatchedAutogradJacobian(PerSampleJacobian):
    """Per-sample products through plain autograd on the whole batch (no ``vmap``).

    ``J_b^T u_b`` for all samples is one backward pass of ``sum_b u_b^T g(x_b)``, and ``J_b v_b``
    one forward-mode pass: exact as long as the model treats samples independently (true for
    every standard layer once BatchNorm is in eval mode), with far less overhead than ``vmap``.
    """

    def __init__(self, batched: Callable[[Tensor], Tensor], x: Tensor, keep_graph: bool) -> None:
        self.x = x if x.requires_grad else x.detach().requires_grad_(True)
        self.h = batched(self.x)
        if self.h.ndim < 1 or self.h.shape[0] != x.shape[0]:
            raise ValueError(
                f"the output has shape {tuple(self.h.shape)}; expected the batch dimension "
                f"{x.shape[0]} first"
            )
        super().__init__(
            batch=x.shape[0],
            in_shape=tuple(x.shape[1:]),
            out_shape=tuple(self.h.shape[1:]),
            dtype=x.dtype,
            device=x.device,
        )
        self.batched = batched
        self.keep_graph = keep_graph

    def evaluate(self, Z: Tensor | None = None) -> Tensor:
        """Return the flattened outputs ``(B, m)`` at points ``Z`` (default: base points)."""
        if Z is None:
            return self.h.reshape(self.batch, -1)
        return self.batched(Z.reshape(self.x.shape)).reshape(self.batch, -1)

    def base_points(self) -> Tensor:
        """Return the flattened points ``(B, n)``."""
        return self.x.reshape(self.batch, -1)

    def _rmatmat(self, U: Tensor) -> Tensor:
        k = U.shape[-1]
        cot = U.movedim(-1, 0).reshape(k, *self.h.shape).to(self.h.dtype)
        if k == 1:
            (g,) = torch.autograd.grad(
                self.h, self.x, cot[0], create_graph=self.keep_graph, retain_graph=True
            )
            return g.reshape(self.batch, -1, 1)
        (G,) = torch.autograd.grad(  # k backward passes vectorised with vmap
            self.h,
            self.x,
            cot,
            create_graph=self.keep_graph,
            retain_graph=True,
            is_grads_batched=True,
        )
        return G.reshape(k, self.batch, -1).movedim(0, -1)

    def _matmat(self, V: Tensor) -> Tensor:
        cols = []
        x = self.x if self.keep_graph else self.x.detach()
        for i in range(V.shape[-1]):
            with fwAD.dual_level():
                out = self.batched(fwAD.make_dual(x, V[..., i].reshape(x.shape).to(x.dtype)))
                tangent = fwAD.unpack_dual(out).tangent
            if tangent is None:  # the output does not depend on the input
                tangent = torch.zeros_like(out)
            cols.append(tangent.reshape(self.batch, -1))
        return torch.stack(cols, dim=-1)

    def dense(self, mode: JacobianMode = "auto") -> Tensor:
        if self.out_dim <= self.in_dim:
            eye = torch.eye(self.out_dim, dtype=self.dtype, device=self.device)
            return self.rmatmat(eye.expand(self.batch, -1, -1)).transpose(1, 2)
        return super().dense(mode)
