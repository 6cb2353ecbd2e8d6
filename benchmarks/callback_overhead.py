"""Overhead of the CurvatureMonitor callback on the digits MLP and small CNN.

The same ``trainer.fit`` runs with and without the callback, interleaved (round-robin, so both
see the same machine conditions), and reports:

1. per metric: its cost per call (the callback's own timer, the median over the warm calls of
   a fit as long as the timed ones, every 50 steps; also over the first 600 steps alone) in
   units of one training step (the mean step of the same fit, Lightning's per-step work
   included), and the Hessian-vector products it spent; each metric alone, and the trace also
   after the top eigenvalue as in the default pair (where it deflates their Krylov basis);
2. with the default settings (top eigenvalue + trace every 200 steps): the total overhead
   (the median over the rounds of the fit time with / without - 1; rounds alternate their
   order) and the curvature records per 1000 steps;
3. the overhead budget: top eigenvalue + trace + gradient view scheduled at *every* step with
   ``overhead_budget=0.05`` (about 10x over budget) must end within a percentage point of 5 %.

    python benchmarks/callback_overhead.py            # a few minutes on 2 cores
    python benchmarks/callback_overhead.py --quick    # a smoke run
    python benchmarks/callback_overhead.py --budget-only --arch mlp --repeat 40
        # only 3. (plain, plain, budget), with more rounds for a narrower interval
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger, TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits import DigitsClassifier, make_loader  # noqa: E402
from nncurv.callbacks import CurvatureMonitor  # noqa: E402

warnings.filterwarnings("ignore")
for _name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)

METRICS = ["top_eig", "trace", "gradient", "min_eig", "layers", "density", "diagonal", "jacobian"]


class MemoryLogger(Logger):
    """Keeps every logged record in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))


class StepClock(pl.Callback):
    """Records the end of every training step (after the callbacks listed before it)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())

    def mean_step(self, skip: set[int], warmup: int = 20) -> float:
        """Mean duration of steps ``> warmup`` whose number is not in ``skip``."""
        durations = [
            b - a
            for step, (a, b) in enumerate(zip(self.ends, self.ends[1:]), start=2)
            if step > warmup and step not in skip
        ]
        return statistics.fmean(durations) if durations else math.nan


def quiet_trainer(steps: int, loggers: list[Logger], callbacks: list[pl.Callback]) -> pl.Trainer:
    """A CPU trainer for ``steps`` optimizer steps without progress bar, summary or checkpoints."""
    return pl.Trainer(
        max_steps=steps,
        logger=loggers,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )


def fit(
    arch: str,
    steps: int,
    root: Path,
    callback: pl.Callback | None,
    memory: bool = False,
    clock: StepClock | None = None,
) -> tuple[float, MemoryLogger]:
    pl.seed_everything(0, verbose=False)
    model = DigitsClassifier(arch, lr=0.1)
    mem = MemoryLogger()
    loggers: list[Logger] = [TensorBoardLogger(str(root), name=arch)]
    if memory:
        loggers.append(mem)
    trainer = quiet_trainer(steps, loggers, [c for c in (callback, clock) if c is not None])
    loader = make_loader(batch_size=32)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    CPU_TIMES.append(time.process_time() - c0)  # all threads of the process (TensorBoard's too)
    return time.perf_counter() - t0, mem


CPU_TIMES: list[float] = []


def interleaved(
    arch: str, steps: int, root: Path, make: dict[str, Any], repeat: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU times of each configuration, measured round-robin.

    The order is reversed every other round (A B C, C B A, ...), so that a drift of the
    machine's speed during a round does not favour the configurations that come first.
    """
    times: dict[str, list[float]] = {k: [] for k in make}
    cpu: dict[str, list[float]] = {k: [] for k in make}
    fit(arch, 20, root, None)  # warm-up (imports, allocator)
    for r in range(repeat):
        items = list(make.items())
        for k, factory in reversed(items) if r % 2 else items:
            times[k].append(fit(arch, steps, root, factory())[0])
            cpu[k].append(CPU_TIMES[-1])
    return times, cpu


def ratios(times: dict[str, list[float]], key: str) -> list[float]:
    """Per round: ``key``'s time over the round's plain time (the mean of its two plain arms)."""
    base = [(a + b) / 2 for a, b in zip(times["plain"], times["plain (again)"])]
    return [t / b - 1 for t, b in zip(times[key], base)]


def plain_noise(times: dict[str, list[float]]) -> list[float]:
    """Per round: the second plain arm's time over the first's, minus 1 (pure noise)."""
    return [a / b - 1 for a, b in zip(times["plain (again)"], times["plain"])]


def paired(times: dict[str, list[float]], key: str) -> float:
    """Median over the rounds of ``key``'s time over the round's plain time, minus 1.

    Ratios within a round share the machine's conditions, so their median is steadier than a
    ratio of medians.
    """
    return statistics.median(ratios(times, key))


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: order statistics ``j`` and ``n-j+1``.

    ``j`` is the largest rank whose binomial coverage ``1 - 2 P(Bin(n, 1/2) < j)`` is still at
    least ``level`` (13 rounds: the 3rd and 11th values, 97.8 %); ``None`` when even the whole
    range covers less (5 rounds or fewer at 95 %).
    """
    x, n = sorted(values), len(values)
    if n == 0 or 1 - 2 / 2**n < level:
        return None
    j, below = 1, 1 / 2**n  # below = P(Bin(n, 1/2) < j)
    while j < n:
        below_next = below + math.comb(n, j) / 2**n
        if 1 - 2 * below_next < level:
            break
        j, below = j + 1, below_next
    return x[j - 1], x[n - j]


def interval_text(values: list[float]) -> str:
    interval = median_interval(values)
    if interval is None:
        return "too few rounds for a 95% interval of the median"
    return f"95% interval of the median {interval[0]:+.1%} to {interval[1]:+.1%}"


def per_metric(
    arch: str, root: Path, step_time: float, every: int, steps: int, early: int = 600
) -> None:
    """Each metric's cost per warm call, in training steps of the same fit.

    The unit is the mean step of the fit that made the calls, leaving out the steps with a call
    and the step right after one: measured at the same time as the calls, it follows the
    machine's speed, which drifts by several percent on a shared machine between the plain
    fits above and these. (It includes the monitor's per-step hook, about 0.5 % of a step.)
    The medians are over every warm call of a fit of ``steps`` steps (the length of the timed
    fits); the last column takes only the calls of the first ``early`` steps, where the
    Hessian changes fastest and warm starts save least.
    """
    print(
        f"\n[{arch}] cost per call, warm calls of a {steps}-step fit, in steps of the same fit "
        f"(plain fits above: 1 training step = {1e3 * step_time:.2f} ms)"
    )
    head = f"{'metric':<22}{'ms / call':>11}{'steps / call':>14}{'HVPs / call':>13}"
    print(f"{head}{'step (ms)':>11}{f'steps / call, first {early}':>28}")
    runs: list[tuple[str, str, list[str]]] = [(n, n, [n]) for n in METRICS]
    # in the default pair the trace deflates the top eigenvalues' Krylov basis
    runs.insert(2, ("trace (default pair)", "trace", ["top_eig", "trace"]))
    for label, name, metrics in runs:
        cb = CurvatureMonitor(metrics=metrics, every_n_steps=every)
        clock = StepClock()
        _, mem = fit(arch, steps, root, cb, memory=True, clock=clock)
        recs = [(st, m) for st, m in mem.records if f"curvature/cost/{name}/seconds" in m]
        secs = [m[f"curvature/cost/{name}/seconds"] for _, m in recs[1:]]
        mvs = [m[f"curvature/cost/{name}/matvecs"] for _, m in recs[1:]]
        sec, mv = statistics.median(secs), statistics.median(mvs)
        first = statistics.median(
            m[f"curvature/cost/{name}/seconds"] for st, m in recs[1:] if (st or 0) <= early
        )
        called = {st for st, _ in recs if st is not None}
        unit = clock.mean_step(called | {st + 1 for st in called})
        print(
            f"{label:<22}{1e3 * sec:>11.2f}{sec / unit:>14.2f}{mv:>13.0f}{1e3 * unit:>11.2f}"
            f"{first / unit:>28.2f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per timed fit")
    p.add_argument("--repeat", type=int, default=7, help="interleaved repetitions")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--arch", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--out", type=Path, default=Path("outputs/callback_overhead"))
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--budget-only", action="store_true", help="only the budget (3.), e.g. with more rounds"
    )
    args = p.parse_args()
    if args.quick:
        args.steps, args.repeat = 100, 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps per fit")
    for arch in args.arch:
        if args.budget_only:
            budget_only(arch, args)
            continue
        root = args.out / arch
        times, cpu = interleaved(
            arch,
            args.steps,
            root,
            {
                "plain": lambda: None,
                "plain (again)": lambda: None,  # the noise floor of the comparison
                "empty": lambda: pl.Callback(),  # Lightning's dispatch of all of a callback's hooks
                "default": lambda: CurvatureMonitor(),
                "budget": lambda: CurvatureMonitor(
                    metrics=["top_eig", "trace", "gradient"],
                    every_n_steps=1,
                    overhead_budget=args.budget,
                ),
            },
            args.repeat,
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}  # contention only ever adds time
        # the two plain arms of a round differ only by noise: its typical size in one round
        # (median |difference|) and what is left of it in the median over the rounds
        diffs = plain_noise(times)
        noise, noise_round = statistics.median(diffs), statistics.median(map(abs, diffs))
        med["plain"] = statistics.median(times["plain"] + times["plain (again)"])
        best["plain"] = min(times["plain"] + times["plain (again)"])
        over = {k: (paired(times, k), best[k] / best["plain"] - 1) for k in times}
        cpu_over = {k: paired(cpu, k) for k in cpu}
        step_time = med["plain"] / args.steps
        default_cb = CurvatureMonitor()
        _, mem = fit(arch, args.steps, root, default_cb, memory=True)
        calls = sum(1 for _, m in mem.records if "curvature/hessian/top_eig_0" in m)
        # as the callback logs it (cost/overhead): relative to the training time without it
        default_own = default_cb.budget.overhead(default_cb._elapsed())
        budget_cb = CurvatureMonitor(
            metrics=["top_eig", "trace", "gradient"], every_n_steps=1, overhead_budget=args.budget
        )
        _, mem = fit(arch, args.steps, root, budget_cb, memory=True)
        own = [
            m["curvature/cost/overhead"] for _, m in mem.records if "curvature/cost/overhead" in m
        ]
        per_metric(arch, root, step_time, every=50, steps=args.steps, early=min(args.steps, 600))
        print(
            f"\n[{arch}] fit of {args.steps} steps, {args.repeat} interleaved repetitions "
            "(overhead: median of the per-round ratios / ratio of the minima)"
        )
        print(
            f"  plain                         {med['plain']:.3f} s   (two plain arms per round; "
            f"they differ by {noise_round:.1%} in a typical round and by {noise:+.1%} in the "
            "median: the noise of the percentages below)"
        )
        over_e = over["empty"]
        print(
            f"  empty pl.Callback()           {med['empty']:.3f} s   overhead {over_e[0]:+.1%} / "
            f"{over_e[1]:+.1%} (Lightning dispatches each of a callback's per-batch hooks at every "
            "step, about 3 us each; CurvatureMonitor hides the ones it does not need)"
        )
        over_d = over["default"]
        print(
            f"  default CurvatureMonitor()    {med['default']:.3f} s   overhead {over_d[0]:+.1%} / "
            f"{over_d[1]:+.1%} ({interval_text(ratios(times, 'default'))}), "
            f"{1000 * calls / args.steps:.0f} records per 1000 steps; its own accounting (calls, "
            f"per-step hooks, slower steps after calls, per-step estimate): {default_own:.1%}"
        )
        over_b = over["budget"]
        ok = "holds" if abs(over_b[0] - args.budget) <= 0.01 else "MISSED"
        print(
            f"  every step, budget {args.budget:.0%}       {med['budget']:.3f} s   overhead "
            f"{over_b[0]:+.1%} / {over_b[1]:+.1%} ({interval_text(ratios(times, 'budget'))}; "
            f"{ok}: median within 1 point of {args.budget:.0%})"
        )
        print(
            f"  process CPU time (less sensitive to other jobs on the machine): default "
            f"{cpu_over['default']:+.1%}, budget {cpu_over['budget']:+.1%}"
        )
        print(
            f"    (the callback's own accounting: {own[-1]:.1%} of the rest of training after "
            f"{len(own)} calls, with OverheadBudget.STEP_CHARGE a step for what it cannot time; "
            "the difference to the wall-clock overhead is measurement noise and the error of "
            "that estimate)"
        )


def budget_only(arch: str, args: argparse.Namespace) -> None:
    """The budget's wall-clock overhead alone: two plain arms and the budgeted one per round."""
    own: list[float] = []  # the callback's own accounting at the end of each fit

    class Budgeted(CurvatureMonitor):
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            super().on_train_end(trainer, pl_module)
            own.append(self.budget.overhead(self._elapsed()))

    def budgeted() -> CurvatureMonitor:
        return Budgeted(
            metrics=["top_eig", "trace", "gradient"], every_n_steps=1, overhead_budget=args.budget
        )

    make = {"plain": lambda: None, "plain (again)": lambda: None, "budget": budgeted}
    times, cpu = interleaved(arch, args.steps, args.out / arch, make, args.repeat)
    over = ratios(times, "budget")
    noise = plain_noise(times)
    med = statistics.median(over)
    ok = "holds" if abs(med - args.budget) <= 0.01 else "MISSED"
    print(
        f"\n[{arch}] budget {args.budget:.0%} only, fit of {args.steps} steps, {args.repeat} "
        f"interleaved rounds\n  wall clock {med:+.1%} ({interval_text(over)}; {ok}: median "
        f"within 1 point of {args.budget:.0%}); process CPU time {paired(cpu, 'budget'):+.1%}\n"
        f"  plain against plain: {statistics.median(noise):+.1%} ({interval_text(noise)})\n"
        f"  the callback's own accounting: {min(own):.1%} to {max(own):.1%} "
        f"(median {statistics.median(own):.1%})"
    )


if __name__ == "__main__":
    main()
