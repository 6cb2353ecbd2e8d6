r"""Thick-restart (Krylov–Schur) block Lanczos with full reorthogonalisation.

One routine serves Lanczos (block size 1) and block Lanczos (block size ``b`` using ``matmat``).
It keeps an orthonormal basis :math:`V_m` and the projection :math:`H_m = V_m^\top A V_m` built
column by column from the products it computes, so that

.. math::
    A V_m = V_m H_m + V_{+} C,

where :math:`V_{+}` is the next block and :math:`C` its coupling. The residual of a Ritz pair
:math:`(\theta, V_m s)` is then :math:`\lVert C s\rVert` with no extra product. When the basis is
full, the wanted Ritz vectors plus some extra ones are kept (a thick restart, Wu & Simon 2000;
Stewart's Krylov–Schur 2001) and the recurrence continues from the next block.

The Arnoldi-style projection also gives a free symmetry test: for a symmetric operator
:math:`H_m` is symmetric up to rounding, and a clear asymmetry raises ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.linalg import vector_norm

from nncurv.linalg._checks import NonFiniteError, sym_tolerance
from nncurv.operators.base import LinearOperator

__all__ = ["KrylovOutput", "krylov_schur", "select"]


@dataclass
class KrylovOutput:
    """Internal result of :func:`krylov_schur`."""

    theta: Tensor
    vectors: Tensor | None
    residuals: Tensor
    converged: bool
    num_matvecs: int
    basis: Tensor | None = None  # (n, m) orthonormal Krylov basis V
    projection: Tensor | None = None  # (m, m) V^T A V


def select(theta: list[float], k: int, which: str) -> list[int]:
    """Indices of the ``k`` Ritz values wanted by ``which``, in that rule's order.

    ``theta`` is the host list of Ritz values in ascending order (as ``eigh`` returns them);
    ``"BE"`` takes ``ceil(k/2)`` from the top and ``floor(k/2)`` from the bottom, ascending.
    """
    m = len(theta)
    k = min(k, m)
    if which == "LA":
        return list(range(m - 1, m - 1 - k, -1))
    if which == "SA":
        return list(range(k))
    if which == "LM":
        return sorted(range(m), key=lambda i: -abs(theta[i]))[:k]
    hi, lo = (k + 1) // 2, k // 2
    return list(range(lo)) + list(range(m - hi, m))


def _orthonormalise_block(
    W: Tensor, V: Tensor, gen: torch.Generator, dims_left: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Return ``(Q, R)`` with ``W = Q R``, ``Q`` orthonormal and orthogonal to ``V``'s columns.

    ``W`` must already be orthogonalised against ``V``. Columns that vanish (an invariant
    subspace was found) are replaced by random directions orthogonal to everything, with a zero
    coupling, so the recurrence continues in the rest of the space.
    """
    b = W.shape[1]
    Q = torch.zeros_like(W[:, :dims_left]) if dims_left < b else torch.zeros_like(W)
    width = Q.shape[1]
    R = torch.zeros(width, b, dtype=W.dtype, device=W.device)
    eps = torch.finfo(W.dtype).eps
    for j in range(b):
        w = W[:, j].clone()
        for _ in range(2):
            # against the basis too: a small w is dominated by rounding along V
            w = w - V @ (V.T @ w)
            if j > 0:
                c = Q[:, : min(j, width)].T @ w
                w = w - Q[:, : min(j, width)] @ c
                R[: min(j, width), j] += c
        if j >= width:
            continue
        nrm = w.norm()
        if float(nrm) <= 100 * eps * scale or float(nrm) == 0.0:
            # breakdown: continue with a random direction orthogonal to the basis
            w = torch.randn(W.shape[0], generator=gen, device=W.device, dtype=W.dtype)
            for _ in range(2):
                w = w - V @ (V.T @ w)
                if j > 0:
                    w = w - Q[:, :j] @ (Q[:, :j].T @ w)
            w = w / w.norm()
            R[j, j] = 0.0
        else:
            R[j, j] = nrm
            w = w / nrm
        Q[:, j] = w
    return Q, R


def krylov_schur(
    op: LinearOperator,
    start: Tensor,
    k: int,
    which: str,
    *,
    tol: float,
    max_matvecs: int,
    ncv: int,
    generator: torch.Generator,
    return_vectors: bool,
    return_basis: bool = False,
) -> KrylovOutput:
    """Compute ``k`` eigenpairs of a symmetric ``op`` selected by ``which``.

    Args:
        op: Symmetric operator of dimension ``n``.
        start: ``(n, b)`` start block (``b = 1``: Lanczos), full column rank.
        k: Number of wanted pairs, ``1 <= k <= n``.
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"``.
        tol: Relative residual tolerance: stop when every wanted pair has
            ``||A v - θ v|| <= tol * |θ|`` (plus a rounding-level floor).
        max_matvecs: Budget of products.
        ncv: Maximal basis size before a thick restart (``>= k + b``).
        generator: Source of random directions after a breakdown.
        return_vectors: Whether to form the Ritz vectors.
        return_basis: Whether to return the final basis :math:`V_m` and :math:`H_m`.
    """
    n = op.shape[0]
    b = start.shape[1]
    dev = op.device
    # the basis is stored by rows (Vt = V^T): every basis vector is contiguous, which makes the
    # reorthogonalisation products and the column writes several times faster than a strided
    # (n, ncv) layout; rows are read only after they are written
    Vt = torch.empty(ncv + b, n, dtype=op.dtype, device=dev)
    # the small projected problem lives on the host in float64: its entries arrive with the one
    # synchronisation per step that the convergence test needs anyway, and the tiny eigh runs
    # there (an accelerator would spend a kernel launch and a sync on each of its small ops)
    host = torch.device("cpu")
    f64 = torch.float64
    H = torch.zeros(ncv + b, ncv + b, dtype=f64)
    if b == 1:  # (a QR of one column is its normalisation)
        Vt[0] = start[:, 0] / vector_norm(start[:, 0])
    else:
        Q0, _ = torch.linalg.qr(start)
        Vt[:b] = Q0.T
    m = 0  # processed columns
    bw = b  # width of the pending block Vt[m:m+bw]
    nmv = 0
    eps = torch.finfo(op.dtype).eps
    sym_tol = sym_tolerance(op.dtype)
    theta = torch.zeros(0, dtype=f64)
    S = torch.zeros(0, 0, dtype=f64)
    res_l: list[float] = []
    hmax = 0.0  # largest |entry| of H[:m, :m]
    coupling_max = 0.0  # largest |entry| of the coupling H[m:m+b, :m]
    wanted_l: list[int] = []
    row_l: list[float] | None = None  # Lanczos: the coupling row below the basis, as floats
    converged = False
    while True:
        block = Vt[m : m + bw]
        if bw > 1:
            Wt = op.matmat(block.T).T.contiguous()
        else:
            Wt = op.matvec(block[0]).unsqueeze(0)
        nmv += bw
        # (torch.linalg.vector_norm: Tensor.norm goes through a Python wrapper, ~10 us a call)
        scale_t = vector_norm(Wt) if bw == 1 else vector_norm(Wt, dim=1).max()
        Vc = Vt[: m + bw]
        # classical Gram-Schmidt twice, each pass one product and one fused update
        h = Vc @ Wt.T
        Wt = torch.addmm(Wt, h.T, Vc, alpha=-1)
        h2 = Vc @ Wt.T
        Wt = torch.addmm(Wt, h2.T, Vc, alpha=-1)
        h += h2
        m_old, m = m, m + bw
        dims_left = n - m
        # the next block comes from the bw residual columns of this one: it is never wider
        # (a block that shrank near the end of the space stays narrow after a restart)
        nb = min(bw, dims_left)
        # one synchronisation: the product's scale, the new column of H and, for Lanczos, the
        # norm of the next vector
        nrm = vector_norm(Wt) if b == 1 and nb else None
        parts = [scale_t.reshape(1), h.reshape(-1)] + ([nrm.reshape(1)] if nrm is not None else [])
        vals = torch.cat(parts).to(host)  # (written into the float64 H below)
        vl = vals.tolist()  # the same numbers as Python floats, for the scalar tests below
        scale = vl[0]
        if not math.isfinite(scale):
            raise NonFiniteError(
                f"the operator produced NaN or Inf at product {nmv}; no eigenvalues reported"
            )
        column = vl[1 : 1 + m * bw]
        H[:m, m_old:m] = vals[1 : 1 + m * bw].reshape(m, bw)
        # H[:m, :m] gained this column and the coupling of the previous step: its largest entry
        hmax = max(hmax, coupling_max, max(map(abs, column)))
        # sanity tests on the small projected problem, on the host, before the next block's
        # coupling is written (they read row m_old, the coupling written one step earlier)
        if m_old == 0:
            asym = 0.0
        elif bw == 1:  # the new column above the diagonal against the row written before
            row = row_l if row_l is not None else H[m_old, :m_old].tolist()
            asym = max(abs(a - c) for a, c in zip(column, row))
        else:
            asym = float((H[:m_old, m_old:m] - H[m_old:m, :m_old].T).abs().max())
        if not math.isfinite(hmax):
            raise NonFiniteError(
                f"the operator produced NaN or Inf after {nmv} products; no eigenvalues reported"
            )
        if asym > sym_tol * max(hmax, torch.finfo(op.dtype).tiny):
            raise ValueError(
                f"op is not symmetric: projections differ by {asym:.3e} relative to "
                f"{hmax:.3e} (tolerance {sym_tol:.1e}); eigenvalues() needs a symmetric operator"
            )
        coupling: float | None = None  # Lanczos: the single entry of the next coupling C
        if nb:
            if nrm is not None and vl[-1] > 1e-3 * scale:
                # Lanczos, healthy step: W was orthogonalised twice above ("twice is enough",
                # Giraud et al. 2005), so it only needs normalising
                torch.div(Wt[0], nrm, out=Vt[m])
                H[m, m_old] = coupling = vl[-1]
                coupling_max = abs(coupling)
                row_l = [0.0] * m_old + [coupling]  # row m of H[:, :m], for the next test
            else:  # a block, or a (near) breakdown: the careful path
                Q, Rn = _orthonormalise_block(Wt.T, Vt[:m].T, generator, nb, scale)
                Vt[m : m + nb] = Q.T
                H[m : m + nb, m_old:m] = Rn.to(host, f64)
                coupling_max = float(H[m : m + nb, m_old:m].abs().max())
                row_l = None
        # convergence: the upper triangle holds every computed projection v_i^T A v_j; below
        # it are the couplings (equal to the projections within the symmetry test above) and,
        # in block mode, the lower half of each diagonal block (never read by eigh)
        if m == 1:  # (the first Ritz pair is the start vector's Rayleigh quotient)
            theta, S = H[:1, 0].clone(), torch.ones(1, 1, dtype=f64)
        else:
            theta, S = torch.linalg.eigh(H[:m, :m], UPLO="U")
        theta_l = theta.tolist()
        if nb == 0:
            res_l = [0.0] * m
        elif coupling is not None:
            # C = coupling * e_m^T: the residuals are |coupling * S[m-1, :]|
            res_l = [abs(coupling * x) for x in S[m - 1].tolist()]
        else:
            res_l = vector_norm(H[m : m + nb, :m] @ S, dim=0).tolist()
        wanted_l = select(theta_l, k, which)
        if m >= k or nb == 0:
            floor = 1e3 * eps * max(hmax, abs(theta_l[0]), abs(theta_l[-1]))
            if m >= k and all(res_l[i] <= tol * abs(theta_l[i]) + floor for i in wanted_l):
                converged = True
                break
        if nb == 0:  # the whole space is spanned: Ritz pairs are exact
            converged = True
            break
        if nmv + nb > max_matvecs:
            break
        if m + nb > ncv:  # thick restart: keep the wanted Ritz vectors and some extra
            p = max(k, min(k + (ncv - k) // 2, ncv - b))
            keep = select(theta_l, p, which)
            p = len(keep)
            Sk = S[:, keep]
            new_basis = Sk.T.to(dev, op.dtype) @ Vt[:m]
            nxt = Vt[m : m + nb].clone()
            Vt[:p] = new_basis
            Vt[p : p + nb] = nxt
            Cn = H[m : m + nb, :m] @ Sk
            H.zero_()
            H[:p, :p] = torch.diag(theta[keep])
            H[p : p + nb, :p] = Cn
            hmax = max(abs(theta_l[i]) for i in keep)
            coupling_max = float(Cn.abs().max())
            row_l = Cn[0].tolist() if nb == 1 else None
            m = p
        bw = nb
    wanted = torch.tensor(wanted_l, dtype=torch.long)
    vectors = Vt[:m].T @ S[:, wanted].to(dev, op.dtype) if return_vectors else None
    Hm = H[:m, :m]
    return KrylovOutput(
        theta=theta[wanted].to(dev, op.dtype),
        vectors=vectors,
        residuals=torch.tensor([res_l[i] for i in wanted_l], dtype=op.dtype, device=dev),
        converged=converged,
        num_matvecs=nmv,
        basis=Vt[:m].T if return_basis else None,  # a view: no copy of a large basis
        projection=((Hm + Hm.T) / 2).to(dev, op.dtype) if return_basis else None,
    )
