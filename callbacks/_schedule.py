"""When the curvature monitor computes: a step schedule and an overhead budget."""

from __future__ import annotations

import math
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

    def steps(self, last: int) -> list[int]:
        """Scheduled steps up to ``last``."""
        return [s for s in range(1, last + 1) if self(s)]


class OverheadBudget:
    """Keeps the callback's time under ``fraction`` of the training time without it.

    A call is allowed when, counting its expected cost (that of the previous call), the
    callback's total time stays below ``fraction`` times the time spent on everything else
    since the start of fitting. A scheduled call that is not allowed is postponed to the first
    step at which it is; calls are therefore spaced out exactly as much as needed.
    """

    def __init__(self, fraction: float | None) -> None:
        self.fraction = fraction
        self.spent = 0.0  # seconds spent by the callback
        self.elapsed_before = 0.0  # wall seconds of previous (resumed) runs
        self.last_cost: float | None = None
        self.skipped = 0

    def allowed(self, elapsed: float) -> bool:
        """Whether a call may run now, ``elapsed`` seconds (wall) after fitting started."""
        if self.fraction is None or self.last_cost is None:
            return True
        other = self.elapsed_before + elapsed - self.spent
        return self.spent + self.last_cost <= self.fraction * other

    def record(self, seconds: float) -> None:
        """Account for a call that took ``seconds``."""
        self.spent += seconds
        self.last_cost = seconds

    def overhead(self, elapsed: float) -> float:
        """Callback time relative to the rest of the training time so far."""
        other = self.elapsed_before + elapsed - self.spent
        return self.spent / other if other > 0 else math.nan
