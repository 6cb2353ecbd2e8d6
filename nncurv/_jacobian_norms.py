r"""Norm estimators for a batch of Jacobians known through products.

Every function here takes a :class:`~nncurv._jacobian_core.PerSampleJacobian` (products
:math:`J_b V_b` and :math:`J_b^\top U_b` for all samples :math:`b` at once) and knows nothing of
models, so each is tested on explicit matrices with a known answer.

Private module: the public entry points are :func:`nncurv.jacobians.jacobian_frobenius_sq`,
:func:`nncurv.jacobians.spectral_norm` and :func:`nncurv.jacobians.singular_values`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from nncurv._jacobian_operator import JacobianMode, PerSampleJacobian
from nncurv.linalg._checks import draw_probes

__all__ = [
    "ProbeSide",
    "Distribution",
    "frobenius_exact",
    "frobenius_hutchinson",
    "frobenius_hutchpp",
    "spectral_power",
    "spectral_lanczos",
    "choose_side",
    "draw_probes",
]

ProbeSide = Literal["auto", "input", "output"]
Distribution = Literal["rademacher", "gaussian"]


def choose_side(op: PerSampleJacobian, side: ProbeSide) -> Literal["input", "output"]:
    """Probe the smaller side of :math:`J` (``"output"``: VJPs; ``"input"``: JVPs)."""
    if side == "auto":
        return "output" if op.out_dim <= op.in_dim else "input"
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'auto', 'input' or 'output', got {side!r}")
    return side


def _std_error(samples: Tensor) -> Tensor:
    """Standard error of the mean over the last axis (NaN with a single sample)."""
    k = samples.shape[-1]
    s = samples.detach()
    if k < 2:
        return torch.full(s.shape[:-1], math.nan, dtype=s.dtype, device=s.device)
    return s.var(dim=-1, correction=1).div(k).sqrt()


def frobenius_exact(op: PerSampleJacobian, mode: JacobianMode = "auto") -> Tensor:
    r"""Return :math:`\|J_b\|_F^2` per sample from the dense Jacobians (shape ``(B,)``)."""
    return op.dense(mode).square().sum(dim=(1, 2))


def _sides(
    op: PerSampleJacobian, side: Literal["input", "output"]
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], int, int]:
    """``(A, Aᵀ, dim probed, dim of the image)`` with ``‖A‖_F = ‖J‖_F``, A probed on the right."""
    if side == "input":
        return op.matmat, op.rmatmat, op.in_dim, op.out_dim
    return op.rmatmat, op.matmat, op.out_dim, op.in_dim


def frobenius_hutchinson(
    op: PerSampleJacobian,
    *,
    num_probes: int,
    side: Literal["input", "output"],
    distribution: Distribution,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    r"""Hutchinson estimate of :math:`\|J_b\|_F^2` and its standard error, per sample.

    .. math::
        \|J\|_F^2 = \mathbb{E}_v \|J v\|^2 = \mathbb{E}_u \|J^\top u\|^2,
        \qquad \mathbb{E}[v v^\top] = I.

    The estimate is linear in :math:`v v^\top`, so it and its gradient with respect to anything
    :math:`J` depends on are unbiased.
    """
    A, _, n, _ = _sides(op, side)
    V = draw_probes(
        (op.batch, n, num_probes),
        distribution,
        dtype=op.dtype,
        device=op.device,
        generator=generator,
    )
    samples = A(V).square().sum(dim=1)  # (B, k)
    return samples.mean(dim=-1), _std_error(samples)


def frobenius_hutchpp(
    op: PerSampleJacobian,
    *,
    num_probes: int,
    side: Literal["input", "output"],
    generator: torch.Generator,
    distribution: Distribution = "rademacher",
) -> tuple[Tensor, Tensor]:
    r"""Hutch++-style estimate of :math:`\|J_b\|_F^2` and its standard error, per sample.

    With :math:`Q` an orthonormal basis of :math:`J S` (a sketch with :math:`k` Gaussian probes),

    .. math::
        \|J\|_F^2 = \|Q^\top J\|_F^2 + \|(I - QQ^\top) J\|_F^2,

    the first term is computed exactly with :math:`k` transposed products and the second by
    Hutchinson with :math:`k'` fresh probes drawn from ``distribution`` (Meyer, Musco, Musco &
    Woodruff, "Hutch++", SOSA 2021, adapted to Frobenius norms). :math:`Q` is held fixed
    (detached): the identity holds for any orthonormal :math:`Q`, so value and gradient stay
    unbiased, and the variance only
    involves the tail :math:`\sum_{i>k} \sigma_i^4` of the spectrum. It pays off once the
    sketch size :math:`k` exceeds the number of dominant singular values; below that, plain
    Hutchinson with Rademacher probes is usually better. The budget ``num_probes`` (at least 3)
    is split as :math:`k = \lfloor m/3 \rfloor`, :math:`k' = m - 2k`.
    """
    A, At, n, _ = _sides(op, side)
    k = num_probes // 3
    k_res = num_probes - 2 * k
    dtype, device = op.dtype, op.device
    S = torch.randn((op.batch, n, k), generator=generator, device=device, dtype=dtype)
    with torch.no_grad():
        Y = A(S)  # (B, m_img, k)
    Q = torch.linalg.qr(Y.detach(), mode="reduced").Q  # orthonormal basis of the sketch
    top = At(Q).square().sum(dim=(1, 2))
    G = draw_probes(
        (op.batch, n, k_res), distribution, dtype=dtype, device=device, generator=generator
    )
    AG = A(G)
    R = AG - Q @ (Q.transpose(1, 2) @ AG)
    samples = R.square().sum(dim=1)  # (B, k')
    return top + samples.mean(dim=-1), _std_error(samples)


def spectral_power(
    op: PerSampleJacobian,
    *,
    max_iters: int,
    tol: float,
    generator: torch.Generator,
    check_every: int = 5,
) -> tuple[Tensor, Tensor, Tensor, int]:
    r"""Batched power iteration on :math:`J_b^\top J_b` for the top singular value per sample.

    Returns ``(sigma, residual, converged, iterations)``: :math:`\sigma_b = \|J_b v_b\|` (a lower
    bound that increases monotonically), the relative residual
    :math:`\|J^\top J v - \sigma^2 v\| / \sigma^2`, whether the relative change of :math:`\sigma`
    over the last iteration fell below ``tol``, and the number of iterations. Convergence is
    checked (one host synchronisation) every ``check_every`` iterations.
    """
    dtype, device = op.dtype, op.device
    v = torch.randn((op.batch, op.in_dim, 1), generator=generator, device=device, dtype=dtype)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    sigma = torch.zeros(op.batch, dtype=dtype, device=device)
    change = torch.full_like(sigma, math.inf)
    w = v
    it = 0
    for it in range(1, max_iters + 1):
        u = op.matmat(v)
        new_sigma = u.norm(dim=(1, 2))
        w = op.rmatmat(u)
        change = (new_sigma - sigma).abs() / new_sigma.clamp_min(torch.finfo(dtype).tiny)
        sigma = new_sigma
        v = w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        if it % check_every == 0 and bool((change <= tol).all()):
            break
    u = op.matmat(v)
    w = op.rmatmat(u)
    sigma_final = u.norm(dim=(1, 2))
    s2 = sigma_final.square().clamp_min(torch.finfo(dtype).tiny)
    residual = (w - s2[:, None, None] * v).norm(dim=(1, 2)) / s2
    return sigma_final, residual, change <= tol, it


def spectral_lanczos(
    op: PerSampleJacobian,
    *,
    max_iters: int,
    tol: float,
    generator: torch.Generator,
    check_every: int = 5,
) -> tuple[Tensor, Tensor, Tensor, int]:
    r"""Batched Lanczos on :math:`J_b^\top J_b`, fully reorthogonalised, for the top singular value.

    All samples advance together (one JVP and one VJP per step). After :math:`k` steps the top
    Ritz value :math:`\theta` of the tridiagonal :math:`T_k` gives :math:`\sigma = \sqrt\theta`,
    with relative residual :math:`\beta_k |s_k| / \theta`, where :math:`s_k` is the last entry of
    its Ritz vector (Paige 1972). Converges far faster than power iteration when
    :math:`\sigma_2 \approx \sigma_1`. Returns ``(sigma, residual, converged, iterations)``.
    """
    dtype, device = op.dtype, op.device
    B, n = op.batch, op.in_dim
    steps = min(max_iters, n)
    tiny = torch.finfo(dtype).tiny
    Q = torch.zeros((B, n, steps), dtype=dtype, device=device)
    q = torch.randn((B, n), generator=generator, device=device, dtype=dtype)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(tiny)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    theta = torch.zeros(B, dtype=dtype, device=device)
    residual = torch.full_like(theta, math.inf)
    it = 0
    for it in range(1, steps + 1):
        Q[:, :, it - 1] = q
        w = op.rmatmat(op.matmat(q[:, :, None]))[:, :, 0]
        alphas.append((w * q).sum(dim=1))
        basis = Q[:, :, :it]
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - (basis @ (basis.transpose(1, 2) @ w[:, :, None]))[:, :, 0]
        beta = w.norm(dim=1)
        betas.append(beta)
        if it % check_every == 0 or it == steps:
            T = torch.diag_embed(torch.stack(alphas, dim=1))
            if it > 1:
                off = torch.diag_embed(torch.stack(betas[:-1], dim=1), offset=1)
                T = T + off + off.transpose(1, 2)
            evals, evecs = torch.linalg.eigh(T)
            theta = evals[:, -1]
            residual = beta * evecs[:, -1, -1].abs() / theta.abs().clamp_min(tiny)
            if bool((residual <= tol).all()):
                break
        q = w / beta[:, None].clamp_min(tiny)
    sigma = theta.clamp_min(0).sqrt()
    return sigma, residual, residual <= tol, it
