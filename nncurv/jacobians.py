r"""Per-sample Jacobians of any layer, their products and their norms.

For a network and a batch :math:`x_1, \dots, x_B`, the Jacobian of layer :math:`g` at sample
:math:`b` is :math:`J_b = \partial g(x_b) / \partial x_b`, the best local linear approximation
:math:`g(x_b + \varepsilon) \approx g(x_b) + J_b \varepsilon`. Layers are named as in
``model.named_modules()`` (or passed as modules); the derivative is taken with respect to the
network input (``wrt="input"``) or to the layer's own input (``wrt="layer_input"``).

The model is evaluated with :func:`torch.func.functional_call` under :func:`torch.vmap`, with
BatchNorm in eval mode and dropout off (per-sample derivatives of a batch-statistics network are
not defined); a temporary hook stops the forward pass at the layer and is removed before return.
Flags, buffers, ``.grad`` and the global RNG are left exactly as they were, also on error.

Results of :func:`layer_jacobian`, :func:`layer_jvp`, :func:`layer_vjp` and
:func:`jacobian_frobenius_sq` are differentiable with respect to the parameters when gradients are
enabled and a parameter requires them (call under :func:`torch.no_grad` for pure analysis);
spectral norms, singular values and the linearisation check are always detached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from nncurv._jacobian_core import Vectorize, Wrt, new_generator, per_sample_jacobian
from nncurv._jacobian_norms import (
    Distribution,
    ProbeSide,
    choose_side,
    frobenius_exact,
    frobenius_hutchinson,
    frobenius_hutchpp,
    spectral_lanczos,
    spectral_power,
)
from nncurv._jacobian_operator import DenseBatchedJacobian, JacobianMode, PerSampleJacobian

__all__ = [
    "FrobeniusResult",
    "SpectralNormResult",
    "LinearizationResult",
    "FrobeniusMethod",
    "layer_jacobian",
    "layer_jvp",
    "layer_vjp",
    "jacobian_frobenius_sq",
    "spectral_norm",
    "singular_values",
    "linearization_error",
    "frobenius_from_operator",
    "PerSampleJacobian",
    "DenseBatchedJacobian",
]

FrobeniusMethod = Literal["exact", "hutchinson", "hutch++"]
Layer = str | nn.Module | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class FrobeniusResult:
    r"""Per-sample squared Frobenius norms :math:`\|J_b\|_F^2`.

    Attributes:
        value: ``(B,)`` estimates (differentiable when the call built a graph).
        std_error: ``(B,)`` standard errors of the estimates (zero for ``"exact"``, NaN when a
            single probe gives no variance estimate), detached.
        method: ``"exact"``, ``"hutchinson"`` or ``"hutch++"``.
        num_products: Per-sample Jacobian-vector products used (JVPs + VJPs).
        wall_time: Seconds spent.
    """

    value: Tensor
    std_error: Tensor
    method: str
    num_products: int
    wall_time: float

    @property
    def mean(self) -> Tensor:
        """Mean over the batch."""
        return self.value.mean()

    @property
    def mean_std_error(self) -> Tensor:
        """Standard error of :attr:`mean` (probes are independent across samples)."""
        return self.std_error.square().sum().sqrt() / self.value.shape[0]


@dataclass(frozen=True)
class SpectralNormResult:
    r"""Per-sample spectral norms :math:`\|J_b\|_2 = \sigma_{\max}(J_b)`.

    Attributes:
        value: ``(B,)`` top singular values (detached).
        residual: ``(B,)`` relative residuals :math:`\|J^\top J v - \sigma^2 v\| / \sigma^2`
            (zero for ``"exact"``).
        converged: ``(B,)`` booleans.
        method: ``"lanczos"``, ``"power"`` or ``"exact"``.
        num_products: Per-sample Jacobian-vector products used.
        num_iters: Lanczos or power steps run (0 for ``"exact"``).
        wall_time: Seconds spent.
    """

    value: Tensor
    residual: Tensor
    converged: Tensor
    method: str
    num_products: int
    num_iters: int
    wall_time: float


@dataclass(frozen=True)
class LinearizationResult:
    r"""First-order Taylor errors :math:`\|g(x+\varepsilon d) - g(x) - \varepsilon J d\|`.

    Attributes:
        epsilons: ``(E,)`` step sizes.
        errors: ``(E, B)`` errors per step size and sample (unit directions :math:`d_b`).
        order: Least-squares slope of :math:`\log(\text{mean error})` against
            :math:`\log \varepsilon`: about 2 for a smooth layer, about 1 if the Jacobian is wrong.
    """

    epsilons: Tensor
    errors: Tensor
    order: float


# --------------------------------------------------------------------------------- Jacobians
def layer_jacobian(
    model: nn.Module,
    x: Tensor,
    *,
    layer: Layer = None,
    wrt: Wrt = "input",
    mode: JacobianMode = "auto",
) -> Tensor:
    r"""Per-sample Jacobians of a layer's output, shape ``[B, *out_shape, *in_shape]``.

    .. math::
        J_b = \frac{\partial g(x_b)}{\partial x_b}

    computed with ``vmap(jacrev)`` (one VJP per output) or ``vmap(jacfwd)`` (one JVP per input);
    ``mode="auto"`` picks the side with fewer products.

    Args:
        model: The network.
        x: Batch of inputs, batch dimension first (floating point).
        layer: Name in ``model.named_modules()``, the submodule itself, or ``None`` (the model).
        wrt: ``"input"`` (the network input) or ``"layer_input"`` (the layer's own input).
        mode: ``"auto"``, ``"rev"`` or ``"fwd"``.

    Returns:
        The Jacobians; ``in_shape`` is the shape of one sample of ``x`` (or of the layer input).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2)
        >>> J = layer_jacobian(torch.nn.Sequential(lin, torch.nn.Tanh()), torch.zeros(4, 3))
        >>> J.shape, torch.allclose(J[0], lin.weight * (1 - torch.tanh(lin.bias) ** 2)[:, None])
        (torch.Size([4, 2, 3]), True)
    """
    with per_sample_jacobian(model, x, layer=layer, wrt=wrt) as op:
        J = op.dense(mode)
        return J.reshape(op.batch, *op.out_shape, *op.in_shape)


def _check_vectors(v: Tensor, op: PerSampleJacobian, shape: tuple[int, ...], name: str) -> Tensor:
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    want = (op.batch, *shape)
    if tuple(v.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(v.shape)}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {v.dtype}")
    return v.to(dtype=op.dtype, device=op.device).reshape(op.batch, -1, 1)


def layer_jvp(
    model: nn.Module, x: Tensor, v: Tensor, *, layer: Layer = None, wrt: Wrt = "input"
) -> Tensor:
    r"""Per-sample Jacobian-vector products :math:`J_b v_b` (forward mode), shape ``[B, *out]``.

    Args:
        model: The network.
        x: Batch of inputs.
        v: Tangents, shape ``[B, *in_shape]`` (like ``x`` for ``wrt="input"``).
        layer: Layer (see :func:`layer_jacobian`).
        wrt: ``"input"`` or ``"layer_input"``.

    Returns:
        :math:`J_b v_b` for every sample.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2)
        >>> v = torch.randn(4, 3)
        >>> torch.allclose(layer_jvp(lin, torch.randn(4, 3), v), v @ lin.weight.T)
        True
    """
    with per_sample_jacobian(model, x, layer=layer, wrt=wrt) as op:
        out = op.matmat(_check_vectors(v, op, op.in_shape, "v"))
        return out.reshape(op.batch, *op.out_shape)


def layer_vjp(
    model: nn.Module, x: Tensor, u: Tensor, *, layer: Layer = None, wrt: Wrt = "input"
) -> Tensor:
    r"""Per-sample vector-Jacobian products :math:`J_b^\top u_b` (reverse mode), ``[B, *in]``.

    Args:
        model: The network.
        x: Batch of inputs.
        u: Cotangents, shape ``[B, *out_shape]``.
        layer: Layer (see :func:`layer_jacobian`).
        wrt: ``"input"`` or ``"layer_input"``.

    Returns:
        :math:`J_b^\top u_b` for every sample.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2)
        >>> u = torch.randn(4, 2)
        >>> torch.allclose(layer_vjp(lin, torch.randn(4, 3), u), u @ lin.weight)
        True
    """
    with per_sample_jacobian(model, x, layer=layer, wrt=wrt) as op:
        out = op.rmatmat(_check_vectors(u, op, op.out_shape, "u"))
        return out.reshape(op.batch, *op.in_shape)


# ----------------------------------------------------------------------------- Frobenius
def _check_probes(method: str, num_probes: int) -> None:
    if method not in ("exact", "hutchinson", "hutch++"):
        raise ValueError(f"method must be 'exact', 'hutchinson' or 'hutch++', got {method!r}")
    if not isinstance(num_probes, int) or isinstance(num_probes, bool) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    if method == "hutch++" and num_probes < 3:
        raise ValueError(
            f"hutch++ needs num_probes >= 3 (sketch, exact part, residual), got {num_probes}"
        )


def frobenius_from_operator(
    op: PerSampleJacobian,
    *,
    method: FrobeniusMethod = "exact",
    num_probes: int = 10,
    side: ProbeSide = "auto",
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    seed: int = 0,
    mode: JacobianMode = "auto",
) -> FrobeniusResult:
    r"""Squared Frobenius norms of any batch of Jacobians known through products.

    The algorithm behind :func:`jacobian_frobenius_sq`, for a :class:`PerSampleJacobian` built
    from a model or from explicit matrices (:class:`DenseBatchedJacobian`).

    Args:
        op: The batch of Jacobians.
        method: ``"exact"``, ``"hutchinson"`` or ``"hutch++"`` (see :func:`jacobian_frobenius_sq`).
        num_probes: Probes (Hutchinson) or total products (Hutch++) per sample.
        side: ``"auto"`` (smaller side), ``"input"`` or ``"output"``.
        distribution: Hutchinson (and Hutch++ residual) probes, ``"rademacher"`` or
            ``"gaussian"``.
        generator: Source of the probes; default: seeded with ``seed``.
        seed: Seed of the default generator.
        mode: Dense Jacobian mode for ``"exact"``: ``"auto"``, ``"rev"`` or ``"fwd"``.

    Returns:
        A :class:`FrobeniusResult`.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> J = torch.randn(1000, 3, 4, dtype=torch.float64, generator=g)  # 1000 samples
        >>> r = frobenius_from_operator(DenseBatchedJacobian(J), method="hutchinson", num_probes=8)
        >>> z = (r.mean - J.square().sum((1, 2)).mean()) / r.mean_std_error
        >>> bool(z.abs() < 4)
        True
    """
    _check_probes(method, num_probes)
    probe_side = choose_side(op, side)
    gen = new_generator(op.device, generator, seed)
    _sync(op.device)
    start, before = time.perf_counter(), op.num_products
    if method == "exact":
        value = frobenius_exact(op, mode)
        se = torch.zeros_like(value.detach())
    elif method == "hutchinson":
        value, se = frobenius_hutchinson(
            op, num_probes=num_probes, side=probe_side, distribution=distribution, generator=gen
        )
    else:
        value, se = frobenius_hutchpp(
            op, num_probes=num_probes, side=probe_side, generator=gen, distribution=distribution
        )
    _sync(op.device)
    return FrobeniusResult(
        value=value,
        std_error=se,
        method=method,
        num_products=op.num_products - before,
        wall_time=time.perf_counter() - start,
    )


def jacobian_frobenius_sq(
    model: nn.Module,
    x: Tensor,
    *,
    layer: Layer = None,
    wrt: Wrt = "input",
    method: FrobeniusMethod = "exact",
    num_probes: int = 10,
    side: ProbeSide = "auto",
    distribution: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    seed: int = 0,
    vectorize: Vectorize = "vmap",
) -> FrobeniusResult:
    r"""Per-sample squared Frobenius norms of a layer's Jacobians.

    .. math::
        \|J_b\|_F^2 = \sum_{ij} \left(\frac{\partial g_i(x_b)}{\partial x_{b,j}}\right)^2

    Methods:
    * ``"exact"``: from the dense Jacobian (``min(n, m)`` products per sample).
    * ``"hutchinson"``: :math:`\|J\|_F^2 = \mathbb{E}\|Jv\|^2 = \mathbb{E}\|J^\top u\|^2` with
      ``num_probes`` probes on the smaller side (JVPs for inputs, VJPs for outputs; ``side``
      overrides); unbiased for the norm and for its gradient (Hutchinson 1990; Hoffman, Roberts
      & Yaida, "Robust Learning with Jacobian Regularization", 2019).
    * ``"hutch++"``: exact on a sketched top subspace, Hutchinson on the rest (Meyer et al.,
      "Hutch++", 2021); ``num_probes`` is the total budget of products (at least 3). Far smaller
      variance once a third of the budget exceeds the number of dominant singular values (on a
      digits CAE encoder: 50x less than Hutchinson at 60 products, but 2x more at 9).

    Args:
        model: The network.
        x: Batch of inputs.
        layer: Layer (see :func:`layer_jacobian`).
        wrt: ``"input"`` or ``"layer_input"``.
        method: ``"exact"``, ``"hutchinson"`` or ``"hutch++"``.
        num_probes: Probes (Hutchinson) or total products (Hutch++) per sample.
        side: ``"auto"`` (smaller side), ``"input"`` or ``"output"``.
        distribution: Hutchinson (and Hutch++ residual) probes, ``"rademacher"`` or
            ``"gaussian"``.
        generator: Source of the probes (on the inputs' device); default: seeded with ``seed``.
        seed: Seed of the default generator.
        vectorize: ``"vmap"`` (each sample on its own) or ``"batch"`` (plain autograd on the
            whole batch: far less overhead, exact only if the model treats samples
            independently, which standard layers do with BatchNorm in eval mode).

    Returns:
        A :class:`FrobeniusResult` with per-sample values and standard errors.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(5, 3)
        >>> r = jacobian_frobenius_sq(lin, torch.randn(2, 5))
        >>> torch.allclose(r.value, lin.weight.square().sum().expand(2))
        True
    """
    _check_probes(method, num_probes)
    with per_sample_jacobian(model, x, layer=layer, wrt=wrt, vectorize=vectorize) as op:
        return frobenius_from_operator(
            op,
            method=method,
            num_probes=num_probes,
            side=side,
            distribution=distribution,
            generator=generator,
            seed=seed,
        )


# ------------------------------------------------------------------------------ spectrum
def singular_values(
    model: nn.Module,
    x: Tensor,
    *,
    layer: Layer = None,
    wrt: Wrt = "input",
    max_entries: int = 2**22,
) -> Tensor:
    r"""Singular values of each sample's Jacobian, descending, shape ``[B, min(m, n)]``.

    Exact (dense Jacobian and :func:`torch.linalg.svdvals`): for small layers only; refused when
    the batch of Jacobians would exceed ``max_entries`` entries.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(4, 3)
        >>> s = singular_values(lin, torch.randn(2, 4))
        >>> torch.allclose(s[1], torch.linalg.svdvals(lin.weight.detach()))
        True
    """
    with torch.no_grad(), per_sample_jacobian(model, x, layer=layer, wrt=wrt) as op:
        size = op.batch * op.in_dim * op.out_dim
        if size > max_entries:
            raise ValueError(
                f"the {op.batch} Jacobians of size {op.out_dim}x{op.in_dim} have {size} entries "
                f"> max_entries={max_entries}; use spectral_norm(method='power') instead"
            )
        return torch.linalg.svdvals(op.dense())


def spectral_norm(
    model: nn.Module,
    x: Tensor,
    *,
    layer: Layer = None,
    wrt: Wrt = "input",
    method: Literal["auto", "lanczos", "power", "exact"] = "auto",
    max_iters: int = 200,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> SpectralNormResult:
    r"""Per-sample spectral norm :math:`\|J_b\|_2 = \max_{\|v\|=1} \|J_b v\|`.

    ``"lanczos"`` runs Lanczos with full reorthogonalisation on :math:`J_b^\top J_b` for all
    samples at once, ``"power"`` power iteration (one JVP and one VJP per step for either;
    power iteration converges like :math:`(\sigma_2/\sigma_1)^{2k}`, Lanczos much faster when
    the top singular values are close); ``"exact"`` takes the dense Jacobian's top singular
    value; ``"auto"`` is exact when ``min(m, n) <= 64``, else Lanczos. ``tol`` bounds the
    relative residual (Lanczos) or the relative change per step (power).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(6, 4)
        >>> r = spectral_norm(lin, torch.randn(3, 6), method="power", tol=1e-10, max_iters=2000)
        >>> top = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
        >>> bool(torch.allclose(r.value, top.expand(3), rtol=1e-4))
        True
    """
    if method not in ("auto", "lanczos", "power", "exact"):
        raise ValueError(f"method must be 'auto', 'lanczos', 'power' or 'exact', got {method!r}")
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    with torch.no_grad(), per_sample_jacobian(model, x, layer=layer, wrt=wrt) as op:
        if method == "auto":
            method = "exact" if min(op.in_dim, op.out_dim) <= 64 else "lanczos"
        gen = new_generator(op.device, generator, seed)
        _sync(op.device)
        start = time.perf_counter()
        if method == "exact":
            sigma = torch.linalg.svdvals(op.dense())[:, 0]
            res = torch.zeros_like(sigma)
            conv = torch.ones_like(sigma, dtype=torch.bool)
            iters = 0
        elif method == "lanczos":
            sigma, res, conv, iters = spectral_lanczos(
                op, max_iters=max_iters, tol=tol, generator=gen
            )
        else:
            sigma, res, conv, iters = spectral_power(
                op, max_iters=max_iters, tol=tol, generator=gen
            )
        _sync(op.device)
        return SpectralNormResult(
            value=sigma,
            residual=res,
            converged=conv,
            method=method,
            num_products=op.num_products,
            num_iters=iters,
            wall_time=time.perf_counter() - start,
        )


# ------------------------------------------------------------------------ linearisation
def linearization_error(
    model: nn.Module,
    x: Tensor,
    *,
    layer: Layer = None,
    wrt: Wrt = "input",
    epsilons: Sequence[float] | Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> LinearizationResult:
    r"""First-order Taylor error of a layer along a random unit direction per sample.

    .. math::
        e_b(\varepsilon) = \| g(x_b + \varepsilon d_b) - g(x_b) - \varepsilon J_b d_b \|
        = O(\varepsilon^2) \text{ for twice differentiable } g.

    A fitted :attr:`LinearizationResult.order` near 2 confirms the Jacobian; near 1 it is wrong
    or the layer is not differentiable there (ReLU kinks within :math:`\varepsilon`).

    Args:
        model: The network.
        x: Batch of inputs.
        layer: Layer (see :func:`layer_jacobian`).
        wrt: ``"input"`` or ``"layer_input"``.
        epsilons: Step sizes; default: 10 values from ``1e-1`` down to ``1e-4`` (``1e-2`` down to
            ``3e-4`` in single precision, where rounding dominates below).
        generator: Source of the directions; default: seeded with ``seed``.
        seed: Seed of the default generator.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()).double()
        >>> r = linearization_error(net, torch.randn(5, 3, dtype=torch.float64))
        >>> 1.9 < r.order < 2.1
        True
    """
    with torch.no_grad(), per_sample_jacobian(model, x, layer=layer, wrt=wrt) as op:
        if epsilons is None:
            hi, lo = (1e-1, 1e-4) if op.dtype == torch.float64 else (1e-2, 3e-4)
            eps = torch.logspace(math.log10(hi), math.log10(lo), 10, dtype=op.dtype)
        else:
            eps = torch.as_tensor(epsilons, dtype=op.dtype).reshape(-1)
            if eps.numel() < 2 or not bool((eps > 0).all()):
                raise ValueError(f"epsilons must be at least two positive values, got {epsilons!r}")
        eps = eps.to(op.device)
        gen = new_generator(op.device, generator, seed)
        d = torch.randn((op.batch, op.in_dim, 1), generator=gen, device=op.device, dtype=op.dtype)
        d = d / d.norm(dim=1, keepdim=True)
        Jd = op.matmat(d)[..., 0]  # (B, m)
        g0, z0 = op.evaluate(), op.base_points()
        errors = torch.stack(
            [(op.evaluate(z0 + e * d[..., 0]) - g0 - e * Jd).norm(dim=1) for e in eps]
        )
        mean_err = errors.mean(dim=1).clamp_min(torch.finfo(op.dtype).tiny)
        le, lm = eps.log(), mean_err.log()
        le_c = le - le.mean()
        order = float((le_c * (lm - lm.mean())).sum() / le_c.square().sum())
        return LinearizationResult(epsilons=eps, errors=errors, order=order)
