r"""``nncurv report``: a curvature and loss-landscape report of a trained Lightning checkpoint.

Given a ``LightningModule`` class, a checkpoint and a function that builds the data loader,
:func:`build_report` computes the curvature summary (top Hessian or GGN eigenvalues, trace,
SLQ spectral density, observed-information metrics when the loss is a likelihood) and
loss-landscape slices (:mod:`nncurv.landscape`), and writes into one folder:

* ``report.html`` — one self-contained page (figures embedded as base64 PNGs);
* ``summary.json`` — every number on the page;
* ``figures/*.png`` — the figures;
* ``slices/*.npz`` — the raw slices (load with :meth:`LandscapeSlice.load`);
* ``tensorboard/`` — event files with the figures as images and the numbers as scalars
  (``tensorboard --logdir OUT/tensorboard``).

The loss convention:
    The loss is ``--loss pkg.mod:Name`` when given (a class is instantiated without
    arguments, e.g. ``torch.nn:CrossEntropyLoss``; a function is used as is); otherwise the
    module's ``loss_fn`` attribute (set ``self.loss_fn = nn.CrossEntropyLoss()`` in
    ``__init__``). It is called as ``loss_fn(model(inputs), targets)`` on the batches of the
    data loader and must reduce over the batch; its reduction is read from its ``reduction``
    attribute (``"mean"`` unless it says ``"sum"``) or given with ``--reduction``.

The data convention:
    ``--data pkg.mod:make_loader`` names a function that returns a batch or a re-iterable of
    ``(inputs, targets)`` batches (a ``DataLoader``), called with ``--data-kwargs`` (JSON).

Example (the digits classifier of ``examples/digits.py``)::

    nncurv report --module examples.digits:DigitsClassifier \
        --ckpt outputs/curvature_monitor/digits_mlp.ckpt \
        --data examples.digits:make_loader --out outputs/report
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from nncurv._landscape_plot import new_figure
from nncurv._report_inputs import (
    ReportInputError,
    check_out_dir,
    import_object,
    load_module,
    resolve_data,
    resolve_loss,
)
from nncurv._report_outputs import clean, scalars, slice_summary, write_page, write_tensorboard
from nncurv.landscape import (
    Direction,
    DirectionInfo,
    LandscapeSlice,
    accuracy,
    gradient_direction,
    plot_slice,
    random_direction,
    slice_1d,
    slice_2d,
)
from nncurv.problem import CurvatureProblem

__all__ = ["Report", "ReportInputError", "build_report", "DEFAULT_INFORMATION_METRICS"]

DEFAULT_INFORMATION_METRICS = ("trace", "logdet", "effective_dimension", "condition")


@dataclass(frozen=True)
class Report:
    """What :func:`build_report` wrote.

    Attributes:
        out_dir: The output folder.
        html: The self-contained page.
        summary_json: The JSON summary.
        figures: Figure name → PNG path.
        slices: Slice name → ``.npz`` path.
        tensorboard_dir: Folder of the event files (``None`` when not written).
        summary: The content of ``summary.json``.
        wall_time: Seconds spent.
    """

    out_dir: Path
    html: Path
    summary_json: Path
    figures: dict[str, Path]
    slices: dict[str, Path]
    tensorboard_dir: Path | None
    summary: dict[str, Any] = field(repr=False)
    wall_time: float = 0.0


class _Log:
    """Stage-by-stage progress on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.i = total, enabled, 0
        self.times: dict[str, float] = {}

    def say(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.i += 1
        t0 = time.perf_counter()
        self.say(f"[{self.i}/{self.total}] {name} ...")
        yield
        dt = time.perf_counter() - t0
        self.times[name] = dt
        self.say(f"[{self.i}/{self.total}] {name}: done in {dt:.1f}s")


def _reduction_of(loss: Any, reduction: str | None) -> Literal["mean", "sum"]:
    if reduction is not None:
        if reduction not in ("mean", "sum"):
            raise ReportInputError(f"--reduction must be 'mean' or 'sum', got {reduction!r}")
        return reduction  # type: ignore[return-value]
    own = getattr(loss, "reduction", "mean")
    if own not in ("mean", "sum"):
        raise ReportInputError(
            f"the loss reduces with {own!r}; nncurv needs a scalar loss ('mean' or 'sum')"
        )
    return own  # type: ignore[no-any-return,return-value]


def _span(curvature: float, f0: float, fallback: float) -> float:
    """Half-width where the quadratic model has risen by about ``4 f0`` (at least visible)."""
    if curvature > 0 and math.isfinite(curvature):
        return 2.0 * math.sqrt(2.0 * max(abs(f0), 1e-2) / curvature)
    return fallback


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def _information(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    reduction: str,
    problem_kwargs: dict[str, Any],
    metrics: Sequence[str],
    seed: int,
) -> tuple[dict[str, Any], str]:
    """Observed-information metrics, or the reason they are not defined for this loss."""
    try:
        from nncurv import information as inf
    except ImportError as err:  # pragma: no cover - the module ships with nncurv
        return {"available": False, "reason": f"nncurv.information missing: {err}"}, ""
    noise = "estimate" if isinstance(loss_fn, nn.MSELoss) else None
    try:
        op = inf.observed_information(
            model,
            loss_fn,
            data,
            reduction=reduction,  # type: ignore[arg-type]
            noise_variance=noise,  # type: ignore[arg-type]
            **problem_kwargs,
        )
    except (ValueError, TypeError) as err:
        return {"available": False, "reason": str(err)}, ""
    wanted = list(metrics)
    spectral = [k for k in ("logdet", "effective_dimension") if k in wanted]
    if "condition" in wanted and spectral:
        # the condition run finds lambda_min cheaply; logdet(I + Id) and the effective dimension
        # (prior precision 1) are undefined when lambda_min <= -1, so their SLQ run is skipped
        first = inf.information_metrics(op, metrics=("condition",), seed=seed)
        rest = [k for k in wanted if k != "condition"]
        skipped: dict[str, str] = {}
        cond = first.condition
        if cond is not None and cond.lambda_min + 1.0 <= 0:
            skipped = {
                k: f"undefined: the observed information has eigenvalue {cond.lambda_min:.4g} "
                "<= -1 (indefinite), so log det(I + Id) and the effective dimension with "
                "prior precision 1 do not exist (skipped)"
                for k in spectral
            }
            rest = [k for k in rest if k not in spectral]
        second = inf.information_metrics(op, metrics=tuple(rest), seed=seed) if rest else first
        m = dataclasses.replace(
            second,
            condition=cond,
            wall_times={**first.wall_times, **second.wall_times},
            num_matvecs={**first.num_matvecs, **second.num_matvecs},
            errors={**first.errors, **second.errors, **skipped},
        )
    else:
        m = inf.information_metrics(op, metrics=tuple(wanted), seed=seed)
    out: dict[str, Any] = {
        "available": True,
        "likelihood": scalars(m.likelihood)
        if hasattr(m.likelihood, "__dataclass_fields__")
        else str(m.likelihood),
        "errors": dict(m.errors),
        "wall_times": dict(m.wall_times),
        "num_matvecs": dict(m.num_matvecs),
    }
    for name in ("trace", "logdet", "effective_dimension", "condition", "tic", "gap"):
        res = getattr(m, name, None)
        if res is not None:
            out[name] = scalars(res)
    if m.top_eigenvalues is not None:
        out["top_eigenvalues"] = m.top_eigenvalues.eigenvalues.tolist()
    if m.standard_errors is not None:
        s = m.standard_errors.values
        out["standard_errors"] = {
            "median": float(s.median()),
            "min": float(s.min()),
            "max": float(s.max()),
            "count": int(s.numel()),
        }
    return out, m.summary()


def build_report(
    module: str | type,
    ckpt: str | Path,
    data: str | Callable[..., Any] | Any,
    out: str | Path,
    *,
    loss: str | Callable[..., Any] | None = None,
    data_kwargs: Mapping[str, Any] | None = None,
    max_batches: int | None = None,
    reduction: Literal["mean", "sum"] | None = None,
    device: str = "cpu",
    dtype: Literal["float32", "float64"] | None = None,
    curvature: Literal["hessian", "ggn"] = "hessian",
    num_eigenvalues: int = 3,
    trace_matvecs: int = 60,
    density_probes: int = 2,
    density_steps: int = 40,
    steps: int = 41,
    grid: int = 21,
    random_directions: int = 2,
    random_span: float = 1.0,
    recalibrate_bn: bool = False,
    information: bool = True,
    information_metrics: Sequence[str] = DEFAULT_INFORMATION_METRICS,
    tensorboard: bool = True,
    chunk_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Report:
    r"""Compute the curvature summary and landscape slices of a checkpoint and write the report.

    Args:
        module: The ``LightningModule`` class, or its import path ``"pkg.mod:Class"``.
        ckpt: The Lightning checkpoint (``trainer.save_checkpoint`` / ``ModelCheckpoint``).
        data: A function returning the data (or its import path ``"pkg.mod:make_loader"``),
            or the data itself (a batch or a re-iterable of batches).
        out: Output folder (created).
        loss: The loss (a callable or an import path; classes are instantiated without
            arguments). Default: the module's ``loss_fn`` attribute.
        data_kwargs: Keyword arguments of the data function.
        max_batches: Use only the first batches of the data.
        reduction: How the loss reduces over a batch; default its ``reduction`` attribute.
        device: Where to compute (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        dtype: Convert the model to this dtype (default: as in the checkpoint).
        curvature: Matrix of the eigenvalues, trace and density: ``"hessian"`` or ``"ggn"``
            (the Taylor model always uses the Hessian).
        num_eigenvalues: Number of top eigenvalues (at least 2 for the eigenvector plane).
        trace_matvecs: Products of the trace estimate (XTrace).
        density_probes: SLQ probes.
        density_steps: Lanczos steps per SLQ probe.
        steps: Points of each 1-D slice.
        grid: Points per axis of each 2-D slice.
        random_directions: Number of random filter-normalised directions (0, 1 or 2+).
        random_span: Half-width of random slices in filter-normalised units.
        recalibrate_bn: Recompute BatchNorm statistics at every landscape point.
        information: Compute observed-information metrics when the loss is a likelihood.
        information_metrics: Which (see :data:`nncurv.information.ALL_METRICS`).
        tensorboard: Write TensorBoard event files.
        chunk_size: Landscape points per vectorised evaluation (default 2 on CPU, 64 on GPU).
        seed: Seed of every random probe and direction.
        progress: Print progress to stderr.

    Returns:
        A :class:`Report` with the paths written.

    Raises:
        ReportInputError: (a ``ValueError``) a bad path, a failing import, a checkpoint that
            does not match the module, no loss, a bad option — before any computation.
    """
    t_start = time.perf_counter()
    # ------------------------------------------------------------------ validate options first
    if curvature not in ("hessian", "ggn"):
        raise ReportInputError(f"--curvature must be 'hessian' or 'ggn', got {curvature!r}")
    if dtype not in (None, "float32", "float64"):
        raise ReportInputError(f"--dtype must be 'float32' or 'float64', got {dtype!r}")
    for opt, val, lo in (
        ("num_eigenvalues", num_eigenvalues, 1),
        ("trace_matvecs", trace_matvecs, 3),
        ("density_probes", density_probes, 1),
        ("density_steps", density_steps, 2),
        ("steps", steps, 3),
        ("grid", grid, 3),
        ("random_directions", random_directions, 0),
        ("chunk_size", 1 if chunk_size is None else chunk_size, 1),
    ):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ReportInputError(f"{opt} must be an int >= {lo}, got {val!r}")
    if not (isinstance(random_span, (int, float)) and random_span > 0):
        raise ReportInputError(f"random_span must be positive, got {random_span!r}")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ReportInputError(f"--device: {device!r} is not a device: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReportInputError(f"--device {device!r}: CUDA is not available on this machine")
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ReportInputError(
            "nncurv report draws its figures with matplotlib: pip install matplotlib "
            "(or nncurv[examples])"
        ) from err
    if information:
        from nncurv.information import ALL_METRICS

        bad = [m for m in information_metrics if m not in ALL_METRICS]
        if bad:
            raise ReportInputError(
                f"unknown information metrics {bad}; choose from {list(ALL_METRICS)}"
            )
    log = _Log(7 + (1 if information else 0), progress)
    summary: dict[str, Any] = {"version": 1}
    figures: dict[str, Path] = {}
    captions: dict[str, str] = {}

    # ------------------------------------------------------------------ load
    if not Path(ckpt).is_file():  # cheap checks first: no import before a typo is reported
        what = "is not a file" if Path(ckpt).exists() else "does not exist"
        raise ReportInputError(f"--ckpt: checkpoint {str(ckpt)!r} {what}")
    cls = import_object(module, "--module") if isinstance(module, str) else module
    out_dir = check_out_dir(out)
    with log.stage("loading module, checkpoint and data"):
        model = load_module(cls, ckpt, str(dev))
        if dtype is not None:
            model = model.to(getattr(torch, dtype))
        loss_fn = resolve_loss(model, loss)
        red = _reduction_of(loss_fn, reduction)
        batches = resolve_data(data, dict(data_kwargs or {}), max_batches)
        try:
            problem = CurvatureProblem(model, loss_fn, batches, reduction=red, seed=seed)
        except Exception as err:  # noqa: BLE001 - any mismatch (IndexError of a bad target too)
            raise ReportInputError(
                f"the module, loss and data do not fit together: {type(err).__name__}: {err}"
            ) from err
        (out_dir / "figures").mkdir(exist_ok=True)
        (out_dir / "slices").mkdir(exist_ok=True)
    f0, g = problem.loss_and_gradient()
    summary["model"] = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "checkpoint": str(Path(ckpt).resolve()),
        "num_params": problem.num_params,
        "num_samples": problem.num_samples,
        "num_batches": problem.num_batches,
        "loss_fn": repr(loss_fn),
        "reduction": red,
        "device": str(problem.device),
        "dtype": str(problem.dtype).replace("torch.", ""),
        "loss": float(f0),
        "gradient_norm": float(g.norm()),
        "batchnorm_recalibrated_in_landscape": recalibrate_bn,
    }

    from nncurv.linalg import eigenvalues, plot_spectral_density, spectral_density, trace
    from nncurv.operators import GGNOperator, HessianOperator

    hess = HessianOperator(problem)
    op = hess if curvature == "hessian" else GGNOperator(problem)
    name = "Hessian" if curvature == "hessian" else "GGN"
    k = min(num_eigenvalues, problem.num_params)

    # ------------------------------------------------------------------ curvature summary
    with log.stage(f"top {k} {name} eigenvalues (Lanczos)"):
        top = eigenvalues(op, k, which="LA", return_eigenvectors=True, seed=seed)
        bottom = eigenvalues(op, 1, which="SA", seed=seed + 1) if curvature == "hessian" else None
    with log.stage(f"{name} trace (XTrace, {trace_matvecs} products)"):
        tr = trace(op, min(trace_matvecs, problem.num_params), seed=seed + 2)
    with log.stage(f"{name} spectral density (SLQ, {density_probes}×{density_steps})"):
        dens = spectral_density(
            op, num_probes=density_probes, num_steps=density_steps, seed=seed + 3
        )
    summary["curvature"] = {
        "matrix": name,
        "top_eigenvalues": top.eigenvalues.tolist(),
        "top_residuals": top.residuals.tolist(),
        "top_converged": top.converged,
        "top_num_matvecs": top.num_matvecs,
        "min_eigenvalue": None if bottom is None else float(bottom.eigenvalues[0]),
        "trace": tr.estimate,
        "trace_standard_error": tr.standard_error,
        "trace_num_matvecs": tr.num_matvecs,
        "density_lambda_min": dens.lambda_min,
        "density_lambda_max": dens.lambda_max,
        "density_negative_mass": dens.resolved_negative_mass(),
        "density_num_matvecs": dens.num_matvecs,
    }
    fig = new_figure((6.0, 3.8))
    ax = fig.add_subplot()
    plot_spectral_density(dens, ax=ax)
    for i, lam in enumerate(top.eigenvalues.tolist()):
        ax.axvline(
            lam, color="C3", ls="--", lw=1, label="Lanczos top eigenvalues" if i == 0 else None
        )
    ax.legend(fontsize=8)
    ax.set_title(f"{name} spectral density (SLQ) and top eigenvalues", fontsize=9)
    figures["spectrum"] = _save(fig, out_dir / "figures" / "spectrum.png")
    captions["spectrum"] = (
        f"SLQ density of the {name} ({dens.num_probes} probes × {density_steps} steps, log scale); "
        "dashed: top eigenvalues from Lanczos."
    )

    # ------------------------------------------------------------------ information
    info_text = ""
    if information:
        with log.stage("observed-information metrics"):
            summary["information"], info_text = _information(
                model,
                loss_fn,
                batches,
                red,
                {},
                information_metrics,
                seed + 4,
            )
    else:
        summary["information"] = {"available": False, "reason": "disabled (--no-information)"}

    # ------------------------------------------------------------------ directions
    metrics = (
        {"accuracy": accuracy} if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) else None
    )
    value = float(f0)
    assert top.eigenvector_dicts is not None
    eig_dirs: list[Direction] = []
    for i in range(min(2, k)):
        lam = float(top.eigenvalues[i])
        vec = {n: t.to(problem.dtype).contiguous() for n, t in top.eigenvector_dicts[i].items()}
        info = DirectionInfo(
            "eigenvector", f"{name} eigvec {i + 1} (λ={lam:.4g})", 1.0, eigenvalue=lam,
            extra={"index": i, "operator": name},
        )  # fmt: skip
        eig_dirs.append(Direction(vec, info))
    rand_dirs = [random_direction(problem, seed=seed + 10 + i) for i in range(random_directions)]
    grad_dir = gradient_direction(problem) if float(g.norm()) > 0 else None

    slices: dict[str, LandscapeSlice] = {}
    one_d: list[tuple[str, Direction, tuple[float, float]]] = []
    for i, d in enumerate(eig_dirs):
        half = _span(d.info.eigenvalue or 0.0, value, 1.0)
        one_d.append((f"eigvec{i + 1}", d, (-half, half)))
    if grad_dir is not None:
        gd = problem.flatten(grad_dir.vector)
        c = float(gd @ hess.matvec(gd))
        tstar = float(g.norm()) / c if c > 0 else math.nan
        if math.isfinite(tstar):
            one_d.append(("gradient", grad_dir, (-tstar, 3.0 * tstar)))
        else:
            norm = math.sqrt(sum(float((p.double() ** 2).sum()) for p in problem.params.values()))
            one_d.append(("gradient", grad_dir, (-0.1 * norm, 0.1 * norm)))
    for i, d in enumerate(rand_dirs[:1]):
        one_d.append((f"random{i + 1}", d, (-random_span, random_span)))

    with log.stage(f"1-D slices ({len(one_d)} × {steps} points, Taylor models)"):
        for key, d, span in one_d:
            slices[key] = slice_1d(
                problem,
                d,
                steps=steps,
                span=span,
                metrics=metrics,
                curvature_operator=hess,
                chunk_size=chunk_size,
                recalibrate_bn=recalibrate_bn,
                progress=progress,
            )
    two_d: list[tuple[str, Direction, Direction, Any]] = []
    if len(rand_dirs) >= 2:
        two_d.append(("plane_random", rand_dirs[0], rand_dirs[1], (-random_span, random_span)))
    if len(eig_dirs) >= 2:
        spans = tuple(
            (-h, h) for h in (_span(d.info.eigenvalue or 0.0, value, 1.0) for d in eig_dirs)
        )
        two_d.append(("plane_eigen", eig_dirs[0], eig_dirs[1], spans))
    with log.stage(f"2-D slices ({len(two_d)} × {grid}×{grid} points)"):
        for key, dx, dy, span in two_d:
            slices[key] = slice_2d(
                problem,
                dx,
                dy,
                steps=grid,
                span=span,
                metrics=metrics,
                chunk_size=chunk_size,
                recalibrate_bn=recalibrate_bn,
                progress=progress,
            )

    # ------------------------------------------------------------------ figures and files
    slice_files: dict[str, Path] = {}
    tb_dir: Path | None = None
    with log.stage("figures, JSON summary, TensorBoard and HTML"):
        slice_rows = []
        for key, s in slices.items():
            slice_files[key] = s.save(out_dir / "slices" / f"{key}.npz")
            figures[key] = _save(plot_slice(s), out_dir / "figures" / f"{key}.png")
            if s.ndim == 1:
                tm = s.taylor
                assert tm is not None
                captions[key] = (
                    f"Loss along {s.directions[0].label} with the 2nd-order Taylor model; shaded: "
                    f"relative error ≤ {tm.rtol:g}."
                )
                slice_rows.append(
                    [
                        s.directions[0].label,
                        s.center_loss,
                        tm.slope,
                        tm.curvature,
                        f"[{tm.valid_range[0]:.3g}, {tm.valid_range[1]:.3g}]",
                        tm.quadratic_step,
                        tm.best_step,
                        "" if tm.epsilon_star is None else f"{tm.epsilon_star:.4g}",
                        "" if tm.best_learning_rate is None else f"{tm.best_learning_rate:.4g}",
                    ]
                )
            else:
                captions[key] = (
                    f"Loss on the plane {s.directions[0].label} × {s.directions[1].label} "
                    "(red star: the checkpoint)."
                )
                figures[key + "_surface"] = _save(
                    plot_slice(s, kind="surface"), out_dir / "figures" / f"{key}_surface.png"
                )
                captions[key + "_surface"] = f"The same plane as a surface ({grid}×{grid} points)."
                if "accuracy" in s.metrics:
                    figures[key + "_accuracy"] = _save(
                        plot_slice(s, metric="accuracy"),
                        out_dir / "figures" / f"{key}_accuracy.png",
                    )
                    captions[key + "_accuracy"] = "Accuracy on the same plane."
        summary["landscape"] = {key: slice_summary(s) for key, s in slices.items()}
        summary["timings"] = dict(log.times)
        summary["files"] = {
            "figures": {k: str(p.relative_to(out_dir)) for k, p in figures.items()},
            "slices": {k: str(p.relative_to(out_dir)) for k, p in slice_files.items()},
        }
        if tensorboard:
            tb_dir = write_tensorboard(out_dir / "tensorboard", figures, summary)
            if tb_dir is None:
                log.say(
                    "tensorboard is not installed: event files skipped (pip install tensorboard)"
                )
        summary["files"]["tensorboard"] = (
            None if tb_dir is None else str(tb_dir.relative_to(out_dir))
        )
        summary["wall_time"] = time.perf_counter() - t_start
        json_path = out_dir / "summary.json"
        json_path.write_text(json.dumps(clean(summary), indent=1, ensure_ascii=False))
        html_path = write_page(out_dir, summary, figures, captions, slice_rows, info_text, tb_dir)
    log.say(f"report: {html_path}")
    if tb_dir is not None:
        log.say(f"tensorboard: tensorboard --logdir {tb_dir}")
    return Report(
        out_dir=out_dir,
        html=html_path,
        summary_json=json_path,
        figures=figures,
        slices=slice_files,
        tensorboard_dir=tb_dir,
        summary=clean(summary),
        wall_time=time.perf_counter() - t_start,
    )
