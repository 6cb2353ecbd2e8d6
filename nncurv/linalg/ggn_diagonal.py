r"""Diagonal of the GGN for cross-entropy and mean-squared-error losses, exact or Monte Carlo.

For a loss :math:`\sum_n c_b\,\ell(f_n, y_n)` (``c_b`` folds the batch weight and the loss's
own reduction) the GGN is :math:`G = \sum_n J_n^\top H_n J_n` with :math:`H_n = c_b
\nabla_f^2 \ell`. With a factor :math:`H_n = S_n S_n^\top`,

.. math::
    \operatorname{diag}(G) = \sum_n \sum_{c} \big(J_n^\top S_n e_c\big)^{\odot 2}.

* ``"exact"``: all :math:`C` columns of :math:`S_n` (about :math:`C` backward passes per sample,
  vectorised): :math:`S_n = \sqrt{c_b}\,(\operatorname{diag}(\sqrt{p}) - p\sqrt{p}^\top)` for
  softmax cross-entropy (:math:`SS^\top = \operatorname{diag}(p) - pp^\top`), and
  :math:`\sqrt{2 c_b}\, I` for MSE.
* ``"mc"``: one sampled column per sample and draw, :math:`s_n = \sqrt{c_b}(p_n - e_{\hat y})`
  with :math:`\hat y \sim \operatorname{softmax}(f_n)` (CE) or :math:`\sqrt{2c_b}\,z`,
  :math:`z\sim\mathcal N(0, I)` (MSE); :math:`E[s s^\top] = H_n` and squares are taken per
  sample, so it is unbiased (BackPACK's ``DiagGGNMC``, Dangel, Kunstner & Hennig 2020).
* ``"gnb"``: Sophia's Gauss–Newton–Bartlett estimator (Liu et al. 2024) for cross-entropy: one
  backward pass of the batch loss on sampled labels, :math:`B\,\hat g \odot \hat g` for a mean
  loss; unbiased by Bartlett's identity, but with cross-sample noise.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_map

from nncurv.linalg._checks import check_finite, check_int
from nncurv.linalg._results import DiagonalResult
from nncurv.problem import Batch, CurvatureProblem

__all__ = ["GGNDiagonalMethod", "ggn_diagonal"]

GGNDiagonalMethod = Literal["exact", "mc", "gnb"]


def _loss_kind(problem: CurvatureProblem) -> tuple[str, str]:
    fn = problem.loss_fn
    if isinstance(fn, nn.CrossEntropyLoss):
        if fn.weight is not None:
            raise ValueError("ggn_diagonal does not support CrossEntropyLoss with class weights")
        return "ce", fn.reduction
    if fn is F.cross_entropy:
        return "ce", problem.reduction
    if isinstance(fn, nn.MSELoss):
        return "mse", fn.reduction
    if fn is F.mse_loss:
        return "mse", problem.reduction
    raise ValueError(
        f"ggn_diagonal supports nn.CrossEntropyLoss and nn.MSELoss (or F.cross_entropy / "
        f"F.mse_loss), got {fn!r}; use diagonal(GGNOperator(problem)) for other losses"
    )


def _scale(kind: str, reduction: str, batch: Batch, out: Tensor) -> float:
    """``c_b``: batch weight times the loss's own normalisation."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"the loss must reduce with 'mean' or 'sum', got {reduction!r}")
    if reduction == "sum":
        return batch.weight
    per_sample = out[0].numel() if kind == "mse" else 1
    return batch.weight / (out.shape[0] * per_sample)


def ggn_diagonal(
    problem: CurvatureProblem,
    *,
    method: GGNDiagonalMethod = "exact",
    mc_samples: int = 1,
    sample_chunk: int = 32,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> DiagonalResult:
    r"""Diagonal of the GGN of a cross-entropy or MSE problem (see the module docstring).

    Args:
        problem: A :class:`~nncurv.problem.CurvatureProblem` whose ``loss_fn`` is
            ``nn.CrossEntropyLoss`` (logits of shape ``(B, C)``) or ``nn.MSELoss``; samples must
            be independent (``batchnorm="eval"``, ``dropout="off"``) and inputs batched along
            dimension 0.
        method: ``"exact"``, ``"mc"`` (per-sample Monte Carlo) or ``"gnb"`` (Sophia's
            Gauss–Newton–Bartlett, cross-entropy only).
        mc_samples: Draws per sample (``"mc"``/``"gnb"``); standard errors need at least 2.
        sample_chunk: Samples per vectorised chunk (memory ``sample_chunk · C · n`` for exact).
        generator: ``torch.Generator`` on the problem's device for the sampled labels.
        seed: Seed when ``generator`` is ``None``.

    Returns:
        A :class:`~nncurv.linalg.DiagonalResult` with the flat estimate, ``estimate_dict`` (same
        shapes as the parameters) and per-entry standard errors (zeros for ``"exact"``, the
        spread over draws for the Monte-Carlo methods, ``inf`` with one draw).
        ``num_matvecs`` counts backward passes (per-sample VJPs for ``"exact"``/``"mc"``).

    References:
        Dangel, Kunstner & Hennig, "BackPACK: packing more into backprop", ICLR 2020; Liu, Li,
        Hall, Liang & Ma, "Sophia: a scalable stochastic second-order optimizer", ICLR 2024;
        Martens, "New insights and perspectives on the natural gradient method", JMLR 2020.

    Example:
        For a linear model with MSE, :math:`\operatorname{diag}(G) = 2\sum_n x_n^{\odot 2}/N`.

        >>> import torch
        >>> from nncurv import CurvatureProblem
        >>> X, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> d = ggn_diagonal(CurvatureProblem(model, torch.nn.MSELoss(), (X, y)))
        >>> torch.allclose(d.estimate, 2 * (X**2).mean(0))
        True
    """
    t0 = time.perf_counter()
    if not isinstance(problem, CurvatureProblem):
        raise TypeError(f"problem must be a CurvatureProblem, got {type(problem).__name__}")
    if method not in ("exact", "mc", "gnb"):
        raise ValueError(f"method must be 'exact', 'mc' or 'gnb', got {method!r}")
    check_int(mc_samples, "mc_samples", minimum=1)
    check_int(sample_chunk, "sample_chunk", minimum=1)
    kind, reduction = _loss_kind(problem)
    if method == "gnb" and kind != "ce":
        raise ValueError("method='gnb' is defined for cross-entropy; use 'mc' for MSE")
    if problem.dropout == "on":
        raise ValueError("ggn_diagonal needs dropout='off': per-sample masks would differ")
    if problem.batchnorm == "batch":
        raise ValueError("ggn_diagonal needs batchnorm='eval': batch statistics couple samples")
    if generator is None:
        generator = torch.Generator(device=problem.device)
        generator.manual_seed(seed)
    draws = 1 if method == "exact" else mc_samples
    total = torch.zeros(draws, problem.num_params, dtype=problem.dtype, device=problem.device)
    passes = 0
    params = problem.params
    with problem.evaluating():
        for batch in problem.batches():
            with torch.no_grad():
                out = problem.output(params, batch)
            if kind == "ce" and out.ndim != 2:
                raise ValueError(f"cross-entropy logits must have shape (B, C), got {out.shape}")
            if kind == "ce":
                _check_targets(problem, batch)
            c_b = _scale(kind, reduction, batch, out)
            if method == "gnb":
                for d in range(draws):
                    total[d] += _gnb(problem, batch, out, c_b, generator)
                    passes += 1
                continue
            for lo in range(0, batch.size, sample_chunk):
                hi = min(lo + sample_chunk, batch.size)
                xs = _slice(batch.inputs, lo, hi)
                o = out[lo:hi]
                if method == "exact":
                    total[0] += _exact_chunk(problem, batch, xs, o, kind, c_b)
                    passes += (hi - lo) * o[0].numel()
                else:
                    for d in range(draws):
                        total[d] += _mc_chunk(problem, batch, xs, o, kind, c_b, generator)
                        passes += hi - lo
    total = problem.all_reduce(total)
    est = total.mean(0)
    check_finite(est, f"the {method} GGN diagonal")
    if method == "exact":
        se = torch.zeros_like(est)
    elif draws < 2:
        se = torch.full_like(est, float("inf"))
    else:
        se = total.std(0) / draws**0.5
    return DiagonalResult(
        estimate=est,
        standard_error=se,
        num_matvecs=passes,
        wall_time=time.perf_counter() - t0,
        method=f"ggn-{method}",
        converged=True,
        estimate_dict=problem.unflatten(est),
    )


def _slice(inputs: Any, lo: int, hi: int) -> Any:
    return tree_map(lambda t: t[lo:hi] if isinstance(t, Tensor) else t, inputs)


def _check_targets(problem: CurvatureProblem, batch: Batch) -> None:
    ignore = getattr(problem.loss_fn, "ignore_index", -100)
    y = batch.targets
    if isinstance(y, Tensor) and not y.is_floating_point() and bool((y == ignore).any()):
        raise ValueError(
            f"targets contain ignore_index={ignore}; ggn_diagonal does not support ignored samples"
        )


def _per_sample_vjp(
    problem: CurvatureProblem, batch: Batch, xs: Any, U: Tensor
) -> dict[str, Tensor]:
    """For each sample ``n`` of the chunk and each row ``k`` of ``U[n]``: ``J_n^T U[n, k]``.

    ``U`` has shape ``(b, K, *out_shape)``; the result maps names to ``(b, K, *param_shape)``.
    """
    params = problem.params

    def one(x: Any, u: Tensor) -> dict[str, Tensor]:
        xb = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)
        single = Batch(xb, None, 1, 1.0, batch.index)

        def f(p: dict[str, Tensor]) -> Tensor:
            return problem.output(p, single)[0]

        pull = vjp(f, params)[1]
        return vmap(lambda w: pull(w)[0])(u)

    return vmap(one)(xs, U)


def _sum_squares(problem: CurvatureProblem, g: dict[str, Tensor]) -> Tensor:
    return torch.cat([(g[n] ** 2).sum(dim=(0, 1)).reshape(-1) for n in problem.param_names])


def _exact_chunk(
    problem: CurvatureProblem, batch: Batch, xs: Any, o: Tensor, kind: str, c_b: float
) -> Tensor:
    b = o.shape[0]
    if kind == "ce":
        p = torch.softmax(o, dim=1)
        sp = p.sqrt()
        # rows of S_n^T: S_n = diag(sqrt p) - p sqrt(p)^T, column c is sqrt(p_c) (e_c - p)
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        U = sp[:, :, None] * (eye[None] - p[:, None, :])  # (b, C, C): U[n, c] = S_n e_c
        U = U * c_b**0.5
    else:
        D = o[0].numel()
        eye = torch.eye(D, dtype=o.dtype, device=o.device).reshape(D, *o.shape[1:])
        U = (2 * c_b) ** 0.5 * eye.unsqueeze(0).expand(b, *eye.shape)
    return _sum_squares(problem, _per_sample_vjp(problem, batch, xs, U))


def _mc_chunk(
    problem: CurvatureProblem,
    batch: Batch,
    xs: Any,
    o: Tensor,
    kind: str,
    c_b: float,
    gen: torch.Generator,
) -> Tensor:
    if kind == "ce":
        p = torch.softmax(o, dim=1)
        yhat = torch.multinomial(p, 1, generator=gen)[:, 0]
        U = c_b**0.5 * (p - F.one_hot(yhat, p.shape[1]).to(p.dtype))
    else:
        z = torch.randn(o.shape, generator=gen, dtype=o.dtype, device=o.device)
        U = (2 * c_b) ** 0.5 * z
    return _sum_squares(problem, _per_sample_vjp(problem, batch, xs, U.unsqueeze(1)))


def _gnb(
    problem: CurvatureProblem, batch: Batch, out: Tensor, c_b: float, gen: torch.Generator
) -> Tensor:
    """Sophia-G: ``ĝ = ∇ Σ_n c_b ℓ(f_n, ŷ_n)``; ``E[ĝ²/c_b] = diag(G_b)``."""
    p = torch.softmax(out, dim=1)
    yhat = torch.multinomial(p, 1, generator=gen)[:, 0]
    leaves = {n: t.detach().requires_grad_(True) for n, t in problem.params.items()}
    logits = problem.output(leaves, batch)
    loss = c_b * F.cross_entropy(logits, yhat, reduction="sum")
    gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    g = problem.flatten(dict(zip(leaves, gs)))
    return g * g / c_b
