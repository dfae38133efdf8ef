"""Attention maps (LSG paper Fig. 1, VAR's maps): the last prompt token's attention over the visual
tokens, per decoder layer and per head or head mean, laid out on the image through the family's
patch -> token map (`Family.token_grid`), overlaid on the image, V-sinks (x) and L-sinks (o) marked;
with gate stacks, the same maps under each stack side by side (docs/analysis.md).

Only the last prompt token's row is computed (`lsg.analysis.data.RowRecorder` asks the attention
path for that row alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lsg.analysis.common import AnalysisResult, identity_of, is_done, mark_done, plt_agg, save_png, stack_label
from lsg.analysis.data import jsonable, observe, resolve_layers
from lsg.files import read_json, write_json

NAME = "maps"
CELL_PX = 16  # image pixels per visual-token cell in the overlay


def resolve_heads(backbone, heads) -> list[int | str]:
    """`"mean"`, `"all"` (every head and the mean) or a list of head indices (and/or "mean") -> the
    head choices shown, "mean" first.

    Raises:
        ValueError: a head index out of range or an unknown entry (naming `0..H-1`).
    """
    n_heads = backbone.family.text_config(backbone.model).num_attention_heads
    if heads == "mean":
        return ["mean"]
    if heads == "all":
        return ["mean", *range(n_heads)]
    chosen = [heads] if isinstance(heads, (int, str)) else list(heads)
    for h in chosen:
        if h != "mean" and (not isinstance(h, int) or not 0 <= h < n_heads):
            raise ValueError(f"Head {h!r} is out of range for backbone '{backbone.name}': use head indices "
                             f"0..{n_heads - 1}, 'mean' or 'all'.")
    return sorted(set(chosen), key=lambda h: -1 if h == "mean" else h)


def panel_grids(grid: np.ndarray, values: np.ndarray) -> dict[int, np.ndarray]:
    """Per panel, a `(rows, cols)` array of per-token `values` `(N_visual,)` placed by `grid`
    `(N_visual, 3)` (panel, row, col); cells without a token are NaN, tokens off the grid (-1) dropped."""
    out = {}
    on = grid[:, 0] >= 0
    for p in np.unique(grid[on, 0]):
        sel = on & (grid[:, 0] == p)
        rows, cols = grid[sel, 1].max() + 1, grid[sel, 2].max() + 1
        panel = np.full((rows, cols), np.nan)
        panel[grid[sel, 1], grid[sel, 2]] = values[sel]
        out[int(p)] = panel
    return out


def head_map(maps: np.ndarray, head) -> np.ndarray:
    """`(N_visual,)` map of one head (or the head mean) from `(H, N_visual)`."""
    return maps.mean(0) if head == "mean" else maps[head]


def run(backbone, records: Sequence, cfg: dict, out_dir: Path,
        stacks: Mapping[str, dict | None] | None = None, progress: bool = True) -> AnalysisResult:
    """Attention maps of `records` under the backbone alone and each gate stack.

    Args:
        cfg: the app's `maps:` config: `layers` (decoder layers, `all` / `every:K` / list), `heads`
            (`mean`, `all` or indices), `png_layers` (layers drawn in the PNGs, default = `layers`),
            `batch_size`.
        out_dir: the run's folder; writes `maps/maps.json` and `maps/<question>.png`.
        stacks: spec -> `{layer: [gates]}`; "none" (the backbone alone) is always shown first.

    Returns:
        `AnalysisResult` with one plotly figure per question (layer slider, head menu) and the
        mean attention mass on visual tokens per stack and layer in `summary`.

    Raises:
        ValueError: a layer or head out of range, a question without an image.
    """
    folder = Path(out_dir) / NAME
    layers = resolve_layers(backbone, cfg.get("layers", "all"))
    heads = resolve_heads(backbone, cfg.get("heads", "mean"))
    png_layers = resolve_layers(backbone, cfg.get("png_layers") or layers)
    stacks = {"none": None, **{k: v for k, v in (stacks or {}).items() if k != "none"}}
    identity = identity_of(backbone, records, {**cfg, "layers": layers}, stacks)
    data_path = folder / "maps.json"
    if not is_done(folder, identity):
        groups = [g for g in ("vsink", "lsink") if g in _groups(backbone)] + ["ordinary"]
        data = {"backbone": backbone.name, "layers": layers, "stacks": list(stacks), "questions": []}
        per_stack = {spec: observe(backbone, records, stack, layers, groups, "last", maps=True,
                                   batch_size=cfg.get("batch_size", 8),
                                   progress=f"maps [{spec}]" if progress else None)
                     for spec, stack in stacks.items()}
        for i, record in enumerate(records):
            base = per_stack["none"][i]
            data["questions"].append({
                "id": record.id, "question": record.question, "grid": base.grid,
                "vsink": base.vsink, "stacks": {spec: {"maps": obs[i].maps, "lsink": obs[i].lsink}
                                                for spec, obs in per_stack.items()}})
        write_json(data_path, jsonable(data))
        files = [data_path]
        for record, q in zip(records, read_json(data_path)["questions"]):
            files.append(save_png(map_png(q, record.load_image(), png_layers), folder / f"{_safe(record.id)}.png"))
        summary = visual_mass_summary(read_json(data_path))
        mark_done(folder, identity, files, summary)
    marker = read_json(folder / "done.json")
    data = read_json(data_path)
    figures = [map_figure(q, record.load_image(), data["layers"], heads, backbone.name)
               for q, record in zip(data["questions"], records)]
    return AnalysisResult(NAME, figures, [Path(f) for f in marker["files"]], marker["summary"])


def _groups(backbone) -> list[str]:
    from lsg.analysis.data import available_groups

    return available_groups(backbone)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def visual_mass_summary(data: dict) -> dict:
    """stack -> layer -> mean over questions (and heads) of the last prompt token's total attention on visual tokens."""
    out = {}
    for spec in data["stacks"]:
        out[spec] = {str(l): float(np.mean([np.asarray(q["stacks"][spec]["maps"][str(l)]).sum(-1).mean()
                                            for q in data["questions"]])) for l in data["layers"]}
    return {"visual_attention_mass": out}


def _markers(grid: np.ndarray, flags, panel: int) -> tuple[list[float], list[float]]:
    """Pixel centres of the flagged tokens of `panel`."""
    if flags is None:
        return [], []
    flags = np.asarray(flags, dtype=bool)
    sel = flags & (grid[:, 0] == panel)
    return list((grid[sel, 2] + 0.5) * CELL_PX), list((grid[sel, 1] + 0.5) * CELL_PX)


def _panel_image(image, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    return np.asarray(image.convert("RGB").resize((cols * CELL_PX, rows * CELL_PX)))


def map_figure(q: dict, image, layers: Sequence[int], heads: Sequence, backbone_name: str = ""):
    """One question's plotly figure: a column per (stack, panel) with the image, the heat map of the
    last prompt token's attention (one trace per head choice, a menu switches them), V-sinks (x) and
    L-sinks (o); a slider over decoder layers (plotly frames)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    grid = np.asarray(q["grid"])
    specs = list(q["stacks"])
    first = str(layers[0])
    panels = sorted(panel_grids(grid, np.zeros(len(grid))))
    columns = [(spec, p) for spec in specs for p in panels]
    titles = [stack_label(spec) + (f" (panel {p})" if len(panels) > 1 else "") for spec, p in columns]
    fig = make_subplots(1, len(columns), subplot_titles=titles, horizontal_spacing=0.03)
    per_column = []  # trace indices of each column: (heat traces per head, lsink trace)
    for c, (spec, p) in enumerate(columns, start=1):
        shape = panel_grids(grid, np.zeros(len(grid)))[p].shape
        fig.add_trace(go.Image(z=_panel_image(image, shape), hoverinfo="skip"), 1, c)
        heat = []
        for k, head in enumerate(heads):
            z = panel_grids(grid, head_map(np.asarray(q["stacks"][spec]["maps"][first]), head))[p]
            fig.add_trace(go.Heatmap(z=z, x0=CELL_PX / 2, dx=CELL_PX, y0=CELL_PX / 2, dy=CELL_PX, opacity=0.6,
                                     colorscale="Viridis", showscale=False, visible=k == 0,
                                     name=f"{stack_label(spec)} head {head}",
                                     hovertemplate="row %{y}, col %{x}: %{z:.4f}<extra></extra>"), 1, c)
            heat.append(len(fig.data) - 1)
        vx, vy = _markers(grid, q.get("vsink"), p)
        fig.add_trace(go.Scatter(x=vx, y=vy, mode="markers", name="V-sink", showlegend=c == 1,
                                 marker=dict(symbol="x", color="red", size=9)), 1, c)
        lx, ly = _markers(grid, q["stacks"][spec]["lsink"].get(first), p)
        fig.add_trace(go.Scatter(x=lx, y=ly, mode="markers", name="L-sink", showlegend=c == 1,
                                 marker=dict(symbol="circle-open", color="orange", size=10, line=dict(width=2))), 1, c)
        per_column.append((spec, p, heat, len(fig.data) - 1))
    frames = []
    for layer in layers:
        data, traces = [], []
        for spec, p, heat, lsink_trace in per_column:
            maps = np.asarray(q["stacks"][spec]["maps"][str(layer)])
            for head, t in zip(heads, heat):
                data.append(go.Heatmap(z=panel_grids(grid, head_map(maps, head))[p]))
                traces.append(t)
            lx, ly = _markers(grid, q["stacks"][spec]["lsink"].get(str(layer)), p)
            data.append(go.Scatter(x=lx, y=ly))
            traces.append(lsink_trace)
        frames.append(go.Frame(data=data, traces=traces, name=str(layer)))
    fig.frames = frames
    steps = [dict(method="animate", label=str(l),
                  args=[[str(l)], dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))])
             for l in layers]
    n = len(fig.data)
    buttons = []
    for k, head in enumerate(heads):
        visible = [True] * n
        for _, _, heat, _ in per_column:
            for j, t in enumerate(heat):
                visible[t] = j == k
        buttons.append(dict(method="restyle", label=f"head {head}", args=[{"visible": visible}]))
    fig.update_layout(
        title=f"{backbone_name} question {q['id']}: last prompt token's attention over visual tokens",
        sliders=[dict(active=0, currentvalue=dict(prefix="decoder layer "), steps=steps, pad=dict(t=30))],
        updatemenus=[dict(type="dropdown", buttons=buttons, x=1.0, y=1.15, xanchor="right")],
        height=420, margin=dict(l=20, r=20, t=80, b=20))
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    return fig


def map_png(q: dict, image, layers: Sequence[int]):
    """A matplotlib figure: a row per (stack, panel), a column per decoder layer, head mean; one
    colour scale per column (0 to the column's largest weight), shared by the stacks."""
    plt = plt_agg()
    grid = np.asarray(q["grid"])
    panels = sorted(panel_grids(grid, np.zeros(len(grid))))
    rows = [(spec, p) for spec in q["stacks"] for p in panels]
    fig, axes = plt.subplots(len(rows), len(layers), figsize=(1.6 * len(layers), 1.7 * len(rows)), squeeze=False)
    head_mean = {(spec, layer): np.asarray(q["stacks"][spec]["maps"][str(layer)]).mean(0)
                 for spec in q["stacks"] for layer in layers}
    top = {layer: max(float(np.nanmax(head_mean[spec, layer])) for spec in q["stacks"]) for layer in layers}
    for r, (spec, p) in enumerate(rows):
        for c, layer in enumerate(layers):
            ax = axes[r, c]
            z = panel_grids(grid, head_mean[spec, layer])[p]
            ax.imshow(_panel_image(image, z.shape))
            # one colour scale per layer column, so stacks compare cell by cell
            ax.imshow(z, extent=(0, z.shape[1] * CELL_PX, z.shape[0] * CELL_PX, 0), alpha=0.6, cmap="viridis",
                      vmin=0.0, vmax=top[layer] or None)
            ax.scatter(*_markers(grid, q.get("vsink"), p), marker="x", c="red", s=14)
            ax.scatter(*_markers(grid, q["stacks"][spec]["lsink"].get(str(layer)), p), marker="o",
                       facecolors="none", edgecolors="orange", s=18)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"L{layer}", fontsize=7)
            if c == 0:
                ax.set_ylabel(stack_label(spec)[:24], fontsize=7)
    fig.suptitle(f"question {q['id']}: last prompt token -> visual tokens (head mean; x V-sink, o L-sink)",
                 fontsize=8)
    fig.tight_layout()
    return fig
