"""The self-contained HTML page of ``nncurv report`` (figures embedded as base64 data URIs)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_html"]

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0;
       background: #ffffff; color: #1d1d1f; }
header { background: #0b3d91; color: #ffffff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0; font-size: 13px; opacity: 0.9; }
main { padding: 12px 24px 40px; }
h2 { font-size: 17px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 26px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
td, th { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figs { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; border: 1px solid #d0d7de; padding: 6px; background: #ffffff; }
figure img { display: block; width: 560px; height: auto; }
figcaption { font-size: 12px; color: #57606a; max-width: 560px; padding-top: 4px; }
pre { background: #f6f8fa; padding: 8px; font-size: 12px; overflow-x: auto; }
.warn { color: #9a3412; }
"""

# Records, for tests and for the curious, whether every image decoded (naturalWidth > 0).
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.figure');
  var ok = 0;
  imgs.forEach(function (img) {
    img.setAttribute('data-natural-width', String(img.naturalWidth));
    img.setAttribute('data-natural-height', String(img.naturalHeight));
    var r = img.getBoundingClientRect();
    img.setAttribute('data-rect', [r.left, r.top + window.scrollY, r.width, r.height]
      .map(function (v) { return Math.round(v); }).join(','));
    if (img.complete && img.naturalWidth > 0) { ok += 1; }
  });
  var s = document.getElementById('image-status');
  s.setAttribute('data-decoded', String(ok));
  s.setAttribute('data-total', String(imgs.length));
  s.textContent = ok + ' of ' + imgs.length + ' figures decoded';
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            text = f"{v:.6g}" if isinstance(v, float) else v
            cells.append(f"<td{cls}>{_e(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img class="figure" alt="{_e(caption)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>'
    )


def write_html(
    path: Path,
    *,
    title: str,
    subtitle: str,
    sections: Sequence[tuple[str, str, Sequence[tuple[Path, str]]]],
) -> Path:
    """Write the page.

    Args:
        path: Output file.
        title: Page heading.
        subtitle: Line under the heading.
        sections: ``(heading, html_body, [(png_path, caption), ...])`` per section; the body is
            already-escaped HTML (tables from :func:`table`).

    Returns:
        ``path``.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<style>{_STYLE}</style>",
        f"<script>{_SCRIPT}</script>",
        "</head><body>",
        f"<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header>",
        "<main>",
        '<p id="image-status" data-decoded="0" data-total="0"></p>',
    ]
    for heading, body, figures in sections:
        parts.append(f"<section><h2>{_e(heading)}</h2>")
        parts.append(body)
        if figures:
            parts.append('<div class="figs">')
            parts.extend(_figure(p, c) for p, c in figures)
            parts.append("</div>")
        parts.append("</section>")
    parts.append("</main></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


table = _table
