"""The ``nncurv`` command line (``nncurv report ...`` or ``python -m nncurv report ...``).

Exit status: 0 on success, 2 for bad input (a path that does not exist, an import that fails,
a checkpoint that does not match the module, a bad option; one line on stderr), 1 for an
unexpected error during the computation (with its traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

_EPILOG = """\
The loss: --loss pkg.mod:Name if given (a class is instantiated without arguments, e.g.
torch.nn:CrossEntropyLoss), else the LightningModule's `loss_fn` attribute. It is called as
loss_fn(model(inputs), targets) and must reduce over the batch ("mean" or "sum").

The data: --data pkg.mod:make_loader names a function returning a DataLoader (or any
re-iterable of (inputs, targets) batches, or one batch); --data-kwargs passes it arguments.
Import paths are resolved from the current folder first; 'path/to/file.py:Name' also works.

Example:
  nncurv report --module examples.digits:DigitsClassifier \\
      --ckpt outputs/curvature_monitor/digits_mlp.ckpt \\
      --data examples.digits:make_loader --data-kwargs '{"shuffle": false}' \\
      --out outputs/report
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``nncurv report --help`` shows every option)."""
    parser = argparse.ArgumentParser(
        prog="nncurv", description="Curvature of neural networks: command-line tools."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    r = sub.add_parser(
        "report",
        help="curvature and loss-landscape report of a Lightning checkpoint",
        description=(
            "Load a LightningModule from a checkpoint, compute its curvature summary (top\n"
            "eigenvalues, trace, spectral density, observed-information metrics when the loss\n"
            "is a likelihood) and loss-landscape slices, and write PNG figures, a JSON summary,\n"
            "TensorBoard event files and one self-contained HTML page into --out."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = r.add_argument_group("inputs (required)")
    g.add_argument(
        "--module", required=True, metavar="PKG.MOD:CLASS", help="the LightningModule class"
    )
    g.add_argument("--ckpt", required=True, metavar="PATH", help="the Lightning checkpoint file")
    g.add_argument(
        "--data",
        required=True,
        metavar="PKG.MOD:FUNC",
        help="function returning the data loader the curvature is computed on",
    )
    g.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    o = r.add_argument_group("model, loss and data")
    o.add_argument(
        "--loss",
        metavar="PKG.MOD:NAME",
        help="loss class or function (default: the module's `loss_fn` attribute)",
    )
    o.add_argument(
        "--reduction",
        choices=("mean", "sum"),
        help="how the loss reduces over a batch (default: its `reduction` attribute, else mean)",
    )
    o.add_argument(
        "--data-kwargs",
        metavar="JSON",
        help='keyword arguments of the data function as JSON, e.g. \'{"split": "train"}\'',
    )
    o.add_argument(
        "--max-batches", type=int, metavar="N", help="use only the first N batches of the data"
    )
    o.add_argument("--device", default="cpu", help="device to compute on (default: cpu)")
    o.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        help="convert the model to this dtype (default: as saved)",
    )
    c = r.add_argument_group("curvature summary")
    c.add_argument(
        "--curvature",
        choices=("hessian", "ggn"),
        default="hessian",
        help="matrix of eigenvalues, trace and density (default: hessian)",
    )
    c.add_argument(
        "--eigenvalues", type=int, default=3, metavar="K", help="top eigenvalues (default: 3)"
    )
    c.add_argument(
        "--trace-matvecs", type=int, default=60, metavar="M", help="products of the trace (60)"
    )
    c.add_argument("--density-probes", type=int, default=2, metavar="L", help="SLQ probes (2)")
    c.add_argument(
        "--density-steps", type=int, default=40, metavar="S", help="Lanczos steps per probe (40)"
    )
    c.add_argument(
        "--no-information",
        action="store_true",
        help="skip the observed-information metrics (computed when the loss is a likelihood)",
    )
    c.add_argument(
        "--information-metrics",
        nargs="+",
        metavar="NAME",
        default=None,
        help="which observed-information metrics (default: trace logdet "
        "effective_dimension condition; also top_eigenvalues standard_errors tic gap)",
    )
    land = r.add_argument_group("loss landscape")
    land.add_argument("--steps", type=int, default=41, help="points per 1-D slice (41)")
    land.add_argument("--grid", type=int, default=21, help="points per axis of 2-D slices (21)")
    land.add_argument(
        "--random-directions",
        type=int,
        default=2,
        metavar="N",
        help="random filter-normalised directions (2: one line and one plane; 0: none)",
    )
    land.add_argument(
        "--random-span",
        type=float,
        default=1.0,
        help="half-width of random slices in filter-normalised units (1.0, as Li et al.)",
    )
    land.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="recompute BatchNorm statistics on the data at every landscape point",
    )
    land.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="landscape points per vectorised pass (default: 2 on CPU, 64 on GPU)",
    )
    m = r.add_argument_group("output")
    m.add_argument("--no-tensorboard", action="store_true", help="do not write event files")
    m.add_argument("--seed", type=int, default=0, help="seed of all probes and directions (0)")
    m.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _fail(message: str) -> int:
    sys.stderr.write(f"nncurv report: error: {message}\n")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on bad input, 1 on an unexpected error.
    """
    args = build_parser().parse_args(argv)
    from nncurv.report import DEFAULT_INFORMATION_METRICS, ReportInputError, build_report

    kwargs = None
    if args.data_kwargs:
        try:
            kwargs = json.loads(args.data_kwargs)
        except json.JSONDecodeError as err:
            return _fail(f"--data-kwargs is not valid JSON ({err}): {args.data_kwargs!r}")
        if not isinstance(kwargs, dict):
            return _fail(f"--data-kwargs must be a JSON object, got {args.data_kwargs!r}")
    try:
        report = build_report(
            args.module,
            args.ckpt,
            args.data,
            args.out,
            loss=args.loss,
            data_kwargs=kwargs,
            max_batches=args.max_batches,
            reduction=args.reduction,
            device=args.device,
            dtype=args.dtype,
            curvature=args.curvature,
            num_eigenvalues=args.eigenvalues,
            trace_matvecs=args.trace_matvecs,
            density_probes=args.density_probes,
            density_steps=args.density_steps,
            steps=args.steps,
            grid=args.grid,
            random_directions=args.random_directions,
            random_span=args.random_span,
            recalibrate_bn=args.recalibrate_bn,
            information=not args.no_information,
            information_metrics=tuple(args.information_metrics or DEFAULT_INFORMATION_METRICS),
            tensorboard=not args.no_tensorboard,
            chunk_size=args.chunk_size,
            seed=args.seed,
            progress=not args.quiet,
        )
    except ReportInputError as err:
        return _fail(str(err))
    print(f"report written to {report.html}")
    if report.tensorboard_dir is not None:
        print(f"open the TensorBoard logs with: tensorboard --logdir {report.tensorboard_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
