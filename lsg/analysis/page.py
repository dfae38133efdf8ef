"""One self-contained HTML page per analysis run: every figure of every analysis, plotly.js inlined
once, no server needed (opens from disk). Written atomically (`lsg.files`)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

from lsg.analysis.common import AnalysisResult
from lsg.files import atomic_write_text

PANEL_CLASS = "lsg-panel"  # the class of every figure's container (the browser test counts them)


def write_page(results: Sequence[AnalysisResult], path: Path, title: str = "lsg analysis") -> Path:
    """Write `results`' figures, in order, to one HTML file at `path`.

    The first figure carries plotly.js inline (`plotly.io.to_html(include_plotlyjs=True)`), every
    later one none, so the file works offline and holds the library once. Each analysis gets a
    heading and its summary (JSON) in a collapsed block.

    Returns:
        `path`.
    """
    import plotly.io as pio

    parts, first = [], True
    for result in results:
        parts.append(f"<h2>{html.escape(result.name)}</h2>")
        if result.summary:
            parts.append("<details><summary>summary</summary><pre>"
                         + html.escape(json.dumps(result.summary, indent=1, default=str)[:20000]) + "</pre></details>")
        for i, fig in enumerate(result.figures):
            div = pio.to_html(fig, full_html=False, include_plotlyjs=first, auto_play=False,
                              div_id=f"{result.name}-{i}")
            parts.append(f'<div class="{PANEL_CLASS}">{div}</div>')
            first = False
    body = "\n".join(parts)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:1em 2em} ."
            f"{PANEL_CLASS}{{margin-bottom:2em}}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n"
            "</body></html>\n")
    return atomic_write_text(path, page)
