r"""Directions in parameter space for loss-landscape slices.

A :class:`Direction` is a parameter-shaped dict of tensors (on the parameters' device and dtype)
with a :class:`DirectionInfo` describing where it came from. The builders here make random
filter-normalised directions (Li et al. 2018), Hessian/GGN eigenvectors, the negative gradient,
the line towards another parameter set (e.g. a second checkpoint) and user directions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from nncurv.problem import CurvatureProblem

__all__ = [
    "Direction",
    "DirectionInfo",
    "Normalization",
    "filter_normalize",
    "random_direction",
    "eigenvector_directions",
    "gradient_direction",
    "interpolation_direction",
    "user_direction",
]

Normalization = Literal["filter", "layer", "model", "none"]
_NORMALIZATIONS = ("filter", "layer", "model", "none")


@dataclass(frozen=True)
class DirectionInfo:
    r"""Description of a direction (what results keep; the tensors themselves are not saved).

    Attributes:
        kind: ``"random"``, ``"eigenvector"``, ``"gradient"``, ``"interpolation"`` or ``"user"``.
        label: Short human-readable name used in plots (e.g. ``"eigvec 1 (λ=3.2)"``).
        norm: Euclidean norm of the direction over the selected parameters.
        normalization: Normalisation applied (random directions), else ``None``.
        eigenvalue: The eigenvalue (eigenvector directions), else ``None``.
        gradient_scale: For gradient directions :math:`d = -c\,g`, the factor :math:`c`
            (``1`` unnormalised, ``1/‖g‖`` unit-norm), else ``None``.
        seed: Seed of random directions, else ``None``.
        extra: Further JSON-serialisable details.
    """

    kind: str
    label: str
    norm: float
    normalization: str | None = None
    eigenvalue: float | None = None
    gradient_scale: float | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "kind": self.kind,
            "label": self.label,
            "norm": self.norm,
            "normalization": self.normalization,
            "eigenvalue": self.eigenvalue,
            "gradient_scale": self.gradient_scale,
            "seed": self.seed,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DirectionInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(
            kind=str(d["kind"]),
            label=str(d["label"]),
            norm=float(d["norm"]),
            normalization=d.get("normalization"),
            eigenvalue=None if d.get("eigenvalue") is None else float(d["eigenvalue"]),
            gradient_scale=(
                None if d.get("gradient_scale") is None else float(d["gradient_scale"])
            ),
            seed=None if d.get("seed") is None else int(d["seed"]),
            extra=dict(d.get("extra") or {}),
        )


@dataclass(frozen=True)
class Direction:
    """A direction in the space of a problem's selected parameters.

    Attributes:
        vector: Parameter name → tensor with the parameter's shape, dtype and device.
        info: Its description.
    """

    vector: dict[str, Tensor]
    info: DirectionInfo

    def flat(self, problem: CurvatureProblem) -> Tensor:
        """The direction as one flat vector in the problem's parameter order."""
        return problem.flatten(self.vector)


def _norm(vector: Mapping[str, Tensor]) -> float:
    total = sum((t.double() ** 2).sum() for t in vector.values())
    return float(torch.as_tensor(total).sqrt())


def _check_like(problem: CurvatureProblem, vector: Mapping[str, Tensor], what: str) -> None:
    if not isinstance(vector, Mapping):
        raise TypeError(f"{what} must be a dict of tensors, got {type(vector).__name__}")
    missing = [n for n in problem.param_names if n not in vector]
    extra = [n for n in vector if n not in problem.shapes]
    if missing or extra:
        raise ValueError(
            f"{what} does not match the selected parameters: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for n in problem.param_names:
        t = vector[n]
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}[{n!r}] must be a tensor, got {type(t).__name__}")
        if t.shape != problem.shapes[n]:
            raise ValueError(
                f"{what}[{n!r}] has shape {tuple(t.shape)}, the parameter has "
                f"{tuple(problem.shapes[n])}"
            )


def filter_normalize(
    direction: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    *,
    normalization: Normalization = "filter",
    ignore_1d: bool = True,
    eps: float = 1e-10,
) -> dict[str, Tensor]:
    r"""Rescale a direction the way Li et al. (2018) do before slicing the loss.

    With ``normalization="filter"`` every filter (a slice along the first dimension: an output
    channel of a convolution, an output row of a linear layer) of the direction gets the norm of
    the matching filter of the parameters,

    .. math::

        d_{i,j} \leftarrow \frac{d_{i,j}}{\lVert d_{i,j}\rVert}\,\lVert \theta_{i,j}\rVert ,

    which removes the scale invariance of ReLU/BatchNorm networks from the picture.
    ``"layer"`` does the same per parameter tensor, ``"model"`` for the whole vector, ``"none"``
    leaves the direction as it is. One-dimensional parameters (biases, BatchNorm scales) are set
    to zero when ``ignore_1d`` (the paper's "ignore biasbn" choice), otherwise they are treated
    like one filter.

    Args:
        direction: Parameter name → tensor.
        params: The parameters, same names and shapes.
        normalization: ``"filter"``, ``"layer"``, ``"model"`` or ``"none"``.
        ignore_1d: Zero the one-dimensional entries.
        eps: Guard against division by a zero-norm direction filter.

    Returns:
        A new dict (inputs are not modified).

    Raises:
        ValueError: Unknown normalisation, or names/shapes that do not match.

    References:
        Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets",
        NeurIPS 2018.

    Example:
        >>> import torch
        >>> w = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
        >>> d = filter_normalize({"w": torch.ones(2, 2, dtype=torch.float64)}, {"w": w})["w"]
        >>> [round(x, 12) for x in d.norm(dim=1).tolist()]
        [5.0, 2.0]
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if set(direction) != set(params):
        raise ValueError(
            f"direction and params have different names: {sorted(set(direction) ^ set(params))}"
        )
    out: dict[str, Tensor] = {}
    for n, d in direction.items():
        p = params[n].to(d.dtype)
        if d.shape != p.shape:
            raise ValueError(
                f"direction[{n!r}] has shape {tuple(d.shape)}, params {tuple(p.shape)}"
            )
        if d.ndim <= 1 and ignore_1d:
            out[n] = torch.zeros_like(d)
        elif normalization == "filter" and d.ndim > 1:
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            pn = p.reshape(p.shape[0], -1).norm(dim=1)
            scale = pn / dn.clamp_min(eps)
            out[n] = d * scale.reshape(-1, *([1] * (d.ndim - 1)))
        elif normalization in ("filter", "layer"):
            out[n] = d * (p.norm() / d.norm().clamp_min(eps))
        else:
            out[n] = d.clone()
    if normalization == "model":
        dn = math.sqrt(sum(float((t.double() ** 2).sum()) for t in out.values()))
        keep = [n for n in out if not (out[n].ndim <= 1 and ignore_1d)]
        pn = math.sqrt(sum(float((params[n].double() ** 2).sum()) for n in keep))
        factor = pn / max(dn, eps)
        out = {n: t * factor for n, t in out.items()}
    return out


def random_direction(
    problem: CurvatureProblem,
    *,
    normalization: Normalization = "filter",
    ignore_1d: bool = True,
    generator: torch.Generator | None = None,
    seed: int = 0,
    label: str | None = None,
) -> Direction:
    r"""A Gaussian random direction, filter-normalised by default (Li et al. 2018).

    Args:
        problem: The model, loss and data; the direction lives on its selected parameters.
        normalization: See :func:`filter_normalize`.
        ignore_1d: Zero biases and other one-dimensional parameters (see
            :func:`filter_normalize`).
        generator: ``torch.Generator`` on the parameters' device; default one seeded with
            ``seed`` (the global RNG is never used).
        seed: Seed of the default generator.
        label: Name in plots (default ``"random (filter-norm., seed 0)"``).

    Returns:
        A :class:`Direction` of kind ``"random"``.

    Raises:
        ValueError: Unknown normalisation.

    Example:
        >>> import torch
        >>> from nncurv import CurvatureProblem
        >>> net = torch.nn.Linear(3, 2)
        >>> p = CurvatureProblem(net, torch.nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)))
        >>> d = random_direction(p, seed=1)
        >>> torch.allclose(d.vector["weight"].norm(dim=1), net.weight.detach().norm(dim=1))
        True
        >>> d.vector["bias"].abs().sum().item()
        0.0
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if generator is None:
        generator = torch.Generator(device=problem.device).manual_seed(seed)
    raw = {
        n: torch.randn(
            problem.shapes[n], generator=generator, dtype=problem.dtype, device=problem.device
        )
        for n in problem.param_names
    }
    vec = filter_normalize(raw, problem.params, normalization=normalization, ignore_1d=ignore_1d)
    text = label or f"random ({normalization}-norm., seed {seed})"
    info = DirectionInfo("random", text, _norm(vec), normalization=normalization, seed=seed)
    return Direction(vec, info)


def eigenvector_directions(
    problem: CurvatureProblem,
    k: int = 2,
    *,
    which: Literal["LA", "SA", "LM", "BE"] = "LA",
    operator: Any = None,
    **eig_kwargs: Any,
) -> list[Direction]:
    r"""Unit-norm eigenvectors of the Hessian (or another operator) as directions.

    Computed with :func:`nncurv.linalg.eigenvalues` (Lanczos) on
    :class:`~nncurv.operators.HessianOperator` unless ``operator`` is given (e.g. a
    :class:`~nncurv.operators.GGNOperator` of the same problem). Along a unit eigenvector
    :math:`u` with eigenvalue :math:`\lambda` the quadratic model of the loss is
    :math:`f + t\,g^\top u + \tfrac12 \lambda t^2`.

    Args:
        problem: The model, loss and data.
        k: Number of eigenvectors.
        which: Part of the spectrum, as in :func:`~nncurv.linalg.eigenvalues`.
        operator: A symmetric operator over the same parameters (default: the Hessian).
        **eig_kwargs: Further arguments of :func:`~nncurv.linalg.eigenvalues` (``tol``,
            ``seed``, ``max_matvecs``, ...).

    Returns:
        ``k`` directions of kind ``"eigenvector"`` with their eigenvalue in ``info``.

    Raises:
        ValueError: ``operator`` has the wrong dimension (and the errors of ``eigenvalues``).
    """
    from nncurv.linalg import eigenvalues
    from nncurv.operators import HessianOperator

    op = HessianOperator(problem) if operator is None else operator
    if tuple(op.shape) != (problem.num_params, problem.num_params):
        raise ValueError(
            f"operator has shape {tuple(op.shape)}, the problem has {problem.num_params} parameters"
        )
    res = eigenvalues(op, k, which=which, return_eigenvectors=True, **eig_kwargs)
    assert res.eigenvectors is not None
    name = type(op).__name__.replace("Operator", "") or "op"
    out = []
    for i in range(res.eigenvalues.shape[0]):
        lam = float(res.eigenvalues[i])
        vec = problem.unflatten(res.eigenvectors[:, i].to(problem.dtype).contiguous())
        info = DirectionInfo(
            "eigenvector",
            f"{name} eigvec {i + 1} (λ={lam:.4g})",
            _norm(vec),
            eigenvalue=lam,
            extra={
                "index": i,
                "which": which,
                "operator": name,
                "residual": float(res.residuals[i]),
                "converged": bool(res.converged),
            },
        )
        out.append(Direction({n: t.clone() for n, t in vec.items()}, info))
    return out


def gradient_direction(
    problem: CurvatureProblem, *, normalize: bool = True, label: str | None = None
) -> Direction:
    r"""The direction of steepest descent, :math:`d = -c\,g` with :math:`c = 1/\lVert g\rVert`.

    With ``normalize=False``, :math:`c = 1`, so that the slice coordinate :math:`t` is a
    gradient-descent learning rate. ``info.gradient_scale`` holds :math:`c` either way.

    Args:
        problem: The model, loss and data (the gradient of the data-set loss).
        normalize: Unit norm (``True``) or the raw negative gradient.
        label: Name in plots.

    Returns:
        A :class:`Direction` of kind ``"gradient"``.

    Raises:
        ValueError: The gradient is zero or not finite.
    """
    _, g = problem.loss_and_gradient()
    gn = float(g.norm())
    if not math.isfinite(gn):
        raise ValueError(f"the gradient is not finite (norm {gn})")
    if normalize and gn == 0.0:
        raise ValueError("the gradient is zero; a normalised gradient direction is undefined")
    c = 1.0 / gn if normalize else 1.0
    vec = problem.unflatten(-c * g)
    info = DirectionInfo(
        "gradient",
        label or ("−gradient (unit)" if normalize else "−gradient"),
        _norm(vec),
        gradient_scale=c,
        extra={"gradient_norm": gn},
    )
    return Direction({n: t.clone() for n, t in vec.items()}, info)


def _as_param_dict(problem: CurvatureProblem, other: Any, what: str) -> dict[str, Tensor]:
    if isinstance(other, nn.Module):
        named: dict[str, Tensor] = dict(other.named_parameters())
        named.update(dict(other.named_buffers()))
        other = named
    if isinstance(other, Tensor):
        if other.shape != (problem.num_params,):
            raise ValueError(
                f"{what} as a flat tensor must have shape ({problem.num_params},), "
                f"got {tuple(other.shape)}"
            )
        return problem.unflatten(other.to(device=problem.device, dtype=problem.dtype))
    if not isinstance(other, Mapping):
        raise TypeError(
            f"{what} must be a module, a state dict or a flat tensor, got {type(other).__name__}"
        )
    picked = {n: other[n] for n in problem.param_names if n in other}
    _check_like(problem, {**picked}, what)
    return {n: t.detach().to(device=problem.device, dtype=problem.dtype) for n, t in picked.items()}


def interpolation_direction(
    problem: CurvatureProblem, other: Any, *, label: str | None = None
) -> Direction:
    r"""The line from the problem's parameters :math:`\theta_A` to another set :math:`\theta_B`.

    :math:`d = \theta_B - \theta_A`, so the slice coordinate :math:`t = 0` is :math:`\theta_A`
    and :math:`t = 1` is :math:`\theta_B` (linear mode connectivity, checkpoint comparison).

    Args:
        problem: The model at :math:`\theta_A`, loss and data.
        other: :math:`\theta_B`: a module of the same architecture, a state dict (extra
            entries such as buffers are ignored) or a flat vector.
        label: Name in plots.

    Returns:
        A :class:`Direction` of kind ``"interpolation"``.

    Raises:
        TypeError: ``other`` has an unsupported type.
        ValueError: Its names or shapes do not match the selected parameters.
    """
    theta_b = _as_param_dict(problem, other, "other")
    vec = {n: theta_b[n] - problem.params[n] for n in problem.param_names}
    info = DirectionInfo("interpolation", label or "θ_A → θ_B", _norm(vec))
    return Direction(vec, info)


def user_direction(
    problem: CurvatureProblem,
    vector: Any,
    *,
    label: str = "user direction",
    normalization: Normalization = "none",
    ignore_1d: bool = False,
) -> Direction:
    """Wrap a direction the user computed (a dict of tensors or a flat vector).

    Args:
        problem: The model, loss and data.
        vector: Parameter name → tensor (selected parameters), or a flat vector.
        label: Name in plots.
        normalization: Optionally filter-normalise it (see :func:`filter_normalize`).
        ignore_1d: Zero one-dimensional parameters when normalising.

    Returns:
        A :class:`Direction` of kind ``"user"``.

    Raises:
        TypeError: ``vector`` has an unsupported type.
        ValueError: Names or shapes do not match.
    """
    vec = _as_param_dict(problem, vector, "vector")
    if normalization != "none" or ignore_1d:
        vec = filter_normalize(
            vec, problem.params, normalization=normalization, ignore_1d=ignore_1d
        )
    info = DirectionInfo(
        "user", label, _norm(vec), normalization=None if normalization == "none" else normalization
    )
    return Direction(vec, info)
