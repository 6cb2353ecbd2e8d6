r"""Contractive auto-encoder penalties, usable as training-loss terms.

The contractive auto-encoder (CAE; Rifai, Vincent, Muller, Glorot & Bengio, "Contractive
Auto-Encoders: Explicit Invariance During Feature Extraction", ICML 2011) adds to the
reconstruction loss the squared Frobenius norm of the **encoder's** Jacobian,

.. math::
    \mathcal{J}_{\mathrm{CAE}} = \sum_x L(x, g(f(x))) + \lambda \|J_f(x)\|_F^2,
    \qquad \|J_f(x)\|_F^2 = \sum_{ij} \left(\frac{\partial h_j}{\partial x_i}\right)^2,

and CAE+H (Rifai, Mesnil, Vincent, Muller, Bengio, Dauphin & Glorot, "Higher Order Contractive
Auto-Encoder", ECML-PKDD 2011) further penalises
:math:`\mathbb{E}_{\varepsilon \sim N(0, \sigma^2 I)} \|J_f(x) - J_f(x + \varepsilon)\|_F^2`,
a stochastic penalty on the encoder's Hessian.

Penalties are differentiable with respect to the encoder's parameters; a graph is built only when
gradients are enabled and a parameter requires them. The encoder runs with BatchNorm in eval mode
and dropout off; its flags, buffers and the global RNG are left untouched.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from nncurv._jacobian_core import Vectorize, check_input, new_generator, per_sample_jacobian
from nncurv._jacobian_norms import Distribution, ProbeSide, choose_side, draw_probes
from nncurv._state import _DROPOUT_TYPES, is_batchnorm
from nncurv.jacobians import frobenius_from_operator

__all__ = [
    "ContractiveMethod",
    "Reduction",
    "contractive_penalty",
    "higher_order_penalty",
    "sigmoid_closed_form",
    "ContractiveLoss",
    "batch_products_are_per_sample",
]

ContractiveMethod = Literal["auto", "closed_form", "exact", "hutchinson", "hutch++"]
Reduction = Literal["mean", "sum", "none"]

_EXACT_MAX_DIM = 64  # "auto" is exact while min(d_in, d_out) <= this (exact costs that many passes)


def _reduce(value: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return value.mean()
    if reduction == "sum":
        return value.sum()
    return value


def _check_common(reduction: str, num_probes: int) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(num_probes, int) or isinstance(num_probes, bool) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")


def _sigmoid_linear(encoder: nn.Module) -> tuple[nn.Linear | None, str]:
    """Return the Linear layer of a ``Sequential([Flatten,] Linear, Sigmoid)`` and a description."""
    if not isinstance(encoder, nn.Sequential):
        return None, f"{type(encoder).__name__} (not an nn.Sequential)"
    layers = [m for m in encoder if not isinstance(m, (nn.Identity, nn.Flatten))]
    flat = [m for m in encoder if isinstance(m, nn.Flatten)]
    desc = "Sequential(" + ", ".join(type(m).__name__ for m in encoder) + ")"
    ok_flatten = all(f.start_dim == 1 and f.end_dim == -1 for f in flat) and len(flat) <= 1
    if (
        len(layers) == 2
        and isinstance(layers[0], nn.Linear)
        and isinstance(layers[1], nn.Sigmoid)
        and ok_flatten
        and (not flat or encoder[0] is flat[0])
    ):
        return layers[0], desc
    return None, desc


class _SigmoidPenaltySum(torch.autograd.Function):
    r"""``scale * sum_bj (h (1 - h))_bj^2 ||W_j||^2`` with its analytic gradient, few kernels.

    Old-style (``forward(ctx, ...)``) on purpose: new-style ``setup_context`` functions bind
    their arguments with ``inspect.signature`` at every call (~40 us on CPU, more than the plain
    expression costs), and the combined form can save the forward's intermediates. Under
    ``torch.func`` transforms, which need ``setup_context``, :func:`_sigmoid_penalty_sum` uses
    the plain expression instead. Gradients: :math:`\partial / \partial h = 2 c\, s (1 - 2h)
    \|W_j\|^2` and :math:`\partial / \partial W_{ji} = 2 c \sum_b s_{bj}^2 W_{ji}` with
    :math:`s = h(1-h)`; when the backward itself is differentiated (``create_graph=True``) they
    are recomputed from the saved inputs with differentiable operations, so higher derivatives
    are those of the plain expression.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, scale: float) -> Tensor:  # noqa: D102
        s = torch.addcmul(h, h, h, value=-1)
        col = (s * s).sum(0)
        r = (weight * weight).sum(1)
        ctx.save_for_backward(h, weight, s, col, r)
        ctx.scale = scale
        return col.dot(r) * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: D102
        h, weight, s, col, r = ctx.saved_tensors
        c = grad * (2.0 * ctx.scale)
        if torch.is_grad_enabled():  # create_graph: differentiable, from the inputs
            s = h - h * h
            col = (s * s).sum(0)
            r = (weight * weight).sum(1)
            return (s - 2 * s * h) * (r * c), weight * (col * c).unsqueeze(1), None
        gh = torch.addcmul(s, s, h, value=-2).mul_(r * c) if ctx.needs_input_grad[0] else None
        gw = weight * (col * c).unsqueeze(1) if ctx.needs_input_grad[1] else None
        return gh, gw, None


def _sigmoid_penalty_sum(h: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``scale * sum_b ||J_f(x_b)||_F^2`` of a sigmoid encoder from its hidden units ``h``."""
    if torch._C._are_functorch_transforms_active():
        s = h - h * h
        return (s * s).sum(0).dot((weight * weight).sum(1)) * scale
    return _SigmoidPenaltySum.apply(h, weight, scale)  # type: ignore[no-any-return]


# layers whose direct call can differ from the analysis call (mode-dependent or RNG-using)
_NOT_PLAIN: tuple[type[nn.Module], ...] = (
    *_DROPOUT_TYPES,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def _is_plain(encoder: nn.Module) -> bool:
    """Whether ``encoder(x)`` equals its analysis call (eval BatchNorm, dropout off, RNG kept).

    True for trees of standard ``torch.nn`` layers without BatchNorm, dropout, recurrent or
    attention layers: their forward neither depends on the train/eval flag nor draws random
    numbers. Custom modules are never assumed plain.
    """
    return all(
        type(m).__module__.startswith("torch.nn.modules.")
        and not is_batchnorm(m)
        and not isinstance(m, _NOT_PLAIN)
        for m in encoder.modules()
    )


def _closed_form_applies(encoder: nn.Module, x: Tensor) -> bool:
    lin, _ = _sigmoid_linear(encoder)
    if lin is None or not isinstance(x, Tensor):
        return False
    return x.ndim == 2 or isinstance(encoder[0], nn.Flatten)  # type: ignore[index]


def sigmoid_closed_form(encoder: nn.Module, x: Tensor, hidden: Tensor | None = None) -> Tensor:
    r"""Per-sample CAE penalty of a sigmoid encoder in closed form, shape ``(B,)``.

    For :math:`h = \mathrm{sigmoid}(W x + b)`, :math:`\partial h_j / \partial x_i = h_j (1 - h_j)
    W_{ji}`, hence (Rifai et al., ICML 2011, eq. 5)

    .. math::
        \|J_f(x)\|_F^2 = \sum_j \big(h_j (1 - h_j)\big)^2 \sum_i W_{ji}^2 .

    Costs one extra ``Linear`` forward, or nothing but element-wise work when the training step
    passes the ``hidden`` units it already computed; the weights' gradient flows through both
    factors.

    Args:
        encoder: ``nn.Sequential(nn.Linear, nn.Sigmoid)``, optionally led by ``nn.Flatten()``.
        x: Batch of inputs.
        hidden: Optionally ``encoder(x)``, shape ``(B, d_h)``, as computed by the training step
            (with its graph); it must be exactly the encoder's output for ``x``.

    Raises:
        ValueError: If the encoder has any other form (the formula holds for sigmoid only).

    Example:
        >>> import torch
        >>> enc = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Sigmoid())
        >>> with torch.no_grad():
        ...     _ = enc[0].weight.fill_(1.0), enc[0].bias.zero_()
        >>> sigmoid_closed_form(enc, torch.zeros(1, 3))  # (1/4)^2 * 3 per unit, 2 units
        tensor([0.3750], grad_fn=<MvBackward0>)
    """
    x = check_input(x)
    lin, desc = _sigmoid_linear(encoder)
    if lin is None:
        raise ValueError(
            f"method='closed_form' needs an encoder nn.Sequential([nn.Flatten(),] nn.Linear, "
            f"nn.Sigmoid()), got {desc}: the formula sum_j (h_j (1 - h_j))^2 ||W_j||^2 holds for "
            f"sigmoid units only; use method='exact' or 'hutchinson'"
        )
    has_flatten = isinstance(encoder[0], nn.Flatten)  # type: ignore[index]
    if x.ndim != 2 and not has_flatten:
        raise ValueError(
            f"x has shape {tuple(x.shape)}; the closed form needs (B, d) inputs or an encoder "
            "that starts with nn.Flatten()"
        )
    x2 = x.reshape(x.shape[0], -1)
    if x2.shape[1] != lin.in_features:
        raise ValueError(
            f"x has {x2.shape[1]} features per sample but the encoder's Linear expects "
            f"{lin.in_features}"
        )
    if hidden is None:
        h = torch.sigmoid(nn.functional.linear(x2, lin.weight, lin.bias))
    else:
        if not isinstance(hidden, Tensor) or tuple(hidden.shape) != (x.shape[0], lin.out_features):
            raise ValueError(
                f"hidden must be the encoder's output of shape {(x.shape[0], lin.out_features)}, "
                f"got {getattr(hidden, 'shape', type(hidden).__name__)}"
            )
        h = hidden
    row_norms = lin.weight.square().sum(dim=1)  # sum_i W_ji^2: square first, then sum
    return (h * (1 - h)).square() @ row_norms


def contractive_penalty(
    encoder: nn.Module,
    x: Tensor,
    *,
    method: ContractiveMethod = "auto",
    num_probes: int = 1,
    side: ProbeSide = "auto",
    distribution: Distribution = "rademacher",
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
    seed: int = 0,
    hidden: Tensor | None = None,
    vectorize: Vectorize = "vmap",
) -> Tensor:
    r"""The CAE penalty :math:`\|J_f(x)\|_F^2` of an encoder, reduced over the batch.

    .. math::
        P = \frac{1}{B} \sum_{b=1}^{B} \|J_f(x_b)\|_F^2 \quad (\text{reduction="mean"})

    Methods: ``"closed_form"`` (:func:`sigmoid_closed_form`; refused for anything but a
    Linear + sigmoid encoder), ``"exact"`` (dense per-sample Jacobian, any encoder),
    ``"hutchinson"`` (``num_probes`` random probes on the smaller side of :math:`J`; unbiased for
    the penalty and its gradient), ``"hutch++"`` (variance-reduced, ``num_probes >= 3``
    products) and ``"auto"`` (closed form when it applies, else exact while
    ``min(d_in, d_out) <= 64``, else Hutchinson with ``num_probes`` probes).

    Args:
        encoder: The encoder :math:`f` (the penalty is on the encoder only, not on the
            auto-encoder).
        x: Batch of inputs, batch dimension first.
        method: See above.
        num_probes: Probes per sample for the stochastic methods.
        side: Probe side for the stochastic methods: ``"auto"``, ``"input"`` or ``"output"``.
        distribution: ``"rademacher"`` or ``"gaussian"`` (Hutchinson).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-sample ``(B,)``).
        generator: Probe source; default: a fresh generator seeded with ``seed``, i.e. the same
            probes at every call. Pass a generator that advances (or use
            :class:`ContractiveLoss`) when training.
        seed: Seed of the default generator.
        hidden: Optionally ``encoder(x)`` from the training step, reused by the closed form to
            save a forward pass (ignored by the other methods).
        vectorize: ``"vmap"`` (each sample on its own, always correct) or ``"batch"`` (plain
            autograd on the whole batch: much less overhead, exact when the encoder treats
            samples independently; :class:`ContractiveLoss` checks that once and uses it).

    Returns:
        The reduced penalty, differentiable with respect to the encoder's parameters.

    Example:
        >>> import torch
        >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Sigmoid()).double()
        >>> x = torch.randn(8, 4, dtype=torch.float64)
        >>> closed = contractive_penalty(enc, x, method="closed_form")
        >>> exact = contractive_penalty(enc, x, method="exact")
        >>> torch.allclose(closed, exact, rtol=1e-12)
        True
    """
    if method not in ("auto", "closed_form", "exact", "hutchinson", "hutch++"):
        raise ValueError(
            "method must be 'auto', 'closed_form', 'exact', 'hutchinson' or 'hutch++', "
            f"got {method!r}"
        )
    _check_common(reduction, num_probes)
    if method == "closed_form" or (method == "auto" and _closed_form_applies(encoder, x)):
        return _reduce(sigmoid_closed_form(encoder, x, hidden), reduction)
    with per_sample_jacobian(encoder, x, vectorize=vectorize) as op:
        if method == "auto":
            method = "exact" if min(op.in_dim, op.out_dim) <= _EXACT_MAX_DIM else "hutchinson"
        res = frobenius_from_operator(
            op,
            method=method,  # type: ignore[arg-type]
            num_probes=num_probes,
            side=side,
            distribution=distribution,
            generator=generator,
            seed=seed,
        )
        return _reduce(res.value, reduction)


def higher_order_penalty(
    encoder: nn.Module,
    x: Tensor,
    *,
    sigma: float = 0.1,
    num_corruptions: int = 4,
    method: Literal["exact", "hutchinson"] = "exact",
    num_probes: int = 1,
    side: ProbeSide = "auto",
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
    seed: int = 0,
    vectorize: Vectorize = "vmap",
) -> Tensor:
    r"""The CAE+H term :math:`\mathbb{E}_\varepsilon \|J_f(x) - J_f(x+\varepsilon)\|_F^2`.

    Averaged over ``num_corruptions`` Gaussian corruptions :math:`\varepsilon \sim N(0,
    \sigma^2 I)` per sample (Rifai et al., ECML-PKDD 2011). As :math:`\sigma \to 0` it behaves
    like :math:`\sigma^2 \|\nabla^2 f(x)\|_F^2`, a penalty on the encoder's curvature.
    ``"exact"`` builds the ``num_corruptions + 1`` Jacobians per sample; ``"hutchinson"`` uses
    :math:`\mathbb{E}_v \|(J_f(x) - J_f(x+\varepsilon)) v\|^2` with the same probe :math:`v` at
    both points (two products per probe and corruption), unbiased for value and gradient.

    Args:
        encoder: The encoder.
        x: Batch of inputs.
        sigma: Standard deviation of the corruption noise.
        num_corruptions: Corrupted copies per sample.
        method: ``"exact"`` or ``"hutchinson"``.
        num_probes: Probes per sample and corruption (Hutchinson).
        side: Probe side (Hutchinson): ``"auto"``, ``"input"`` or ``"output"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        generator: Source of corruptions and probes; default: seeded with ``seed``.
        seed: Seed of the default generator.
        vectorize: ``"vmap"`` or ``"batch"`` (see :func:`contractive_penalty`).

    Returns:
        The reduced penalty, differentiable with respect to the encoder's parameters.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(4, 3)  # an affine encoder has a constant Jacobian
        >>> float(higher_order_penalty(lin, torch.randn(5, 4)))
        0.0
    """
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
    _check_common(reduction, num_probes)
    if not isinstance(num_corruptions, int) or num_corruptions < 1:
        raise ValueError(f"num_corruptions must be a positive integer, got {num_corruptions!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    x = check_input(x)
    gen = new_generator(x.device, generator, seed)
    B, c = x.shape[0], num_corruptions
    noise = torch.randn((c, *x.shape), generator=gen, device=x.device, dtype=x.dtype)
    xs = torch.cat([x.detach().unsqueeze(0), x.detach() + sigma * noise]).reshape(-1, *x.shape[1:])
    with per_sample_jacobian(encoder, xs, vectorize=vectorize) as op:
        if method == "exact":
            J = op.dense().reshape(c + 1, B, op.out_dim, op.in_dim)
            diff = J[1:] - J[:1]
            value = diff.square().sum(dim=(2, 3)).mean(dim=0)
        else:
            probe_side = choose_side(op, side)
            n = op.in_dim if probe_side == "input" else op.out_dim
            V = draw_probes(
                (B, n, num_probes),
                distribution="rademacher",
                dtype=op.dtype,
                device=op.device,
                generator=gen,
            )
            Vs = V.unsqueeze(0).expand(c + 1, -1, -1, -1).reshape((c + 1) * B, n, num_probes)
            prod = op.matmat(Vs) if probe_side == "input" else op.rmatmat(Vs)
            prod = prod.reshape(c + 1, B, -1, num_probes)
            value = (prod[1:] - prod[:1]).square().sum(dim=2).mean(dim=(0, 2))
        return _reduce(value, reduction)


def batch_products_are_per_sample(encoder: nn.Module, x: Tensor, *, rtol: float = 1e-4) -> bool:
    """Whether batched autograd products of ``encoder`` equal per-sample (``vmap``) ones on ``x``.

    One random vector-Jacobian product both ways (fixed seed, no gradient graph): ``False``
    when the encoder lets samples influence each other, e.g. a custom layer normalising over
    the batch.
    """
    x = check_input(x)
    with torch.no_grad():
        with per_sample_jacobian(encoder, x, keep_graph=False) as op:
            gen = new_generator(x.device, None, 12345)
            U = torch.randn(
                (op.batch, op.out_dim, 1), generator=gen, device=x.device, dtype=x.dtype
            )
            ref = op.rmatmat(U)
        with per_sample_jacobian(encoder, x, keep_graph=False, vectorize="batch") as op_b:
            got = op_b.rmatmat(U)
    scale = ref.abs().max().clamp_min(torch.finfo(ref.dtype).tiny)
    return bool(((got - ref).abs() <= rtol * scale).all())


class ContractiveLoss(nn.Module):
    r"""CAE (and optionally CAE+H) penalty as a loss module: ``loss = recon + crit(encoder, x)``.

    .. math::
        \lambda \, \frac{1}{B}\sum_b \|J_f(x_b)\|_F^2
        + \gamma \, \frac{1}{B}\sum_b \mathbb{E}_\varepsilon \|J_f(x_b) - J_f(x_b+\varepsilon)\|_F^2

    Holds its own ``torch.Generator`` (seeded with ``seed``, created on the inputs' device at the
    first call) so that stochastic probes and corruptions differ from step to step while the
    global RNG is never touched.

    Args:
        weight: :math:`\lambda`.
        method: See :func:`contractive_penalty`.
        num_probes: Probes for the stochastic methods.
        higher_order_weight: :math:`\gamma` (0 disables the CAE+H term).
        sigma: Corruption scale of the CAE+H term.
        num_corruptions: Corruptions of the CAE+H term.
        reduction: ``"mean"`` or ``"sum"``.
        seed: Seed of the module's generator.
        vectorize: How per-sample products are batched for the stochastic and exact methods:
            ``"vmap"``, ``"batch"`` (plain autograd on the whole batch, much less overhead), or
            ``"auto"``: ``"batch"`` once a one-off check on the first batch (of at least two
            samples) shows that the encoder treats samples independently, else ``"vmap"``
            with a warning.

    Once the first call has checked an encoder, later calls take fast paths with the same
    results: the closed form as one fused autograd function (exact gradients and higher
    derivatives); one-probe Hutchinson through plain autograd on the encoder (for encoders of
    standard layers without BatchNorm, dropout, recurrent or attention layers), drawing the same
    probes as the general path. :meth:`encode` returns the hidden units with the penalty, so
    that a training step needs no separate encoder forward.

    Example:
        >>> import torch
        >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Sigmoid())
        >>> crit = ContractiveLoss(weight=0.5)
        >>> x = torch.randn(8, 4)
        >>> torch.allclose(crit(enc, x), 0.5 * contractive_penalty(enc, x, method="exact"))
        True
    """

    def __init__(
        self,
        weight: float = 1.0,
        *,
        method: ContractiveMethod = "auto",
        num_probes: int = 1,
        higher_order_weight: float = 0.0,
        sigma: float = 0.1,
        num_corruptions: int = 4,
        reduction: Literal["mean", "sum"] = "mean",
        seed: int = 0,
        vectorize: Literal["auto", "vmap", "batch"] = "auto",
    ) -> None:
        super().__init__()
        if not weight >= 0 or not higher_order_weight >= 0:
            raise ValueError(
                f"weights must be non-negative, got weight={weight!r}, "
                f"higher_order_weight={higher_order_weight!r}"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if method not in ("auto", "closed_form", "exact", "hutchinson", "hutch++"):
            raise ValueError(f"unknown method {method!r}")
        if vectorize not in ("auto", "vmap", "batch"):
            raise ValueError(f"vectorize must be 'auto', 'vmap' or 'batch', got {vectorize!r}")
        _check_common(reduction, num_probes)
        self.weight = float(weight)
        self.method: ContractiveMethod = method
        self.num_probes = num_probes
        self.higher_order_weight = float(higher_order_weight)
        self.sigma = sigma
        self.num_corruptions = num_corruptions
        self.reduction: Reduction = reduction
        self.seed = seed
        self.vectorize = vectorize
        self._generator: torch.Generator | None = None
        self._checked: dict[int, Vectorize] = {}  # id(encoder) -> verified vectorisation
        # id(encoder) -> (encoder, its Linear when it is a sigmoid encoder, else None)
        self._closed_form: dict[int, tuple[nn.Module, nn.Linear | None]] = {}
        # id(encoder) -> (encoder, input shape, one-probe side; None: no fast path)
        self._hutch_side: dict[int, tuple[nn.Module, tuple[int, ...], str | None]] = {}

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device.type != device.type:
            self._generator = new_generator(device, None, self.seed)
        return self._generator

    def forward(self, encoder: nn.Module, x: Tensor, hidden: Tensor | None = None) -> Tensor:
        """Return the weighted penalty of ``encoder`` on the batch ``x``.

        ``hidden`` (optional) is ``encoder(x)`` from the training step, reused by the closed form.
        """
        fast = self._closed_form_fast_path(encoder, x, hidden)
        if fast is not None:
            return fast
        hutch = self._hutchinson_fast_path(encoder, x)
        if hutch is not None:
            return hutch[1]
        x = check_input(x)
        gen = self._gen(x.device)
        vec = self._vectorize(encoder, x)
        loss = self.weight * contractive_penalty(
            encoder,
            x,
            method=self.method,
            num_probes=self.num_probes,
            reduction=self.reduction,
            generator=gen,
            hidden=hidden,
            vectorize=vec,
        )
        if self.higher_order_weight > 0:
            loss = loss + self.higher_order_weight * higher_order_penalty(
                encoder,
                x,
                sigma=self.sigma,
                num_corruptions=self.num_corruptions,
                method="hutchinson" if self.method in ("hutchinson", "hutch++") else "exact",
                num_probes=self.num_probes,
                reduction=self.reduction,
                generator=gen,
                vectorize=vec,
            )
        self._learn_probe_side(encoder, x, vec)
        return loss

    def encode(self, encoder: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return ``(encoder(x), penalty)``, sharing work between the two where possible.

        For a training step that needs the hidden units anyway:
        ``h, pen = crit.encode(enc, x); loss = recon(dec(h), x) + pen``. The hidden units are
        those of a plain call ``encoder(x)`` (with its graph). With one Hutchinson probe they
        come from the very forward pass that gives the probe's product (a reverse-mode
        :math:`J^\top u` from the same graph, or a forward-mode :math:`J v` carried along with
        it), so the penalty costs no extra forward; with the closed form they are reused by it.
        The penalty (value and probes) is the one :meth:`forward` would return.

        Example:
            >>> import torch
            >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
            >>> x = torch.randn(8, 4)
            >>> h, pen = ContractiveLoss(0.5, method="hutchinson").encode(enc, x)
            >>> torch.allclose(h, enc(x)), torch.allclose(pen, ContractiveLoss(0.5,
            ...     method="hutchinson")(enc, x))
            (True, True)
        """
        if self.method == "hutchinson":
            hutch = self._hutchinson_fast_path(encoder, x)
            if hutch is not None:
                return hutch
        h = encoder(x)
        fast = self._closed_form_fast_path(encoder, x, h)
        return h, fast if fast is not None else self.forward(encoder, x, hidden=h)

    # ------------------------------------------------------------------------- fast paths
    def _learn_probe_side(self, encoder: nn.Module, x: Tensor, vec: Vectorize) -> None:
        """After a checked one-probe Hutchinson call, remember the encoder's probe side."""
        if (
            self.method != "hutchinson"
            or self.num_probes != 1
            or self.higher_order_weight > 0
            or vec != "batch"
            or id(encoder) in self._hutch_side
        ):
            return
        side = None
        if _is_plain(encoder):
            with torch.no_grad():
                out = encoder(x[:1])
            if isinstance(out, Tensor) and out.ndim >= 1 and out.shape[0] == 1:
                side = "output" if out[0].numel() <= x[0].numel() else "input"
        self._hutch_side[id(encoder)] = (encoder, tuple(x.shape[1:]), side)

    def _hutchinson_fast_path(self, encoder: nn.Module, x: Tensor) -> tuple[Tensor, Tensor] | None:
        r"""One-probe Hutchinson through plain autograd on the encoder, ``(h, penalty)``.

        Taken once a checked call showed that the encoder treats samples independently and it
        is :func:`_is_plain` (so calling it directly is the analysis call). The probe is drawn
        exactly as the general path draws it (same generator, shape and side), so the value is
        the same estimate, unbiased with its gradient. Output side: :math:`\|J^\top u\|^2` by
        one ``autograd.grad`` on the graph of ``h = encoder(x)``; input side: :math:`\|J v\|^2`
        with :math:`J v` the tangent of a forward-mode dual pass that also yields ``h``.
        """
        known = self._hutch_side.get(id(encoder))
        if known is None or known[0] is not encoder or known[2] is None:
            return None
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != known[1] or x.is_inference():
            return None
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return None
        if not any(p.requires_grad for p in encoder.parameters()):
            return None  # no graph wanted: the general path returns a constant
        if not x.dtype.is_floating_point or x.shape[0] == 0:
            return None
        gen = self._gen(x.device)
        B = x.shape[0]
        if known[2] == "output":
            xr = x if x.requires_grad else x.detach().requires_grad_(True)
            h = encoder(xr)
            u = draw_probes(
                (B, h[0].numel(), 1), "rademacher", dtype=h.dtype, device=h.device, generator=gen
            )
            (prod,) = torch.autograd.grad(h, xr, u.reshape(h.shape), create_graph=True)
        else:
            v = draw_probes(
                (B, x[0].numel(), 1), "rademacher", dtype=x.dtype, device=x.device, generator=gen
            )
            with fwAD.dual_level():
                # x need not require grad here: the tangent carries the dependence on x
                h, tangent = fwAD.unpack_dual(encoder(fwAD.make_dual(x, v.reshape(x.shape))))
            prod = torch.zeros_like(h) if tangent is None else tangent
        scale = self.weight / B if self.reduction == "mean" else self.weight
        return h, prod.square().sum() * scale

    def _closed_form_fast_path(
        self, encoder: nn.Module, x: Tensor, hidden: Tensor | None
    ) -> Tensor | None:
        """The closed form with no per-call Python validation once the encoder was checked.

        The first call for an encoder goes through :func:`sigmoid_closed_form` (full checks);
        later calls with 2-D inputs cost only the arithmetic (a fused kernel sequence), plus
        the encoder's forward when ``hidden`` is not given.
        """
        if self.higher_order_weight > 0 or self.method not in ("closed_form", "auto"):
            return None
        if not (isinstance(x, Tensor) and x.ndim == 2):
            return None
        known = self._closed_form.get(id(encoder))
        if known is None or known[0] is not encoder:
            lin, _ = _sigmoid_linear(encoder)
            self._closed_form[id(encoder)] = (encoder, lin)
            return None  # the first call takes the checked path
        lin = known[1]
        if lin is None or x.is_inference() or x.shape[1] != lin.in_features:
            return None
        if hidden is None:
            if not x.dtype.is_floating_point or x.shape[0] == 0:
                return None
            h = torch.sigmoid(nn.functional.linear(x, lin.weight, lin.bias))
        elif isinstance(hidden, Tensor) and hidden.shape == (x.shape[0], lin.out_features):
            h = hidden
        else:
            return None
        scale = self.weight / x.shape[0] if self.reduction == "mean" else self.weight
        return _sigmoid_penalty_sum(h, lin.weight, scale)

    def _vectorize(self, encoder: nn.Module, x: Tensor) -> Vectorize:
        if self.vectorize != "auto":
            return self.vectorize
        if id(encoder) in self._checked:
            return self._checked[id(encoder)]
        if x.shape[0] < 2:
            return "vmap"
        ok = batch_products_are_per_sample(encoder, x[:4])
        if not ok:
            warnings.warn(
                f"{type(encoder).__name__} mixes samples across the batch (its batched "
                "Jacobian products differ from per-sample ones); ContractiveLoss uses "
                "vectorize='vmap'",
                stacklevel=3,
            )
        self._checked[id(encoder)] = "batch" if ok else "vmap"
        return self._checked[id(encoder)]

    def extra_repr(self) -> str:
        """Summarise the configuration."""
        return (
            f"weight={self.weight}, method={self.method!r}, num_probes={self.num_probes}, "
            f"higher_order_weight={self.higher_order_weight}, reduction={self.reduction!r}"
        )
