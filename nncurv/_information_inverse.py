r"""Metrics that need the inverse of the information: standard errors and Takeuchi's criterion."""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from nncurv._information_cg import NotPositiveDefiniteError, conjugate_gradients
from nncurv._information_results import (
    StandardErrors,
    TICResult,
    cg_breakdown,
    check_dense_size,
    check_method,
    dense_eigh,
    dense_matrix,
    dense_tol,
    not_pd,
)
from nncurv.linalg._checks import (
    check_finite,
    check_int,
    check_operator,
    make_generator,
    random_probes,
)
from nncurv.operators.base import LinearOperator

__all__ = ["resolve_subset", "standard_errors", "takeuchi_criterion"]


# ---------------------------------------------------------------------- standard errors
def _labels(op: LinearOperator, indices: Tensor) -> tuple[str, ...]:
    names = getattr(op, "param_names", None)
    shapes = getattr(getattr(op, "problem", None), "shapes", None)
    if names is None or shapes is None:
        return tuple(f"[{i}]" for i in indices.tolist())
    starts, offset = [], 0
    for n in names:
        starts.append((offset, n))
        offset += shapes[n].numel()
    out = []
    for i in indices.tolist():
        start, name = max((s for s in starts if s[0] <= i), key=lambda s: s[0])
        shape = tuple(shapes[name])
        j = i - start
        if not shape:
            out.append(name)
            continue
        idx = []
        for d in reversed(shape):
            idx.append(j % d)
            j //= d
        out.append(f"{name}[{', '.join(str(x) for x in reversed(idx))}]")
    return tuple(out)


def resolve_subset(op: LinearOperator, subset: str | Sequence[str] | Tensor | None) -> Tensor:
    """Flat indices of the parameters named by ``subset`` (glob patterns or names)."""
    n = op.shape[0]
    if subset is None:
        return torch.arange(n, device=op.device)
    if isinstance(subset, Tensor):
        idx = subset.to(device=op.device, dtype=torch.long).reshape(-1)
        if idx.numel() == 0 or bool((idx < 0).any()) or bool((idx >= n).any()):
            raise ValueError(f"subset indices must be in [0, {n}), got {subset!r}")
        return idx
    names = getattr(op, "param_names", None)
    shapes = getattr(getattr(op, "problem", None), "shapes", None)
    if names is None or shapes is None:
        raise TypeError("subset by name needs a parameter-space operator; pass flat indices")
    patterns = [subset] if isinstance(subset, str) else list(subset)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"subset must be a name pattern or a list of them, got {subset!r}")
    chosen, offset, parts = set(), 0, []
    for pat in patterns:
        hits = [
            nm
            for nm in names
            if fnmatch.fnmatchcase(nm, pat) or fnmatch.fnmatchcase(nm, pat + ".*")
        ]
        if not hits:
            raise ValueError(f"subset {pat!r} matches no parameter; available: {names[:12]}")
        chosen.update(hits)
    for nm in names:
        size = shapes[nm].numel()
        if nm in chosen:
            parts.append(torch.arange(offset, offset + size, device=op.device))
        offset += size
    return torch.cat(parts)


def standard_errors(
    op: LinearOperator,
    *,
    subset: str | Sequence[str] | Tensor | None = None,
    method: Literal["auto", "dense", "cg"] = "auto",
    damping: float = 0.0,
    max_dense: int = 4096,
    tol: float = 1e-10,
    max_iter: int | None = None,
    block_size: int = 32,
    seed: int = 0,
) -> StandardErrors:
    r"""Standard errors :math:`\sqrt{[(I + \delta\,\mathrm{Id})^{-1}]_{jj}}` (asymptotic, Wald).

    ``"dense"`` forms :math:`I` (``n`` products) and inverts it through its eigendecomposition,
    up to ``max_dense`` parameters. ``"cg"`` solves :math:`(I+\delta)x = e_j` by conjugate
    gradients for each chosen entry ``j`` (``subset``), with the *full* operator: the result is
    the marginal standard error, not the one with the other parameters held fixed (for that,
    build the information with ``params=`` instead). ``"auto"`` is dense up to ``max_dense``.

    Args:
        op: The information (symmetric positive definite).
        subset: Entries to report: a name or glob (``"fc.*"``), a list of them, or flat indices;
            ``None`` for all.
        method: ``"auto"``, ``"dense"`` or ``"cg"``.
        damping: :math:`\delta \ge 0` (a prior precision; Laplace posterior standard deviations).
        max_dense: Largest dimension for the dense route.
        tol: CG relative residual tolerance.
        max_iter: CG iteration cap.
        block_size: Right-hand sides solved together.
        seed: Seed of the Lanczos run that names the smallest eigenvalue after a CG breakdown.

    Raises:
        ValueError: The information is singular or indefinite (the message names the smallest
            eigenvalue), the dense route is too large, or ``subset`` matches nothing.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([4.0, 25.0], dtype=torch.float64)))
        >>> standard_errors(op).values.tolist()
        [0.5, 0.2]
    """
    t0 = time.perf_counter()
    check_operator(op, symmetric=True)
    check_method(method, ("auto", "dense", "cg"))
    if not (damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    check_int(block_size, "block_size", minimum=1)
    idx = resolve_subset(op, subset)
    n = op.shape[0]
    if method == "auto":
        check_int(max_dense, "max_dense", minimum=1)
        method = "dense" if n <= max_dense else "cg"
    names = _labels(op, idx)
    if method == "dense":
        check_dense_size(op, max_dense, "standard errors")
        lam, U = dense_eigh(op)
        lam = lam + damping
        if float(lam[0]) <= dense_tol(lam):
            raise not_pd(float(lam[0]), float(lam[-1]), "standard errors need", damping)
        Ui = U[idx]
        var = (Ui**2 / lam).sum(1)
        return StandardErrors(
            values=var.sqrt(),
            indices=idx,
            names=names,
            method="dense",
            damping=damping,
            smallest_eigenvalue=float(lam[0]),
            residuals=torch.zeros_like(var),
            converged=True,
            num_matvecs=n,
            wall_time=time.perf_counter() - t0,
        )
    var_parts, res_parts, nmv, conv = [], [], 0, True
    for start in range(0, idx.numel(), block_size):
        cols = idx[start : start + block_size]
        E = torch.zeros(n, cols.numel(), dtype=op.dtype, device=op.device)
        E[cols, torch.arange(cols.numel(), device=op.device)] = 1.0
        try:
            r = conjugate_gradients(op, E, shift=damping, tol=tol, max_iter=max_iter)
        except NotPositiveDefiniteError as err:
            raise cg_breakdown(op, err, "standard errors need", damping, seed) from err
        nmv += r.num_matvecs
        conv = conv and r.converged
        var_parts.append(r.solution[cols, torch.arange(cols.numel(), device=op.device)])
        res_parts.append(r.residuals)
    var = torch.cat(var_parts)
    if bool((var <= 0).any()):
        bad = NotPositiveDefiniteError("a diagonal entry of the inverse is not positive")
        raise cg_breakdown(op, bad, "standard errors need", damping, seed)
    return StandardErrors(
        values=var.sqrt(),
        indices=idx,
        names=names,
        method="cg",
        damping=damping,
        smallest_eigenvalue=None,
        residuals=torch.cat(res_parts),
        converged=conv,
        num_matvecs=nmv,
        wall_time=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------- TIC
def takeuchi_criterion(
    op: LinearOperator,
    covariance: LinearOperator,
    *,
    method: Literal["auto", "dense", "cg"] = "auto",
    damping: float = 0.0,
    num_probes: int = 20,
    max_dense: int = 4096,
    tol: float = 1e-8,
    max_iter: int | None = None,
    seed: int = 0,
) -> TICResult:
    r"""Takeuchi's penalty :math:`\operatorname{tr}((I+\delta)^{-1} C)` for a gradient scatter C.

    See :class:`TICResult` for the scaling of :math:`C`.

    Dense (``n`` products of each, eigendecomposition) up to ``max_dense``; otherwise Hutchinson
    with Rademacher probes, :math:`\frac1m\sum_k x_k^\top C v_k` with :math:`x_k` the CG solution
    of :math:`(I+\delta)x_k = v_k` (unbiased up to the CG tolerance).

    References:
        Takeuchi, "Distribution of information statistics and validity criteria of models",
        Mathematical Sciences 153, 1976; Thomas, Pedregosa, van Merriënboer, Manzagol, Bengio &
        Le Roux, "On the interplay between noise and curvature and its effect on optimization
        and generalization", AISTATS 2020.
    """
    t0 = time.perf_counter()
    check_operator(op, symmetric=True)
    check_operator(covariance, symmetric=True)
    if covariance.shape != op.shape:
        raise ValueError(f"covariance has shape {covariance.shape}, information {op.shape}")
    check_method(method, ("auto", "dense", "cg"))
    if not (damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    check_int(num_probes, "num_probes", minimum=1)
    n = op.shape[0]
    if method == "auto":
        check_int(max_dense, "max_dense", minimum=1)
        method = "dense" if n <= max_dense else "cg"
    if method == "dense":
        check_dense_size(op, max_dense, "TIC")
        lam, U = dense_eigh(op)
        lam = lam + damping
        if float(lam[0]) <= dense_tol(lam):
            raise not_pd(float(lam[0]), float(lam[-1]), "TIC needs", damping)
        C = dense_matrix(covariance)
        value = float(((U.T @ C @ U).diagonal() / lam).sum())
        return TICResult(value, 0.0, n, damping, "dense", n, time.perf_counter() - t0, True)
    gen = make_generator(op, None, seed)
    V = random_probes(op, num_probes, "rademacher", gen)
    try:
        r = conjugate_gradients(op, V, shift=damping, tol=tol, max_iter=max_iter)
    except NotPositiveDefiniteError as err:
        raise cg_breakdown(op, err, "TIC needs", damping, seed) from err
    samples = (r.solution * covariance.matmat(V)).sum(0)
    check_finite(samples, "the TIC probes")
    se = float(samples.std() / math.sqrt(num_probes)) if num_probes > 1 else math.inf
    return TICResult(
        float(samples.mean()),
        se,
        n,
        damping,
        "cg",
        r.num_matvecs,
        time.perf_counter() - t0,
        r.converged,
    )
