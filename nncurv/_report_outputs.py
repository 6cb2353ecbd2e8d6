"""What ``nncurv report`` writes besides the figures: JSON-safe summaries, TensorBoard, the page."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nncurv._landscape_results import LandscapeSlice
from nncurv._report_html import table, write_html

__all__ = ["clean", "scalars", "slice_summary", "write_tensorboard", "write_page"]


def clean(x: Any) -> Any:
    """JSON-safe copy: tensors/arrays to lists, non-finite floats to strings."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return [clean(v) for v in x.tolist()] if x.ndim else clean(x.item())
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, Mapping):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def scalars(obj: Any) -> dict[str, Any]:
    """Scalar fields of a result dataclass."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[f.name] = v
        elif isinstance(v, torch.Tensor) and v.numel() <= 16:
            out[f.name] = v.detach().cpu().tolist()
    return out


def slice_summary(s: LandscapeSlice) -> dict[str, Any]:
    d: dict[str, Any] = {
        "ndim": s.ndim,
        "directions": [x.to_dict() for x in s.directions],
        "ranges": [[float(a.min()), float(a.max()), len(a)] for a in s.axes],
        "center_loss": s.center_loss,
        "min_loss": float(np.nanmin(s.loss)) if np.isfinite(s.loss).any() else math.nan,
        "max_loss": float(np.nanmax(s.loss)) if np.isfinite(s.loss).any() else math.nan,
        "num_nonfinite": s.num_nonfinite,
        "vectorized": s.vectorized,
        "wall_time": s.wall_time,
    }
    if s.taylor is not None:
        tm = s.taylor
        d["taylor"] = {
            k: v
            for k, v in tm.to_dict().items()
            if k not in ("predicted", "abs_error", "rel_error")
        }
    return d


def write_tensorboard(
    tb_dir: Path, figures: Mapping[str, Path], summary: Mapping[str, Any]
) -> Path | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    import matplotlib.image as mpimg

    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        for key, path in figures.items():
            img = mpimg.imread(path)  # RGBA floats in [0, 1]
            writer.add_image(f"report/{key}", img[..., :3], 0, dataformats="HWC")
        cur = summary["curvature"]
        for i, lam in enumerate(cur["top_eigenvalues"]):
            writer.add_scalar(f"curvature/top_eigenvalue_{i + 1}", lam, 0)
        writer.add_scalar("curvature/trace", cur["trace"], 0)
        if cur["min_eigenvalue"] is not None:
            writer.add_scalar("curvature/min_eigenvalue", cur["min_eigenvalue"], 0)
        writer.add_scalar("loss/value", summary["model"]["loss"], 0)
        writer.add_scalar("loss/gradient_norm", summary["model"]["gradient_norm"], 0)
        for key, s in summary["landscape"].items():
            tm = s.get("taylor")
            if tm and tm.get("epsilon_star") is not None and isinstance(tm["epsilon_star"], float):
                writer.add_scalar(f"landscape/{key}_epsilon_star", tm["epsilon_star"], 0)
        text = json.dumps(clean({k: summary[k] for k in ("model", "curvature")}), indent=1)
        writer.add_text("report/summary", "```\n" + text + "\n```", 0)
        writer.flush()
    finally:
        writer.close()
    return tb_dir


def write_page(
    out_dir: Path,
    summary: Mapping[str, Any],
    figures: Mapping[str, Path],
    captions: Mapping[str, str],
    slice_rows: list[list[Any]],
    info_text: str,
    tb_dir: Path | None,
) -> Path:
    m, c = summary["model"], summary["curvature"]
    model_rows = [
        ["module", m["class"]],
        ["checkpoint", m["checkpoint"]],
        ["parameters", m["num_params"]],
        ["samples / batches", f"{m['num_samples']} / {m['num_batches']}"],
        ["loss function", f"{m['loss_fn']} (reduction {m['reduction']})"],
        ["loss", m["loss"]],
        ["gradient norm", m["gradient_norm"]],
        ["device / dtype", f"{m['device']} / {m['dtype']}"],
    ]
    curv_rows = [
        [f"top eigenvalue {i + 1}", lam, f"residual {r:.2e}"]
        for i, (lam, r) in enumerate(zip(c["top_eigenvalues"], c["top_residuals"]))
    ]
    if c["min_eigenvalue"] is not None:
        curv_rows.append(["smallest eigenvalue", c["min_eigenvalue"], "Lanczos, which='SA'"])
    curv_rows += [
        [
            "trace",
            c["trace"],
            f"± {c['trace_standard_error']:.3g} ({c['trace_num_matvecs']} products)",
        ],
        [
            "SLQ negative mass",
            c["density_negative_mass"],
            "fraction of the spectrum below -1e-3 max|λ|",
        ],
        [
            "SLQ support",
            f"[{c['density_lambda_min']:.4g}, {c['density_lambda_max']:.4g}]",
            f"{c['density_num_matvecs']} products",
        ],
    ]
    info = summary["information"]
    if info.get("available"):
        info_body = (
            "<p>Observed information <i>I</i> of the likelihood (see <code>nncurv.information"
            "</code> for the scaling conventions).</p>"
            f"<pre>{_escape(info_text)}</pre>"
        )
    else:
        info_body = f'<p class="warn">Not computed: {_escape(info.get("reason", ""))}</p>'
    head = [
        "direction",
        "f(θ)",
        "gᵀd",
        "dᵀHd",
        "Taylor valid t",
        "quadratic t*",
        "best t",
        "ε* = gᵀg/gᵀHg",
        "best lr",
    ]
    one = [k for k in figures if k.startswith(("eigvec", "gradient", "random"))]
    two = [k for k in figures if k.startswith("plane")]
    files = [
        ["summary.json", "every number on this page"],
        ["figures/*.png", f"{len(figures)} figures"],
        ["slices/*.npz", "raw slices: nncurv.landscape.LandscapeSlice.load(path)"],
    ]
    if tb_dir is not None:
        files.append(["tensorboard/", f"tensorboard --logdir {tb_dir}"])
    sections = [
        ("Model and data", table(model_rows), []),
        (
            f"Curvature ({c['matrix']})",
            table(curv_rows, ["quantity", "value", "detail"]),
            [(figures["spectrum"], captions["spectrum"])],
        ),
        ("Observed information", info_body, []),
        (
            "Loss landscape: 1-D slices",
            table(slice_rows, head)
            + "<p>t: coordinate along the direction; ε* and best lr: learning rates along −g.</p>",
            [(figures[k], captions[k]) for k in one],
        ),
        ("Loss landscape: 2-D slices", "", [(figures[k], captions[k]) for k in two]),
        ("Files", table(files), []),
    ]
    return write_html(
        out_dir / "report.html",
        title=f"nncurv report: {m['class'].rsplit('.', 1)[-1]}",
        subtitle=f"{m['checkpoint']} — {m['num_params']} parameters, {m['num_samples']} samples",
        sections=sections,
    )


def _escape(text: str) -> str:
    return html.escape(text)
