"""Input validation, random probes and non-finite detection shared by the algorithms."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from nncurv.operators.base import LinearOperator, sym_tolerance

Distribution = Literal["rademacher", "gaussian"]

__all__ = [
    "Distribution",
    "NonFiniteError",
    "check_distribution",
    "check_operator",
    "check_int",
    "make_generator",
    "draw_probes",
    "random_probes",
    "check_finite",
    "check_symmetric",
]


class NonFiniteError(ValueError):
    """The operator returned NaN or Inf; no estimate is reported."""


def check_operator(op: object, *, symmetric: bool) -> LinearOperator:
    """Check that ``op`` is a square :class:`LinearOperator` (symmetric if required).

    Only the operator's declared ``is_symmetric`` flag is read here (free); the Krylov methods
    also compare the projections they compute anyway and raise if the operator turns out not to
    be symmetric.
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"op must be an nncurv LinearOperator, got {type(op).__name__}")
    if len(op.shape) != 2 or op.shape[0] != op.shape[1]:
        raise ValueError(f"op must be square, got shape {tuple(op.shape)}")
    if symmetric and not op.is_symmetric:
        raise ValueError(
            f"this algorithm needs a symmetric operator, got {op!r} (is_symmetric=False)"
        )
    return op


def check_int(value: object, name: str, *, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` (not ``bool``) ``>= minimum``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def make_generator(
    op: LinearOperator, generator: torch.Generator | None, seed: int
) -> torch.Generator:
    """Return ``generator`` if given (checked to live on the operator's device), else a new one."""
    if generator is None:
        return op.new_generator(seed)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != op.device.type:
        raise ValueError(
            f"generator is on {generator.device}, but the operator is on {op.device}; "
            "draw probes on the operator's device"
        )
    return generator


_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    r"""``(256, 8)``: row ``b`` holds :math:`2\,\mathrm{bit}_j(b) - 1` for ``j = 0..7``."""
    key = (dtype, device)
    table = _SIGN_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = (2 * bits - 1).to(dtype=dtype, device=device)
        _SIGN_TABLES[key] = table
    return table


def draw_probes(
    shape: tuple[int, ...],
    distribution: Distribution,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> Tensor:
    r"""Draw i.i.d. probes with :math:`\mathbb{E}[v v^\top] = I` from ``generator``."""
    check_distribution(distribution)
    if distribution == "rademacher":
        # eight signs per random byte (its bits are i.i.d. fair), expanded by a table lookup:
        # an eighth of the draws of one byte per sign, a fifth of the time on CPU
        numel = math.prod(shape)
        nbytes = -(-numel // 8)
        draws = torch.randint(0, 256, (nbytes,), generator=generator, device=device)
        # (keyed by the draws' device, which names its index even when `device` does not)
        signs = _sign_table(dtype, draws.device).index_select(0, draws)
        return signs.reshape(-1)[:numel].reshape(shape)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def check_distribution(distribution: object) -> None:
    """Raise ``ValueError`` unless ``distribution`` is ``"rademacher"`` or ``"gaussian"``."""
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")


def random_probes(
    op: LinearOperator, k: int, distribution: Distribution, generator: torch.Generator
) -> Tensor:
    r"""Return ``(n, k)`` probes on the operator's device with :math:`E[vv^\top] = I`."""
    return draw_probes(
        (op.shape[0], k), distribution, dtype=op.dtype, device=op.device, generator=generator
    )


def check_finite(x: Tensor | float, what: str) -> None:
    """Raise :class:`NonFiniteError` if ``x`` contains NaN or Inf (one host sync)."""
    if isinstance(x, Tensor) and (x.numel() != 1 or x.is_complex()):
        ok = bool(torch.isfinite(x).all())
    else:
        ok = math.isfinite(float(x.detach() if isinstance(x, Tensor) else x))
    if not ok:
        raise NonFiniteError(
            f"the operator produced NaN or Inf while computing {what}; "
            "check the model, the loss and the data (no estimate is reported)"
        )


def check_symmetric(
    op: LinearOperator, *, generator: torch.Generator | None = None, seed: int = 0
) -> float:
    r"""Probe symmetry with two random vectors (2 products) and return the relative asymmetry.

    Computes :math:`|u^\top A w - w^\top A u| / (\lVert A u\rVert \lVert w\rVert
    + \lVert A w\rVert\lVert u \rVert)`; raises ``ValueError`` when it exceeds a dtype-dependent
    tolerance (``1e-6`` in float64, about ``3.5e-2`` in float32).

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> check_symmetric(MatrixOperator(torch.eye(3, dtype=torch.float64))) < 1e-12
        True
    """
    check_operator(op, symmetric=False)
    gen = make_generator(op, generator, seed)
    U = random_probes(op, 2, "gaussian", gen)
    AU = op.matmat(U)
    check_finite(AU, "a symmetry probe")
    a = float(U[:, 0] @ AU[:, 1])
    b = float(U[:, 1] @ AU[:, 0])
    scale = float(AU[:, 0].norm() * U[:, 1].norm() + AU[:, 1].norm() * U[:, 0].norm())
    rel = abs(a - b) / max(scale, torch.finfo(op.dtype).tiny)
    if rel > sym_tolerance(op.dtype):
        raise ValueError(
            f"op is not symmetric: u^T A w = {a:.6e} but w^T A u = {b:.6e} "
            f"(relative asymmetry {rel:.2e})"
        )
    return rel
