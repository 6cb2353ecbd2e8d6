r"""The metrics :class:`~nncurv.callbacks.CurvatureMonitor` computes, one class per metric.

A metric takes a :class:`MetricContext` (the curvature problem of the probe data at the current
parameters, the learning rate, seeded generators, a shared Hessian operator) and returns a
:class:`MetricOutput` (scalars, histograms, figures). Subclass :class:`CurvatureMetric` and pass
an instance in ``metrics=[...]`` to add one; metrics that keep state across calls (warm starts)
save it through :meth:`CurvatureMetric.state_dict`.

Every quantity is computed with the operators and algorithms of nncurv on the parameters as they
are (detached), inside the guards of :class:`~nncurv.problem.CurvatureProblem`: nothing here
touches ``.grad``, buffers, flags or the global RNG.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor

from nncurv.jacobians import jacobian_frobenius_sq
from nncurv.linalg import (
    deflated_hutchinson_trace,
    diagonal,
    eigenvalues,
    exact_trace,
    spectral_density,
    trace,
)
from nncurv.linalg.density import SpectralDensity
from nncurv.operators import HessianOperator
from nncurv.problem import CurvatureProblem

__all__ = [
    "MetricContext",
    "MetricOutput",
    "CurvatureMetric",
    "TopEigenvalues",
    "MinEigenvalue",
    "HessianTrace",
    "SpectralDensityMetric",
    "HessianDiagonal",
    "LayerCurvature",
    "GradientCurvature",
    "JacobianNorm",
    "InformationMetric",
]


def _bad(owner: object, name: str, value: object, want: str) -> MisconfigurationException:
    return MisconfigurationException(
        f"{type(owner).__name__}: {name} must be {want}, got {value!r}"
    )


def _int_at_least(owner: object, name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(owner, name, value, f"an integer >= {minimum}")


def _positive(owner: object, name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(float(value)) and float(value) > 0):  # type: ignore[arg-type]
        raise _bad(owner, name, value, "a positive number" + (" or None" if optional else ""))


def _flag(owner: object, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _bad(owner, name, value, "True or False")


def _choice(owner: object, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _bad(owner, name, value, f"one of {choices}")


@dataclass
class MetricOutput:
    """What one metric produced at one call.

    Attributes:
        scalars: ``{key: value}``; keys are relative tags such as ``"hessian/top_eig_0"``.
        histograms: ``{key: samples}`` logged with ``add_histogram`` (TensorBoard only).
        densities: ``{key: SpectralDensity}`` logged as native TensorBoard histograms.
        figures: ``{key: factory}``; each factory returns a matplotlib figure and is called only
            on rank 0 when a TensorBoard writer is attached.
    """

    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Tensor] = field(default_factory=dict)
    densities: dict[str, SpectralDensity] = field(default_factory=dict)
    figures: dict[str, Callable[[], Any]] = field(default_factory=dict)


class MetricContext:
    """Everything a metric needs at one call; operators are built lazily and shared.

    Attributes:
        results: Values metrics share within a call (``"top_eig"``: the largest eigenvalue).
        notes: ``(key, message)`` pairs a metric reports for a value it logs as NaN; the
            callback warns once per key.
        extra_matvecs: Products spent outside the context's operators (a metric adds them).

    Args:
        problem: The curvature problem of the probe data at the current parameters.
        step: The optimizer step (``trainer.global_step``).
        lr: Learning rate of the first parameter group of the first optimizer (``None``
            outside fitting).
        seed: Base seed; :meth:`generator` derives one stream per metric and step from it, the
            same on every rank.
        hessian_mode: Mode of the :class:`~nncurv.operators.HessianOperator` (``"auto"``: the
            cached mode, verified by its first product, with a fall-back when it fails).
        batched_products: ``matmat`` strategy of the whole-problem Hessian operator (``None``:
            measured by its first wide ``matmat``, see
            :class:`~nncurv.operators.HessianOperator`).
        loss_fn: The loss (default: the problem's).
        data: The probe data the problem was built from (for metrics that build their own
            operators, e.g. the observed information).
        problem_kwargs: The :class:`CurvatureProblem` options of ``problem`` (``params``,
            ``batchnorm``, ``distributed``, ...), for the same purpose.
    """

    def __init__(
        self,
        problem: CurvatureProblem,
        *,
        step: int,
        lr: float | None,
        seed: int,
        hessian_mode: str,
        batched_products: bool | None = None,
        loss_fn: Callable[..., Tensor] | None = None,
        data: Any = None,
        problem_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.problem = problem
        self.step = step
        self.lr = lr
        self.seed = seed
        self.hessian_mode = hessian_mode
        self.batched_products = batched_products
        self.loss_fn = loss_fn if loss_fn is not None else problem.loss_fn
        self.data = data
        self.problem_kwargs = dict(problem_kwargs or {})
        self.results: dict[str, Any] = {}
        self.notes: list[tuple[str, str]] = []
        self.extra_matvecs = 0
        self._ops: dict[str | None, HessianOperator] = {}
        self._blocks: dict[str, CurvatureProblem] | None = None

    def hessian(self, block: str | None = None) -> HessianOperator:
        """The Hessian operator of the whole problem (``block=None``) or of one block."""
        if block not in self._ops:
            problem = self.problem if block is None else self.block_problems()[block]
            mode = self.hessian_mode
            if block is not None and None in self._ops:
                mode = self._ops[None].mode
            op = HessianOperator(
                problem,
                mode=mode,  # type: ignore[arg-type]
                batched_products=self.batched_products if block is None else None,
            )
            self._ops[block] = op
        return self._ops[block]

    def learned(self) -> tuple[str, bool | None]:
        """The product mode and ``matmat`` strategy the whole-problem operator settled on.

        ``("auto", None)`` parts stay undecided until a product has verified them; the callback
        passes the decisions to the next call's context so they are made once per fit.
        """
        op = self._ops.get(None)
        if op is None or op.num_matvecs == 0 or op._unverified:
            return self.hessian_mode, self.batched_products
        return op.mode, op.batched_products

    def block_problems(self) -> dict[str, CurvatureProblem]:
        """One problem per parameter block (layer), see :meth:`CurvatureProblem.blocks`."""
        if self._blocks is None:
            self._blocks = self.problem.block_problems()
        return self._blocks

    def generator(self, name: str) -> torch.Generator:
        """A generator on the problem's device seeded from ``(seed, step, name)``."""
        gen = torch.Generator(device=self.problem.device)
        gen.manual_seed(
            (self.seed * 1_000_003 + self.step * 7919 + zlib.crc32(name.encode())) % 2**63
        )
        return gen

    @property
    def num_matvecs(self) -> int:
        """Products spent so far by the operators of this context and by metrics' own."""
        return sum(op.num_matvecs for op in self._ops.values()) + self.extra_matvecs

    def release(self) -> None:
        """Drop the operators and the graphs they cache."""
        for op in self._ops.values():
            op.release()
        self._ops.clear()


class CurvatureMetric:
    """Base class of the metrics; subclass it and pass an instance to add a metric.

    Subclasses set :attr:`name` (unique; used in warnings, cost tags and checkpoint state),
    implement :meth:`compute` and :meth:`names` (the scalar keys, logged as NaN when the
    computation fails) and, for state across calls, :meth:`state_dict`/:meth:`load_state_dict`.
    """

    name: str = "metric"

    def names(self, ctx: MetricContext) -> list[str]:
        """Scalar keys this metric logs (relative tags)."""
        return []

    def compute(self, ctx: MetricContext) -> MetricOutput:
        """Compute the metric at the context's parameters."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State to resume from (CPU tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


def _cpu(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().cpu()


class _WarmStart:
    """Previous eigenvectors per operator key, reused as Lanczos start vectors."""

    def __init__(self) -> None:
        self.vectors: dict[str, Tensor] = {}

    def get(self, key: str, op: HessianOperator) -> Tensor | None:
        v = self.vectors.get(key)
        if v is None or v.shape[0] != op.shape[0]:
            return None
        return v.to(device=op.device, dtype=op.dtype)

    def set(self, key: str, vecs: Tensor | None) -> None:
        # (unit columns: their sum is finite exactly when they are)
        if vecs is not None and math.isfinite(float(vecs.sum())):
            self.vectors[key] = vecs.detach()

    def state(self) -> dict[str, Any]:
        return {k: _cpu(v) for k, v in self.vectors.items()}

    def load(self, state: dict[str, Any]) -> None:
        self.vectors = {k: v for k, v in state.items() if isinstance(v, Tensor)}


class TopEigenvalues(CurvatureMetric):
    r"""The ``k`` largest Hessian eigenvalues (sharpness), warm-started from the previous call.

    Lanczos (:func:`nncurv.linalg.eigenvalues`, ``which="LA"``) starts from the eigenvectors of
    the previous call, which change slowly during training, so a call typically costs a handful
    of Hessian-vector products. Logs ``hessian/top_eig_{i}`` and ``hessian/top_eig_converged``.

    The default tolerance is loose on purpose: a relative residual :math:`\epsilon` bounds the
    eigenvalue error by :math:`\epsilon^2\lambda^2/\mathrm{gap}` (about :math:`10^{-4}\lambda`
    at the default on the digits models), and each halving of :math:`\epsilon` costs products.
    A loose tolerance has one failure mode: right after the two largest eigenvalues cross, the
    warm start lies along what is now the second eigenvector and its Ritz pair converges before
    the new top direction emerges, so the second eigenvalue is reported (measured on the
    digits MLP every 50-200 steps: 2 calls in 220, 8-10 % low; mixing a random vector into the
    start or adding the previous second Ritz vector did not prevent it). Lower ``tol`` where
    that matters. ``benchmarks/top_eig_tolerance.py`` measures products and errors against the
    tolerance on the digits models: at 1e-2 every warm call stayed within 1e-3 of a tight
    solve, at 1.5e-2 about 0.3 products a call fewer but 2 of 59 calls at 2e-3 (top two at the
    edge of stability).

    Args:
        k: Number of eigenvalues.
        tol: Relative residual tolerance of the Ritz pairs.
        max_matvecs: Budget of products per call.
        warm_start: Start from the previous call's eigenvectors.
    """

    name = "top_eig"

    def __init__(
        self,
        k: int = 1,
        *,
        tol: float | None = 1e-2,
        max_matvecs: int | None = None,
        warm_start: bool = True,
    ) -> None:
        _int_at_least(self, "k", k)
        _positive(self, "tol", tol, optional=True)
        if max_matvecs is not None:
            _int_at_least(self, "max_matvecs", max_matvecs, minimum=k)
        _flag(self, "warm_start", warm_start)
        self.k = k
        self.tol = tol
        self.max_matvecs = max_matvecs
        self.warm_start = warm_start
        self._warm = _WarmStart()
        # set by the monitor when a HessianTrace follows: the Krylov basis of this call is
        # shared through ctx.results["krylov_basis"] so that the trace deflates it for free
        self.share_basis = False

    def names(self, ctx: MetricContext) -> list[str]:
        return [f"hessian/top_eig_{i}" for i in range(self.k)] + ["hessian/top_eig_converged"]

    def _solve(self, ctx: MetricContext, k: int, which: str) -> Any:
        """Warm-started Lanczos on the context's Hessian.

        Keeps the eigenvectors for the next call and shares the Krylov basis when asked
        (``share_basis``).
        """
        op = ctx.hessian()
        res = eigenvalues(
            op,
            k,
            which=which,  # type: ignore[arg-type]
            tol=self.tol,
            max_matvecs=self.max_matvecs,
            v0=self._warm.get("", op) if self.warm_start else None,
            return_eigenvectors=True,
            return_basis=self.share_basis,
            generator=ctx.generator(self.name),
        )
        self._warm.set("", res.eigenvectors)
        if res.krylov_basis is not None and res.krylov_projection is not None:
            ctx.results["krylov_basis"] = (res.krylov_basis, res.krylov_projection.trace())
        return res

    def compute(self, ctx: MetricContext) -> MetricOutput:
        k = min(self.k, ctx.hessian().shape[0])
        res = self._solve(ctx, k, "LA")
        ctx.results["top_eig"] = float(res.eigenvalues[0])
        vals = res.eigenvalues.tolist() + [math.nan] * (self.k - k)
        out = {f"hessian/top_eig_{i}": v for i, v in enumerate(vals)}
        out["hessian/top_eig_converged"] = float(res.converged)
        return MetricOutput(scalars=out)

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": self._warm.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._warm.load(state.get("vectors", {}))


class MinEigenvalue(TopEigenvalues):
    """The most negative Hessian eigenvalue (``which="SA"``), warm-started; ``hessian/min_eig``."""

    name = "min_eig"

    def __init__(self, *, tol: float | None = 1e-2, max_matvecs: int | None = None) -> None:
        super().__init__(1, tol=tol, max_matvecs=max_matvecs)

    def names(self, ctx: MetricContext) -> list[str]:
        return ["hessian/min_eig"]

    def compute(self, ctx: MetricContext) -> MetricOutput:
        res = self._solve(ctx, 1, "SA")
        return MetricOutput(scalars={"hessian/min_eig": float(res.eigenvalues[0])})


def _trace(op: HessianOperator, num_matvecs: int, method: str, gen: torch.Generator) -> Any:
    if op.shape[0] <= num_matvecs:
        return exact_trace(op)
    return trace(op, num_matvecs, method=method, generator=gen)  # type: ignore[arg-type]


class HessianTrace(CurvatureMetric):
    r"""Hessian trace with its standard error.

    When the top eigenvalues are computed in the same call (the monitor runs ``"top_eig"``
    first) and ``deflate`` is on, the trace is the exact trace on their Krylov
    subspace :math:`V` (known from the Lanczos run, no product) plus Hutchinson with
    ``num_matvecs`` probes on its orthogonal complement
    (:func:`nncurv.linalg.deflated_hutchinson_trace`): the sharp directions that dominate the
    variance are removed for free, and the probes run as one batched product. Otherwise
    :func:`nncurv.linalg.trace` with ``method`` spends the budget (XTrace by default: a smaller
    error than Hutchinson, but a standard error that underestimates it by 1.2-1.5x;
    ``"hutchinson"`` for a calibrated margin). Exact (``n`` products) when the model has at
    most ``num_matvecs`` parameters. Logs
    ``hessian/trace``, ``hessian/trace_stderr`` and ``hessian/trace_lower``/``_upper``
    (:math:`\pm 2` standard errors, drawn as a margin chart in TensorBoard).

    Args:
        num_matvecs: Budget of products per call.
        method: ``"xtrace"``, ``"hutch++"``, ``"hutchinson"`` or ``"auto"`` (without a
            Krylov basis to deflate).
        deflate: Deflate the Krylov basis of the call's top-eigenvalue run when there is one.
    """

    name = "trace"

    def __init__(
        self, num_matvecs: int = 10, *, method: str = "xtrace", deflate: bool = True
    ) -> None:
        least = {"hutchinson": 1, "auto": 2, "xtrace": 2, "hutch++": 3}
        _choice(self, "method", method, tuple(least))
        _int_at_least(self, "num_matvecs", num_matvecs, minimum=least[method])
        _flag(self, "deflate", deflate)
        self.num_matvecs = num_matvecs
        self.method = method
        self.deflate = deflate

    def names(self, ctx: MetricContext) -> list[str]:
        return [f"hessian/trace{s}" for s in ("", "_stderr", "_lower", "_upper")]

    def compute(self, ctx: MetricContext) -> MetricOutput:
        op, gen = ctx.hessian(), ctx.generator(self.name)
        # taken out of the context: the basis is a view of the Lanczos workspace
        krylov = ctx.results.pop("krylov_basis", None) if self.deflate else None
        if krylov is not None and op.shape[0] > self.num_matvecs:
            basis, basis_trace = krylov
            r = deflated_hutchinson_trace(
                op, basis, self.num_matvecs, basis_trace=basis_trace, generator=gen
            )
        else:
            r = _trace(op, self.num_matvecs, self.method, gen)
        se = r.standard_error
        return MetricOutput(
            scalars={
                "hessian/trace": r.estimate,
                "hessian/trace_stderr": se,
                "hessian/trace_lower": r.estimate - 2 * se,
                "hessian/trace_upper": r.estimate + 2 * se,
            }
        )


class SpectralDensityMetric(CurvatureMetric):
    r"""Hessian spectral density by stochastic Lanczos quadrature.

    Logged as a native TensorBoard histogram (``hessian/spectral_density``, 60 bins, counts in
    eigenvalues) and, with matplotlib installed and ``figure=True``, a log-scale figure
    (``hessian/spectral_density_plot``); also the scalar ``hessian/negative_mass`` (fraction of
    the spectral mass below :math:`-10^{-3}\max|\lambda|`: closer to zero SLQ cannot tell the
    sign).

    Args:
        num_steps: Lanczos steps per probe.
        num_probes: Number of probes.
        figure: Also log a matplotlib figure.
    """

    name = "density"

    def __init__(self, num_steps: int = 30, *, num_probes: int = 1, figure: bool = True) -> None:
        _int_at_least(self, "num_steps", num_steps)
        _int_at_least(self, "num_probes", num_probes)
        _flag(self, "figure", figure)
        self.num_steps = num_steps
        self.num_probes = num_probes
        self.figure = figure

    def names(self, ctx: MetricContext) -> list[str]:
        return ["hessian/negative_mass"]

    def compute(self, ctx: MetricContext) -> MetricOutput:
        from nncurv.linalg import plot_spectral_density

        slq = spectral_density(
            ctx.hessian(),
            num_probes=self.num_probes,
            num_steps=self.num_steps,
            generator=ctx.generator(self.name),
        )
        out = MetricOutput(
            scalars={"hessian/negative_mass": slq.resolved_negative_mass()},
            densities={"hessian/spectral_density": slq},
        )
        if self.figure:
            out.figures["hessian/spectral_density_plot"] = lambda: plot_spectral_density(slq)
        return out


class HessianDiagonal(CurvatureMetric):
    """Hessian diagonal (XDiag estimate, exact for small models), one histogram per layer.

    Tags ``hessian/diagonal/<layer>`` (TensorBoard histograms only).

    Args:
        num_matvecs: Budget of products per call.
        method: ``"xdiag"``, ``"hutchinson"`` or ``"exact"``.
    """

    name = "diagonal"

    def __init__(self, num_matvecs: int = 20, *, method: str = "xdiag") -> None:
        _choice(self, "method", method, ("auto", "xdiag", "hutchinson", "exact"))
        _int_at_least(self, "num_matvecs", num_matvecs, minimum=1 if method == "hutchinson" else 2)
        self.num_matvecs = num_matvecs
        self.method = method

    def compute(self, ctx: MetricContext) -> MetricOutput:
        op = ctx.hessian()
        r = diagonal(op, self.num_matvecs, method=self.method, generator=ctx.generator(self.name))  # type: ignore[arg-type]
        parts = ctx.problem.unflatten(r.estimate)
        hists = {
            f"hessian/diagonal/{block or 'model'}": torch.cat([parts[n].reshape(-1) for n in names])
            for block, names in ctx.problem.blocks().items()
        }
        return MetricOutput(histograms=hists)


class LayerCurvature(CurvatureMetric):
    """Top eigenvalue and trace of each layer's Hessian block (warm-started per layer).

    Tags ``layer/<name>/top_eig`` and ``layer/<name>/trace`` (``<name>`` is the module name
    owning the parameters, as in :meth:`CurvatureProblem.blocks`).

    Args:
        top_eig: Log each block's top eigenvalue.
        trace: Log each block's trace.
        trace_matvecs: Trace budget per block (exact for smaller blocks).
        tol: Relative residual tolerance of the eigenvalues (see :class:`TopEigenvalues`).
    """

    name = "layers"

    def __init__(
        self,
        *,
        top_eig: bool = True,
        trace: bool = True,
        trace_matvecs: int = 10,
        tol: float = 1e-2,
    ) -> None:
        _flag(self, "top_eig", top_eig)
        _flag(self, "trace", trace)
        _int_at_least(self, "trace_matvecs", trace_matvecs)
        _positive(self, "tol", tol)
        self.top_eig = top_eig
        self.trace = trace
        self.trace_matvecs = trace_matvecs
        self.tol = tol
        self._warm = _WarmStart()

    def names(self, ctx: MetricContext) -> list[str]:
        keys = []
        for block in ctx.problem.blocks():
            b = block or "model"
            keys += [f"layer/{b}/top_eig"] * self.top_eig + [f"layer/{b}/trace"] * self.trace
        return keys

    def compute(self, ctx: MetricContext) -> MetricOutput:
        out: dict[str, float] = {}
        for block in ctx.block_problems():
            b = block or "model"
            op = ctx.hessian(block)
            if self.top_eig:
                res = eigenvalues(
                    op,
                    1,
                    tol=self.tol,
                    v0=self._warm.get(block, op),
                    return_eigenvectors=True,
                    generator=ctx.generator(f"{self.name}/{block}"),
                )
                self._warm.set(block, res.eigenvectors)
                out[f"layer/{b}/top_eig"] = float(res.eigenvalues[0])
            if self.trace:
                gen = ctx.generator(f"{self.name}/{block}/trace")
                out[f"layer/{b}/trace"] = _trace(op, self.trace_matvecs, "xtrace", gen).estimate
            op.release()
        return MetricOutput(scalars=out)

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": self._warm.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._warm.load(state.get("vectors", {}))


class GradientCurvature(CurvatureMetric):
    r"""The second-order view of the next gradient step.

    From :math:`f(\theta - \varepsilon g) \approx f - \varepsilon g^\top g +
    \tfrac12 \varepsilon^2 g^\top H g`: the curvature along the gradient
    :math:`g^\top H g / g^\top g` (``gradient/curvature``), the step size minimising the
    quadratic model :math:`\varepsilon^* = g^\top g / g^\top H g` (``gradient/step_star``, NaN
    when :math:`g^\top H g \le 0`: the model has no minimum along :math:`-g`), the optimizer's
    learning rate (``gradient/lr``) and their ratio, and :math:`\lVert g\rVert`
    (``gradient/norm``). One gradient and one Hessian-vector product.
    """

    name = "gradient"

    def names(self, ctx: MetricContext) -> list[str]:
        keys = ["gradient/norm", "gradient/curvature", "gradient/step_star"]
        return keys + (["gradient/lr", "gradient/step_star_over_lr"] if ctx.lr is not None else [])

    def compute(self, ctx: MetricContext) -> MetricOutput:
        H = ctx.hessian()
        g = H.gradient()  # read from the cached first-order graph when there is one
        hg = H.matvec(g)
        gg, ghg = float(g @ g), float(g @ hg)
        curv = ghg / gg if gg > 0 else math.nan
        eps = gg / ghg if ghg > 0 else math.nan
        out = {
            "gradient/norm": math.sqrt(gg),
            "gradient/curvature": curv,
            "gradient/step_star": eps,
        }
        if ctx.lr is not None:
            out["gradient/lr"] = ctx.lr
            out["gradient/step_star_over_lr"] = eps / ctx.lr if ctx.lr > 0 else math.nan
        return MetricOutput(scalars=out)


class JacobianNorm(CurvatureMetric):
    r"""Mean Frobenius norm :math:`\lVert \partial g(x)/\partial x\rVert_F` over the probe samples.

    ``g`` is the model output or the output of the named ``layer``
    (:func:`nncurv.jacobians.jacobian_frobenius_sq`, BatchNorm in eval mode, dropout off).
    Logged as ``jacobian/fro_norm`` (``jacobian/<layer>/fro_norm`` for a layer); under DDP the
    mean runs over the samples of all ranks.

    Args:
        layer: Module name (as in ``named_modules()``) or ``None`` for the model output.
        method: ``"hutchinson"`` (default), ``"hutch++"`` or ``"exact"``.
        num_probes: Probes per sample for the stochastic methods.
    """

    name = "jacobian"

    def __init__(
        self, layer: str | None = None, *, method: str = "hutchinson", num_probes: int = 4
    ) -> None:
        if layer is not None and not isinstance(layer, str):
            raise _bad(self, "layer", layer, "None or a module name")
        _choice(self, "method", method, ("exact", "hutchinson", "hutch++"))
        _int_at_least(self, "num_probes", num_probes, minimum=3 if method == "hutch++" else 1)
        self.layer = layer
        self.method = method
        self.num_probes = num_probes

    @property
    def _key(self) -> str:
        return "jacobian/fro_norm" if self.layer is None else f"jacobian/{self.layer}/fro_norm"

    def names(self, ctx: MetricContext) -> list[str]:
        return [self._key]

    def compute(self, ctx: MetricContext) -> MetricOutput:
        p = ctx.problem
        total = torch.zeros(2, dtype=torch.float64, device=p.device)
        gen = ctx.generator(self.name)
        with torch.no_grad():
            for batch in p.batches():
                if not isinstance(batch.inputs, Tensor):
                    raise TypeError(
                        f"JacobianNorm needs tensor inputs, got {type(batch.inputs).__name__}"
                    )
                r = jacobian_frobenius_sq(
                    p.model,
                    batch.inputs,
                    layer=self.layer,
                    method=self.method,  # type: ignore[arg-type]
                    num_probes=self.num_probes,
                    generator=gen,
                )
                fro = r.value.detach().clamp_min(0).sqrt().to(torch.float64)
                total += torch.stack(
                    [
                        fro.sum(),
                        torch.tensor(float(fro.numel()), device=p.device, dtype=torch.float64),
                    ]
                )
        total = p.all_reduce(total)
        return MetricOutput(scalars={self._key: float(total[0] / total[1])})


class InformationMetric(CurvatureMetric):
    r"""Observed-information metrics: trace, log-determinant, effective dimension and TIC.

    The observed information :math:`I = \sum_n \nabla^2[-\log p(y_n|x_n,\theta)]` of the probe
    data (:func:`nncurv.information.observed_information`; the loss must be a recognised
    negative log-likelihood, or ``assume_nll=True``; MSE needs ``noise_variance``). Logs
    ``information/trace`` (± ``trace_stderr``), ``information/logdet`` of
    :math:`I + \lambda\,\mathrm{Id}` and ``information/effective_dimension``
    :math:`\sum_i \lambda_i/(\lambda_i+\alpha)` from one SLQ run, and Takeuchi's penalty
    ``information/tic`` :math:`\operatorname{tr}((I+\delta)^{-1}C)` with :math:`C` the gradient
    scatter (CG on probes; ``tic=False`` skips it). Away from a minimum the information is
    indefinite: a value that is then undefined (a Ritz value below :math:`-\lambda`, CG meeting
    negative curvature) is logged as NaN with one warning naming the cause.

    Args:
        prior_precision: :math:`\lambda` of the log-determinant.
        alpha: :math:`\alpha` of the effective dimension (default ``prior_precision``).
        trace_matvecs: Trace budget.
        slq_probes: SLQ probes (at least 2 for a standard error).
        slq_steps: Lanczos steps per probe.
        tic: Also compute TIC.
        tic_damping: :math:`\delta` (default ``prior_precision``).
        tic_probes: Probes of TIC.
        tic_max_iter: CG iterations per TIC solve.
        noise_variance: :math:`\sigma^2` for MSE (a number or ``"estimate"``).
        assume_nll: Accept an unrecognised loss as the negative log-likelihood.
    """

    name = "information"

    def __init__(
        self,
        *,
        prior_precision: float = 1.0,
        alpha: float | None = None,
        trace_matvecs: int = 20,
        slq_probes: int = 2,
        slq_steps: int = 20,
        tic: bool = True,
        tic_damping: float | None = None,
        tic_probes: int = 4,
        tic_max_iter: int = 50,
        noise_variance: float | str | None = None,
        assume_nll: bool = False,
    ) -> None:
        _positive(self, "prior_precision", prior_precision)
        _positive(self, "alpha", alpha, optional=True)
        _positive(self, "tic_damping", tic_damping, optional=True)
        for name, value in [
            ("trace_matvecs", trace_matvecs),
            ("slq_probes", slq_probes),
            ("slq_steps", slq_steps),
            ("tic_probes", tic_probes),
            ("tic_max_iter", tic_max_iter),
        ]:
            _int_at_least(self, name, value)
        _flag(self, "tic", tic)
        _flag(self, "assume_nll", assume_nll)
        if noise_variance != "estimate":
            _positive(self, "noise_variance", noise_variance, optional=True)
        self.prior_precision = prior_precision
        self.alpha = alpha
        self.trace_matvecs = trace_matvecs
        self.slq_probes = slq_probes
        self.slq_steps = slq_steps
        self.tic = tic
        self.tic_damping = tic_damping
        self.tic_probes = tic_probes
        self.tic_max_iter = tic_max_iter
        self.noise_variance = noise_variance
        self.assume_nll = assume_nll

    def names(self, ctx: MetricContext) -> list[str]:
        keys = ["trace", "trace_stderr", "logdet", "logdet_stderr"]
        keys += ["effective_dimension", "effective_dimension_stderr"]
        keys += ["tic", "tic_stderr"] if self.tic else []
        return [f"information/{k}" for k in keys]

    def compute(self, ctx: MetricContext) -> MetricOutput:
        from nncurv import information as inf

        p = ctx.problem
        kw = dict(ctx.problem_kwargs)
        reduction = kw.pop("reduction", p.reduction)
        common: dict[str, Any] = {"reduction": reduction, "noise_variance": self.noise_variance}
        common.update(kw)
        info = inf.observed_information(
            p.model,
            ctx.loss_fn,
            ctx.data,
            assume_nll=self.assume_nll,
            mode=ctx.hessian_mode,
            **common,
        )
        out: dict[str, float] = dict.fromkeys(self.names(ctx), math.nan)
        try:
            tr = _trace(info, self.trace_matvecs, "xtrace", ctx.generator(f"{self.name}/trace"))  # type: ignore[arg-type]
            out["information/trace"] = tr.estimate
            out["information/trace_stderr"] = tr.standard_error
            slq = spectral_density(
                info,
                num_probes=self.slq_probes,
                num_steps=self.slq_steps,
                generator=ctx.generator(f"{self.name}/slq"),
            )
            for key, fn, par in [
                ("logdet", inf.log_determinant, self.prior_precision),
                (
                    "effective_dimension",
                    inf.effective_dimension,
                    self.alpha or self.prior_precision,
                ),
            ]:
                try:
                    r = fn(info, par, density=slq)
                    out[f"information/{key}"] = r.value
                    out[f"information/{key}_stderr"] = r.standard_error
                except ValueError as err:
                    ctx.notes.append((f"information/{key}", f"undefined, logged as NaN: {err}"))
            if self.tic:
                self._tic(ctx, inf, info, common, out)
        finally:
            ctx.extra_matvecs += info.num_matvecs
            info.release()
        return MetricOutput(scalars=out)

    def _tic(
        self, ctx: MetricContext, inf: Any, info: Any, common: dict[str, Any], out: dict[str, float]
    ) -> None:
        p = ctx.problem
        emp = inf.empirical_fisher(
            p.model, ctx.loss_fn, ctx.data, assume_nll=self.assume_nll, **common
        )
        damping = self.prior_precision if self.tic_damping is None else self.tic_damping
        try:
            r = inf.takeuchi_criterion(
                info,
                inf.gradient_covariance(emp),
                method="cg",
                damping=damping,
                num_probes=self.tic_probes,
                max_iter=self.tic_max_iter,
                tol=1e-6,
                seed=int(ctx.generator(f"{self.name}/tic").initial_seed() % 2**31),
            )
            out["information/tic"] = r.value
            out["information/tic_stderr"] = r.standard_error
            if not r.converged:
                ctx.notes.append(
                    ("information/tic", f"CG did not converge in {self.tic_max_iter} iterations")
                )
        except (ValueError, inf.NotPositiveDefiniteError) as err:
            ctx.notes.append(("information/tic", f"undefined, logged as NaN: {err}"))
        finally:
            emp.release()


#: Metrics selectable by name in ``CurvatureMonitor(metrics=[...])``.
BUILTIN: dict[str, Callable[[], CurvatureMetric]] = {
    "top_eig": TopEigenvalues,
    "min_eig": MinEigenvalue,
    "trace": HessianTrace,
    "density": SpectralDensityMetric,
    "diagonal": HessianDiagonal,
    "layers": LayerCurvature,
    "gradient": GradientCurvature,
    "jacobian": JacobianNorm,
    "information": InformationMetric,
}
