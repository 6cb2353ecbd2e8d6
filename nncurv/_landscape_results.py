"""Frozen result records of the landscape analysis, with ``.npz`` / JSON round trips."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nncurv._landscape_directions import DirectionInfo

__all__ = ["TaylorModel", "LandscapeSlice"]


def _f(x: Any) -> float | None:
    """JSON-safe float (NaN/inf become strings so the file stays valid JSON)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)  # type: ignore[return-value]


def _uf(x: Any) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True)
class TaylorModel:
    r"""Second-order Taylor model of the loss along one direction, against the true slice.

    .. math::

        q(t) = f + t\,g^\top d + \tfrac12 t^2\, d^\top H d .

    Attributes:
        value: :math:`f(\theta)`.
        slope: :math:`g^\top d`.
        curvature: :math:`d^\top H d`.
        predicted: :math:`q(t)` on the slice's grid.
        abs_error: :math:`|q(t) - f(\theta + t d)|`.
        rel_error: ``abs_error / max(|f(θ + t d)|, tiny)``.
        rtol: The relative-error tolerance of ``valid_range``.
        valid_range: ``(t_lo, t_hi)``: the largest run of grid points around the point closest
            to :math:`t = 0` on which ``rel_error <= rtol`` (``(nan, nan)`` when none).
        quadratic_step: Minimiser of :math:`q`, :math:`t^\star = -g^\top d / d^\top H d` when
            :math:`d^\top H d > 0`, else ``nan``.
        best_step: The grid point where the true loss is smallest.
        best_loss: The loss there.
        epsilon_star: Gradient directions only: :math:`\varepsilon^\star = g^\top g/g^\top H g`,
            the learning rate that minimises the quadratic model along :math:`-g` (``nan`` when
            :math:`g^\top H g \le 0`), else ``None``.
        best_learning_rate: Gradient directions only: ``best_step`` as a learning rate along
            :math:`-g`, else ``None``.
        num_matvecs: Hessian-vector products spent (one).
    """

    value: float
    slope: float
    curvature: float
    predicted: np.ndarray
    abs_error: np.ndarray
    rel_error: np.ndarray
    rtol: float
    valid_range: tuple[float, float]
    quadratic_step: float
    best_step: float
    best_loss: float
    epsilon_star: float | None = None
    best_learning_rate: float | None = None
    num_matvecs: int = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (arrays as lists)."""
        return {
            "value": _f(self.value),
            "slope": _f(self.slope),
            "curvature": _f(self.curvature),
            "predicted": [_f(v) for v in self.predicted],
            "abs_error": [_f(v) for v in self.abs_error],
            "rel_error": [_f(v) for v in self.rel_error],
            "rtol": self.rtol,
            "valid_range": [_f(v) for v in self.valid_range],
            "quadratic_step": _f(self.quadratic_step),
            "best_step": _f(self.best_step),
            "best_loss": _f(self.best_loss),
            "epsilon_star": _f(self.epsilon_star),
            "best_learning_rate": _f(self.best_learning_rate),
            "num_matvecs": self.num_matvecs,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaylorModel:
        """Inverse of :meth:`to_dict`."""

        def arr(key: str) -> np.ndarray:
            return np.array([float(v) for v in d[key]], dtype=np.float64)

        lo, hi = (float(v) for v in d["valid_range"])
        return cls(
            value=float(d["value"]),
            slope=float(d["slope"]),
            curvature=float(d["curvature"]),
            predicted=arr("predicted"),
            abs_error=arr("abs_error"),
            rel_error=arr("rel_error"),
            rtol=float(d["rtol"]),
            valid_range=(lo, hi),
            quadratic_step=float(d["quadratic_step"]),
            best_step=float(d["best_step"]),
            best_loss=float(d["best_loss"]),
            epsilon_star=_uf(d.get("epsilon_star")),
            best_learning_rate=_uf(d.get("best_learning_rate")),
            num_matvecs=int(d.get("num_matvecs", 1)),
        )


@dataclass(frozen=True)
class LandscapeSlice:
    """Loss (and metrics) on a 1-D line or a 2-D plane through the parameters.

    The point with coordinates ``t`` (1-D) or ``(a, b)`` (2-D) is ``θ + t d`` or
    ``θ + a d_1 + b d_2``.

    Attributes:
        axes: One coordinate array per direction.
        loss: Loss values, shape ``(len(axes[0]),)`` or ``(len(axes[0]), len(axes[1]))``
            (``loss[i, j]`` at ``(axes[0][i], axes[1][j])``).
        metrics: Name → array shaped like ``loss`` (sample-weighted means over the data).
        directions: Description of each direction.
        center_loss: Loss at ``θ`` (coordinates zero), evaluated separately.
        taylor: The second-order model along the direction (1-D slices), else ``None``.
        recalibrated_bn: Whether BatchNorm statistics were recomputed at every point.
        vectorized: Whether the points were evaluated with ``vmap``.
        num_evaluations: Forward passes over a batch (per point and batch).
        wall_time: Seconds spent.
        num_nonfinite: Number of grid points with a NaN/inf loss (kept in ``loss``).
        extra: Free-form JSON-serialisable details (data size, reduction, ...).
    """

    axes: tuple[np.ndarray, ...]
    loss: np.ndarray
    metrics: dict[str, np.ndarray]
    directions: tuple[DirectionInfo, ...]
    center_loss: float
    taylor: TaylorModel | None
    recalibrated_bn: bool
    vectorized: bool
    num_evaluations: int
    wall_time: float
    num_nonfinite: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        """1 for a line, 2 for a plane."""
        return len(self.axes)

    @property
    def finite(self) -> bool:
        """Whether every loss value is finite."""
        return self.num_nonfinite == 0

    # ------------------------------------------------------------------ serialisation
    def _meta(self) -> dict[str, Any]:
        return {
            "ndim": self.ndim,
            "directions": [d.to_dict() for d in self.directions],
            "center_loss": _f(self.center_loss),
            "taylor": None if self.taylor is None else self.taylor.to_dict(),
            "recalibrated_bn": self.recalibrated_bn,
            "vectorized": self.vectorized,
            "num_evaluations": self.num_evaluations,
            "wall_time": self.wall_time,
            "num_nonfinite": self.num_nonfinite,
            "metric_names": list(self.metrics),
            "extra": self.extra,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything as a JSON-serialisable dict (arrays as nested lists)."""
        d = self._meta()
        d["axes"] = [[_f(v) for v in a] for a in self.axes]
        d["loss"] = np.vectorize(_f, otypes=[object])(self.loss).tolist()
        d["metrics"] = {
            k: np.vectorize(_f, otypes=[object])(v).tolist() for k, v in self.metrics.items()
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LandscapeSlice:
        """Inverse of :meth:`to_dict`."""

        def arr(x: Any) -> np.ndarray:
            return np.vectorize(float, otypes=[np.float64])(np.array(x, dtype=object))

        return cls(
            axes=tuple(arr(a) for a in d["axes"]),
            loss=arr(d["loss"]),
            metrics={k: arr(v) for k, v in d["metrics"].items()},
            directions=tuple(DirectionInfo.from_dict(x) for x in d["directions"]),
            center_loss=float(d["center_loss"]),
            taylor=None if d.get("taylor") is None else TaylorModel.from_dict(d["taylor"]),
            recalibrated_bn=bool(d["recalibrated_bn"]),
            vectorized=bool(d["vectorized"]),
            num_evaluations=int(d["num_evaluations"]),
            wall_time=float(d["wall_time"]),
            num_nonfinite=int(d["num_nonfinite"]),
            extra=dict(d.get("extra") or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write to ``path``: ``.npz`` (arrays + JSON metadata) or ``.json`` by suffix.

        Args:
            path: Target file; its suffix picks the format.

        Returns:
            The path written.

        Raises:
            ValueError: Unknown suffix.
        """
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False))
        elif path.suffix == ".npz":
            arrays = {f"axis{i}": a for i, a in enumerate(self.axes)}
            arrays["loss"] = self.loss
            arrays.update({f"metric:{k}": v for k, v in self.metrics.items()})
            arrays["meta"] = np.array(json.dumps(self._meta(), ensure_ascii=False))
            np.savez(path, **arrays)  # type: ignore[arg-type]
        else:
            raise ValueError(f"path must end in .npz or .json, got {str(path)!r}")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LandscapeSlice:
        """Read a file written by :meth:`save`.

        Args:
            path: A ``.npz`` or ``.json`` file.

        Returns:
            The slice.

        Raises:
            ValueError: Unknown suffix.
        """
        path = Path(path)
        if path.suffix == ".json":
            return cls.from_dict(json.loads(path.read_text()))
        if path.suffix != ".npz":
            raise ValueError(f"path must end in .npz or .json, got {str(path)!r}")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            axes = tuple(np.asarray(z[f"axis{i}"]) for i in range(int(meta["ndim"])))
            loss = np.asarray(z["loss"])
            metrics = {k: np.asarray(z[f"metric:{k}"]) for k in meta["metric_names"]}
        d = dict(meta)
        d.update(
            axes=[a.tolist() for a in axes],
            loss=loss.tolist(),
            metrics={k: v.tolist() for k, v in metrics.items()},
        )
        return cls.from_dict(d)
