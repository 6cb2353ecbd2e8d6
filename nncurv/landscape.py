r"""Post-hoc loss-landscape analysis: 1-D and 2-D slices of the loss around the parameters.

The loss (and any metric, e.g. accuracy) is evaluated at :math:`\theta + t\,d` or
:math:`\theta + a\,d_1 + b\,d_2` along random filter-normalised directions (Li et al. 2018),
Hessian eigenvectors, the negative gradient, the line to a second parameter set, or user
directions. Everything runs through :class:`~nncurv.problem.CurvatureProblem`: the model is
never mutated (its parameters, ``.grad``, buffers, flags and the global RNG are left as they
were), grid points are evaluated in chunks with ``torch.func.vmap``, on one batch or a whole data
loader, optionally recomputing BatchNorm statistics at every point.

Along 1-D slices the second-order Taylor model :math:`f + t\,g^\top d + \frac12 t^2 d^\top H d`
is computed from one Hessian-vector product and compared with the true loss.

Example:
    >>> import torch
    >>> from nncurv import CurvatureProblem
    >>> from nncurv.landscape import eigenvector_directions, slice_1d
    >>> X = torch.randn(32, 3, dtype=torch.float64)
    >>> y = X @ torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> problem = CurvatureProblem(model, torch.nn.MSELoss(), (X, y))
    >>> d = eigenvector_directions(problem, k=1)[0]
    >>> s = slice_1d(problem, d, steps=5, span=(-1.0, 1.0))
    >>> bool(abs(s.taylor.predicted - s.loss).max() < 1e-10)  # a quadratic: Taylor is exact
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nncurv._landscape_directions import (
    Direction,
    DirectionInfo,
    Normalization,
    eigenvector_directions,
    filter_normalize,
    gradient_direction,
    interpolation_direction,
    random_direction,
    user_direction,
)
from nncurv._landscape_eval import evaluate_points
from nncurv._landscape_plot import plot_slice, plot_slices, slices_to_tensorboard
from nncurv._landscape_results import LandscapeSlice, TaylorModel
from nncurv.problem import CurvatureProblem

__all__ = [
    "Direction",
    "DirectionInfo",
    "LandscapeSlice",
    "Normalization",
    "TaylorModel",
    "accuracy",
    "eigenvector_directions",
    "filter_normalize",
    "gradient_direction",
    "interpolation_direction",
    "plot_slice",
    "plot_slices",
    "random_direction",
    "slice_1d",
    "slice_2d",
    "slices_to_tensorboard",
    "taylor_model",
    "user_direction",
]

Metric = Callable[..., Tensor]


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Top-1 accuracy of logits against class indices (a metric for the slices).

    Args:
        outputs: ``(n, classes)`` logits.
        targets: ``(n,)`` class indices.

    Returns:
        A scalar tensor in ``[0, 1]``.

    Example:
        >>> import torch
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])).item()
        0.5
    """
    return (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean()


def _coords(
    steps: int | Sequence[float] | Tensor | np.ndarray, span: tuple[float, float], what: str
) -> np.ndarray:
    if isinstance(steps, bool):
        raise TypeError(f"{what} must be an int or a sequence of coordinates, got {steps!r}")
    if isinstance(steps, int):
        if steps < 2:
            raise ValueError(f"{what} must be at least 2, got {steps!r}")
        lo, hi = (float(v) for v in span)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"span must be finite with lo < hi, got {span!r}")
        return np.linspace(lo, hi, steps)
    arr = np.asarray(steps.cpu() if isinstance(steps, Tensor) else steps, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 1 or not np.isfinite(arr).all():
        raise ValueError(f"{what} must be a 1-D sequence of finite coordinates, got {steps!r}")
    return arr


def _check_common(
    problem: Any,
    directions: Sequence[Any],
    metrics: Mapping[str, Metric] | None,
    chunk_size: int | None,
    recalibrate_bn: bool,
    vectorize: bool | str,
) -> None:
    if not isinstance(problem, CurvatureProblem):
        raise TypeError(f"problem must be a CurvatureProblem, got {type(problem).__name__}")
    for d in directions:
        if not isinstance(d, Direction):
            raise TypeError(
                f"directions must be Direction objects (see random_direction, user_direction), "
                f"got {type(d).__name__}"
            )
        missing = set(problem.param_names) ^ set(d.vector)
        if missing:
            raise ValueError(
                f"direction {d.info.label!r} does not match the problem's parameters: "
                f"{sorted(missing)[:5]}"
            )
        for n, t in d.vector.items():
            if t.shape != problem.shapes[n] or t.device != problem.device:
                raise ValueError(
                    f"direction {d.info.label!r}: entry {n!r} has shape {tuple(t.shape)} on "
                    f"{t.device}, the parameter has {tuple(problem.shapes[n])} on "
                    f"{problem.device}"
                )
    if metrics is not None:
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a dict name -> callable, got {metrics!r}")
        for k, m in metrics.items():
            if not callable(m):
                raise TypeError(f"metric {k!r} is not callable: {m!r}")
            if k == "loss":
                raise ValueError("metric name 'loss' is reserved")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if vectorize not in (True, False, "auto"):
        raise ValueError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
    if recalibrate_bn and problem.batchnorm == "batch":
        raise ValueError(
            "recalibrate_bn=True needs a problem with batchnorm='eval' (with 'batch' the running "
            "statistics are not used)"
        )


def taylor_model(
    problem: CurvatureProblem,
    direction: Direction,
    coords: Sequence[float] | np.ndarray,
    loss: np.ndarray,
    *,
    rtol: float = 0.05,
    operator: Any = None,
) -> TaylorModel:
    r"""Second-order Taylor model along a direction, compared with computed loss values.

    .. math::

        q(t) = f(\theta) + t\, g^\top d + \tfrac12 t^2\, d^\top H d,

    with :math:`g` and :math:`H` the gradient and Hessian of the data-set loss (one gradient and
    one Hessian-vector product). The relative error ``|q - f| / |f|`` is tested against ``rtol``
    to give the range of step sizes where the model holds. For the negative-gradient direction
    :math:`d = -c\,g` it also reports :math:`\varepsilon^\star = g^\top g / g^\top H g`, the
    gradient-descent learning rate that minimises :math:`q` (Cauchy step), and the learning
    rate of the true best point on the slice.

    Args:
        problem: The model, loss and data.
        direction: The direction ``d``.
        coords: Slice coordinates ``t``.
        loss: True loss at ``θ + t d`` (same length as ``coords``).
        rtol: Relative-error tolerance of ``valid_range``.
        operator: Curvature operator for :math:`d^\top H d` (default
            :class:`~nncurv.operators.HessianOperator` of ``problem``).

    Returns:
        A :class:`TaylorModel`.

    Raises:
        ValueError: ``coords`` and ``loss`` differ in length, or ``rtol`` is not positive.
    """
    from nncurv.operators import HessianOperator

    t = np.asarray(coords, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    if t.shape != loss.shape or t.ndim != 1:
        raise ValueError(
            f"coords and loss must be 1-D of equal length, got {t.shape}, {loss.shape}"
        )
    if not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol!r}")
    f0, g = problem.loss_and_gradient()
    d = direction.flat(problem)
    op = HessianOperator(problem) if operator is None else operator
    Hd = op.matvec(d)
    slope, curv, value = float(g @ d), float(d @ Hd), float(f0)
    pred = value + slope * t + 0.5 * curv * t**2
    abs_err = np.abs(pred - loss)
    rel_err = abs_err / np.maximum(np.abs(loss), np.finfo(np.float64).tiny)
    ok = rel_err <= rtol
    i0 = int(np.argmin(np.abs(t)))
    if ok[i0]:
        lo = i0
        while lo > 0 and ok[lo - 1]:
            lo -= 1
        hi = i0
        while hi < len(t) - 1 and ok[hi + 1]:
            hi += 1
        valid = (float(t[lo]), float(t[hi]))
    else:
        valid = (math.nan, math.nan)
    qstep = -slope / curv if curv > 0 else math.nan
    finite = np.isfinite(loss)
    if finite.any():
        ib = int(np.nanargmin(np.where(finite, loss, np.nan)))
        best_t, best_f = float(t[ib]), float(loss[ib])
    else:
        best_t = best_f = math.nan
    eps_star = best_lr = None
    c = direction.info.gradient_scale
    if direction.info.kind == "gradient" and c is not None:
        gHg = curv / c**2
        eps_star = float(g @ g) / gHg if gHg > 0 else math.nan
        best_lr = best_t * c
    release = getattr(op, "release", None)
    if operator is None and release is not None:
        release()
    return TaylorModel(
        value=value,
        slope=slope,
        curvature=curv,
        predicted=pred,
        abs_error=abs_err,
        rel_error=rel_err,
        rtol=float(rtol),
        valid_range=valid,
        quadratic_step=qstep,
        best_step=best_t,
        best_loss=best_f,
        epsilon_star=eps_star,
        best_learning_rate=best_lr,
    )


def _run(
    problem: CurvatureProblem,
    directions: Sequence[Direction],
    axes: Sequence[np.ndarray],
    metrics: Mapping[str, Metric] | None,
    chunk_size: int | None,
    vectorize: bool | str,
    recalibrate_bn: bool,
    progress: bool,
) -> tuple[np.ndarray, dict[str, np.ndarray], float, bool, int]:
    grids = np.meshgrid(*axes, indexing="ij")
    coeffs = np.stack([g.reshape(-1) for g in grids], axis=1)
    # the centre is evaluated as an extra point so that center_loss shares the same code path
    coeffs = np.concatenate([np.zeros((1, len(axes))), coeffs], axis=0)
    C = torch.as_tensor(coeffs, dtype=problem.dtype, device=problem.device)
    ev = evaluate_points(
        problem,
        problem.params,
        [d.vector for d in directions],
        C,
        metrics=metrics,
        chunk_size=chunk_size,
        vectorize=vectorize,
        recalibrate_bn=recalibrate_bn,
        progress=progress,
        desc=f"{len(axes)}-D slice ({C.shape[0] - 1} points)",
    )
    shape = tuple(len(a) for a in axes)
    loss_all = ev.loss.detach().double().cpu().numpy()
    loss = loss_all[1:].reshape(shape)
    mets = {k: v.detach().double().cpu().numpy()[1:].reshape(shape) for k, v in ev.metrics.items()}
    return loss, mets, float(loss_all[0]), ev.vectorized, ev.num_evaluations


def slice_1d(
    problem: CurvatureProblem,
    direction: Direction,
    *,
    steps: int | Sequence[float] | np.ndarray | Tensor = 51,
    span: tuple[float, float] = (-1.0, 1.0),
    metrics: Mapping[str, Metric] | None = None,
    taylor: bool = True,
    taylor_rtol: float = 0.05,
    curvature_operator: Any = None,
    chunk_size: int | None = None,
    vectorize: bool | str = "auto",
    recalibrate_bn: bool = False,
    progress: bool = False,
) -> LandscapeSlice:
    r"""The loss along a line :math:`t \mapsto \mathcal{L}(\theta + t\,d)`.

    Args:
        problem: The model, loss and data (one batch or a loader; mean or sum reduction).
        direction: The direction ``d`` (see the builders in this module).
        steps: Number of equally spaced coordinates over ``span``, or the coordinates.
        span: ``(t_min, t_max)`` when ``steps`` is an int.
        metrics: Name → ``metric(outputs, targets) -> scalar`` batch mean (e.g.
            :func:`accuracy`); each is averaged over the data with sample weights.
        taylor: Also compute the second-order Taylor model (:func:`taylor_model`).
        taylor_rtol: Relative-error tolerance of the Taylor model's valid range.
        curvature_operator: Operator for the Taylor curvature (default the Hessian).
        chunk_size: Grid points per vectorised evaluation (bounds memory: activations of
            ``chunk_size`` copies of a batch); default 2 on CPU, 64 on accelerators.
        vectorize: ``"auto"`` (``torch.func.vmap`` over the points of a chunk, a loop if a
            layer cannot be vmapped), ``True`` (vmap, errors propagate) or ``False`` (loop).
        recalibrate_bn: Recompute BatchNorm running statistics on the data at every point
            (the statistics the point's network would have after training on the data), without
            touching the model's buffers. Needs ``batchnorm="eval"`` in the problem.
        progress: Show a progress bar (tqdm if installed).

    Returns:
        A :class:`LandscapeSlice` with ``ndim == 1``.

    Raises:
        TypeError: ``problem`` or ``direction`` of the wrong type, a metric not callable.
        ValueError: Bad ``steps``/``span``/``chunk_size``, a direction that does not match the
            parameters, ``recalibrate_bn`` with ``batchnorm="batch"``.

    References:
        Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets",
        NeurIPS 2018; Goodfellow, Vinyals, Saxe, "Qualitatively characterizing neural network
        optimization problems", ICLR 2015 (linear interpolation).
    """
    t0 = time.perf_counter()
    _check_common(problem, [direction], metrics, chunk_size, recalibrate_bn, vectorize)
    if not isinstance(taylor_rtol, (int, float)) or not taylor_rtol > 0:  # before the grid
        raise ValueError(f"taylor_rtol must be positive, got {taylor_rtol!r}")
    axis = _coords(steps, span, "steps")
    loss, mets, center, vec, nev = _run(
        problem, [direction], [axis], metrics, chunk_size, vectorize, recalibrate_bn, progress
    )
    tm = None
    if taylor:
        tm = taylor_model(
            problem, direction, axis, loss, rtol=taylor_rtol, operator=curvature_operator
        )
    return LandscapeSlice(
        axes=(axis,),
        loss=loss,
        metrics=mets,
        directions=(direction.info,),
        center_loss=center,
        taylor=tm,
        recalibrated_bn=recalibrate_bn,
        vectorized=vec,
        num_evaluations=nev,
        wall_time=time.perf_counter() - t0,
        num_nonfinite=int((~np.isfinite(loss)).sum()),
        extra={"num_samples": problem.num_samples, "reduction": problem.reduction},
    )


def slice_2d(
    problem: CurvatureProblem,
    direction_x: Direction,
    direction_y: Direction,
    *,
    steps: int | tuple[int, int] = 21,
    span: tuple[float, float] | tuple[tuple[float, float], tuple[float, float]] = (-1.0, 1.0),
    coords: tuple[Sequence[float], Sequence[float]] | None = None,
    metrics: Mapping[str, Metric] | None = None,
    chunk_size: int | None = None,
    vectorize: bool | str = "auto",
    recalibrate_bn: bool = False,
    progress: bool = False,
) -> LandscapeSlice:
    r"""The loss on a plane :math:`(a, b) \mapsto \mathcal{L}(\theta + a\,d_x + b\,d_y)`.

    Args:
        problem: The model, loss and data.
        direction_x: First direction (rows of ``loss``).
        direction_y: Second direction (columns of ``loss``).
        steps: Points per axis (an int for both, or a pair).
        span: ``(lo, hi)`` for both axes, or one pair per axis.
        coords: Explicit coordinates per axis (overrides ``steps``/``span``).
        metrics: As in :func:`slice_1d`.
        chunk_size: As in :func:`slice_1d`.
        vectorize: As in :func:`slice_1d`.
        recalibrate_bn: As in :func:`slice_1d`.
        progress: As in :func:`slice_1d`.

    Returns:
        A :class:`LandscapeSlice` with ``ndim == 2`` and ``loss[i, j]`` at
        ``(axes[0][i], axes[1][j])``.

    Raises:
        TypeError: Arguments of the wrong type.
        ValueError: Bad grid specification or directions (see :func:`slice_1d`).

    Example:
        >>> import torch
        >>> from nncurv import CurvatureProblem
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> problem = CurvatureProblem(net, torch.nn.CrossEntropyLoss(), data)
        >>> dx, dy = random_direction(problem, seed=0), random_direction(problem, seed=1)
        >>> s = slice_2d(problem, dx, dy, steps=5, metrics={"accuracy": accuracy})
        >>> s.loss.shape, s.metrics["accuracy"].shape
        ((5, 5), (5, 5))
        >>> bool(abs(s.loss[2, 2] - s.center_loss) < 1e-5)  # the centre of the grid is θ
        True
    """
    t0 = time.perf_counter()
    _check_common(
        problem, [direction_x, direction_y], metrics, chunk_size, recalibrate_bn, vectorize
    )
    if coords is not None:
        if len(coords) != 2:
            raise ValueError(f"coords must be a pair of sequences, got {coords!r}")
        axes = [_coords(list(c), (0.0, 1.0), "coords") for c in coords]
    else:
        nx, ny = (steps, steps) if isinstance(steps, int) else tuple(steps)
        if isinstance(span[0], (int, float)):
            sx = sy = span
        else:
            sx, sy = span  # type: ignore[misc]
        axes = [_coords(nx, sx, "steps"), _coords(ny, sy, "steps")]  # type: ignore[arg-type]
    loss, mets, center, vec, nev = _run(
        problem,
        [direction_x, direction_y],
        axes,
        metrics,
        chunk_size,
        vectorize,
        recalibrate_bn,
        progress,
    )
    return LandscapeSlice(
        axes=tuple(axes),
        loss=loss,
        metrics=mets,
        directions=(direction_x.info, direction_y.info),
        center_loss=center,
        taylor=None,
        recalibrated_bn=recalibrate_bn,
        vectorized=vec,
        num_evaluations=nev,
        wall_time=time.perf_counter() - t0,
        num_nonfinite=int((~np.isfinite(loss)).sum()),
        extra={"num_samples": problem.num_samples, "reduction": problem.reduction},
    )
