"""TensorBoard helpers of the curvature monitor: writers, custom-scalars layout, histograms."""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Sequence
from typing import Any

import torch

from nncurv.linalg.density import SpectralDensity

__all__ = ["tensorboard_writers", "custom_scalars_layout", "add_density", "log_scalars"]


def _writer_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from torch.utils.tensorboard import SummaryWriter

        types.append(SummaryWriter)
    except ImportError:  # pragma: no cover - tensorboard is a dependency of the extra
        pass
    try:  # pragma: no cover - optional
        from tensorboardX import SummaryWriter as XWriter

        types.append(XWriter)
    except ImportError:
        pass
    return tuple(types)


def tensorboard_writers(loggers: Sequence[Any]) -> list[Any]:
    """The TensorBoard ``SummaryWriter`` of every logger that has one (call on rank 0 only).

    Detected by the writer's type rather than the logger's class, so loggers of both the
    ``pytorch_lightning`` and the ``lightning.pytorch`` namespaces qualify.
    """
    types = _writer_types()
    if not types:
        return []
    writers = []
    for logger in loggers:
        exp = getattr(logger, "experiment", None)
        if isinstance(exp, types):
            writers.append(exp)
    return writers


def custom_scalars_layout(prefix: str, keys: Sequence[str]) -> dict[str, Any]:
    """A custom-scalars layout: eigenvalues overlaid, trace with its margin, sharpness vs 2/lr.

    Args:
        prefix: The tag prefix (``"curvature/"``).
        keys: The relative scalar keys that will be logged.
    """
    p = re.escape(prefix)
    charts: dict[str, Any] = {}
    ks = set(keys)
    if any(k.startswith("hessian/top_eig_") and k[-1].isdigit() for k in ks):
        charts["Hessian top eigenvalues"] = ["Multiline", [rf"{p}hessian/top_eig_\d+$"]]
    if "hessian/trace" in ks:
        charts["Hessian trace (±2 SE)"] = [
            "Margin",
            [
                f"{prefix}hessian/trace",
                f"{prefix}hessian/trace_lower",
                f"{prefix}hessian/trace_upper",
            ],
        ]
    if "stability/two_over_lr" in ks or "hessian/top_eig_0" in ks:  # (lr may be 0 at first)
        charts["Sharpness vs 2/lr"] = [
            "Multiline",
            [f"{p}hessian/top_eig_0$", f"{p}stability/two_over_lr$"],
        ]
    if "gradient/step_star" in ks:
        charts["Step size: optimal vs lr"] = [
            "Multiline",
            [f"{p}gradient/step_star$", f"{p}gradient/lr$"],
        ]
    if any(k.startswith("layer/") and k.endswith("/top_eig") for k in ks):
        charts["Layer top eigenvalues"] = ["Multiline", [rf"{p}layer/.*/top_eig$"]]
    if any(k.startswith("layer/") and k.endswith("/trace") for k in ks):
        charts["Layer traces"] = ["Multiline", [rf"{p}layer/.*/trace$"]]
    if any(k.startswith("cost/") for k in ks):
        charts["Cost per metric (s)"] = ["Multiline", [rf"{p}cost/.*/seconds$"]]
    return {prefix.rstrip("/") or "curvature": charts}


def add_density(writer: Any, tag: str, slq: SpectralDensity, step: int, num_bins: int = 60) -> None:
    """Log an SLQ spectral density as a native TensorBoard histogram (counts in eigenvalues)."""
    lo, hi = slq.lambda_min, slq.lambda_max
    width = max(hi - lo, abs(hi), 1e-12) / num_bins
    edges = torch.linspace(lo - width, hi + width, num_bins + 1, dtype=torch.float64)
    centres = (edges[1:] + edges[:-1]) / 2
    _, values = slq.density(centres.to(slq.nodes.device))
    counts = (values.cpu() * (edges[1] - edges[0]) * slq.dim).clamp_min(0)
    total, _ = slq.trace()
    squares, _ = slq.spectral_sum(lambda x: x * x)
    writer.add_histogram_raw(
        tag,
        min=lo,
        max=hi,
        num=float(counts.sum()),
        sum=total,
        sum_squares=squares,
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )


@functools.cache
def _stock_log_metrics() -> tuple[Any, ...]:
    """``log_metrics`` of the TensorBoard loggers of both Lightning namespaces."""
    found = []
    for mod in ("lightning_fabric.loggers.tensorboard", "lightning.fabric.loggers.tensorboard"):
        try:
            found.append(importlib.import_module(mod).TensorBoardLogger.log_metrics)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


@functools.cache
def _summary_types() -> tuple[Any, Any] | None:
    """``(Summary proto class, torch SummaryWriter)``, or ``None`` without tensorboard."""
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return Summary, SummaryWriter


def log_scalars(logger: Any, tags: dict[str, float], step: int) -> None:
    """``logger.log_metrics(tags, step)``, as one merged event for a stock TensorBoard logger.

    Lightning's ``TensorBoardLogger`` writes one event per scalar (about 25 µs each); the same
    values in one ``Summary`` (as TensorFlow's merged summaries do) read back identically and
    cost a fifth. Any other logger, one that overrides ``log_metrics``, or one whose writer is
    not torch's ``SummaryWriter`` (tensorboardX, which Lightning may fall back to) gets the call.
    """
    prefix = getattr(logger, "_prefix", None)
    stock = getattr(type(logger), "log_metrics", None) in _stock_log_metrics()
    proto = _summary_types() if stock and isinstance(prefix, str) else None
    experiment = getattr(logger, "experiment", None) if proto is not None else None
    if proto is None or not isinstance(experiment, proto[1]):
        logger.log_metrics(tags, step=step)
        return
    summary = proto[0]
    join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
    values = [
        summary.Value(tag=f"{prefix}{join}{k}" if prefix else k, simple_value=float(v))
        for k, v in tags.items()
    ]
    experiment._get_file_writer().add_summary(summary(value=values), step)
