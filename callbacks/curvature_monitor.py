r"""Curvature monitor: curvature metrics in TensorBoard during training.

Computes curvature metrics of the model being trained every N optimizer steps and logs them to
every attached logger (scalars) and to TensorBoard (histograms, figures, a custom-scalars
layout), on CPU or GPU, single process or DDP, without disturbing training.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from nncurv.callbacks._metrics import (
    BUILTIN,
    CurvatureMetric,
    HessianTrace,
    JacobianNorm,
    MetricContext,
    MetricOutput,
    TopEigenvalues,
    _bad,
    _choice,
    _flag,
    _int_at_least,
)
from nncurv.callbacks._schedule import OverheadBudget, StepSchedule
from nncurv.callbacks._tb import (
    add_density,
    custom_scalars_layout,
    log_scalars,
    tensorboard_writers,
)
from pytorch_lightning.callbacks.callback import Callback
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from nncurv._state import untouched
from nncurv.batches import BatchFormat
from nncurv.problem import (
    CurvatureProblem,
    ParamSelection,
    _dist_initialized,
    _select,
    _unwrap,
    check_reduction,
)

__all__ = ["CurvatureMonitor"]

_LOSS_ATTRS = ("loss_fn", "criterion", "loss_func")

# Hooks Lightning dispatches at every batch. Each dispatch of a callback's hook costs about
# 3 us on CPU (a profiler context and its name) whether or not the callback overrides the hook,
# 1.5 % of a 1 ms training step for the six hooks of a step. Lightning skips a hook attribute
# that is not callable (the ``callable(fn)`` test of ``_call_callback_hooks``, Lightning >= 2.0),
# so the monitor sets the hooks it does not need to ``None`` on the instance.
_MISSING = object()
_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
)


class _Batches:
    """Batches that :class:`CurvatureProblem` reads as an iterable (never as a single batch)."""

    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = list(batches)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _clone(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


def _to_cpu(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().cpu())


def _device(module: torch.nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class CurvatureMonitor(Callback):
    r"""Log curvature metrics of the model during training (Hessian spectrum, trace, ...).

    Every ``every_n_steps`` optimizer steps (or log-spaced), in ``on_train_batch_end`` — i.e.
    at the parameters *after* the optimizer step :math:`\theta_{t}` with ``t =
    trainer.global_step`` — the callback builds the :class:`~nncurv.problem.CurvatureProblem`
    of the probe data at the current parameters and computes the selected metrics:

    * ``"top_eig"`` (default): the ``top_k`` largest Hessian eigenvalues, warm-started from the
      previous call's eigenvectors (``hessian/top_eig_{i}``);
    * ``"trace"`` (default): the Hessian trace with its standard error (``hessian/trace``, ...),
      exact on the Krylov subspace of the top-eigenvalue run and estimated on the rest (see
      :class:`~nncurv.callbacks.HessianTrace`);
    * ``"gradient"``: :math:`g^\top H g / g^\top g`, :math:`\varepsilon^* = g^\top g /
      g^\top H g` beside the learning rate (``gradient/...``), see
      :class:`~nncurv.callbacks.GradientCurvature`;
    * ``"min_eig"``, ``"density"`` (SLQ histogram and figure), ``"diagonal"`` (per-layer
      histograms), ``"layers"`` (per-layer top eigenvalue and trace), ``"jacobian"`` (input
      Jacobian Frobenius norm of the model or of ``jacobian_layer``), ``"information"``
      (observed-information trace, log-determinant, effective dimension and TIC, see
      :class:`~nncurv.callbacks.InformationMetric`), or any
      :class:`~nncurv.callbacks.CurvatureMetric` instance.

    With ``"top_eig"`` and a learning rate, the edge of stability is tracked as
    ``stability/two_over_lr`` (:math:`2/\eta`) and ``stability/sharpness_ratio``
    (:math:`\lambda_{\max}\eta/2`, which reaches 1 at the edge of stability of gradient descent).
    Each call also logs its cost: ``cost/<metric>/seconds``, ``cost/<metric>/matvecs``
    (Hessian-vector products), ``cost/total_seconds`` and ``cost/overhead`` (callback time over
    the rest of the training time so far).

    Tags are ``prefix + key`` (``curvature/hessian/top_eig_0``). Scalars go to every logger
    through ``logger.log_metrics(..., step=trainer.global_step)`` and into
    ``trainer.callback_metrics`` (so that other callbacks can monitor them); histograms,
    figures and the custom-scalars layout go to TensorBoard writers, on rank 0 only.

    Nothing of the training is disturbed: parameters, ``.grad``, optimizer state, buffers
    (BatchNorm statistics), train/eval flags, the global RNG and the loop state are exactly as
    they would have been without the callback, so runs with and without it end with identical
    weights (deterministic settings). Computations run in the parameters' dtype with autocast
    disabled (float32 under ``*-mixed`` precision) unless ``autocast=True``.

    Between calls the monitor costs a few microseconds a step. Lightning dispatches every
    per-batch hook of every callback at every step (about 3 us each, in its profiler's
    context), so at ``setup`` the hooks this run does not need are set to ``None`` on the
    instance, which Lightning skips, and at ``teardown`` they are shown again.
    ``on_train_batch_start`` runs until the probe batches are taken (before the training step
    can change them) and the call at step 0 is made; ``on_validation_batch_end`` runs with
    ``validation``; hooks a subclass overrides or the user sets on the instance are kept.
    ``on_train_batch_end`` is shown only from the step before a scheduled one until its call
    is made: with a single ``torch.optim.Optimizer``, a step hook on it
    (``register_step_post_hook``, removed at the end of fitting) follows the steps instead;
    where that is not possible (see :meth:`_arm`) ``on_train_batch_end`` runs at every step.
    A scheduled step is computed at the first optimizer step that reaches or passes it.

    Under DDP every rank takes part in each product (the distributed operator all-reduces
    each matrix-vector product; probes come from identically seeded generators), so the metrics
    are those of the union of the ranks' probe batches; only rank 0 writes.

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` as the module computes its training loss;
            default: the module's ``loss_fn``/``criterion``/``loss_func`` attribute.
        metrics: Names of built-in metrics and/or :class:`CurvatureMetric` instances (default:
            the top eigenvalue and the trace, a few training steps per call).
        every_n_steps: Interval of the ``"every"`` schedule, in optimizer steps (gradient
            accumulation counts once per step).
        schedule: ``"every"`` or ``"log"`` (about ``points_per_decade`` calls per decade).
        points_per_decade: Density of the ``"log"`` schedule.
        at_fit_start: Also compute before the first step (``step 0``).
        at_fit_end: Also compute at the end of fitting (if the last step was not computed).
        probe: ``"fixed"``: the first training batch (per rank), kept for the whole run so
            that values are comparable over time (saved in checkpoints); an int ``m``: the first
            ``m`` training batches; ``"fresh"``: the current training batch at each call.
        probe_data: Explicit probe data instead (a batch or an iterable of batches).
        reduction: How ``loss_fn`` reduces over a batch (``"mean"`` or ``"sum"``).
        params: Parameter selection (see :class:`~nncurv.problem.CurvatureProblem`).
        batchnorm: ``"eval"`` (running statistics) or ``"batch"`` (batch statistics, running
            ones untouched).
        dropout: ``"off"`` or ``"on"`` (masks fixed per batch and call).
        batch_format: How batches are split and the model called.
        hessian_mode: Hessian-vector product mode (``"auto"``: cached, verified by its first
            product, with a fall-back to the functional modes).
        top_k: Number of top eigenvalues of the ``"top_eig"`` metric.
        trace_matvecs: Budget of the ``"trace"`` metric.
        jacobian_layer: Layer of the ``"jacobian"`` metric (``None``: the model output).
        validation: Also compute at the end of each validation epoch (and in standalone
            ``trainer.validate()``), on the first validation batch, under ``prefix + "val/"``.
        overhead_budget: Cap on the callback's time as a fraction of the training time without
            it (``0.05``: at most 5 % slower); scheduled calls that would exceed it are postponed.
            The callback's time counts its calls, its per-step hooks, the slowdown of the
            steps right after each call and a per-step estimate of what it cannot time (see
            :class:`~nncurv.callbacks.OverheadBudget`).
        autocast: Run under the trainer's precision context instead of disabling autocast.
        prefix: Tag prefix.
        seed: Base seed of the probe vectors.
        on_error: ``"warn"``: a failing metric is logged as NaN with one warning naming the
            cause and training goes on; ``"raise"``: the error propagates.

    Raises:
        MisconfigurationException: Bad arguments (here), or no logger / no loss function (in
            ``setup``).

    Example::

        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import TensorBoardLogger
        >>> from nncurv.callbacks import CurvatureMonitor
        >>> monitor = CurvatureMonitor(torch.nn.CrossEntropyLoss(), metrics=["top_eig", "gradient"])
        >>> [m.name for m in monitor.metrics], monitor.schedule.steps(1000)[:3]
        (['top_eig', 'gradient'], [200, 400, 600])
        >>> logger = TensorBoardLogger("logs")
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=logger)  # doctest: +SKIP
    """

    def __init__(
        self,
        loss_fn: Callable[..., Tensor] | None = None,
        *,
        metrics: Sequence[str | CurvatureMetric] = ("top_eig", "trace"),
        every_n_steps: int = 200,
        schedule: Literal["every", "log"] = "every",
        points_per_decade: int = 10,
        at_fit_start: bool = False,
        at_fit_end: bool = False,
        probe: Literal["fixed", "fresh"] | int = "fixed",
        probe_data: Any = None,
        reduction: Literal["mean", "sum"] = "mean",
        params: ParamSelection = None,
        batchnorm: Literal["eval", "batch"] = "eval",
        dropout: Literal["off", "on"] = "off",
        batch_format: BatchFormat | None = None,
        hessian_mode: str = "auto",
        top_k: int = 1,
        trace_matvecs: int = 10,
        jacobian_layer: str | None = None,
        validation: bool = False,
        overhead_budget: float | None = None,
        autocast: bool = False,
        prefix: str = "curvature/",
        seed: int = 0,
        on_error: Literal["warn", "raise"] = "warn",
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise _bad(self, "loss_fn", loss_fn, "callable")
        for name, count in [
            ("every_n_steps", every_n_steps),
            ("points_per_decade", points_per_decade),
            ("top_k", top_k),
            ("trace_matvecs", trace_matvecs),
        ]:
            _int_at_least(self, name, count)
        for name, value, choices in [
            ("schedule", schedule, ("every", "log")),
            ("reduction", reduction, ("mean", "sum")),
            ("batchnorm", batchnorm, ("eval", "batch")),
            ("dropout", dropout, ("off", "on")),
            ("on_error", on_error, ("warn", "raise")),
            ("hessian_mode", hessian_mode, ("auto", "cached", *_FUNCTIONAL_MODES)),
        ]:
            _choice(self, name, value, choices)
        count = isinstance(probe, int) and not isinstance(probe, bool) and probe >= 1
        if not (count or probe in ("fixed", "fresh")):
            raise _bad(self, "probe", probe, "'fixed', 'fresh' or a positive integer")
        if overhead_budget is not None and not (
            isinstance(overhead_budget, (int, float)) and 0 < overhead_budget <= 10
        ):
            raise _bad(
                self, "overhead_budget", overhead_budget, "None or a fraction > 0 (0.05 = 5 %)"
            )
        if not isinstance(prefix, str):
            raise _bad(self, "prefix", prefix, "a string")
        if batch_format is not None and not isinstance(batch_format, BatchFormat):
            raise _bad(self, "batch_format", batch_format, "a BatchFormat")
        if jacobian_layer is not None and not isinstance(jacobian_layer, str):
            raise _bad(self, "jacobian_layer", jacobian_layer, "None or a module name")
        for flag_name, flag in [
            ("at_fit_start", at_fit_start),
            ("at_fit_end", at_fit_end),
            ("validation", validation),
            ("autocast", autocast),
        ]:
            _flag(self, flag_name, flag)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad(self, "seed", seed, "an integer")
        if probe_data is not None and not isinstance(probe_data, Iterable):  # (a batch is too)
            raise _bad(self, "probe_data", probe_data, "None, a batch or an iterable of batches")
        self.metrics = self._build_metrics(metrics, top_k, trace_matvecs, jacobian_layer)
        self.loss_fn = loss_fn
        self.schedule = StepSchedule(schedule, every_n_steps, points_per_decade)
        self.at_fit_start = at_fit_start
        self.at_fit_end = at_fit_end
        self.probe = probe
        self.probe_data = probe_data
        self.reduction = reduction
        self.params = params
        self.batchnorm = batchnorm
        self.dropout = dropout
        self.batch_format = batch_format
        self.hessian_mode = hessian_mode
        # what "auto" settled on at an earlier call (run time only; not in checkpoints)
        self._learned_mode: str | None = None
        self._batched_products: bool | None = None
        self.validation = validation
        self.autocast = autocast
        self.prefix = prefix
        self.seed = seed
        self.on_error = on_error
        self.budget = OverheadBudget(overhead_budget)
        # state (saved in checkpoints)
        self._last_step = -1  # last optimizer step handled (de-duplicates micro-batches)
        self._last_computed = -1
        self._pending = False
        self._num_calls = 0
        self._probe: list[Any] = []
        # run-time only
        self._keys: dict[str, list[str]] = {}  # scalar keys each metric logged last
        self._loss: Callable[..., Tensor] | None = None
        self._writers: list[Any] = []
        self._world_size = 1
        self._fast_dev_run = False
        # probe batches to collect from the first training batches
        self._probe_wanted = 0
        self._hooks_hidden = False  # by _select_hooks (Lightning's setup) until teardown
        # the optimizer's step hook (see _arm): on_train_batch_end is then shown only around
        # scheduled steps; armed once the hook has seen a step
        self._step_hook: Any = None
        self._trainer: pl.Trainer | None = None
        self._armed_optimizer: torch.optim.Optimizer | None = None
        self._armed = False
        self._due: int | None = None  # the next scheduled step after _last_step (cached)
        if probe_data is None and probe != "fresh":
            self._probe_wanted = 1 if probe == "fixed" else int(probe)
        self._layout_written: set[int] = set()
        self._warned: set[str] = set()
        self._loss_checked = False  # the first problem checks that the loss is a scalar
        self._t0: float | None = None
        self._val_batch: Any = None
        self._last_batch: Any = None

    @staticmethod
    def _build_metrics(
        metrics: Sequence[str | CurvatureMetric],
        top_k: int,
        trace_matvecs: int,
        jacobian_layer: str | None,
    ) -> list[CurvatureMetric]:
        if isinstance(metrics, (str, CurvatureMetric)) or not isinstance(metrics, Sequence):
            raise MisconfigurationException(
                f"CurvatureMonitor: metrics must be a list of names or CurvatureMetric "
                f"instances, got {metrics!r}"
            )
        built: list[CurvatureMetric] = []
        for m in metrics:
            if isinstance(m, CurvatureMetric):
                built.append(m)
            elif m == "top_eig":
                built.append(TopEigenvalues(top_k))
            elif m == "trace":
                built.append(HessianTrace(trace_matvecs))
            elif m == "jacobian":
                built.append(JacobianNorm(jacobian_layer))
            elif isinstance(m, str) and m in BUILTIN:
                built.append(BUILTIN[m]())
            else:
                raise MisconfigurationException(
                    f"CurvatureMonitor: unknown metric {m!r}; choose from {sorted(BUILTIN)} or "
                    "pass a CurvatureMetric instance"
                )
        names = [m.name for m in built]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise MisconfigurationException(
                f"CurvatureMonitor: metric names must be unique, got duplicates {dup}"
            )
        if not built:
            raise MisconfigurationException("CurvatureMonitor: metrics is empty")
        # the edge-of-stability ratio needs the top eigenvalue before the gradient metric
        built.sort(key=lambda m: 0 if isinstance(m, TopEigenvalues) and m.name == "top_eig" else 1)
        for i, m in enumerate(built):  # a trace after the top eigenvalues deflates their basis
            if type(m) is TopEigenvalues and any(
                isinstance(t, HessianTrace) and t.deflate for t in built[i + 1 :]
            ):
                m.share_basis = True
        return built

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads this for every hook call (profiler names): build it once
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = self._generate_state_key(prefix=self.prefix)
        return key

    # ------------------------------------------------------------------ setup
    def _start_hook_needed(self) -> bool:
        """Whether ``on_train_batch_start`` still has work: probes to take, the call at step 0."""
        return self._probe_wanted > len(self._probe) or (self.at_fit_start and self._last_step < 0)

    def _hide(self, name: str) -> None:
        """Set hook ``name`` to ``None`` on the instance, which Lightning skips.

        Not done for a hook a subclass overrides or the user set on the instance.
        """
        impl = getattr(type(self), name)
        own = impl is getattr(Callback, name) or impl is getattr(CurvatureMonitor, name)
        if own and name not in self.__dict__:
            setattr(self, name, None)

    def _select_hooks(self) -> None:
        """Hide the per-batch hooks this run does not need from Lightning's dispatch.

        Kept are ``on_train_batch_end``; ``on_train_batch_start`` while probe batches are to be
        taken (before the training step can change them) or the call at step 0 is pending (it
        hides itself afterwards); ``on_validation_batch_end`` with ``validation``; any hook a
        subclass overrides or the user set on the instance. :meth:`teardown` (or an exception)
        shows them again, so that the hooks can be called by hand outside fitting.
        """
        self._show_hooks()
        needed = {
            "on_train_batch_start": self._start_hook_needed(),
            "on_validation_batch_end": self.validation,
        }
        for name in _BATCH_HOOKS:
            if not needed.get(name):
                self._hide(name)
        self._hooks_hidden = True

    def _show_hooks(self) -> None:
        self._disarm()
        for name in _BATCH_HOOKS:
            self._show(name)
        self._hooks_hidden = False

    def _show(self, name: str) -> None:
        if self.__dict__.get(name, _MISSING) is None:
            del self.__dict__[name]

    def _hide_end(self) -> None:
        """With the step hook: hide ``on_train_batch_end`` (a dict write, on the step path)."""
        self.__dict__["on_train_batch_end"] = None

    # --------------------------------------------------------- the optimizer's step hook
    def _arm(self, trainer: pl.Trainer) -> None:
        """Follow the optimizer steps with a step hook on the optimizer (``on_train_start``).

        A torch step hook costs a plain function call, against Lightning's dispatch of a
        callback hook (a profiler context, a name built, ``getattr`` on every callback) and
        the hook itself: about 30 of the Python calls of a step. ``on_train_batch_end`` is
        hidden once the step hook has seen a step, and shown for the steps around a
        scheduled one (see :meth:`_after_optimizer_step`).

        Not done (``on_train_batch_end`` then runs at every step) with several optimizers, an
        optimizer whose ``step`` torch does not wrap with its hooks (one that skips
        ``Optimizer.__init__``), a gradient scaler (``16-mixed``: it skips the steps with
        infinite gradients, several in a row at times, which no step hook sees), a custom
        ``should_compute`` or ``on_train_batch_end`` (subclass or instance), or ``at_fit_end``
        with ``probe="fresh"`` (which keeps the last batch).
        """
        self._disarm()
        optimizers = trainer.optimizers
        opt = optimizers[0] if len(optimizers) == 1 else None
        if (
            not self._hooks_hidden  # (not in a fit set up by Lightning)
            or not isinstance(opt, torch.optim.Optimizer)
            or "_optimizer_step_post_hooks" not in vars(opt)
            or not getattr(type(opt).step, "hooked", False)
            or getattr(trainer.precision_plugin, "scaler", None) is not None
            or self._custom_schedule()
            or type(self).on_train_batch_end is not CurvatureMonitor.on_train_batch_end
            or "on_train_batch_end" in self.__dict__
            or (self.at_fit_end and self.probe == "fresh" and self.probe_data is None)
        ):
            return
        self._trainer = trainer
        self._armed_optimizer = opt
        self._step_hook = opt.register_step_post_hook(self._after_optimizer_step)

    def _custom_schedule(self) -> bool:
        """Whether ``should_compute`` is overridden (by a subclass or on the instance)."""
        return (
            type(self).should_compute is not CurvatureMonitor.should_compute
            or "should_compute" in self.__dict__
        )

    def _disarm(self) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        self._trainer = None
        self._armed_optimizer = None
        if self._armed:
            self._armed = False
            self._show("on_train_batch_end")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.budget.pause()  # (a validation run is no training step, nor a call's aftermath)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.budget.pause()  # (the epoch boundary: end-of-epoch hooks, checkpoints, the loader)
        # an optimizer replaced between epochs (e.g. strategy.setup_optimizers) gets the hook
        if self._step_hook is not None and (
            len(trainer.optimizers) != 1 or trainer.optimizers[0] is not self._armed_optimizer
        ):
            self._arm(trainer)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """The optimizer's step hook: mark the step and show ``on_train_batch_end`` if needed.

        Lightning counts the step when ``optimizer.step`` returns, so this is step
        ``global_step + 1``. ``on_train_batch_end`` is shown for a call that is due (or
        pending) and allowed by the budget, and for the step before a scheduled one: a step
        whose ``optimizer.step`` is skipped (by a custom ``optimizer_step``) reaches no step
        hook, but still counts as a step. (If the step before is skipped too, the call comes
        one step late; a gradient scaler, which can skip several, keeps the per-step hook.)
        """
        trainer = self._trainer
        if trainer is None:  # (a handle that outlived its fit)
            return
        t0 = time.perf_counter()
        self.budget.tick(t0)
        if not self._armed:
            self._armed = True
            self._hide_end()
        step = trainer.global_step + 1
        due = self._next_due()
        if self._pending or step >= due or (self._num_calls == 0 and self._fast_dev_run):
            if self._world_size > 1 or self.budget.allowed(self._elapsed(t0)):
                self._show("on_train_batch_end")  # (under DDP it decides, on every rank)
            else:
                self._postpone()
                self._hide_end()
        elif step + 1 >= due:
            self._show("on_train_batch_end")
        self.budget.spent += time.perf_counter() - t0

    def _next_due(self) -> int:
        """The first scheduled step after the last step handled."""
        if self._due is None or self._due <= self._last_step:
            self._due = self.schedule.next_after(max(self._last_step, 0))
        return self._due

    def _is_due(self, step: int) -> bool:
        """Whether a scheduled step lies in ``(last step handled, step]``."""
        if self._custom_schedule():
            return self.should_compute(step)
        return step >= self._next_due()

    def _postpone(self) -> None:
        self.budget.skipped += 1
        if "budget" not in self._warned:
            b = self.budget
            share = b.estimate_share()
            untimed = (
                f"; of the budget, the estimate of what the callback costs outside its timers "
                f"(OverheadBudget.STEP_CHARGE = {b.STEP_CHARGE:.3g} s a step) takes {share:.2%} "
                "at this step time"
                if b.fraction is not None and share is not None and share >= 0.25 * b.fraction
                else ""
            )
            self._warn_once(
                "budget",
                f"CurvatureMonitor: a call costs {b.last_cost:.3g} s, more than the overhead "
                f"budget of {b.fraction:.1%} allows at this schedule; calls are spaced out to "
                f"stay within it{untimed}",
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._show_hooks()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._show_hooks()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._select_hooks()
        self._configure(trainer, pl_module, stage)

    def _configure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the loss, check the module and find the TensorBoard writers (``setup``)."""
        if stage not in ("fit", "validate"):
            return
        if stage == "validate" and not self.validation:
            return
        self._world_size = trainer.world_size
        self._fast_dev_run = bool(getattr(trainer, "fast_dev_run", False))
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use the CurvatureMonitor callback with a Trainer that has no logger; "
                "pass logger=TensorBoardLogger(...) (or any logger)"
            )
        self._loss = self.loss_fn
        if self._loss is None:
            for attr in _LOSS_ATTRS:
                fn = getattr(pl_module, attr, None)
                if callable(fn):
                    self._loss = fn
                    break
        if self._loss is None:
            raise MisconfigurationException(
                f"CurvatureMonitor: no loss function; pass loss_fn=... or give "
                f"{type(pl_module).__name__} one of the attributes {_LOSS_ATTRS}"
            )
        # the parameter selection, the Jacobian layer and the reduction must fit this module
        module = _unwrap(pl_module)
        try:
            _select(module, self.params)
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"CurvatureMonitor: params: {err}") from err
        try:
            check_reduction(self._loss, self.reduction, owner="the callback")
        except ValueError as err:
            raise MisconfigurationException(f"CurvatureMonitor: {err}") from err
        layers = dict(module.named_modules())
        for metric in self.metrics:
            if isinstance(metric, JacobianNorm) and metric.layer not in (None, *layers):
                names = ", ".join(list(layers)[1:13])
                raise MisconfigurationException(
                    f"CurvatureMonitor: jacobian_layer {metric.layer!r} is not a module of "
                    f"{type(pl_module).__name__}; its modules: {names}"
                )
        self._writers = []
        if trainer.is_global_zero and not getattr(trainer, "fast_dev_run", False):
            self._writers = tensorboard_writers(trainer.loggers)
            if not self._writers:
                self._warn_once(
                    "no-tensorboard",
                    "CurvatureMonitor: no TensorBoard logger attached; scalars are logged to "
                    f"{[type(lg).__name__ for lg in trainer.loggers]}, histograms, figures and "
                    "the custom-scalars layout are skipped",
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self.budget.pause()  # (an instance fitted before: its last tick is not this fit's)
        self._arm(trainer)

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # the probe is taken here, before the training step can change the batch in place
        if self._probe_wanted > len(self._probe):
            self._probe.append(_clone(batch))
        if self.at_fit_start and self._last_step < 0 and trainer.global_step == 0:
            self._last_step = 0
            self._run(trainer, pl_module, batch, 0)
        if self._hooks_hidden and not self._start_hook_needed():
            self._hide("on_train_batch_start")  # its work is done: no more dispatches

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # without the optimizer's step hook every step passes here: kept to a few
        # microseconds, and its time counts as the callback's in the overhead budget
        t0 = time.perf_counter()
        if self.at_fit_end:
            self._last_batch = batch
        step = trainer.global_step
        if step <= self._last_step:
            return  # the same optimizer step (gradient accumulation) or already logged
        if not self._armed and step > 0:  # once an optimizer step (armed: the step hook ticks)
            self.budget.tick(t0)
        if self._is_due(step) or (self._num_calls == 0 and self._fast_dev_run):
            self._pending = True
        self._last_step = step
        if self._pending:
            allowed = self.budget.allowed(self._elapsed(t0))
            if self.budget.fraction is not None and self._world_size > 1:
                allowed = bool(trainer.strategy.broadcast(allowed, src=0))  # same on all ranks
            if allowed:
                self._run(trainer, pl_module, batch, step, at_step=True)
                self._follow(step)
                return
            self._postpone()
        self._follow(step)
        self.budget.spent += time.perf_counter() - t0

    def _follow(self, step: int) -> None:
        """With the step hook: hide this hook again unless the next step is scheduled.

        (Within an optimizer step, under gradient accumulation, it stays as it is.)
        """
        if self._armed and step + 1 < self._next_due():
            self._hide_end()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._disarm()
        step = trainer.global_step
        if self.at_fit_end and step > self._last_computed:
            self._run(trainer, pl_module, self._last_batch, step)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.validation and not trainer.sanity_checking and self._val_batch is None:
            self._val_batch = _clone(batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.validation or trainer.sanity_checking or self._val_batch is None:
            return
        batch, self._val_batch = self._val_batch, None
        self._run(
            trainer, pl_module, batch, trainer.global_step, data=_Batches([batch]), group="val/"
        )

    def should_compute(self, step: int) -> bool:
        """Whether optimizer step ``step`` is scheduled (override for a custom schedule)."""
        return self.schedule(step)

    # ------------------------------------------------------------------ computation
    def _elapsed(self, now: float | None = None) -> float:
        if self._t0 is None:
            return 0.0
        return (time.perf_counter() if now is None else now) - self._t0

    def _probe_batches(self, batch: Any) -> Any:
        if self.probe_data is not None:
            return self.probe_data
        if self.probe == "fresh" or not self._probe:
            return _Batches([batch])
        return _Batches(self._probe)

    def _lr(self, trainer: pl.Trainer) -> float | None:
        try:
            return float(trainer.optimizers[0].param_groups[0]["lr"])
        except (IndexError, KeyError, AttributeError, TypeError, RuntimeError):
            return None

    def _product_mode(self) -> str:
        """The product mode for this call: the user's, or what ``"auto"`` learned before.

        Only a functional mode is learned (one ``"auto"`` fell back to or timed), so that it is
        not probed again; the cached mode is re-chosen by ``"auto"`` at no cost.
        """
        if self.hessian_mode != "auto" or self._learned_mode is None:
            return self.hessian_mode
        return self._learned_mode

    def _precision(self, trainer: pl.Trainer, dev: torch.device) -> Any:
        if self.autocast:
            return trainer.precision_plugin.forward_context()
        return torch.autocast(device_type=dev.type, enabled=False)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _run(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        step: int,
        *,
        data: Any = None,
        group: str = "",
        at_step: bool = False,
    ) -> None:
        if self._loss is None:  # hooks called without setup (e.g. by hand)
            self._configure(trainer, pl_module, "fit")
        dev = _device(pl_module)
        _sync(dev)
        t0 = time.perf_counter()
        out = self._compute(trainer, pl_module, data or self._probe_batches(batch), step, dev)
        self._log(trainer, out, step, group, time.perf_counter() - t0)
        _sync(dev)
        end = time.perf_counter()
        seconds = end - t0
        # a call at a training step: the budget also measures the slower steps after it
        self.budget.record(seconds, now=end if at_step else None)
        self._pending = False
        self._num_calls += 1
        self._last_computed = max(self._last_computed, step)

    def _compute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        data: Any,
        step: int,
        dev: torch.device,
    ) -> tuple[MetricOutput, dict[str, tuple[float, int]]]:
        merged = MetricOutput()
        costs: dict[str, tuple[float, int]] = {}
        lr = self._lr(trainer)
        assert self._loss is not None
        kwargs: dict[str, Any] = {
            "reduction": self.reduction,
            "params": self.params,
            "batchnorm": self.batchnorm,
            "dropout": self.dropout,
            "batch_format": self.batch_format,
            "cache_batches": True,
            "distributed": trainer.world_size > 1,
            "seed": self.seed + step,
            # the loss was checked to be a scalar when the first problem was built; later
            # problems check it at their first evaluation instead of spending a forward pass
            "check_loss": not self._loss_checked,
        }
        with untouched(pl_module), self._precision(trainer, dev):
            try:
                problem = CurvatureProblem(pl_module, self._loss, data, **kwargs)
                self._loss_checked = True
            except Exception as err:
                if self.on_error == "raise":
                    raise
                self._warn_once(
                    "problem",
                    f"CurvatureMonitor: cannot set up the problem at step {step}; its metrics "
                    f"are logged as NaN: {type(err).__name__}: {err}",
                )
                for metric in self.metrics:
                    keys = self._keys.get(metric.name)
                    if keys is None:  # never computed: the keys that need no problem
                        try:
                            keys = metric.names(None)  # type: ignore[arg-type]
                        except Exception:  # noqa: BLE001 - e.g. per-layer keys need the model
                            keys = []
                    merged.scalars.update(dict.fromkeys(keys, math.nan))
                return merged, costs
            ctx = MetricContext(
                problem,
                step=step,
                lr=lr,
                seed=self.seed,
                hessian_mode=self._product_mode(),
                batched_products=self._batched_products,
                loss_fn=self._loss,
                data=data,
                problem_kwargs=kwargs,
            )
            for metric in self.metrics:
                _sync(dev)
                t0, n0 = time.perf_counter(), ctx.num_matvecs
                try:
                    res = metric.compute(ctx)
                except Exception as err:
                    if self.on_error == "raise":
                        raise
                    self._warn_once(
                        metric.name,
                        f"CurvatureMonitor: metric {metric.name!r} failed at step {step} and is "
                        f"logged as NaN: {type(err).__name__}: {err}",
                    )
                    res = MetricOutput(scalars=dict.fromkeys(_safe_names(metric, ctx), math.nan))
                _sync(dev)
                costs[metric.name] = (time.perf_counter() - t0, ctx.num_matvecs - n0)
                for key, msg in ctx.notes:
                    self._warn_once(key, f"CurvatureMonitor: {key}: {msg}")
                ctx.notes.clear()
                merged.scalars.update(res.scalars)
                self._keys[metric.name] = list(res.scalars)
                merged.histograms.update(res.histograms)
                merged.densities.update(res.densities)
                merged.figures.update(res.figures)
            # keep what "auto" chose (the product mode, the matmat strategy) for later calls
            mode, batched = ctx.learned()
            if self.hessian_mode == "auto" and mode in _FUNCTIONAL_MODES:
                # "auto" found the cached mode failing or, with many probe batches, timed the
                # functional modes: later calls skip that (a verified "cached" costs nothing to
                # re-choose, and is re-chosen only while the probe data has few batches)
                self._learned_mode = mode
            if self._batched_products is None:
                self._batched_products = batched
            top = ctx.results.get("top_eig")
            if top is not None and lr is not None:
                merged.scalars["stability/sharpness_ratio"] = top * lr / 2
                if lr > 0:
                    merged.scalars["stability/two_over_lr"] = 2 / lr
            ctx.release()
        return merged, costs

    def _log(
        self,
        trainer: pl.Trainer,
        result: tuple[MetricOutput, dict[str, tuple[float, int]]],
        step: int,
        group: str,
        seconds: float,
    ) -> None:
        out, costs = result
        scalars = dict(out.scalars)
        for name, (sec, nmv) in costs.items():
            scalars[f"cost/{name}/seconds"] = sec
            scalars[f"cost/{name}/matvecs"] = float(nmv)
        scalars["cost/total_seconds"] = seconds
        spent = self.budget.spent + seconds
        other = self.budget.elapsed_before + self._elapsed() - spent
        scalars["cost/overhead"] = spent / other if other > 0 else math.nan
        pre = self.prefix + group
        tags = {pre + k: float(v) for k, v in scalars.items()}
        shared = trainer.callback_metrics  # a property that merges results on every access
        for tag, value in tags.items():
            shared[tag] = torch.tensor(value, dtype=torch.float64)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            log_scalars(logger, tags, step)
        for w in self._writers:
            # the layout is written once (TensorBoard reads one per run), from a training call:
            # its charts are those of the training metrics
            if not group and id(w) not in self._layout_written:
                self._layout_written.add(id(w))
                w.add_custom_scalars(custom_scalars_layout(pre, list(scalars)))
            for key, values in out.histograms.items():
                w.add_histogram(pre + key, values.detach().float().cpu(), global_step=step)
            for key, slq in out.densities.items():
                add_density(w, pre + key, slq, step)
            for key, make in out.figures.items():
                try:
                    w.add_figure(pre + key, make(), global_step=step, close=True)
                except ImportError as err:
                    self._warn_once("figure", f"CurvatureMonitor: no figure logged ({err})")

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        # Under DDP every rank holds its own probe batches and only rank 0's state reaches the
        # checkpoint: the probes of all ranks are gathered into it (Lightning builds the
        # checkpoint on every rank, so this collective is met everywhere)
        probe = [_to_cpu(b) for b in self._probe]
        probes: list[Any] = [probe]
        if _dist_initialized() and torch.distributed.get_world_size() > 1:
            probes = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(probes, probe)
        return {
            "last_step": self._last_step,
            "last_computed": self._last_computed,
            "pending": self._pending,
            "num_calls": self._num_calls,
            "probes_by_rank": probes,
            "budget": {
                "spent": self.budget.spent,
                "elapsed": self.budget.elapsed_before + self._elapsed(),
                "last_cost": self.budget.last_cost,
            },
            "metrics": {m.name: m.state_dict() for m in self.metrics},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self._due = None
        self._last_computed = int(state_dict.get("last_computed", -1))
        self._pending = bool(state_dict.get("pending", False))
        self._num_calls = int(state_dict.get("num_calls", 0))
        probes = state_dict.get("probes_by_rank", [state_dict.get("probe", [])])
        world = torch.distributed.get_world_size() if _dist_initialized() else 1
        rank = torch.distributed.get_rank() if _dist_initialized() else 0
        if len(probes) == world:
            self._probe = list(probes[rank])
        else:  # resumed on another number of processes: each rank draws its probe again
            self._probe = []
            self._warn_once(
                "resume-world",
                f"CurvatureMonitor: the checkpoint holds the probe batches of {len(probes)} "
                f"process(es), this run has {world}; the probe batches are drawn again",
            )
        budget = state_dict.get("budget", {})
        self.budget.spent = float(budget.get("spent", 0.0))
        self.budget.elapsed_before = float(budget.get("elapsed", 0.0))
        self.budget.last_cost = budget.get("last_cost")
        for m in self.metrics:
            m.load_state_dict(state_dict.get("metrics", {}).get(m.name, {}))


_FUNCTIONAL_MODES = ("forward-over-reverse", "reverse-over-reverse")


def _safe_names(metric: CurvatureMetric, ctx: MetricContext) -> list[str]:
    try:
        return metric.names(ctx)
    except Exception:  # noqa: BLE001 - names of a broken metric are best effort
        warnings.warn(f"CurvatureMonitor: cannot list the keys of {metric.name!r}", stacklevel=2)
        return []
