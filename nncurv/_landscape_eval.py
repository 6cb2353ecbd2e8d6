"""Evaluate the loss (and metrics) at many points ``θ + Σ_j c_j d_j``, functionally.

Points are processed in chunks; within a chunk ``torch.func.vmap`` runs all points in one
batched forward pass (falling back to a loop when a layer has no batching rule). The user's
module is never mutated: parameters and BatchNorm buffers of each point are passed to
``functional_call`` through :meth:`CurvatureProblem.output`.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.modules.batchnorm import _BatchNorm

from nncurv._landscape_affine import AffinePlan, affine_plan
from nncurv.problem import Batch, CurvatureProblem

__all__ = ["GridEvaluation", "evaluate_points", "Progress", "default_chunk_size"]

Metric = Callable[..., Tensor]


class Progress:
    """A progress bar: tqdm when installed (imported lazily), else a one-line stderr counter."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled, self.count = total, desc, enabled, 0
        self._bar: Any = None
        self._t0 = time.perf_counter()
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
            except ImportError:
                self._bar = None

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        self.count += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        else:
            pct = 100.0 * self.count / max(self.total, 1)
            sys.stderr.write(f"\r{self.desc}: {self.count}/{self.total} ({pct:3.0f}%)")
            sys.stderr.flush()

    def close(self) -> None:
        """Finish the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write(f"\r{self.desc}: done in {time.perf_counter() - self._t0:.1f}s\n")
            sys.stderr.flush()


@dataclass(frozen=True)
class GridEvaluation:
    """Raw values at the points, on the problem's device.

    Attributes:
        loss: ``(P,)`` data-set loss at each point.
        metrics: Name → ``(P,)`` sample-weighted mean of each metric.
        vectorized: Whether vmap was used (``False`` after a fallback to the loop).
        num_evaluations: Forward passes over a batch spent (one per point and batch, twice
            with BatchNorm recalibration).
        first_layer_precomputed: Whether the first-layer affine precomputation was used (on at
            least one batch).
        batched_mlp: Whether the rest of the network ran as batched matrix products (an MLP of
            ``nn.Linear`` and elementwise layers after the precomputed first layer).
    """

    loss: Tensor
    metrics: dict[str, Tensor]
    vectorized: bool
    num_evaluations: int
    first_layer_precomputed: bool = False
    batched_mlp: bool = False


def _bn_modules(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            out.append((name + "." if name else "", m))
    return out


def fast_loss(problem: CurvatureProblem, batch: Batch) -> Callable[[Tensor], Tensor] | None:
    r"""An exact, faster formula for the batch loss of ``outputs``, or ``None``.

    For ``nn.CrossEntropyLoss`` without class weights or label smoothing on ``(N, C)`` logits
    and class-index targets none of which is ignored, the loss is
    :math:`\operatorname{mean}_i(\log\sum_c e^{o_{ic}} - o_{i y_i})` (or the sum): the same
    value as ``F.cross_entropy`` up to float rounding, computed with ``logsumexp`` and
    ``gather``. On CPU this is about 5x faster for few classes (``log_softmax`` over a short
    last dimension is not vectorised there), which matters when thousands of grid points each
    evaluate the loss without a backward pass.
    """
    fn, y = problem.loss_fn, batch.targets
    if type(fn) is not nn.CrossEntropyLoss or not isinstance(y, Tensor):
        return None
    if fn.weight is not None or fn.label_smoothing != 0 or fn.reduction not in ("mean", "sum"):
        return None
    if y.ndim != 1 or y.dtype not in (torch.int64, torch.int32) or y.numel() == 0:
        return None
    if bool((y < 0).any()) or bool((y == fn.ignore_index).any()):
        return None  # ignored targets: the user's loss handles them
    index = y.long().unsqueeze(1)
    mean = fn.reduction == "mean"

    def loss(outputs: Tensor) -> Tensor:
        if outputs.ndim != 2 or outputs.dtype not in (torch.float32, torch.float64):
            return problem.output_loss(outputs, batch)
        per = torch.logsumexp(outputs, dim=1) - outputs.gather(1, index).squeeze(1)
        return per.mean() if mean else per.sum()

    return loss


def _point(
    center: Mapping[str, Tensor], dirs: Sequence[Mapping[str, Tensor]], c: Tensor
) -> dict[str, Tensor]:
    out = {}
    for n, t in center.items():
        p = t
        for j, d in enumerate(dirs):
            p = p + c[j] * d[n]
        out[n] = p
    return out


class _Evaluator:
    def __init__(
        self,
        problem: CurvatureProblem,
        center: Mapping[str, Tensor],
        dirs: Sequence[Mapping[str, Tensor]],
        metrics: Mapping[str, Metric],
        vectorize: bool | str,
    ) -> None:
        self.problem, self.center, self.dirs, self.metrics = problem, center, dirs, metrics
        self.use_vmap = vectorize is True or vectorize == "auto"
        self.strict = vectorize is True
        self.fell_back = False
        self.evals = 0

    def run(
        self,
        fn: Callable[[Tensor, dict[str, Tensor]], Tensor],
        C: Tensor,
        extra: dict[str, Tensor] | None = None,
        extra_factory: Callable[[], dict[str, Tensor]] | None = None,
    ) -> Tensor:
        """``fn(row, extra_row)`` over the rows of ``C`` (vmapped when possible), stacked.

        With ``extra_factory`` the extra inputs are made by it, afresh for the point-by-point
        fallback: a failed vmap may have modified them in place (an ``inplace=True`` module).
        """
        self.evals += C.shape[0]
        extra = (extra_factory() if extra_factory is not None else extra) or {}
        if self.use_vmap:
            try:
                return vmap(fn, randomness="same")(C, extra)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                if self.strict:
                    raise
                self.use_vmap, self.fell_back = False, True
                warnings.warn(
                    f"landscape: vmap over grid points failed ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:160]}); evaluating point by point",
                    RuntimeWarning,
                    stacklevel=4,
                )
                if extra_factory is not None:
                    extra = extra_factory()
        rows = [fn(C[i], {key: t[i] for key, t in extra.items()}) for i in range(C.shape[0])]
        return torch.stack(rows)

    def values_fn(
        self,
        batch: Batch,
        values: Callable[[Tensor], Tensor],
        plan: AffinePlan | None = None,
    ) -> Callable[[Tensor, dict[str, Tensor]], Tensor]:
        """Loss and metrics of one point on ``batch``; ``values`` from :meth:`values_of_output`.

        With ``plan``, from the precomputed first-layer outputs (``num_evaluations`` still
        counts one per point).
        """
        problem = self.problem
        output: Callable[[Tensor, dict[str, Tensor]], Tensor]
        if plan is None:

            def output(c: Tensor, bn_state: dict[str, Tensor]) -> Tensor:
                p = _point(self.center, self.dirs, c)
                p.update(bn_state)
                return problem.output(p, batch)

        else:
            first = {plan.weight, plan.bias}
            center = {n: t for n, t in self.center.items() if n not in first}
            dirs = [{n: t for n, t in d.items() if n not in first} for d in self.dirs]
            fixed = {n: t for n, t in problem._fixed.items() if n not in first}

            def output(c: Tensor, extra: dict[str, Tensor]) -> Tensor:
                # extra["z"]: this point's first-layer output, computed for the whole chunk
                state = {**fixed, **_point(center, dirs, c)}
                return plan.rest_output(problem, state, extra["z"])

        def f(c: Tensor, bn_state: dict[str, Tensor]) -> Tensor:
            return values(output(c, bn_state))

        return f

    def values_of_output(self, batch: Batch, frac: float) -> Callable[[Tensor], Tensor]:
        """``[weighted loss, metric_1 * frac, ...]`` of one point's model output on ``batch``."""
        problem, metrics = self.problem, self.metrics
        fast = fast_loss(problem, batch)

        def values(out: Tensor) -> Tensor:
            value = fast(out) if fast is not None else problem.output_loss(out, batch)
            vals = [(value * batch.weight).to(problem.dtype)]
            for m in metrics.values():
                v = m(out) if batch.targets is None else m(out, batch.targets)
                if not isinstance(v, Tensor):
                    v = torch.as_tensor(v, device=problem.device)
                vals.append(v.to(problem.dtype).reshape(()) * frac)
            return torch.stack(vals)

        return values

    def run_batched_mlp(
        self, plan: AffinePlan, values: Callable[[Tensor], Tensor], C: Tensor, z: Tensor
    ) -> Tensor | None:
        """Values of a chunk through :meth:`AffinePlan.rest_outputs_batched`.

        ``values`` is :meth:`values_of_output` of the batch. ``None`` when the loss or a metric
        cannot be vmapped over the outputs (the caller then takes the vmapped
        ``functional_call`` path).
        """
        out = plan.rest_outputs_batched(self.problem, self.center, self.dirs, C, z)
        try:
            vals = vmap(values, randomness="same")(out)
        except (RuntimeError, NotImplementedError, ValueError):
            return None
        self.evals += C.shape[0]
        return vals


def default_chunk_size(device: torch.device) -> int:
    """Points per vectorised call: 2 on CPU, 64 on accelerators.

    On CPU a chunk's activations should stay in cache: on the 2-core machine of
    ``benchmarks/landscape.py`` (digits MLPs, 1797 samples) chunks of 2 were 1.23-1.30x the
    loop in every run, while chunks of 4-8 ranged from 0.8x to 1.9x with the load of the
    machine's shared cache. Accelerators gain from larger batched kernels.
    """
    return 2 if device.type == "cpu" else 64


def _chunks(P: int, size: int) -> Iterator[slice]:
    for s in range(0, P, size):
        yield slice(s, min(s + size, P))


def _bn_stats(
    ev: _Evaluator,
    C: Tensor,
    chunk_size: int,
    bns: list[tuple[str, _BatchNorm]],
    progress: Progress,
) -> dict[str, Tensor]:
    """Per-point BatchNorm running statistics over the data, ``(P, channels)`` per buffer."""
    problem = ev.problem
    P = C.shape[0]
    dt = problem.dtype
    total = {
        f"{pre}{k}": torch.zeros(P, m.num_features, dtype=dt, device=problem.device)
        for pre, m in bns
        for k in ("running_mean", "running_var")
    }
    for m in (m for _, m in bns):
        m.training = True  # restored by problem.evaluating()
    local = sum(problem.batch_sizes)
    for batch in problem.batches():
        for sl in _chunks(P, chunk_size):

            def f(c: Tensor, _: dict[str, Tensor], batch: Batch = batch) -> Tensor:
                p = _point(ev.center, ev.dirs, c)
                fresh: dict[str, Tensor] = {}
                for pre, m in bns:
                    zeros = torch.zeros(m.num_features, dtype=dt, device=problem.device) + 0 * c[0]
                    fresh[pre + "running_mean"] = zeros
                    fresh[pre + "running_var"] = zeros.clone()
                    fresh[pre + "num_batches_tracked"] = torch.zeros(
                        (), dtype=torch.long, device=problem.device
                    )
                problem.output({**p, **fresh}, batch)
                parts = []
                for pre, m in bns:
                    factor = 1.0 if m.momentum is None else float(m.momentum)
                    parts.append(fresh[pre + "running_mean"] / factor)
                    parts.append(fresh[pre + "running_var"] / factor)
                return torch.cat(parts)

            flat = ev.run(f, C[sl])
            off = 0
            for pre, m in bns:
                k = m.num_features
                total[pre + "running_mean"][sl] += flat[:, off : off + k] * (batch.size / local)
                total[pre + "running_var"][sl] += flat[:, off + k : off + 2 * k] * (
                    batch.size / local
                )
                off += 2 * k
            progress.update(sl.stop - sl.start)
    for m in (m for _, m in bns):
        m.training = False
    if problem.distributed:
        world_local = torch.tensor(float(local), device=problem.device)
        problem.all_reduce(world_local)
        for t in total.values():
            t.mul_(local)
            problem.all_reduce(t)
            t.div_(world_local)
    return total


def evaluate_points(
    problem: CurvatureProblem,
    center: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    coefficients: Tensor,
    *,
    metrics: Mapping[str, Metric] | None = None,
    chunk_size: int | None = None,
    vectorize: bool | str = "auto",
    recalibrate_bn: bool = False,
    precompute_first_layer: bool = True,
    progress: bool = False,
    desc: str = "landscape",
) -> GridEvaluation:
    r"""Loss and metrics at ``center + coefficients @ directions`` for every row of coefficients.

    First-layer affine precomputation: when the model is an ``nn.Sequential`` (possibly nested
    as first children) whose first module is an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``
    applied to the raw input tensor, that layer's output is affine in the coefficients,

    .. math::

        z(c) = L(x;\, W_0, b_0) + \sum_j c_j\, L(x;\, D_j W, D_j b),

    so it is computed ``k + 1`` times per batch instead of once per point, and each point
    evaluates only the rest of the network on :math:`z(c)` (exact up to float rounding). It is
    used automatically when safe (BatchNorm policy ``"eval"``, dropout ``"off"``, no BatchNorm
    recalibration, default batch format, a tensor input, no hooks or tied parameters, finite
    first-layer outputs); other models and batches take the generic path.
    ``precompute_first_layer=False`` turns it off.

    Args:
        problem: The model, loss and data.
        center: Parameter dict of the origin.
        directions: ``k`` parameter dicts.
        coefficients: ``(P, k)`` tensor.
        metrics: Name → ``metric(outputs, targets) -> scalar`` (a batch mean); averaged over
            the data with sample weights.
        chunk_size: Points per vectorised call (default :func:`default_chunk_size`).
        vectorize: ``"auto"`` (vmap, loop on failure), ``True`` (vmap, errors propagate) or
            ``False`` (loop).
        recalibrate_bn: Recompute BatchNorm running statistics on the data at every point.
        precompute_first_layer: Use the first-layer affine precomputation where it applies.
        progress: Show a progress bar.
        desc: Its label.

    Returns:
        A :class:`GridEvaluation`.
    """
    if vectorize not in (True, False, "auto"):
        raise ValueError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
    metrics = dict(metrics or {})
    if chunk_size is None:
        chunk_size = default_chunk_size(problem.device)
    P, k = coefficients.shape
    C = coefficients.to(device=problem.device, dtype=problem.dtype)
    ev = _Evaluator(problem, center, directions, metrics, vectorize)
    bns = _bn_modules(problem.model) if recalibrate_bn else []
    plan = affine_plan(problem) if precompute_first_layer and not recalibrate_bn else None
    used_plan = False
    used_mlp = False
    nb = problem.num_batches
    bar = Progress(P * nb * (2 if bns else 1), desc, progress)
    acc = torch.zeros(P, 1 + len(metrics), dtype=problem.dtype, device=problem.device)
    N = problem.num_samples
    try:
        with problem.evaluating(), torch.no_grad():
            stats = _bn_stats(ev, C, chunk_size, bns, bar) if bns else None
            for batch in problem.batches():
                first = None
                if plan is not None and isinstance(batch.inputs, Tensor):
                    first = plan.first_outputs(problem, center, directions, batch)
                used_plan |= first is not None
                # once per batch: the loss formula inspects the targets
                values = ev.values_of_output(batch, batch.size / N)
                fn = ev.values_fn(batch, values, plan if first is not None else None)
                batched = (
                    first is not None
                    and plan is not None
                    and ev.use_vmap
                    and batch.inputs.dim() == 2
                    and plan.batched_mlp
                )
                for sl in _chunks(P, chunk_size):
                    sub = {key: t[sl] for key, t in stats.items()} if stats else None
                    factory = None
                    if first is not None:
                        factory = lambda f=first, s=sl: {"z": f(C[s])}  # noqa: E731
                    vals = None
                    if batched:
                        assert plan is not None and first is not None
                        vals = ev.run_batched_mlp(plan, values, C[sl], first(C[sl]))
                        batched = vals is not None
                        used_mlp |= batched
                    if vals is None:
                        vals = ev.run(fn, C[sl], sub, extra_factory=factory)
                    acc[sl] += vals
                    bar.update(sl.stop - sl.start)
    finally:
        bar.close()
    acc = problem.all_reduce(acc)
    names = list(metrics)
    return GridEvaluation(
        loss=acc[:, 0],
        metrics={n: acc[:, 1 + i] for i, n in enumerate(names)},
        vectorized=ev.use_vmap and not ev.fell_back,
        num_evaluations=ev.evals,
        first_layer_precomputed=used_plan,
        batched_mlp=used_mlp,
    )
