r"""Extreme eigenvalues of symmetric operators: Lanczos, block Lanczos and power iteration.

``eigenvalues(op, k, which=...)`` returns the ``k`` eigenpairs of a symmetric operator at one
or both ends of its spectrum, using only products with ``op``.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from torch import Tensor

from nncurv.linalg._checks import (
    check_finite,
    check_int,
    check_operator,
    make_generator,
    random_probes,
)
from nncurv.linalg._krylov_schur import krylov_schur
from nncurv.linalg._results import EigenResult, _unflatten_or_none
from nncurv.operators.base import LinearOperator

__all__ = ["Which", "EigenMethod", "eigenvalues"]

Which = Literal["LA", "SA", "LM", "BE"]
EigenMethod = Literal["lanczos", "block", "power"]

_WHICH = ("LA", "SA", "LM", "BE")
_METHODS = ("lanczos", "block", "power")


def _default_tol(dtype: torch.dtype) -> float:
    return max(1e-8, torch.finfo(dtype).eps ** 0.5)


def eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    which: Which = "LA",
    method: EigenMethod = "lanczos",
    tol: float | None = None,
    max_matvecs: int | None = None,
    ncv: int | None = None,
    block_size: int | None = None,
    v0: Tensor | None = None,
    return_eigenvectors: bool = False,
    return_basis: bool = False,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> EigenResult:
    r"""Compute ``k`` eigenvalues of a symmetric operator at one or both ends of its spectrum.

    With :math:`A = U \Lambda U^\top`, the pairs :math:`(\lambda_i, u_i)` selected by ``which``
    are returned: largest algebraic (``"LA"``, the sharpness), smallest algebraic (``"SA"``,
    the most negative curvature, to see saddles), largest magnitude (``"LM"``, what power
    iteration finds) or both ends (``"BE"``: :math:`\lceil k/2\rceil` from the top and
    :math:`\lfloor k/2\rfloor` from the bottom).

    The methods are:

    * ``"lanczos"`` (default): Lanczos with full reorthogonalisation and thick restarts
      (Krylov–Schur; Wu & Simon 2000, Stewart 2001). A pair is accepted when
      :math:`\lVert A v - \theta v\rVert \le \mathrm{tol}\,|\theta|` (plus a rounding-level
      floor for :math:`\theta \approx 0`), so the eigenvalue error is about
      :math:`\mathrm{tol}^2 |\theta|^2/\mathrm{gap}`. Iterations scale with
      :math:`1/\sqrt{\mathrm{gap}}` (Kaniel–Paige–Saad).
    * ``"block"``: the same with a block of ``block_size`` vectors per step, computed with one
      ``matmat`` (bigger batched products; more products in total than ``"lanczos"``). Like
      every single-vector Krylov method (ARPACK included), ``"lanczos"`` sees one copy of an
      eigenvalue of exact multiplicity > 1 (e.g. the zero eigenvalues of a rank-deficient
      GGN); ``"block"`` resolves multiplicities up to ``block_size``.
    * ``"power"``: power iteration with deflation (Gram–Schmidt against the pairs found) and
      PyHessian's rule: stop when the Rayleigh quotient changes by less than ``tol``
      relative. Kept for comparison; it converges like :math:`|\lambda_2/\lambda_1|^{2t}`.
      ``"LA"``/``"SA"`` are obtained by shifting with the largest magnitude
      (``A + |\lambda_{LM}| I``). ``"BE"`` is not supported.

    Args:
        op: A symmetric :class:`~nncurv.operators.base.LinearOperator` of dimension ``n``.
        k: Number of eigenpairs, ``1 <= k <= n``.
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"``.
        method: ``"lanczos"``, ``"block"`` or ``"power"``.
        tol: Relative residual tolerance (``"power"``: relative change of the Rayleigh
            quotient). Default :math:`\max(10^{-8}, \sqrt{\varepsilon})` for the operator's dtype
            (``3.5e-4`` in float32, ``1.5e-8`` in float64).
        max_matvecs: Budget of products; on exhaustion the result has ``converged=False``.
            Default ``max(300, 30 * ncv)``.
        ncv: Basis size before a thick restart. Default ``max(2k + 1, 20)`` (``"block"``:
            ``max(2k + 2b, 6b, 40)``), at most ``n``. In block mode an ``ncv`` between
            ``n - b`` and ``n`` lets the block shrink near the end of the space, and it stays
            narrow after a restart: still correct, but more products.
        block_size: Block size ``b`` for ``"block"`` (default ``k``, or the number of warm-start
            vectors if larger).
        v0: Warm start: a ``(n,)`` vector or ``(n, p)`` matrix, e.g. the eigenvectors of the
            previous training step. Lanczos starts from the sum of the normalised columns (its
            Krylov space then contains all of them), block Lanczos from their span, power
            iteration from column ``i`` for the ``i``-th pair. To track ``k > 1`` pairs whose
            eigenvalues are clustered, prefer ``method="block"`` with ``v0``: its first step is
            a Rayleigh–Ritz step on the previous vectors (``k`` products when they are still
            accurate to ``tol``), while a single Krylov sequence resolves a cluster slowly.
        return_eigenvectors: Also return the ``(n, k)`` eigenvectors (and, for parameter-space
            operators with ``unflatten``, one parameter dict per eigenvector).
        return_basis: Also return the final Krylov basis and :math:`V^\top A V` (Lanczos
            methods), e.g. to deflate a trace estimate at no further product.
        generator: ``torch.Generator`` on the operator's device for the random start.
        seed: Seed of the generator created when ``generator`` is ``None``.

    Returns:
        An :class:`~nncurv.linalg.EigenResult` with eigenvalues, residual norms, ``converged``,
        ``num_matvecs`` and ``wall_time``.

    Raises:
        TypeError: ``op`` is not an operator, or ``k`` is not an int.
        ValueError: ``k`` outside ``[1, n]``, unknown ``which``/``method``, a non-symmetric
            operator (by its flag, or detected from the projections), a bad ``v0``.
        NonFiniteError: The operator returned NaN or Inf (a ``ValueError``).

    References:
        Lanczos 1950; Paige 1976; Wu & Simon, "Thick-restart Lanczos method for large symmetric
        eigenvalue problems", SIMAX 22(2), 2000; Stewart, "A Krylov–Schur algorithm for large
        eigenproblems", SIMAX 23(3), 2001; Yao et al., "PyHessian", 2020 (power iteration).

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64) - 10)  # -9 ... 90
        >>> top = eigenvalues(MatrixOperator(A), k=2)
        >>> [round(x, 8) for x in top.eigenvalues.tolist()], top.converged
        ([90.0, 89.0], True)
        >>> round(eigenvalues(MatrixOperator(A), which="SA").eigenvalues.item(), 8)
        -9.0
    """
    t0 = time.perf_counter()
    check_operator(op, symmetric=True)
    n = op.shape[0]
    check_int(k, "k", minimum=1)
    if k > n:
        raise ValueError(f"k must be at most the dimension n={n}, got k={k!r}")
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "power" and which == "BE":
        raise ValueError("method='power' does not support which='BE'; use method='lanczos'")
    if tol is None:
        tol = _default_tol(op.dtype)
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise ValueError(f"tol must be a positive float, got {tol!r}")
    warm = _check_v0(op, v0)
    b = 1
    if method == "block":
        b = (
            block_size
            if block_size is not None
            else max(k, warm.shape[1] if warm is not None else 1)
        )
        check_int(b, "block_size", minimum=1)
        b = min(b, n)
    if ncv is None:
        ncv = max(2 * k + 1, 20) if method != "block" else max(2 * k + 2 * b, 6 * b, 40)
    check_int(ncv, "ncv", minimum=1)
    ncv = min(ncv, n)
    if ncv < min(k + b, n):
        raise ValueError(f"ncv must be at least k + block_size = {k + b}, got {ncv!r}")
    if max_matvecs is None:
        max_matvecs = max(300, 30 * ncv)
    check_int(max_matvecs, "max_matvecs", minimum=max(b, k))  # a pair per product at most
    gen = make_generator(op, generator, seed)

    vecs: Tensor | None
    basis: Tensor | None = None
    projection: Tensor | None = None
    if method == "power":
        vals, vecs, res, conv, nmv = _power(op, k, which, float(tol), max_matvecs, warm, gen)
    else:
        start = _start_block(op, warm, b, gen)
        out = krylov_schur(
            op,
            start,
            k,
            which,
            tol=float(tol),
            max_matvecs=max_matvecs,
            ncv=ncv,
            generator=gen,
            return_vectors=return_eigenvectors,
            return_basis=return_basis,
        )
        basis, projection = out.basis, out.projection
        vals, vecs, res, conv, nmv = (
            out.theta,
            out.vectors,
            out.residuals,
            out.converged,
            out.num_matvecs,
        )
    if not return_eigenvectors:
        vecs = None
    dicts: list[dict[str, Tensor]] | None = None
    if vecs is not None and hasattr(op, "unflatten"):
        found = [_unflatten_or_none(op, vecs[:, i]) for i in range(vecs.shape[1])]
        dicts = [d for d in found if d is not None]
    return EigenResult(
        eigenvalues=vals,
        eigenvectors=vecs,
        residuals=res,
        converged=bool(conv),
        num_matvecs=nmv,
        wall_time=time.perf_counter() - t0,
        method=method,
        which=which,
        eigenvector_dicts=dicts,
        krylov_basis=basis,
        krylov_projection=projection,
    )


def _check_v0(op: LinearOperator, v0: Tensor | None) -> Tensor | None:
    if v0 is None:
        return None
    if not isinstance(v0, Tensor):
        raise TypeError(f"v0 must be a torch.Tensor, got {type(v0).__name__}")
    V = v0.unsqueeze(1) if v0.ndim == 1 else v0
    n = op.shape[0]
    if V.ndim != 2 or V.shape[0] != n or V.shape[1] == 0:
        raise ValueError(f"v0 must have shape ({n},) or ({n}, p), got {tuple(v0.shape)}")
    V = V.detach().to(dtype=op.dtype, device=op.device)
    # one synchronisation for the usual case: finite, non-zero norms
    norms = torch.linalg.vector_norm(V, dim=0)
    if not all(math.isfinite(x) and x > 0 for x in norms.tolist()):
        bad = (~torch.isfinite(V)).any(dim=0).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"v0 must be finite; column(s) {bad} contain NaN or Inf")
        # finite, but the squares overflow or underflow: rescale each column by its largest
        # entry first (a zero column stays zero)
        V = V / V.abs().amax(dim=0).clamp_min(torch.finfo(V.dtype).tiny)
        norms = torch.linalg.vector_norm(V, dim=0)
        if not all(norms.tolist()):
            raise ValueError("v0 has a zero column")
    return V / norms


def _start_block(op: LinearOperator, warm: Tensor | None, b: int, gen: torch.Generator) -> Tensor:
    if warm is None:
        return random_probes(op, b, "gaussian", gen)
    if b == 1:
        if warm.shape[1] == 1:  # (normalised by _check_v0)
            return warm
        s = warm.sum(dim=1, keepdim=True)
        if float(s.norm()) <= 1e-3 * warm.shape[1] ** 0.5:  # columns cancel: fall back
            s = s + random_probes(op, 1, "gaussian", gen) * 1e-2
        return s
    cols = warm[:, :b]
    if cols.shape[1] < b:
        cols = torch.cat([cols, random_probes(op, b - cols.shape[1], "gaussian", gen)], dim=1)
    return cols


def _power(
    op: LinearOperator,
    k: int,
    which: str,
    tol: float,
    max_matvecs: int,
    warm: Tensor | None,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor, bool, int]:
    """Deflated power iteration with the relative-change rule; returns values in A's scale."""
    nmv = 0
    shift, sign = 0.0, 1.0
    vals: list[float] = []
    vecs: list[Tensor] = []
    res: list[float] = []
    conv = True
    if which in ("LA", "SA"):
        lam, vec, r, c, used = _power_one(op, 0.0, 1.0, [], tol, max_matvecs, warm, 0, gen)
        nmv += used
        if (which == "LA" and lam >= 0) or (which == "SA" and lam <= 0):
            vals, vecs, res, conv = [lam], [vec], [r], c
            if k == 1:
                return _stack(op, vals, vecs, res, conv, nmv)
        sign = 1.0 if which == "LA" else -1.0
        shift = abs(lam)
        if not vals:
            conv = True
    while len(vals) < k:
        budget = max_matvecs - nmv
        if budget < 1:
            conv = False
            break
        mu, vec, r, c, used = _power_one(op, shift, sign, vecs, tol, budget, warm, len(vals), gen)
        nmv += used
        vals.append(sign * (mu - shift))
        vecs.append(vec)
        res.append(r)
        conv = conv and c
    return _stack(op, vals, vecs, res, conv, nmv)


def _stack(
    op: LinearOperator,
    vals: list[float],
    vecs: list[Tensor],
    res: list[float],
    conv: bool,
    nmv: int,
) -> tuple[Tensor, Tensor, Tensor, bool, int]:
    v = torch.tensor(vals, dtype=op.dtype, device=op.device)
    r = torch.tensor(res, dtype=op.dtype, device=op.device)
    return v, torch.stack(vecs, 1), r, conv, nmv


def _power_one(
    op: LinearOperator,
    shift: float,
    sign: float,
    found: list[Tensor],
    tol: float,
    budget: int,
    warm: Tensor | None,
    index: int,
    gen: torch.Generator,
) -> tuple[float, Tensor, float, bool, int]:
    """One eigenpair of ``B = sign*A + shift*I`` by power iteration orthogonal to ``found``."""
    if warm is not None and index < warm.shape[1]:
        v = warm[:, index].clone()
    else:
        v = random_probes(op, 1, "rademacher", gen)[:, 0]
    F = torch.stack(found, 1) if found else None

    def orth(x: Tensor) -> Tensor:
        if F is not None:
            x = x - F @ (F.T @ x)
        return x / x.norm()

    v = orth(v)
    mu_prev: float | None = None
    mu, r, used = 0.0, float("inf"), 0
    while used < budget:
        w = sign * op.matvec(v) + shift * v
        used += 1
        mu = float(v @ w)
        if mu != mu or abs(mu) == float("inf"):
            check_finite(w, "a power-iteration product")
        r = float((w - mu * v).norm())
        if mu_prev is not None and abs(mu - mu_prev) / (abs(mu_prev) + 1e-6) < tol:
            return mu, v, r, True, used
        mu_prev = mu
        v = orth(w)
    return mu, v, r, False, used
