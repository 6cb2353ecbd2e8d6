"""Shared machinery of operators over a model's parameters (Hessian, GGN, ...).

An operator over parameters sums, over the batches of a :class:`~nncurv.problem.CurvatureProblem`,
a per-batch product computed by a *prepared* object (:class:`BatchProduct`), then all-reduces
across ranks when the problem is distributed. Modes differ only in how a batch is prepared.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from nncurv.operators.base import LinearOperator
from nncurv.problem import Batch, CurvatureProblem

__all__ = ["ParameterOperator", "BatchProduct", "grad_products", "pullback_of"]

Params = dict[str, Tensor]
_WARNED: set[tuple[object, ...]] = set()  # one warning per operator type, model type and failure


class BatchProduct:
    """Products of one batch's curvature block with parameter-shaped tangents.

    ``mv`` takes and returns dicts of parameter-shaped tensors; ``mm`` the same with a leading
    column dimension ``k``. A product with ``flat = True`` instead implements ``mv_flat`` (a
    flat vector of the operator's dimension) and ``mm_flat`` (an ``(n, k)`` matrix).
    """

    flat = False

    def mv_flat(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def mm_flat(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def mv(self, v: Params) -> Params:
        raise NotImplementedError

    def mm(self, V: Params) -> Params:
        k = next(iter(V.values())).shape[0]
        cols = [self.mv({n: t[j] for n, t in V.items()}) for j in range(k)]
        return {n: torch.stack([c[n] for c in cols]) for n in V}


def pullback_of(fn: Callable[[Any], Any], primal: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``torch.func.vjp`` returning ``(output, pullback)`` with the pullback's tuple unwrapped."""
    out, pull = torch.func.vjp(fn, primal)[:2]
    return out, lambda cotangent: pull(cotangent)[0]


def grad_products(
    outputs: list[Tensor], inputs: list[Tensor], cotangents: list[Tensor], *, batched: bool
) -> list[Tensor]:
    """``autograd.grad`` over a retained graph, tolerant of unused inputs and constant outputs.

    Outputs that do not require grad contribute zero; inputs that are not reached get zeros.
    """
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs:
        lead = (cotangents[0].shape[0],) if batched else ()
        return [torch.zeros(*lead, *x.shape, dtype=x.dtype, device=x.device) for x in inputs]
    outs, cots = zip(*pairs)
    grads = torch.autograd.grad(
        list(outs),
        inputs,
        grad_outputs=list(cots),
        retain_graph=True,
        allow_unused=True,
        materialize_grads=True,
        is_grads_batched=batched,
    )
    return list(grads)


class ParameterOperator(LinearOperator):
    """Base class of curvature operators over the selected parameters of a problem.

    Subclasses define :attr:`modes` (preferred order for ``"auto"``), :attr:`cached_mode` and
    :meth:`_prepare`. The operator is defined at the parameters the problem read at construction;
    in the cached mode the first-order graphs are kept (one per batch) until :meth:`release` or
    until the operator is dropped.
    """

    modes: tuple[str, ...] = ()
    cached_mode = "cached"

    def __init__(
        self,
        problem: CurvatureProblem,
        *,
        mode: str = "auto",
        chunk_size: int | None = 16,
        max_cached_batches: int = 8,
    ) -> None:
        if not isinstance(problem, CurvatureProblem):
            raise TypeError(f"problem must be a CurvatureProblem, got {type(problem).__name__}")
        if mode != "auto" and mode not in self.modes:
            raise ValueError(f"mode must be 'auto' or one of {self.modes}, got {mode!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if not isinstance(max_cached_batches, int) or max_cached_batches < 0:
            raise ValueError(f"max_cached_batches must be >= 0, got {max_cached_batches!r}")
        super().__init__(problem.num_params, dtype=problem.dtype, device=problem.device)
        self.problem = problem
        self.matmat_chunk_size = chunk_size
        self.max_cached_batches = max_cached_batches
        self._cache: dict[int, BatchProduct] = {}
        self.mode_errors: dict[str, str] = {}
        self._unverified = False  # "auto" picked the cached mode; the first product checks it
        self.mode = self._choose_mode() if mode == "auto" else mode

    # ------------------------------------------------------------------ vectors
    @property
    def param_names(self) -> list[str]:
        """Names of the parameters, in the order of the flat vectors."""
        return self.problem.param_names

    def flatten(self, tensors: Mapping[str, Tensor | None]) -> Tensor:
        """Concatenate a dict of parameter-shaped tensors into a flat vector."""
        return self.problem.flatten(tensors)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into a dict of parameter-shaped tensors."""
        return self.problem.unflatten(vector)

    def _split_columns(self, V: Tensor) -> Params:
        k = V.shape[1]
        Vt = V.T
        out: Params = {}
        offset = 0
        for n in self.problem.param_names:
            shape = self.problem.shapes[n]
            size = shape.numel()
            out[n] = Vt[:, offset : offset + size].reshape(k, *shape)
            offset += size
        return out

    def _join_columns(self, parts: Params, k: int) -> Tensor:
        return torch.cat([parts[n].reshape(k, -1) for n in self.problem.param_names], dim=1).T

    # ------------------------------------------------------------------ products
    def _prepare(self, batch: Batch, mode: str) -> BatchProduct:
        raise NotImplementedError

    def _for_each_batch(
        self, fn: Callable[[BatchProduct], Tensor], init: Callable[[], Tensor]
    ) -> Tensor:
        if not self._unverified:
            return self._run(fn, init)
        # "auto" chose the cached mode without spending a product on a probe: the first real
        # product is the probe, and a failure falls back to the functional modes
        try:
            out = self._run(fn, init)
        except RuntimeError as err:  # e.g. an op without a double-backward formula
            self._unverified = False
            self._cache.clear()
            self.mode_errors[self.cached_mode] = f"{type(err).__name__}: {err}"
            self.mode = self._choose_functional_mode()
            return self._run(fn, init)
        self._unverified = False
        return out

    def _run(self, fn: Callable[[BatchProduct], Tensor], init: Callable[[], Tensor]) -> Tensor:
        """Sum ``fn`` over the batches (``init()``: the result without any batch on this rank)."""
        total: Tensor | None = None
        cached = self.mode == self.cached_mode
        if cached and self._cache and len(self._cache) == self.problem.num_batches:
            self.problem.check_unchanged()  # (the graphs hold the parameters as they were)
            for prod in self._cache.values():
                r = fn(prod)
                total = r if total is None else total + r
        else:
            with self.problem.evaluating():
                for batch in self.problem.batches():
                    if cached:
                        if batch.index not in self._cache:
                            self._cache[batch.index] = self._prepare(batch, self.mode)
                        prod = self._cache[batch.index]
                    else:
                        prod = self._prepare(batch, self.mode)
                    r = fn(prod)
                    total = r if total is None else total + r
        return self.problem.all_reduce(init() if total is None else total)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._products(
            v, lambda p: p.mv_flat(v), self.unflatten, lambda p, d: self.flatten(p.mv(d))
        )

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        return self._products(
            V,
            lambda p: p.mm_flat(V),
            self._split_columns,
            lambda p, d: self._join_columns(p.mm(d), k),
        )

    def _products(
        self,
        x: Tensor,
        flat: Callable[[BatchProduct], Tensor],
        split: Callable[[Tensor], Params],
        via_dict: Callable[[BatchProduct, Params], Tensor],
    ) -> Tensor:
        """Sum the batches' products with ``x``.

        Flat products take ``x`` as it is, dict products its dict form (``split(x)``, made once
        and only if a dict product needs it).
        """
        parts: Params | None = None

        def product(p: BatchProduct) -> Tensor:
            nonlocal parts
            if p.flat:
                return flat(p)
            if parts is None:
                parts = split(x)
            return via_dict(p, parts)

        return self._for_each_batch(product, lambda: torch.zeros_like(x))

    def release(self) -> None:
        """Free the graphs kept by the cached mode (they are rebuilt on the next product)."""
        self._cache.clear()

    # ------------------------------------------------------------------ auto mode
    def _choose_mode(self) -> str:
        """Pick the mode for ``"auto"``.

        With at most ``max_cached_batches`` batches the cached mode is taken: each further
        product is then a single backward pass, which no other mode beats. It is verified by the
        first real product (no product is spent on a probe); should that fail, the functional
        modes take over. With more batches the functional modes are probed.
        """
        if self.problem.num_batches <= self.max_cached_batches:
            self._unverified = True
            return self.cached_mode
        return self._choose_functional_mode()

    def _choose_functional_mode(self) -> str:
        """Time each non-cached mode on one product of the first batch; keep the fastest."""
        gen = self.new_generator(12345)
        v = torch.randn(self.shape[0], generator=gen, dtype=self.dtype, device=self.device)
        vd = self.unflatten(v)
        timings: dict[str, float] = {}
        with self.problem.evaluating():
            it = self.problem.batches()
            batch = next(it)
            it.close()
            for m in self.modes:
                if m == self.cached_mode:
                    continue
                try:
                    self._sync()
                    t0 = time.perf_counter()
                    self._prepare(batch, m).mv(vd)
                    self._sync()
                    timings[m] = time.perf_counter() - t0
                except RuntimeError as err:  # a mode the model lacks; user errors propagate
                    self.mode_errors[m] = f"{type(err).__name__}: {err}"
        if not timings:
            hint = ""
            if self.cached_mode in self.modes and self.cached_mode not in self.mode_errors:
                hint = (
                    f"; with more than max_cached_batches={self.max_cached_batches} batches "
                    f"'auto' does not try mode={self.cached_mode!r} (double backward over one "
                    "kept graph per batch): pass it, or a larger max_cached_batches"
                )
            raise RuntimeError(
                f"{type(self).__name__}: no product mode works for this model: "
                f"{self.mode_errors}{hint}"
            )
        chosen = min(timings, key=timings.__getitem__)
        key = (type(self).__name__, type(self.problem.model).__name__, tuple(self.mode_errors))
        if self.mode_errors and key not in _WARNED:
            _WARNED.add(key)
            failed = "; ".join(
                f"{m} ({e.splitlines()[0][:160]})" for m, e in self.mode_errors.items()
            )
            warnings.warn(
                f"{type(self).__name__}: mode(s) unavailable for this model: {failed}; "
                f"using {chosen!r}",
                RuntimeWarning,
                stacklevel=4,
            )
        return chosen

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(n={self.shape[0]}, mode={self.mode!r}, problem={self.problem!r})"
