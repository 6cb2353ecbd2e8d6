r"""The Hessian of the data-set loss with respect to the selected parameters."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from nncurv.operators._parameter import (
    BatchProduct,
    ParameterOperator,
    Params,
    pullback_of,
)
from nncurv.problem import Batch, CurvatureProblem

__all__ = ["HessianOperator", "HessianMode"]

HessianMode = Literal["auto", "cached", "forward-over-reverse", "reverse-over-reverse"]


class _ForwardOverReverse(BatchProduct):
    """``jvp(grad(f))``: no graph kept between products; one forward+backward per product.

    Floating-point targets enter the ``jvp`` as primals with materialised zero tangents:
    captured as constants they get immutable ``ZeroTensor`` tangents, on which the forward-mode
    formula of ``mse_loss``'s backward fails ("ZeroTensors are immutable", pytorch#123996).
    """

    def __init__(self, problem: CurvatureProblem, batch: Batch) -> None:
        self.params = problem.params
        y = batch.targets
        self.targets: Tensor | None = None
        if isinstance(y, Tensor) and y.is_floating_point():
            self.targets = y

        def loss(p: Params, t: Tensor | None = None) -> Tensor:
            b = batch if t is None else dataclasses.replace(batch, targets=t)
            return problem.batch_loss(p, b)

        self.grad_fn = grad(loss)

    def mv(self, v: Params) -> Params:
        if self.targets is None:
            return jvp(self.grad_fn, (self.params,), (v,))[1]
        zero = torch.zeros_like(self.targets)
        return jvp(self.grad_fn, (self.params, self.targets), (v, zero))[1]

    def mm(self, V: Params) -> Params:
        return vmap(self.mv, randomness="same")(V)


class _ReverseOverReverse(BatchProduct):
    """``vjp(grad(f))``: the gradient graph is built once per prepare, then pulled back."""

    def __init__(self, problem: CurvatureProblem, batch: Batch) -> None:
        _, self.pullback = pullback_of(grad(lambda p: problem.batch_loss(p, batch)), problem.params)

    def mv(self, v: Params) -> Params:
        return self.pullback(v)

    def mm(self, V: Params) -> Params:
        return vmap(self.mv, randomness="same")(V)


class _Cached(BatchProduct):
    """Double backward over a retained first-order graph (PyHessian's recipe).

    The gradient graph is built once (``create_graph=True``); each product is one further
    backward pass through it. The parameters enter the graph as views of one flat leaf, so the
    gradient is one flat tensor and a product takes and returns flat vectors: the split of the
    tangent and the concatenation of the result run inside the autograd engine instead of as a
    dozen small Python-level operations per product (the same numbers, bit for bit).
    """

    flat = True

    def __init__(self, problem: CurvatureProblem, batch: Batch, leaf: Tensor) -> None:
        self.leaf = leaf  # (shared by the batches of an operator: one copy of the parameters)
        loss = problem.batch_loss(problem.unflatten(leaf), batch)
        (self.grad,) = torch.autograd.grad(
            loss, self.leaf, create_graph=True, allow_unused=True, materialize_grads=True
        )
        self.batched: bool | None = None  # matmat strategy, set by the operator

    def _pull(self, cotangent: Tensor, batched: bool) -> Tensor:
        if not self.grad.requires_grad:  # the gradient does not depend on anything
            return torch.zeros_like(cotangent)
        (out,) = torch.autograd.grad(
            self.grad,
            self.leaf,
            grad_outputs=cotangent,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        # None: the gradient depends on the inputs only (a loss linear in the parameters);
        # (materialize_grads would give the leaf's shape, without the batched dimension)
        return torch.zeros_like(cotangent) if out is None else out

    def mv_flat(self, v: Tensor) -> Tensor:
        return self._pull(v, batched=False)

    def mm_flat(self, V: Tensor) -> Tensor:
        batched = self.batched
        if batched is None:
            # unmeasured: on CPU one backward per column is the safer guess (1.6x faster than
            # the vmapped backward on a 21k-parameter CNN at batch 256), accelerators gain from
            # the batched one; HessianOperator measures both on its first wide matmat
            batched = self.leaf.device.type != "cpu"
        if batched:
            try:
                return self._pull(V.T, batched=True).T
            except RuntimeError:  # an op without a batching rule in its backward: loop instead
                pass
        return torch.stack([self._pull(V[:, j], batched=False) for j in range(V.shape[1])], 1)


_FUNCTIONAL_MODES: dict[str, Callable[[CurvatureProblem, Batch], BatchProduct]] = {
    "forward-over-reverse": _ForwardOverReverse,
    "reverse-over-reverse": _ReverseOverReverse,
}


class HessianOperator(ParameterOperator):
    r"""Hessian of the data-set loss with respect to the selected parameters.

    .. math::

        H = \nabla^2_\theta \mathcal{L}(\theta), \qquad
        \mathcal{L}(\theta) = \sum_b w_b\, \ell_b(\theta),

    with batch weights :math:`w_b = n_b/N` for mean-reduced losses and :math:`1` for summed ones
    (see :class:`~nncurv.problem.CurvatureProblem`). Products are Hessian-vector products; the
    dense matrix is formed only by :meth:`to_dense`.

    Modes:
        * ``"forward-over-reverse"``: ``jvp`` of ``grad`` (no graph kept between products);
        * ``"reverse-over-reverse"``: ``vjp`` of ``grad``;
        * ``"cached"``: the first-order graph is built once per batch and every product is one
          further backward pass (fastest for iterative algorithms; memory of one
          forward/backward graph per batch and one flat copy of the selected parameters,
          released by :meth:`release` or with the operator);
        * ``"auto"`` (default): the cached mode for at most ``max_cached_batches`` batches,
          verified by the first real product (no product is spent on a probe) with a fall-back
          to the functional modes should it fail; with more batches each functional mode is
          timed once on the first batch and the faster that works is kept. Modes that fail for
          the model (e.g. a missing double-backward or forward-mode formula) are reported in one
          warning and in :attr:`mode_errors`.

    Args:
        problem: The model, loss and data (or pass them to :func:`nncurv.hessian`).
        mode: One of the modes above.
        chunk_size: Columns per vectorised batch in :meth:`matmat` (bounds memory).
        max_cached_batches: Largest number of batches for which ``"auto"`` may pick ``"cached"``.
        batched_products: How :meth:`matmat` runs its columns in the cached mode: ``True``, one
            vmapped backward pass per chunk (``is_grads_batched``); ``False``, one backward pass
            per column; ``None`` (default), measured on the first ``matmat`` of at least 4
            columns (one column looped, the others batched; no product is spent twice), kept in
            :attr:`batched_products`; a distributed operator does not measure (ranks could
            decide differently) and uses the device default, the loop on CPU. The batched pass
            wins for small models whose products are dominated by per-call overhead (2.3x on a
            9k-parameter MLP at batch 32 on CPU), the loop for large batches on CPU.

    Example:
        Linear regression with mean squared error has :math:`H = 2 X^\top X / N` for the weights.

        >>> import torch
        >>> from nncurv import CurvatureProblem
        >>> X = torch.randn(20, 3, dtype=torch.float64)
        >>> y = torch.randn(20, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> H = HessianOperator(CurvatureProblem(model, torch.nn.MSELoss(), (X, y)))
        >>> torch.allclose(H.to_dense(), 2 * X.T @ X / 20)
        True
    """

    modes = ("cached", "forward-over-reverse", "reverse-over-reverse")

    def __init__(
        self,
        problem: CurvatureProblem,
        *,
        mode: HessianMode = "auto",
        chunk_size: int | None = 16,
        max_cached_batches: int = 8,
        batched_products: bool | None = None,
    ) -> None:
        if batched_products not in (None, True, False):
            raise TypeError(
                f"batched_products must be None, True or False, got {batched_products!r}"
            )
        self.batched_products = batched_products
        self._leaf: Tensor | None = None  # cached mode: the flat copy of the parameters
        super().__init__(
            problem, mode=mode, chunk_size=chunk_size, max_cached_batches=max_cached_batches
        )

    def _prepare(self, batch: Batch, mode: str) -> BatchProduct:
        if mode != "cached":
            return _FUNCTIONAL_MODES[mode](self.problem, batch)
        if self._leaf is None:
            self._leaf = self.problem.flatten(self.problem.params).detach().requires_grad_(True)
        prod = _Cached(self.problem, batch, self._leaf)
        prod.batched = self.batched_products
        return prod

    def release(self) -> None:
        """Free the graphs kept by the cached mode (they are rebuilt on the next product)."""
        super().release()
        self._leaf = None

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        if (
            self.batched_products is not None
            or self.mode != "cached"
            or k < 4
            or self.problem.distributed  # ranks could decide differently: the device default
        ):
            return super()._matmat(V)

        # measure once which matmat strategy is faster for this model and batch: the vmapped
        # backward (one engine call for all columns) wins for small models whose products are
        # dominated by per-call overhead, one backward per column for larger ones on CPU
        def use(batched: bool | None) -> None:
            for prod in self._cache.values():
                if isinstance(prod, _Cached):
                    prod.batched = batched

        out: list[Tensor] = []
        per_column: dict[bool, float] = {}
        try:
            # the first column is not timed: it builds (and verifies) the graphs and warms up
            # the vmapped backward, for graphs built now and for those built by earlier products
            self.batched_products = True
            use(True)
            out.append(super()._matmat(V[:, :1]))
            # one column looped, the rest batched: a batched call has a fixed cost (about three
            # products for a 9k-parameter MLP) that only a group of columns amortises
            for batched, cols in ((False, slice(1, 2)), (True, slice(2, k))):
                use(batched)
                self._sync()
                t0 = time.perf_counter()
                out.append(super()._matmat(V[:, cols]))
                self._sync()
                per_column[batched] = (time.perf_counter() - t0) / (cols.stop - cols.start)
        finally:
            decided = len(per_column) == 2 and self.mode == "cached"  # (not fallen back)
            self.batched_products = per_column[True] < per_column[False] if decided else None
            use(self.batched_products)
        return torch.cat(out, dim=1)

    def gradient(self) -> Tensor:
        """Flat gradient of the data-set loss at the operator's parameters.

        In the cached mode the first-order graphs kept for the products already hold it, so no
        further forward or backward pass is made; otherwise it is computed by the problem.

        Example:
            >>> import torch
            >>> from nncurv import CurvatureProblem
            >>> X, y = torch.randn(8, 2).double(), torch.randn(8, 1).double()
            >>> model = torch.nn.Linear(2, 1).double()
            >>> problem = CurvatureProblem(model, torch.nn.MSELoss(), (X, y))
            >>> H = HessianOperator(problem, mode="cached")
            >>> torch.allclose(H.gradient(), problem.loss_and_gradient()[1])
            True
        """
        if self.mode != "cached":
            return self.problem.loss_and_gradient()[1]
        if len(self._cache) < self.problem.num_batches:
            with self.problem.evaluating():
                for batch in self.problem.batches():
                    if batch.index not in self._cache:
                        self._cache[batch.index] = self._prepare(batch, self.mode)
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for prod in self._cache.values():
            assert isinstance(prod, _Cached)
            total += prod.grad.detach()
        return self.problem.all_reduce(total)


def hessian(
    model: torch.nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    mode: HessianMode = "auto",
    chunk_size: int | None = 16,
    **problem_kwargs: Any,
) -> HessianOperator:
    """Build a :class:`HessianOperator` from a model, a loss and data.

    Keyword arguments other than ``mode`` and ``chunk_size`` go to
    :class:`~nncurv.problem.CurvatureProblem` (``reduction``, ``params``, ``batchnorm``, ...).

    Example:
        >>> import torch
        >>> X, y = torch.randn(10, 2), torch.randn(10, 1)
        >>> H = hessian(torch.nn.Linear(2, 1), torch.nn.MSELoss(), (X, y))
        >>> H.shape
        (3, 3)
    """
    return HessianOperator(
        CurvatureProblem(model, loss_fn, data, **problem_kwargs), mode=mode, chunk_size=chunk_size
    )
