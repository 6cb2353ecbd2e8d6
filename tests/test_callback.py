"""CurvatureMonitor: exact values, schedule, loggers, resume, failures, validation, budget."""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from nncurv.callbacks import (
    CurvatureMetric,
    CurvatureMonitor,
    HessianDiagonal,
    HessianTrace,
    InformationMetric,
    JacobianNorm,
    LayerCurvature,
    MetricOutput,
    MinEigenvalue,
    OverheadBudget,
    SpectralDensityMetric,
    StepSchedule,
    TopEigenvalues,
)
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from nncurv.linalg import NonFiniteError
from tests.test_callback_common import (  # noqa: F401 - one_thread is a fixture
    QUIET,
    Regression,
    closed_form_gradient,
    closed_form_hessian,
    loader,
    make_trainer,
    one_thread,
    read_events,
    regression_data,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    *[pytest.mark.filterwarnings(q) for q in QUIET],
]

P = "curvature/"


class SpyLogger(CSVLogger):
    """Records every ``log_metrics`` call."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir, name="csv", version=0)
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))
        super().log_metrics(metrics, step)

    def curvature_steps(self, key: str = P + "hessian/top_eig_0") -> list[int | None]:
        return [s for s, m in self.calls if key in m]


def _single(scalars: dict[str, list[tuple[int, float]]], tag: str) -> float:
    values = {v for _, v in scalars[tag]}
    assert len(values) == 1, (tag, scalars[tag])
    return values.pop()


# --------------------------------------------------------------------------- exact values
@pytest.mark.parametrize("probe", ["fixed", 2, "data"])
def test_logged_values_equal_closed_form_of_linear_regression(tmp_path, probe):
    """lr=0 keeps the parameters fixed: H = 2 A^T A / N on the probe batch, at every call."""
    X, y = regression_data(32, 4)
    model = Regression(4, lr=0.0)
    batch = 8
    if probe == "data":
        kwargs: dict[str, Any] = {"probe_data": (X, y)}
        Xp, yp = X, y
    else:
        kwargs = {"probe": probe}
        m = 1 if probe == "fixed" else probe
        Xp, yp = X[: m * batch], y[: m * batch]
    cb = CurvatureMonitor(
        metrics=[
            TopEigenvalues(2, tol=1e-10),
            "trace",
            MinEigenvalue(tol=1e-10),
            "gradient",
            LayerCurvature(tol=1e-10),
        ],
        every_n_steps=2,
        **kwargs,
    )
    trainer = make_trainer(tmp_path, [cb], max_steps=4, precision="64-true")
    trainer.fit(model, loader(X, y, batch))
    scalars, _ = read_events(trainer.logger.log_dir)

    H = closed_form_hessian(model, Xp)
    lam = torch.linalg.eigvalsh(H)
    g = closed_form_gradient(model, Xp, yp)
    expected = {
        "hessian/top_eig_0": lam[-1],
        "hessian/top_eig_1": lam[-2],
        "hessian/min_eig": lam[0],
        "hessian/trace": H.trace(),  # 5 parameters <= budget: exact
        "hessian/trace_stderr": 0.0,
        "gradient/norm": g.norm(),
        "gradient/curvature": g @ H @ g / (g @ g),
        "gradient/step_star": (g @ g) / (g @ H @ g),
        "gradient/lr": 0.0,
        "layer/lin/top_eig": lam[-1],
        "layer/lin/trace": H.trace(),
        "stability/sharpness_ratio": 0.0,
    }
    for key, ref in expected.items():
        tag = P + key
        assert [s for s, _ in scalars[tag]] == [2, 4], (tag, scalars[tag])
        got = _single(scalars, tag)
        assert math.isclose(got, float(ref), rel_tol=1e-6, abs_tol=1e-6), (key, got, float(ref))
        # also available to other callbacks
        assert math.isclose(
            float(trainer.callback_metrics[tag]), float(ref), rel_tol=1e-6, abs_tol=1e-6
        )
    assert _single(scalars, P + "hessian/top_eig_converged") == 1.0
    assert P + "stability/two_over_lr" not in scalars  # lr = 0: no edge of stability
    (_, cold), (_, warm) = scalars[P + "cost/top_eig/matvecs"]
    assert 1 <= warm < cold  # the second call starts from the first call's eigenvectors
    assert all(v >= 0 for _, v in scalars[P + "cost/total_seconds"])


def test_fresh_probe_uses_the_batch_of_each_step(tmp_path):
    X, y = regression_data(32, 4)
    model = Regression(4, lr=0.0)
    cb = CurvatureMonitor(metrics=[TopEigenvalues(tol=1e-10)], every_n_steps=2, probe="fresh")
    trainer = make_trainer(tmp_path, [cb], max_steps=4, precision="64-true")
    trainer.fit(model, loader(X, y, 8))
    s, _ = read_events(trainer.logger.log_dir)
    for step, value in s[P + "hessian/top_eig_0"]:  # step t ends with the batch t - 1
        Xb = X[8 * (step - 1) : 8 * step]
        ref = float(torch.linalg.eigvalsh(closed_form_hessian(model, Xb))[-1])
        assert value == pytest.approx(ref, rel=1e-6), step


def test_edge_of_stability_and_learning_rate(tmp_path):
    X, y = regression_data(32, 4)
    cb = CurvatureMonitor(metrics=["top_eig", "gradient"], every_n_steps=1)
    trainer = make_trainer(tmp_path, [cb], max_steps=3, precision="64-true")
    trainer.fit(Regression(4, lr=0.05), loader(X, y, 8))
    s, _ = read_events(trainer.logger.log_dir)
    assert [st for st, _ in s[P + "stability/two_over_lr"]] == [1, 2, 3]
    assert _single(s, P + "stability/two_over_lr") == pytest.approx(40.0)
    assert _single(s, P + "gradient/lr") == pytest.approx(0.05)
    for (_, top), (_, ratio) in zip(s[P + "hessian/top_eig_0"], s[P + "stability/sharpness_ratio"]):
        assert ratio == pytest.approx(top * 0.05 / 2, rel=1e-6)
    # the default (loose) tolerance still gives the sharpness to 1e-3 (H is constant here)
    lam = float(torch.linalg.eigvalsh(closed_form_hessian(Regression(4), X[:8]))[-1])
    assert all(abs(v - lam) <= 1e-3 * lam for _, v in s[P + "hessian/top_eig_0"])


def test_closed_form_on_every_device(tmp_path, device):
    """The same exact values with the model on ``device`` (CUDA when present)."""
    X, y = regression_data(32, 4)
    model = Regression(4, lr=0.0)
    cb = CurvatureMonitor(metrics=[TopEigenvalues(tol=1e-10), "trace"], every_n_steps=1)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    trainer = make_trainer(
        tmp_path, [cb], max_steps=1, precision="64-true", accelerator=accelerator
    )
    trainer.fit(model, loader(X, y, 8))
    H = closed_form_hessian(model, X[:8])
    got = trainer.callback_metrics
    assert float(got[P + "hessian/top_eig_0"]) == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-9
    )
    assert float(got[P + "hessian/trace"]) == pytest.approx(float(H.trace()), rel=1e-9)


def test_jacobian_metric_of_linear_model_is_weight_norm(tmp_path):
    X, y = regression_data(32, 4)
    model = Regression(4, lr=0.0)
    cb = CurvatureMonitor(metrics=[JacobianNorm(method="exact")], every_n_steps=2)
    trainer = make_trainer(tmp_path, [cb], max_steps=2, precision="64-true")
    trainer.fit(model, loader(X, y, 8))
    got = float(trainer.callback_metrics[P + "jacobian/fro_norm"])
    assert got == pytest.approx(float(model.lin.weight.detach().norm()), rel=1e-10)


def test_custom_metric_plugs_in(tmp_path):
    class ParamCount(CurvatureMetric):
        name = "count"

        def names(self, ctx):
            return ["custom/num_params"]

        def compute(self, ctx):
            return MetricOutput(scalars={"custom/num_params": float(ctx.problem.num_params)})

    X, y = regression_data(16, 3)
    cb = CurvatureMonitor(metrics=[ParamCount()], every_n_steps=1)
    trainer = make_trainer(tmp_path, [cb], max_steps=1, precision="64-true")
    trainer.fit(Regression(3), loader(X, y, 8))
    assert float(trainer.callback_metrics[P + "custom/num_params"]) == 4.0


# --------------------------------------------------------------------------- schedule
def test_gradient_accumulation_computes_once_per_optimizer_step(tmp_path):
    X, y = regression_data(32, 4)
    spy = SpyLogger(str(tmp_path))
    cb = CurvatureMonitor(metrics=["top_eig"], every_n_steps=1)
    trainer = make_trainer(
        tmp_path, [cb], logger=spy, max_steps=3, accumulate_grad_batches=2, precision="64-true"
    )
    trainer.fit(Regression(4, lr=0.01), loader(X, y, 4))
    assert spy.curvature_steps() == [1, 2, 3]


class Skipping(Regression):
    """Runs the closure but skips ``optimizer.step`` at the given steps, as a mixed-precision
    step with infinite gradients does (Lightning still counts the step)."""

    def __init__(self, d: int, skip: set[int]) -> None:
        super().__init__(d, lr=0.01)
        self.skip = skip

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, closure: Any) -> None:
        if self.trainer.global_step + 1 in self.skip:
            closure()
        else:
            optimizer.step(closure=closure)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_step_hook_follows_the_schedule_through_skipped_and_accumulated_steps(
    tmp_path, accumulate
):
    """With one optimizer the monitor follows the steps with a step hook on the optimizer and
    Lightning dispatches ``on_train_batch_end`` only from the step before a scheduled one to
    its call. A scheduled step whose ``optimizer.step`` is skipped reaches no step hook and is
    still computed at its own step; the hook is removed after fitting."""
    X, y = regression_data(64, 3)
    spy = SpyLogger(str(tmp_path))
    cb = CurvatureMonitor(metrics=["top_eig"], every_n_steps=5, probe=1)
    trainer = make_trainer(
        tmp_path,
        [cb],
        logger=spy,
        max_steps=15,
        accumulate_grad_batches=accumulate,
        profiler="simple",
        precision="64-true",
    )
    model = Skipping(3, skip={5, 7, 9})  # 5: scheduled; 9: the step before one
    trainer.fit(model, loader(X, y, 2))
    assert spy.curvature_steps() == [5, 10, 15]
    pre = f"[Callback]{cb.state_key}."
    durations = trainer.profiler.recorded_durations  # type: ignore[attr-defined]
    # dispatched at steps 4, 5, 10, 14, 15 (not 9, whose step hook never ran, nor 8: the
    # step hook of 10 shows it); with two micro-batches a step, also at the first ones of 5
    # and 15 and at the very first, before the step hook has seen a step
    assert len(durations[pre + "on_train_batch_end"]) == {1: 5, 2: 8}[accumulate]
    # the budget's per-step estimate: once for each of the 12 optimizer steps that ran but the
    # first, whose tick only marks the time (never twice: hook and batch end both seen)
    assert cb.budget.untimed == pytest.approx(11 * OverheadBudget.STEP_CHARGE)
    assert cb._step_hook is None and not trainer.optimizers[0]._optimizer_step_post_hooks
    assert "on_train_batch_end" not in cb.__dict__  # callable by hand again


def test_the_monitor_dispatches_every_step_where_it_cannot_predict_its_calls(tmp_path):
    """A subclass with its own ``should_compute`` (or two optimizers) gets
    ``on_train_batch_end`` at every step, as before the step hook."""
    X, y = regression_data(32, 3)

    class Odd(CurvatureMonitor):
        def should_compute(self, step: int) -> bool:
            return step % 2 == 1

    spy = SpyLogger(str(tmp_path))
    cb = Odd(metrics=["top_eig"])
    trainer = make_trainer(tmp_path, [cb], logger=spy, max_steps=6, profiler="simple")
    trainer.fit(Regression(3, lr=0.01).float(), loader(X.float(), y.float(), 4))
    assert spy.curvature_steps() == [1, 3, 5]
    pre = f"[Callback]{cb.state_key}."
    durations = trainer.profiler.recorded_durations  # type: ignore[attr-defined]
    assert len(durations[pre + "on_train_batch_end"]) == 6 and cb._step_hook is None


class Wrapped(torch.optim.Optimizer):
    """An optimizer wrapper that skips ``Optimizer.__init__`` (as ``torch_optimizer``'s
    Lookahead does): torch does not run step hooks for it."""

    def __init__(self, base: torch.optim.Optimizer) -> None:  # noqa: D107
        self.base = base
        self.defaults = base.defaults
        self.param_groups = base.param_groups
        self.state = base.state

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return self.base.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)


class Swapping(pl.Callback):
    """Builds the optimizers again when the second epoch starts."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == 1:
            trainer.strategy.setup_optimizers(trainer)


@pytest.mark.parametrize("case", ["wrapped", "swapped", "instance schedule"])
def test_the_monitor_keeps_its_schedule_where_the_step_hook_cannot_follow(tmp_path, case):
    """An optimizer without torch's step hooks, an optimizer replaced between epochs and a
    ``should_compute`` set on the instance: every scheduled step is still computed."""
    X, y = regression_data(32, 3)
    spy = SpyLogger(str(tmp_path))
    cb = CurvatureMonitor(metrics=["top_eig"], every_n_steps=5)
    callbacks: list[Any] = [cb]
    model = Regression(3, lr=0.01)
    expected = [5, 10, 15, 20]
    if case == "wrapped":
        model.configure_optimizers = lambda: Wrapped(  # type: ignore[method-assign]
            torch.optim.SGD(model.parameters(), lr=0.01)
        )
    elif case == "swapped":
        callbacks.insert(0, Swapping())
    else:
        cb.should_compute = lambda step: step in (2, 3, 7)  # type: ignore[method-assign]
        expected = [2, 3, 7]
    trainer = make_trainer(tmp_path, callbacks, logger=spy, max_steps=24, precision="64-true")
    trainer.fit(model, loader(X, y, 4))  # 8 steps an epoch
    assert spy.curvature_steps() == expected
    assert cb._step_hook is None


def test_no_step_hook_with_a_gradient_scaler():
    """A gradient scaler skips steps with infinite gradients, several in a row at times, which
    no step hook sees: the monitor then keeps ``on_train_batch_end`` at every step."""
    from types import SimpleNamespace

    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    for scaler, armed in [(None, True), (object(), False)]:
        cb = CurvatureMonitor(metrics=["top_eig"])
        cb._hooks_hidden = True  # (as in a fit set up by Lightning)
        trainer = SimpleNamespace(optimizers=[opt], precision_plugin=SimpleNamespace(scaler=scaler))
        cb._arm(trainer)  # type: ignore[arg-type]
        assert (cb._step_hook is not None) is armed
        cb._disarm()
    assert not opt._optimizer_step_post_hooks


class Manual(Regression):
    """Manual optimization with ``n`` SGD optimizers, each stepped at every batch (Lightning
    counts every optimizer step: ``global_step`` advances by ``n`` a batch)."""

    def __init__(self, d: int, n: int) -> None:
        super().__init__(d, lr=0.01)
        self.automatic_optimization = False
        self.n = n

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        for opt in self.optimizers() if self.n > 1 else [self.optimizers()]:  # type: ignore[union-attr]
            opt.zero_grad()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            opt.step()
        return loss.detach()

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.parameters(), lr=self.lr) for _ in range(self.n)]


@pytest.mark.parametrize("n", [1, 2])
def test_manual_optimization_computes_at_or_right_after_each_scheduled_step(tmp_path, n):
    """One optimizer: the step hook follows it and each scheduled step is computed. Two (the
    monitor then runs at every batch): ``global_step`` jumps by two, and a scheduled step that
    falls between two batches is computed at the next one."""
    X, y = regression_data(64, 3)
    spy = SpyLogger(str(tmp_path))
    cb = CurvatureMonitor(metrics=["top_eig"], every_n_steps=3)
    trainer = make_trainer(
        tmp_path, [cb], logger=spy, max_steps=12, precision="64-true", profiler="simple"
    )
    trainer.fit(Manual(3, n), loader(X, y, 4))
    assert spy.curvature_steps() == {1: [3, 6, 9, 12], 2: [4, 6, 10, 12]}[n]
    durations = trainer.profiler.recorded_durations  # type: ignore[attr-defined]
    dispatched = len(durations[f"[Callback]{cb.state_key}.on_train_batch_end"])
    assert dispatched == {1: 8, 2: 6}[n]  # 1: steps 2-3, 5-6, 8-9, 11-12; 2: every batch
    assert (cb._step_hook is None) and ("on_train_batch_end" not in cb.__dict__)


def test_log_spaced_schedule_and_fit_start_end(tmp_path):
    X, y = regression_data(64, 3)
    spy = SpyLogger(str(tmp_path))
    cb = CurvatureMonitor(
        metrics=["top_eig"], schedule="log", points_per_decade=4, at_fit_start=True, at_fit_end=True
    )
    trainer = make_trainer(tmp_path, [cb], logger=spy, max_steps=13, precision="64-true")
    trainer.fit(Regression(3, lr=0.01), loader(X, y, 4))
    assert StepSchedule("log", points_per_decade=4).steps(13) == [1, 2, 4, 6, 10]
    assert spy.curvature_steps() == [0, 1, 2, 4, 6, 10, 13]


def test_schedule_unit():
    every = StepSchedule("every", every_n_steps=3)
    assert [s for s in range(0, 10) if every(s)] == [3, 6, 9]
    log = StepSchedule("log", points_per_decade=10)
    steps = log.steps(1000)
    assert steps[:4] == [1, 2, 3, 4] and steps[-1] == 1000 and 100 in steps
    assert 25 <= len(steps) <= 31  # about 10 per decade (fewer in the first, integer steps)
    ratios = [b / a for a, b in zip(steps[10:], steps[11:])]
    assert all(1.2 < r < 1.33 for r in ratios), ratios  # 10**(1/10) = 1.259


@pytest.mark.parametrize(
    "kind,p", [("every", 7), ("every", 1), ("log", 1), ("log", 4), ("log", 10)]
)
def test_next_scheduled_step(kind, p):
    """``next_after(s)``, the first scheduled step after ``s``, against a scan of the steps:
    every step up to 3000, and the steps just below each log-spaced step up to 10^12 (where a
    start computed past the threshold once made the search run to the next decade)."""
    sched = StepSchedule(kind, every_n_steps=p, points_per_decade=p)
    for s in range(3000):
        assert sched.next_after(s) == next(t for t in range(s + 1, 10**6) if sched(t)), s
    if kind == "log":
        for level in range(3 * p, 12 * p):
            t = math.floor(10 ** ((level - 1e-9) / p)) - 3
            while not sched(t):
                t += 1  # the scheduled step of this level
            assert [sched.next_after(s) for s in range(t - 4, t)] == [t] * 4, (level, t)


def _steady_budget() -> tuple[OverheadBudget, float]:
    """A 5 % budget that has seen twenty 1-second steps, and the time of the last one."""
    b = OverheadBudget(0.05)
    for t in range(1, 21):
        b.tick(float(t))
    return b, 20.0


def test_overhead_budget_unit():
    b = OverheadBudget(0.1)
    assert b.allowed(0.0)  # unknown cost: allowed
    b.record(1.0)  # spent 1 s
    assert not b.allowed(5.0)  # 2 s of callback vs 4 s of training: 50 %
    assert not b.allowed(20.0)  # 2 / 19
    assert b.allowed(21.0)  # 2 / 20 = 10 %
    assert b.overhead(21.0) == pytest.approx(1 / 20)
    assert OverheadBudget(None).allowed(0.0)


def test_overhead_budget_charges_the_untimed_estimate_at_every_measured_step():
    b = OverheadBudget(0.05)
    b.STEP_CHARGE = 0.01  # (the instance's estimate: 1 % of these 1-second steps)
    for t in range(101):  # 100 measured steps (the first tick only marks the time)
        b.tick(float(t))
    assert b.untimed == pytest.approx(1.0) and b.spent == pytest.approx(1.0)
    assert b.overhead(100.0) == pytest.approx(1.0 / 99.0)
    # it counts against the cap: after a 4 s call, the next one is allowed later than it would
    # be without the estimate (8 s within 5 % of 160 s; 9 s of 180 s)
    b.record(4.0)
    c = OverheadBudget(0.05)
    c.record(4.0)
    assert c.allowed(170.0) and not b.allowed(170.0) and b.allowed(185.0)
    b.pause()  # a pause is no step: nothing charged for it
    b.tick(200.0)
    assert b.untimed == pytest.approx(1.0)
    b.tick(201.0)
    assert b.untimed == pytest.approx(1.01)
    # the default estimate is a few microseconds: negligible against steps of milliseconds
    assert 0 < OverheadBudget.STEP_CHARGE <= 50e-6


def test_overhead_budget_counts_the_slower_step_after_a_call():
    b = OverheadBudget(0.05)
    t = 0.0
    for _ in range(20):  # steps of 1 s, except one slow outlier the median ignores
        t += 1.0
        b.tick(t)
    t += 7.0
    b.tick(t)
    b.record(4.0, now=t + 4.0)  # a call at a training step
    t += 4.0
    b.tick(t + 1.3)  # the step after it: 0.3 s slower than the median step
    assert b.spent - b.untimed == pytest.approx(4.3) and b.aftermath == pytest.approx(0.3)
    b.tick(t + 2.3)  # later steps are not the call's
    assert b.spent - b.untimed == pytest.approx(4.3)
    # capped at half the call's cost (an interval spanning e.g. a validation loop)
    b.record(2.0, now=t + 3.0)
    b.tick(t + 100.0)
    assert b.aftermath == pytest.approx(0.3 + 1.0)
    # a call that is not at a training step (validation, fit end) has no aftermath
    b.record(1.0)
    b.tick(t + 200.0)
    assert b.aftermath == pytest.approx(1.3)
    # too few steps to know a typical one: nothing is counted
    c = OverheadBudget(0.05)
    c.tick(0.0)
    c.tick(1.0)
    c.record(1.0, now=2.0)
    c.tick(10.0)
    assert c.aftermath == 0.0 and c.spent - c.untimed == pytest.approx(1.0)


def test_overhead_budget_counts_the_steps_after_a_call_as_a_signed_sum():
    b, t = _steady_budget()
    b.record(8.0, now=t + 8.0)
    t += 8.0
    # the window: +0.5, +0.25, -0.125 (a faster step offsets the earlier excess), then typical
    for extra in (0.5, 0.25, -0.125, 0.0, 0.0):
        t += 1.0 + extra
        b.tick(t)
    assert b.aftermath == pytest.approx(0.625) and b.spent - b.untimed == pytest.approx(8.625)
    # the running sum never charges less than zero: a fast first step charges nothing, and the
    # slower step after it is charged only beyond what the fast one saved
    c, u = _steady_budget()
    c.record(8.0, now=u)
    for interval, charged in ((0.75, 0.0), (1.5, 0.25), (1.0, 0.25)):
        u += interval
        c.tick(u)
        assert c.aftermath == pytest.approx(charged)
    # steps past the window are not the call's (a 2 s step after it is not an aftermath)
    for _ in range(OverheadBudget.AFTERMATH_STEPS - 3):
        u += 1.0
        c.tick(u)
    u += 2.0
    c.tick(u)
    assert c.aftermath == pytest.approx(0.25)
    # the window's first step stays out of the typical steps, its later ones enter them (so
    # that calls every few steps still follow a change of the step time)
    later = [1.5, 1.0] + [1.0] * (OverheadBudget.AFTERMATH_STEPS - 3) + [2.0]
    assert list(c._intervals)[-len(later) :] == pytest.approx(later)
    assert 0.75 not in c._intervals
    # a call without a training step (validation, fit end) closes the previous window
    c.record(8.0, now=u)
    c.record(1.0)
    u += 5.0
    c.tick(u)
    assert c.aftermath == pytest.approx(0.25)


def test_overhead_budget_follows_the_step_time_when_calls_come_every_few_steps():
    # the step time doubles after 20 steps; calls every 5 steps have no aftermath at all
    b = OverheadBudget(0.05)
    t = 0.0
    for i in range(200):
        t += 1.0 if i < 20 else 2.0
        b.tick(t)
        if i >= 10 and i % 5 == 0:
            b.record(4.0, now=t)
    # only the first windows, before the median follows the new step time, are charged
    assert b.aftermath <= 2.0 * 6
    assert statistics.median(b._intervals) == pytest.approx(2.0)


def test_overhead_budget_pause_leaves_a_pause_out():
    b, t = _steady_budget()
    b.record(4.0, now=t)
    t += 1.5
    b.tick(t)  # the first step after the call: 0.5 s slower
    b.pause()  # a validation run (or an epoch boundary) of 30 s
    t += 30.0
    b.tick(t)  # only marks the time
    assert b.aftermath == pytest.approx(0.5) and 30.0 not in b._intervals
    t += 1.0
    b.tick(t)  # the window goes on
    assert b.aftermath == pytest.approx(0.5) and b._after_left == OverheadBudget.AFTERMATH_STEPS - 2


def test_without_the_step_hook_the_budget_ticks_once_an_optimizer_step(tmp_path):
    """Without the step hook (here: a custom ``should_compute``), ``on_train_batch_end`` runs
    at every batch; under gradient accumulation the budget still measures optimizer steps, and
    each epoch starts without a measured interval (the boundary is no step)."""
    X, y = regression_data(64, 3)
    ticks: list[int] = []

    class Odd(CurvatureMonitor):
        def should_compute(self, step: int) -> bool:
            return step == 3

    cb = Odd(metrics=["top_eig"], overhead_budget=0.5)
    trainer = make_trainer(
        tmp_path, [cb], max_epochs=2, accumulate_grad_batches=4, precision="64-true"
    )
    tick = cb.budget.tick

    def spy(now: float) -> None:
        ticks.append(trainer.global_step)
        tick(now)

    cb.budget.tick = spy  # type: ignore[method-assign]
    trainer.fit(Regression(3, lr=0.01), loader(X, y, 4))  # 16 batches, 4 steps an epoch
    assert trainer.global_step == 8
    assert ticks == list(range(1, 9))  # once a step, not once a batch
    # 2 epochs of 4 steps, the first tick of each only marks the time: 6 intervals (one of
    # them the call's first step, kept out)
    assert len(cb.budget._intervals) == 5


def test_overhead_budget_spaces_calls_out(tmp_path):
    X, y = regression_data(64, 3)
    spy = SpyLogger(str(tmp_path))

    class Slow(CurvatureMetric):
        name = "slow"

        def compute(self, ctx):
            import time

            time.sleep(0.05)
            return MetricOutput(scalars={"slow/x": 1.0})

    cb = CurvatureMonitor(metrics=[Slow()], every_n_steps=1, overhead_budget=0.05)
    trainer = make_trainer(tmp_path, [cb], logger=spy, max_steps=30, precision="64-true")
    with pytest.warns(UserWarning, match="overhead budget") as rec:
        trainer.fit(Regression(3, lr=0.01), loader(X, y, 2))
    assert not any("STEP_CHARGE" in str(w.message) for w in rec)  # the calls took the budget
    steps = spy.curvature_steps(P + "slow/x")
    assert 1 <= len(steps) < 10, steps
    assert cb.budget.skipped == 30 - len(steps)  # each step without a call, refused once


def test_a_budget_the_untimed_estimate_fills_says_so(tmp_path):
    """A budget smaller than the per-step estimate over the step time leaves no room for
    calls: the warning names the estimate and its share, not only the call's cost."""
    X, y = regression_data(64, 3)
    spy = SpyLogger(str(tmp_path))
    cb = CurvatureMonitor(metrics=["top_eig"], every_n_steps=1, overhead_budget=0.05)
    cb.budget.STEP_CHARGE = 10.0  # (far above a step here: the estimate takes it all)
    trainer = make_trainer(tmp_path, [cb], logger=spy, max_steps=10, precision="64-true")
    with pytest.warns(UserWarning, match=r"STEP_CHARGE = 10 s a step\) takes [0-9.]+%") as rec:
        trainer.fit(Regression(3, lr=0.01), loader(X, y, 2))
    assert spy.curvature_steps() == [1]  # the first call (of unknown cost), then none
    assert cb.budget.untimed == pytest.approx(10.0 * 9)
    # said once
    assert sum("overhead budget" in str(w.message) for w in rec) == 1


# --------------------------------------------------------------------------- loggers, errors
def test_no_logger_is_a_configuration_error(tmp_path):
    X, y = regression_data(16, 3)
    trainer = make_trainer(tmp_path, [CurvatureMonitor()], logger=False, max_steps=1)
    with pytest.raises(MisconfigurationException, match="no logger"):
        trainer.fit(Regression(3), loader(X, y, 8))


def test_missing_loss_function_is_a_configuration_error(tmp_path):
    X, y = regression_data(16, 3)
    model = Regression(3)
    del model.loss_fn
    model.loss_fn = None  # not callable
    trainer = make_trainer(tmp_path, [CurvatureMonitor()], max_steps=1)
    with pytest.raises(MisconfigurationException, match="no loss function"):
        trainer.fit(model, loader(X, y, 8))


def test_loss_reduction_disagreeing_with_the_callback_is_a_configuration_error(tmp_path):
    X, y = regression_data(16, 3)
    model = Regression(3)
    model.loss_fn = torch.nn.MSELoss(reduction="sum")
    trainer = make_trainer(tmp_path, [CurvatureMonitor()], max_steps=1)
    with pytest.raises(MisconfigurationException, match=r"reduction='sum' but .*'mean'"):
        trainer.fit(model, loader(X, y, 8))
    trainer = make_trainer(tmp_path, [CurvatureMonitor(reduction="sum")], max_steps=1)
    trainer.fit(model, loader(X, y, 8))  # agreeing: fine


def test_probe_batches_from_a_checkpoint_of_another_world_size_are_drawn_again():
    batch = [torch.ones(2, 3), torch.zeros(2, 1)]
    cb = CurvatureMonitor()
    cb.load_state_dict({"probes_by_rank": [[batch]]})  # this process: rank 0 of 1
    assert cb._probe == [batch]
    cb = CurvatureMonitor()
    with pytest.warns(UserWarning, match="probe batches of 2 process"):
        cb.load_state_dict({"probes_by_rank": [[batch], [batch]]})
    assert cb._probe == []
    cb = CurvatureMonitor()
    cb.load_state_dict({"probe": [batch]})  # the layout before probes were kept per rank
    assert cb._probe == [batch]


def test_csv_logger_only_warns_once_and_logs_scalars(tmp_path):
    X, y = regression_data(16, 3)
    spy = SpyLogger(str(tmp_path))
    cb = CurvatureMonitor(metrics=["top_eig", "density"], every_n_steps=1)
    trainer = make_trainer(tmp_path, [cb], logger=spy, max_steps=2, precision="64-true")
    with pytest.warns(UserWarning, match="no TensorBoard logger") as rec:
        trainer.fit(Regression(3), loader(X, y, 8))
    assert sum("no TensorBoard" in str(w.message) for w in rec) == 1
    assert spy.curvature_steps() == [1, 2]
    assert P + "hessian/negative_mass" in spy.calls[-1][1]


def test_fast_dev_run_computes_once(tmp_path):
    X, y = regression_data(16, 3)
    cb = CurvatureMonitor(metrics=["top_eig", "trace", "density"], every_n_steps=100)
    trainer = make_trainer(tmp_path, [cb], fast_dev_run=True, precision="64-true")
    trainer.fit(Regression(3), loader(X, y, 8))
    assert cb._num_calls == 1
    assert math.isfinite(float(trainer.callback_metrics[P + "hessian/top_eig_0"]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 2.5}, "every_n_steps"),
        ({"metrics": ["top_eig", "nope"]}, "unknown metric 'nope'"),
        ({"metrics": "top_eig"}, "metrics must be a list"),
        ({"metrics": []}, "metrics is empty"),
        ({"metrics": ["top_eig", TopEigenvalues()]}, "duplicates"),
        ({"schedule": "sometimes"}, "schedule"),
        ({"probe": "random"}, "probe"),
        ({"probe": 0}, "probe"),
        ({"reduction": "avg"}, "reduction"),
        ({"batchnorm": "train"}, "batchnorm"),
        ({"dropout": True}, "dropout"),
        ({"hessian_mode": "fast"}, "hessian_mode"),
        ({"overhead_budget": 0}, "overhead_budget"),
        ({"overhead_budget": "5%"}, "overhead_budget"),
        ({"on_error": "ignore"}, "on_error"),
        ({"top_k": 0}, "top_k"),
        ({"loss_fn": 3}, "loss_fn"),
        ({"jacobian_layer": 3}, "jacobian_layer"),
        ({"validation": "yes"}, "validation must be True or False, got 'yes'"),
        ({"at_fit_start": 1}, "at_fit_start"),
        ({"at_fit_end": None}, "at_fit_end"),
        ({"autocast": "no"}, "autocast"),
        ({"seed": "abc"}, "seed must be an integer, got 'abc'"),
        ({"probe_data": 123}, "probe_data must be None, a batch or an iterable"),
    ],
)
def test_bad_arguments_raise_misconfiguration(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        CurvatureMonitor(**kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TopEigenvalues(0), "TopEigenvalues: k must be an integer >= 1, got 0"),
        (lambda: TopEigenvalues(tol=-1), "TopEigenvalues: tol must be a positive number or None"),
        (lambda: TopEigenvalues(3, max_matvecs=2), "max_matvecs must be an integer >= 3"),
        (lambda: MinEigenvalue(tol=0.0), "MinEigenvalue: tol"),
        (lambda: HessianTrace(0), "HessianTrace: num_matvecs must be an integer >= 2, got 0"),
        (lambda: HessianTrace(2, method="hutch++"), "num_matvecs must be an integer >= 3"),
        (lambda: HessianTrace(method="bogus"), "HessianTrace: method must be one of"),
        (lambda: HessianDiagonal(method="bogus"), "HessianDiagonal: method must be one of"),
        (lambda: JacobianNorm(method="bogus"), "JacobianNorm: method must be one of"),
        (lambda: JacobianNorm(3), "JacobianNorm: layer must be None or a module name, got 3"),
        (lambda: SpectralDensityMetric(num_steps=0), "SpectralDensityMetric: num_steps"),
        (lambda: InformationMetric(slq_probes=0), "InformationMetric: slq_probes"),
        (lambda: InformationMetric(prior_precision=-1.0), "prior_precision must be a positive"),
        (lambda: InformationMetric(noise_variance="guess"), "noise_variance"),
        (lambda: LayerCurvature(trace_matvecs=-3), "LayerCurvature: trace_matvecs"),
        (lambda: LayerCurvature(tol=float("nan")), "LayerCurvature: tol"),
    ],
)
def test_bad_metric_arguments_raise_misconfiguration(make, match):
    with pytest.raises(MisconfigurationException, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"params": "nomatch.*"}, "params: params selection 'nomatch.*' matches no trainable"),
        (
            {"metrics": ["jacobian"], "jacobian_layer": "nope"},
            "jacobian_layer .nope. is not a module of Regression",
        ),
    ],
)
def test_arguments_checked_against_the_module_at_setup(tmp_path, kwargs, match):
    X, y = regression_data(16, 3)
    trainer = make_trainer(tmp_path, [CurvatureMonitor(**kwargs)], max_steps=1)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(Regression(3), loader(X, y, 8))


# --------------------------------------------------------------------------- failures
def _nan_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean() * float("nan")


def _fit_warned(tmp_path: Any, loss_fn: Any, max_steps: int) -> tuple[Any, list[str]]:
    """Top eigenvalue and trace at every step with ``loss_fn``; the warnings raised."""
    X, y = regression_data(16, 3)
    cb = CurvatureMonitor(loss_fn, metrics=["top_eig", "trace"], every_n_steps=1)
    trainer = make_trainer(tmp_path, [cb], max_steps=max_steps, precision="64-true")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(Regression(3, lr=0.01), loader(X, y, 4))
    return trainer, [str(w.message) for w in rec]


def test_failing_metric_is_logged_as_nan_with_one_warning(tmp_path):
    trainer, warned = _fit_warned(tmp_path, _nan_loss, 3)
    msgs = [m for m in warned if "logged as NaN" in m]
    assert len(msgs) == 2, msgs  # one per metric, not one per call
    assert any("'top_eig'" in m and "NaN or Inf" in m for m in msgs)
    s, _ = read_events(trainer.logger.log_dir)
    assert [st for st, _ in s[P + "hessian/top_eig_0"]] == [1, 2, 3]
    assert all(math.isnan(v) for _, v in s[P + "hessian/top_eig_0"] + s[P + "hessian/trace"])
    assert trainer.global_step == 3  # training went on


def test_a_problem_that_cannot_be_built_logs_its_metrics_as_nan(tmp_path):
    def per_sample(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out - target) ** 2  # not reduced: no problem can be built on it

    trainer, warned = _fit_warned(tmp_path, per_sample, 2)
    msgs = [m for m in warned if "cannot set up the problem" in m]
    assert len(msgs) == 1 and "logged as NaN" in msgs[0], msgs
    s, _ = read_events(trainer.logger.log_dir)
    for key in ("hessian/top_eig_0", "hessian/trace", "hessian/trace_stderr"):
        assert [st for st, _ in s[P + key]] == [1, 2], key
        assert all(math.isnan(v) for _, v in s[P + key]), key


def test_on_error_raise_propagates(tmp_path):
    X, y = regression_data(16, 3)
    cb = CurvatureMonitor(_nan_loss, metrics=["top_eig"], every_n_steps=1, on_error="raise")
    trainer = make_trainer(tmp_path, [cb], max_steps=2, precision="64-true")
    with pytest.raises(NonFiniteError):
        trainer.fit(Regression(3), loader(X, y, 4))


# --------------------------------------------------------------------------- resume
def test_resume_continues_schedule_without_duplicates(tmp_path):
    X, y = regression_data(64, 3)
    dl = loader(X, y, 4)

    def monitor() -> CurvatureMonitor:
        return CurvatureMonitor(metrics=["top_eig"], every_n_steps=2, at_fit_start=True)

    cb1 = monitor()
    t1 = make_trainer(tmp_path, [cb1], max_steps=5, precision="64-true")
    t1.fit(Regression(3, lr=0.01), dl)
    ckpt = str(tmp_path / "mid.ckpt")
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"][cb1.state_key]
    assert (
        saved["last_step"] == 5
        and saved["num_calls"] == 3
        and [len(p) for p in saved["probes_by_rank"]] == [1]
    )
    assert saved["metrics"]["top_eig"]["vectors"][""].shape == (4, 1)

    cb2 = monitor()
    t2 = make_trainer(tmp_path, [cb2], max_steps=9, precision="64-true")
    t2.fit(Regression(3, lr=0.01), dl, ckpt_path=ckpt)
    assert cb2._num_calls == 5  # 0, 2, 4 restored; 6, 8 new (no second fit start)
    torch.testing.assert_close(cb2._probe[0][0], X[:4])  # the probe batch of the first run
    s, _ = read_events(t2.logger.log_dir)
    assert sorted(st for st, _ in s[P + "hessian/top_eig_0"]) == [0, 2, 4, 6, 8]


# --------------------------------------------------------------------------- validation
def test_validation_standalone_and_during_fit(tmp_path):
    X, y = regression_data(32, 4)
    model = Regression(4, lr=0.0)
    cb = CurvatureMonitor(metrics=["top_eig", "trace"], validation=True, every_n_steps=100)
    trainer = make_trainer(
        tmp_path, [cb], max_steps=2, precision="64-true", limit_val_batches=2, val_check_interval=2
    )
    trainer.validate(model, loader(X, y, 8))  # inference mode
    H = closed_form_hessian(model, X[:8])
    top = float(trainer.callback_metrics[P + "val/hessian/top_eig_0"])
    assert top == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
    trainer.fit(model, loader(X, y, 8), loader(X, y, 8))  # no_grad validation during fit
    s, _ = read_events(trainer.logger.log_dir)
    assert [st for st, _ in s[P + "val/hessian/trace"]] == [0, 2]
    assert _single(s, P + "val/hessian/trace") == pytest.approx(float(H.trace()), rel=1e-6)


# --------------------------------------------------------------------------- information
def test_observed_information_metrics_of_linear_gaussian_regression(tmp_path):
    """MSE with noise variance s2: I = A^T A / s2, C = sum_n (g_n - gbar)(g_n - gbar)^T."""
    X, y = regression_data(32, 4)
    model = Regression(4, lr=0.0)
    s2, lam = 0.5, 2.0
    metric = InformationMetric(
        noise_variance=s2,
        prior_precision=lam,
        slq_probes=40,
        slq_steps=5,
        tic_probes=300,
        tic_max_iter=20,
    )
    cb = CurvatureMonitor(metrics=[metric], every_n_steps=2, probe_data=(X, y))
    trainer = make_trainer(tmp_path, [cb], max_steps=2, precision="64-true")
    trainer.fit(model, loader(X, y, 8))
    got = {k[len(P) :]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(P)}

    A = torch.cat([X, torch.ones(32, 1, dtype=X.dtype)], dim=1)
    info = A.T @ A / s2
    mu = torch.linalg.eigvalsh(info)
    w = torch.cat([model.lin.weight.detach().reshape(-1), model.lin.bias.detach()])
    G = -(y.reshape(-1) - A @ w)[:, None] * A / s2  # per-sample gradients of the NLL
    Gc = G - G.mean(0)
    tic = torch.trace(torch.linalg.solve(info + lam * torch.eye(5, dtype=X.dtype), Gc.T @ Gc))
    assert got["information/trace"] == pytest.approx(float(info.trace()), rel=1e-10)
    for key, ref in [
        ("logdet", torch.log(mu + lam).sum()),
        ("effective_dimension", (mu / (mu + lam)).sum()),
        ("tic", tic),
    ]:
        se = got[f"information/{key}_stderr"]
        assert 0 < se < 0.2 * abs(float(ref)), (key, se)
        assert abs(got[f"information/{key}"] - float(ref)) <= 4 * se, (key, got, float(ref))


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_mixed_computes_in_float32_unless_asked(tmp_path, autocast):
    X, y = (t.float() for t in regression_data(32, 4))

    def run(precision: str, sub: str) -> float:
        model = Regression(4, lr=0.0).float()
        cb = CurvatureMonitor(
            metrics=[TopEigenvalues(tol=1e-6)], every_n_steps=1, autocast=autocast
        )
        trainer = make_trainer(tmp_path / sub, [cb], max_steps=1, precision=precision)
        trainer.fit(model, loader(X, y, 8))
        return float(trainer.callback_metrics[P + "hessian/top_eig_0"])

    full, mixed = run("32-true", "full"), run("bf16-mixed", "mixed")
    exact = float(torch.linalg.eigvalsh(closed_form_hessian(Regression(4), X[:8].double()))[-1])
    assert full == pytest.approx(exact, rel=1e-5)
    if autocast:  # the trainer's bf16 autocast: about 3 significant digits
        assert 1e-5 < abs(mixed - exact) / exact < 5e-2
    else:
        assert mixed == pytest.approx(exact, rel=1e-5)


def test_trace_deflates_the_krylov_basis_of_the_top_eigenvalues():
    """With "top_eig" first (the default), the trace is tr(VᵀHV) from the Lanczos run plus
    Hutchinson on the complement: no product for V, the budget's probes batched."""
    from nncurv.callbacks import HessianTrace
    from nncurv.callbacks._metrics import MetricContext

    from nncurv import CurvatureProblem
    from nncurv.linalg import deflated_hutchinson_trace

    default = CurvatureMonitor()
    assert [type(m).__name__ for m in default.metrics] == ["TopEigenvalues", "HessianTrace"]
    assert default.metrics[0].share_basis  # type: ignore[attr-defined]
    assert CurvatureMonitor(metrics=["trace", "top_eig"]).metrics[0].share_basis  # type: ignore[attr-defined]
    assert not CurvatureMonitor(metrics=["top_eig"]).metrics[0].share_basis  # type: ignore[attr-defined]
    no = CurvatureMonitor(metrics=["top_eig", HessianTrace(deflate=False)])
    assert not no.metrics[0].share_basis  # type: ignore[attr-defined]

    X, y = regression_data(64, 15)
    model = Regression(15)
    problem = CurvatureProblem(model, model.loss_fn, (X, y))
    H = closed_form_hessian(model, X)
    ctx = MetricContext(problem, step=3, lr=0.1, seed=0, hessian_mode="cached")
    top = TopEigenvalues(tol=1e-3)
    top.share_basis = True
    top.compute(ctx)
    V, basis_trace = ctx.results["krylov_basis"]
    assert math.isclose(float(basis_trace), float((V.T @ H @ V).trace()), rel_tol=1e-10)
    n0 = ctx.num_matvecs
    out = HessianTrace(6).compute(ctx)
    assert ctx.num_matvecs - n0 == 6
    ref = deflated_hutchinson_trace(
        ctx.hessian(), V, 6, basis_trace=basis_trace, generator=ctx.generator("trace")
    )
    assert out.scalars["hessian/trace"] == pytest.approx(ref.estimate, rel=1e-12)
    assert out.scalars["hessian/trace_stderr"] == pytest.approx(ref.standard_error, rel=1e-12)
    # unbiased over the metric's seeds (fixed basis, fresh probes)
    est = []
    for seed in range(300):
        c = MetricContext(problem, step=3, lr=0.1, seed=seed, hessian_mode="cached")
        c.results["krylov_basis"] = (V, basis_trace)
        est.append(HessianTrace(6).compute(c).scalars["hessian/trace"])
    e = torch.tensor(est, dtype=torch.float64)
    assert abs(float(e.mean()) - float(H.trace())) <= 4 * float(e.std()) / math.sqrt(len(est))
    ctx.release()


def test_learned_product_mode_matmat_strategy_and_probe_without_setup(tmp_path):
    """A verified "cached" is not pinned (auto re-chooses it for free, and only for few probe
    batches); a functional mode auto fell back to or timed is reused; the user's setting wins
    and is what the checkpoint holds; the matmat strategy is kept; probe collection needs no
    setup."""
    X, y = regression_data(48, 12)
    model = Regression(12, lr=0.01)
    cb = CurvatureMonitor(every_n_steps=2)
    trainer = make_trainer(tmp_path, [cb], max_steps=4, precision="64-true")
    trainer.fit(model, loader(X, y, 8))
    assert cb._learned_mode is None
    assert cb._batched_products in (True, False)  # the deflated trace's matmat measured it
    assert cb.hessian_mode == "auto" and "hessian_mode" not in cb.state_dict()
    assert cb._product_mode() == "auto"
    cb._learned_mode = "reverse-over-reverse"
    assert cb._product_mode() == "reverse-over-reverse"
    fixed = CurvatureMonitor(hessian_mode="cached")
    fixed._learned_mode = "reverse-over-reverse"
    assert fixed._product_mode() == "cached"

    by_hand = CurvatureMonitor(probe=2)
    for i in range(3):
        by_hand.on_train_batch_start(None, None, (X[i : i + 1], y[i : i + 1]), i)  # type: ignore[arg-type]
    assert [float(b[0][0, 0]) for b in by_hand._probe] == [float(X[0, 0]), float(X[1, 0])]


def test_lightning_does_not_dispatch_the_per_batch_hooks_the_monitor_does_not_need(tmp_path):
    """Lightning dispatches every hook of every callback at every batch (about 3 us each, in
    its profiler's context): the monitor hides the ones it does not need and Lightning skips
    them. ``on_train_batch_start`` runs only until the probes are taken (before the training step,
    which may change the batch in place) and the call at step 0 is made; hooks a subclass
    overrides or the user sets on the instance are kept; after fitting every hook can be called
    by hand again."""
    X, y = regression_data(32, 3)
    unused = ["on_before_backward", "on_after_backward", "on_before_optimizer_step"]
    unused += ["on_before_zero_grad", "on_validation_batch_end"]

    class Subclass(CurvatureMonitor):
        def on_before_backward(self, *args: Any) -> None:
            self.seen = getattr(self, "seen", 0) + 1

    class Mutating(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            batch[0] = torch.zeros_like(batch[0])  # the (list) batch changed in place
            return super().training_step(batch, batch_idx)

    def fit(cb: CurvatureMonitor, model: Any = None) -> dict[str, int]:
        trainer = make_trainer(tmp_path, [cb], max_steps=4, profiler="simple", precision="64-true")
        trainer.fit(model or Regression(3, lr=0.01), loader(X, y, 4))
        pre = f"[Callback]{cb.state_key}."
        durations = trainer.profiler.recorded_durations  # type: ignore[attr-defined]
        return {k[len(pre) :]: len(v) for k, v in durations.items() if k.startswith(pre)}

    plain = CurvatureMonitor(metrics=["top_eig"], every_n_steps=2, probe=2)
    hooks = fit(plain, Mutating(3, lr=0.01))
    assert hooks["on_train_batch_end"] == 4 and hooks["on_train_batch_start"] == 2, hooks
    assert not set(hooks) & set(unused), hooks
    assert plain._num_calls == 2
    assert torch.equal(plain._probe[0][0], X[:4]) and torch.equal(plain._probe[1][0], X[4:8])
    batch = [X[:4], y[:4]]
    plain.on_train_batch_start(None, None, batch, 0)  # type: ignore[arg-type] # by hand, after
    plain.on_before_backward(None, None, None)  # type: ignore[arg-type]

    at_start = CurvatureMonitor(metrics=["top_eig"], every_n_steps=2, at_fit_start=True)
    assert fit(at_start)["on_train_batch_start"] == 1
    assert at_start._num_calls == 3 and torch.equal(at_start._probe[0][0], X[:4])

    sub = Subclass(metrics=["top_eig"], every_n_steps=2)
    assert "on_before_backward" in fit(sub) and sub.seen == 4
    mine = CurvatureMonitor(metrics=["top_eig"], every_n_steps=2)
    seen: list[int] = []
    mine.on_after_backward = lambda *args: seen.append(1)  # type: ignore[method-assign]
    assert "on_after_backward" in fit(mine) and len(seen) == 4
