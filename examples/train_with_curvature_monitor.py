"""Watch the sharpness of a digits classifier rise to 2/lr, live in TensorBoard.

Trains an MLP and a small CNN on scikit-learn's 8×8 digits with plain SGD at a large learning
rate, with :class:`nncurv.callbacks.CurvatureMonitor` attached on a log-spaced schedule. The
top Hessian eigenvalue (the sharpness) rises within a few dozen steps to the edge of stability
``2/lr`` (Cohen et al., "Gradient descent on neural networks typically occurs at the edge of
stability", ICLR 2021), overshoots it briefly, and training pulls it back below ``2/lr`` (the
catapult of Lewkowycz et al. 2020); with cross-entropy it then decays as the predictions
saturate. The callback also logs the trace, the curvature along the gradient and the step size
that minimises the local quadratic model (``eps*/lr``), per-layer sharpness and its own cost.

Writes TensorBoard logs and a Lightning checkpoint of the MLP under ``--out`` (default
``outputs/curvature_monitor``) and prints a table and the ``tensorboard`` command.

    python examples/train_with_curvature_monitor.py            # about a minute on 2 CPU cores
    python examples/train_with_curvature_monitor.py --quick    # a few seconds (CI)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger, TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsClassifier, make_loader  # noqa: E402
from nncurv.callbacks import CurvatureMonitor  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
for _name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class History(Logger):
    """Keeps the curvature records in memory for the summary table."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is not None and any(k.startswith("curvature/") for k in metrics):
            self.rows.setdefault(step, {}).update(metrics)


def train(arch: str, args: argparse.Namespace) -> tuple[History, pl.Trainer, float]:
    pl.seed_everything(args.seed, verbose=False)
    model = DigitsClassifier(arch, width=args.width, lr=args.lr)
    monitor = CurvatureMonitor(
        metrics=["top_eig", "trace", "gradient", "layers"] + (["density"] if args.density else []),
        top_k=2,
        schedule="log" if args.every is None else "every",
        every_n_steps=args.every or 1,
        points_per_decade=args.per_decade,
        at_fit_start=True,
        at_fit_end=True,
        probe=args.probe_batches,
        overhead_budget=args.budget,
    )
    history = History()
    trainer = pl.Trainer(
        max_steps=args.steps,
        logger=[TensorBoardLogger(str(args.out), name=arch, version=0), history],
        callbacks=[monitor],
        accelerator="cpu",
        devices=1,
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    trainer.fit(
        model,
        make_loader("train", batch_size=args.batch_size, seed=args.seed),
        make_loader("test", batch_size=512),
    )
    return history, trainer, time.perf_counter() - t0


def report(arch: str, history: History, trainer: pl.Trainer, seconds: float, lr: float) -> None:
    steps = sorted(history.rows)
    print(f"\n{arch.upper()}: SGD lr={lr}, 2/lr = {2 / lr:.2f}   ({seconds:.1f} s)")
    print(f"{'step':>6}{'lambda_max':>12}{'lambda_2':>10}{'lam*lr/2':>10}{'trace':>10}"
          f"{'gHg/gg':>9}{'eps*/lr':>9}{'cost ms':>9}")  # fmt: skip
    shown = steps if len(steps) <= 16 else steps[:: -(-len(steps) // 15)] + steps[-1:]
    for s in dict.fromkeys(shown):
        r = history.rows[s]
        print(
            f"{s:>6}{r['curvature/hessian/top_eig_0']:>12.3f}"
            f"{r['curvature/hessian/top_eig_1']:>10.3f}"
            f"{r['curvature/stability/sharpness_ratio']:>10.3f}"
            f"{r['curvature/hessian/trace']:>10.2f}"
            f"{r['curvature/gradient/curvature']:>9.3f}"
            f"{r['curvature/gradient/step_star_over_lr']:>9.3f}"
            f"{1e3 * r['curvature/cost/total_seconds']:>9.1f}"
        )
    first, last = history.rows[steps[0]], history.rows[steps[-1]]
    peak_step = max(steps, key=lambda s: history.rows[s]["curvature/hessian/top_eig_0"])
    peak = history.rows[peak_step]["curvature/hessian/top_eig_0"]
    acc = float(trainer.callback_metrics.get("val/acc", float("nan")))
    over = float(last.get("curvature/cost/overhead", float("nan")))
    print(
        f"sharpness {first['curvature/hessian/top_eig_0']:.2f} -> "
        f"{last['curvature/hessian/top_eig_0']:.2f} (peak {peak:.2f} = {peak * lr / 2:.2f} x 2/lr "
        f"at step {peak_step}); "
        f"held-out accuracy {acc:.3f}; callback overhead {over:.1%} of training time"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (large on purpose)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--every", type=int, default=None, help="every N steps (default: log-spaced)")
    p.add_argument("--per-decade", type=int, default=12, help="log-spaced calls per decade")
    p.add_argument("--probe-batches", type=int, default=2, help="training batches in the probe")
    p.add_argument("--budget", type=float, default=None, help="overhead budget (e.g. 0.1)")
    p.add_argument("--density", action="store_true", help="also log the spectral density")
    p.add_argument("--arch", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--quick", action="store_true", help="a few seconds (CI)")
    p.add_argument("--out", type=Path, default=Path("outputs/curvature_monitor"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (small models: 1)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.per_decade = 40, 4
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.arch:
        history, trainer, seconds = train(arch, args)
        report(arch, history, trainer, seconds, args.lr)
        if arch == "mlp":
            ckpt = args.out / "digits_mlp.ckpt"
            trainer.save_checkpoint(str(ckpt))
            print(f"checkpoint (DigitsClassifier in examples/digits.py): {ckpt}")
    print(f"\nTensorBoard:  tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
