"""Figures of landscape slices (line, contour, surface) and their export to TensorBoard.

matplotlib and tensorboard are optional dependencies, imported only here and only when called.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, any backend, headless).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from nncurv._landscape_results import LandscapeSlice

__all__ = ["plot_slice", "plot_slices", "slices_to_tensorboard", "new_figure"]

PlotKind = Literal["auto", "line", "contour", "surface"]


def new_figure(figsize: tuple[float, float] = (6.0, 4.0)) -> Any:
    """A pyplot-free matplotlib ``Figure`` (raises a clear ``ImportError`` without matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from err
    return Figure(figsize=figsize, layout="constrained")


def _line(s: LandscapeSlice, ax: Any, metric: str | None, show_taylor: bool) -> None:
    t = s.axes[0]
    y = s.loss if metric is None else s.metrics[metric]
    name = "loss" if metric is None else metric
    ax.plot(t, y, color="C0", lw=2, label=name)
    tm = s.taylor
    if metric is None and show_taylor and tm is not None:
        ax.plot(t, tm.predicted, color="C1", ls="--", lw=1.5, label="2nd-order Taylor")
        lo, hi = tm.valid_range
        if np.isfinite(lo):
            ax.axvspan(lo, hi, color="C2", alpha=0.12, label=f"Taylor rel. err ≤ {tm.rtol:g}")
        if np.isfinite(tm.quadratic_step) and t.min() <= tm.quadratic_step <= t.max():
            ax.axvline(tm.quadratic_step, color="C1", ls=":", label="quadratic-model minimum")
        if np.isfinite(tm.best_step):
            ax.plot([tm.best_step], [tm.best_loss], "o", color="C3", label="best on slice")
        finite = y[np.isfinite(y)]
        if finite.size:  # keep the true curve in view when the parabola shoots off
            span = float(finite.max() - finite.min()) or abs(float(finite.max())) or 1.0
            ax.set_ylim(float(finite.min()) - 0.1 * span, float(finite.max()) + 0.3 * span)
    ax.axvline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel(f"t along {s.directions[0].label}")
    ax.set_ylabel(name)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)


def _title(s: LandscapeSlice, metric: str | None) -> str:
    name = "loss" if metric is None else metric
    if s.ndim == 1:
        text = f"{name} along {s.directions[0].label}"
        tm = s.taylor
        if tm is not None and tm.epsilon_star is not None:
            text += f"\nε* = {tm.epsilon_star:.3g}, best lr on slice = {tm.best_learning_rate:.3g}"
    else:
        text = f"{name}: {s.directions[0].label} × {s.directions[1].label}"
    if s.recalibrated_bn:
        text += " (BN recalibrated)"
    return text


def plot_slice(
    result: LandscapeSlice,
    *,
    kind: PlotKind = "auto",
    metric: str | None = None,
    ax: Any = None,
    show_taylor: bool = True,
    log_scale: bool = False,
    levels: int = 30,
) -> Any:
    """Plot a slice and return the matplotlib figure.

    1-D slices are drawn as a line (with the Taylor model, the band where its relative error
    stays within tolerance, the quadratic-model minimiser and the best point on the slice);
    2-D slices as filled contours (``"contour"``, default) or a 3-D surface (``"surface"``).

    Args:
        result: A :class:`~nncurv.landscape.LandscapeSlice`.
        kind: ``"auto"``, ``"line"``, ``"contour"`` or ``"surface"``.
        metric: Plot this metric instead of the loss.
        ax: An existing ``Axes`` (a 3-D one for ``"surface"``); a new figure otherwise.
        show_taylor: Overlay the Taylor model on 1-D loss slices.
        log_scale: Logarithmic value axis / contour levels of ``log10(loss)``.
        levels: Number of contour levels.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: A kind that does not fit the slice's dimension, or an unknown metric.
    """
    if kind not in ("auto", "line", "contour", "surface"):
        raise ValueError(f"kind must be 'auto', 'line', 'contour' or 'surface', got {kind!r}")
    if metric is not None and metric not in result.metrics:
        raise ValueError(f"unknown metric {metric!r}; the slice has {sorted(result.metrics)}")
    if kind == "auto":
        kind = "line" if result.ndim == 1 else "contour"
    if (kind == "line") != (result.ndim == 1):
        raise ValueError(f"kind={kind!r} does not fit a {result.ndim}-D slice")
    if ax is None:
        fig = new_figure((6.0, 4.2) if kind != "surface" else (6.5, 5.0))
        ax = fig.add_subplot(projection="3d" if kind == "surface" else None)
    else:
        fig = ax.figure
    if kind == "line":
        _line(result, ax, metric, show_taylor)
        if log_scale:
            ax.set_yscale("log")
    else:
        z = result.loss if metric is None else result.metrics[metric]
        if log_scale:
            z = np.log10(np.clip(z, 1e-300, None))
        X, Y = np.meshgrid(result.axes[0], result.axes[1], indexing="ij")
        zf = np.where(np.isfinite(z), z, np.nan)
        label = ("log10 " if log_scale else "") + ("loss" if metric is None else metric)
        if kind == "contour":
            cs = ax.contourf(X, Y, zf, levels=levels, cmap="viridis")
            ax.contour(X, Y, zf, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
            fig.colorbar(cs, ax=ax, label=label)
            ax.plot([0], [0], "r*", ms=10)
        else:
            ax.plot_surface(X, Y, zf, cmap="viridis", linewidth=0, antialiased=True)
            ax.set_zlabel(label)
        ax.set_xlabel(result.directions[0].label)
        ax.set_ylabel(result.directions[1].label)
    ax.set_title(_title(result, metric), fontsize=9)
    return fig


def plot_slices(results: Sequence[LandscapeSlice], *, ncols: int = 2, **kwargs: Any) -> Any:
    """Several slices side by side in one figure (2-D ones as contours).

    Args:
        results: Slices.
        ncols: Columns of the grid of panels.
        **kwargs: Passed to :func:`plot_slice` (except ``ax``).

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: No slices.
    """
    if not results:
        raise ValueError("plot_slices needs at least one slice")
    ncols = max(1, min(ncols, len(results)))
    nrows = -(-len(results) // ncols)
    fig = new_figure((5.5 * ncols, 4.0 * nrows))
    for i, r in enumerate(results):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        plot_slice(r, ax=ax, kind="auto", **kwargs)
    return fig


def slices_to_tensorboard(
    results: Sequence[LandscapeSlice] | dict[str, LandscapeSlice],
    writer: Any,
    *,
    tag: str = "landscape",
    global_step: int = 0,
    surface: bool = False,
) -> list[str]:
    """Write slice figures to TensorBoard as images (``SummaryWriter.add_figure``).

    Args:
        results: Slices, or a dict tag suffix → slice.
        writer: A ``torch.utils.tensorboard.SummaryWriter`` or a log directory (a writer is
            then created, used and closed; tensorboard is imported only here).
        tag: Tag prefix; images are named ``{tag}/{name}``.
        global_step: Step recorded with the images.
        surface: Also write a surface plot of 2-D slices.

    Returns:
        The tags written.

    Raises:
        ImportError: tensorboard is not installed (``pip install tensorboard``).
    """
    own = False
    if isinstance(writer, (str, bytes)) or hasattr(writer, "__fspath__"):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "writing to TensorBoard needs tensorboard: pip install tensorboard "
                "(or nncurv[lightning])"
            ) from err
        writer, own = SummaryWriter(log_dir=str(writer)), True
    items = (
        list(results.items())
        if isinstance(results, dict)
        else [(f"slice{i}", r) for i, r in enumerate(results)]
    )
    tags = []
    try:
        for name, r in items:
            writer.add_figure(f"{tag}/{name}", plot_slice(r), global_step=global_step)
            tags.append(f"{tag}/{name}")
            if surface and r.ndim == 2:
                writer.add_figure(
                    f"{tag}/{name}_surface", plot_slice(r, kind="surface"), global_step=global_step
                )
                tags.append(f"{tag}/{name}_surface")
        writer.flush()
    finally:
        if own:
            writer.close()
    return tags
