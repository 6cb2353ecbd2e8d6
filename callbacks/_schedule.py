"""When the curvature monitor computes: a step schedule and an overhead budget."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

__all__ = ["StepSchedule", "OverheadBudget"]


@dataclass
class StepSchedule:
    r"""Every ``every_n_steps`` optimizer steps, or log-spaced.

    Log-spaced (``"log"``): the steps where :math:`\lfloor p \log_{10} s\rfloor` increases,
    i.e. about ``p = points_per_decade`` computations per decade (1, 2, 3, ..., 10, 13, 16, 20,
    ...), dense early in training when curvature changes fastest.

    Example:
        >>> StepSchedule("log", points_per_decade=4).steps(100)
        [1, 2, 4, 6, 10, 18, 32, 57, 100]
        >>> StepSchedule("every", every_n_steps=30).steps(100)
        [30, 60, 90]
    """

    kind: str = "every"
    every_n_steps: int = 50
    points_per_decade: int = 10

    def __call__(self, step: int) -> bool:
        """Whether ``step`` (``>= 1``) is scheduled."""
        if step < 1:
            return False
        if self.kind == "every":
            return step % self.every_n_steps == 0
        if step == 1:
            return True
        p = self.points_per_decade
        return math.floor(p * math.log10(step) + 1e-9) > math.floor(p * math.log10(step - 1) + 1e-9)

    def next_after(self, step: int) -> int:
        """The first scheduled step after ``step`` (``>= 0``).

        Example:
            >>> StepSchedule("log", points_per_decade=4).next_after(10)
            18
        """
        if step < 1:
            return 1 if self.kind == "log" else self.every_n_steps
        if self.kind == "every":
            return (step // self.every_n_steps + 1) * self.every_n_steps
        # log-spaced: the first t > step with floor(p log10 t) above its value at step, found
        # from just below 10^((level + 1) / p) (a start past it would skip a decade)
        p = self.points_per_decade

        def level(t: int) -> int:
            return math.floor(p * math.log10(t) + 1e-9)

        now = level(step)
        t = max(step + 1, math.floor(10 ** ((now + 1 - 1e-8) / p)) - 2)
        while level(t) <= now:
            t += 1
        return t

    def steps(self, last: int) -> list[int]:
        """Scheduled steps up to ``last``."""
        return [s for s in range(1, last + 1) if self(s)]


class OverheadBudget:
    """Keeps the callback's time under ``fraction`` of the training time without it.

    A call is allowed when, counting its expected cost (that of the previous call), the
    callback's total time stays below ``fraction`` times the time spent on everything else
    since the start of fitting. A scheduled call that is not allowed is postponed to the first
    step at which it is; calls are therefore spaced out exactly as much as needed.

    The callback's time counts its calls, its per-step hooks and the *aftermath* of each call
    made at a training step: the training steps right after a call run slower than typical
    ones (caches and the allocator's free lists refilled, TensorBoard's writer thread
    serialising the new events). Over the :attr:`AFTERMATH_STEPS` steps after a call, the sum
    of each step's excess over the median of the recent steps without a call (a signed sum, so
    that the jitter of ordinary steps cancels; at least zero and at most half the call's own
    cost) is the callback's too. On the digits MLP the first step after a call is about 1 ms
    slower and the next seven 0.3-0.5 ms together. Lightning's dispatch of a hook happens
    outside it and cannot be measured from inside (about 3 us); the monitor follows the steps
    with a step hook on the optimizer, a plain function call, and Lightning dispatches its
    ``on_train_batch_end`` only around its calls.

    What it cannot time at all is charged as an estimate: :attr:`STEP_CHARGE` seconds at every
    measured step, i.e. every optimizer step but the first after a pause (with several
    optimizers stepping in one batch: every batch). It stands for Lightning's dispatch around
    the monitor's hooks and the slow decay of a call's effect on the caches past the window.
    On a 2-core CPU, before this estimate, the wall clock of the budgeted digits MLP (1.1 ms
    steps) ended a median of 10 us a step above the timed cost, that of the CNN (2.3 ms steps)
    about 7 us (``benchmarks/callback_overhead.py``; single runs scatter from -16 to +25 us),
    and the MLP's steps beyond a call's window stayed 4-13 us slower than a plain fit's. With
    it, the wall clock ended 0-10 us a step below the accounting on the MLP and a mean of
    about 15 us above it on the CNN. The estimate is kept apart in :attr:`untimed`. It is
    0.9 % of the MLP's step and a few hundredths of a percent of a 30 ms step; a budget below
    ``STEP_CHARGE`` over the step time leaves no room for calls (the budget's warning then
    says so). Set it on the class or the instance to measure it differently.

    Example:
        >>> b = OverheadBudget(0.1)
        >>> for t in range(10):  # ten 1-second steps
        ...     b.tick(float(t))
        >>> b.record(2.0, now=11.0)  # a call of 2 s ends at t = 11
        >>> b.tick(12.5)  # the next step takes 1.5 s instead of 1 s
        >>> b.tick(13.7)  # and the one after 1.2 s
        >>> round(b.spent - b.untimed, 6), round(b.aftermath, 6)
        (2.7, 0.7)
        >>> round(b.untimed / b.STEP_CHARGE)  # the estimate, charged at the 11 measured steps
        11
    """

    AFTERMATH_STEPS = 8
    """Steps after a call whose slowdown is charged to the callback."""

    STEP_CHARGE = 10e-6
    """Seconds charged at every step for what the callback costs outside its timers."""

    def __init__(self, fraction: float | None) -> None:
        self.fraction = fraction
        self.spent = 0.0  # seconds spent by the callback
        self.elapsed_before = 0.0  # wall seconds of previous (resumed) runs
        self.last_cost: float | None = None
        self.skipped = 0
        self.aftermath = 0.0  # part of `spent`: slower steps right after calls
        self.untimed = 0.0  # STEP_CHARGE per measured step (in `spent`; not checkpointed)
        self._intervals: deque[float] = deque(maxlen=64)  # recent steps without a call
        self._last_tick: float | None = None
        self._last_interval: float | None = None
        self._after_left = 0  # steps left in the current call's aftermath window
        self._after_sum = 0.0  # signed sum of their excess over the typical step
        self._after_cap = 0.0  # half the cost of the call that opened the window
        self._typical: float | None = None  # the typical step, taken at the window's start

    def allowed(self, elapsed: float) -> bool:
        """Whether a call may run now, ``elapsed`` seconds (wall) after fitting started."""
        if self.fraction is None or self.last_cost is None:
            return True
        other = self.elapsed_before + elapsed - self.spent
        return self.spent + self.last_cost <= self.fraction * other

    def tick(self, now: float) -> None:
        """Mark the end of a training step (``now``: ``time.perf_counter()``).

        The monitor ticks at the optimizer's step (or, without its step hook, at the end of
        the batch that completes an optimizer step). The :attr:`AFTERMATH_STEPS` steps after a
        call (see :meth:`record`) are compared with the median of the recent steps without
        one, and the running sum of their excess, clipped to ``[0, cost / 2]``, is the
        callback's time, as is :attr:`STEP_CHARGE` for every measured step. After
        :meth:`pause` the next tick only marks the time.
        """
        last, self._last_tick = self._last_tick, now
        if last is None:
            return
        interval = self._last_interval = now - last
        self.spent += self.STEP_CHARGE
        self.untimed += self.STEP_CHARGE
        if not self._after_left:
            self._intervals.append(interval)
            return
        self._after_left -= 1
        if self._typical is None:  # the window's first step, left out of the typical steps
            if len(self._intervals) < 8:  # too few steps to know a typical one
                self._after_left = 0
                return
            self._typical = statistics.median(self._intervals)
        else:  # the later ones keep the typical step current when calls come every few steps
            self._intervals.append(interval)
        charged = self._window_charge()
        self._after_sum += interval - self._typical
        extra = self._window_charge() - charged
        self.spent += extra
        self.aftermath += extra

    def estimate_share(self) -> float | None:
        """The share of a step that :attr:`STEP_CHARGE` charges (``None`` before any step).

        The step is the median recent one, or the last one measured while no typical one is
        known yet.
        """
        step = statistics.median(self._intervals) if self._intervals else self._last_interval
        return self.STEP_CHARGE / step if step else None

    def _window_charge(self) -> float:
        """What the current window charges: its signed sum, clipped to ``[0, cost / 2]``."""
        return min(max(0.0, self._after_sum), self._after_cap)

    def pause(self) -> None:
        """Forget the last tick: the next interval is not a training step's and is not measured.

        Called at the start of fitting and of each epoch and before a validation run, so that
        an epoch boundary, a validation loop or a checkpoint is neither a typical step nor a
        call's aftermath.
        """
        self._last_tick = None

    def record(self, seconds: float, now: float | None = None) -> None:
        """Account for a call that took ``seconds``.

        ``now`` (the time the call ended) marks a call made at a training step: the next
        :attr:`AFTERMATH_STEPS` ticks then measure its aftermath.
        """
        self.spent += seconds
        self.last_cost = seconds
        # a new call closes the previous call's window (what was charged stays charged)
        self._after_left = self.AFTERMATH_STEPS if now is not None else 0
        self._after_sum = 0.0
        self._after_cap = 0.5 * seconds
        self._typical = None
        if now is not None:
            self._last_tick = now

    def overhead(self, elapsed: float) -> float:
        """Callback time relative to the rest of the training time so far."""
        other = self.elapsed_before + elapsed - self.spent
        return self.spent / other if other > 0 else math.nan
