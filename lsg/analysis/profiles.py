"""Layer profiles (LSG paper Fig. 2) and activation profiles (Fig. 3), per token group
(`lsg.analysis.data.GROUPS`), with 95% CIs over questions (docs/analysis.md).

- Layer profiles: per decoder layer, the mean per-token attention (head mean) from the query rows
  (the last prompt token by default) to each group, the total attention mass on each group, and
  the mean L2 norm of the hidden state entering the layer over each group's tokens; one line per
  group (and per stack, overlaid), a CI band around each.
- Activation profiles: per group, the mean `|x|` of every dimension of the ViT feature-layer hidden
  state (V-sink patches vs the others) and of the hidden state entering chosen decoder layers: the
  massive dimensions show as spikes; and per group the hidden-state norm at the LLM input (layer 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lsg.analysis.common import (AnalysisResult, identity_of, is_done, mark_done, mean_ci, plt_agg, save_png,
                                 stack_label)
from lsg.analysis.data import jsonable, observe, resolve_groups, resolve_layers
from lsg.files import read_json, write_json

METRICS = {  # key in the JSON -> axis title
    "attn_per_token": "mean attention per token",
    "attn_mass": "attention mass",
    "norm": "hidden-state norm",
}
COLORS = {"text_sink": "#1f77b4", "vsink": "#d62728", "lsink": "#ff7f0e", "ordinary": "#2ca02c",
          "other_text": "#7f7f7f", "vit_vsink": "#d62728", "vit_other": "#2ca02c"}
DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]


def _stacks(stacks) -> dict:
    return {"none": None, **{k: v for k, v in (stacks or {}).items() if k != "none"}}


def run_layers(backbone, records: Sequence, cfg: dict, out_dir: Path, stacks: Mapping[str, dict | None] | None = None,
               ci: dict | None = None, progress: bool = True) -> AnalysisResult:
    """Layer profiles of `records` under the backbone alone and each stack.

    Args:
        cfg: the app's `profiles:` config: `layers`, `groups` (`auto` or names), `queries`
            (`last`, `user`, `answer`, `user+answer`), `batch_size`.
        out_dir: the run's folder; writes `profiles/profiles.json` and `profiles/profiles.png`.
        stacks: spec -> `{layer: [gates]}`; "none" always comes first.
        ci: `{"ci_level": 0.95, "bootstrap_samples": 2000}` (the app's `stats:` group).

    Returns:
        `AnalysisResult` with one figure (three panels: per-token attention, mass, norm; CI bands)
        and the profile means in `summary`.

    Raises:
        ValueError: a layer out of range, an unknown or unavailable group, an unknown `queries`.
    """
    ci = ci or {}
    folder = Path(out_dir) / "profiles"
    layers = resolve_layers(backbone, cfg.get("layers", "all"))
    groups = resolve_groups(backbone, cfg.get("groups", "auto"))
    queries = cfg.get("queries", "last")
    stacks = _stacks(stacks)
    identity = identity_of(backbone, records, {**cfg, "layers": layers, "groups": groups, **ci}, stacks)
    path = folder / "profiles.json"
    if not is_done(folder, identity):
        data = {"backbone": backbone.name, "layers": layers, "groups": groups, "queries": queries,
                "n_questions": len(records), "stacks": {}}
        for spec, stack in stacks.items():
            obs = observe(backbone, records, stack, layers, groups, queries, maps=False,
                          batch_size=cfg.get("batch_size", 8), progress=f"profiles [{spec}]" if progress else None)
            data["stacks"][spec] = {
                metric: dict(zip(("mean", "low", "high", "n"),
                                 mean_ci(np.stack([getattr(o, metric) for o in obs]), ci.get("ci_level", 0.95),
                                         ci.get("bootstrap_samples", 2000))))
                for metric in METRICS}
        write_json(path, jsonable(data))
        data = read_json(path)
        files = [path, save_png(profile_png(data), folder / "profiles.png")]
        mark_done(folder, identity, files, {"stacks": {s: {m: v[m]["mean"] for m in METRICS}
                                                       for s, v in data["stacks"].items()}})
    marker, data = read_json(folder / "done.json"), read_json(path)
    return AnalysisResult("profiles", [profile_figure(data)], [Path(f) for f in marker["files"]], marker["summary"])


def _band(x: Sequence, low: Sequence, high: Sequence) -> tuple[list, list]:
    """Polygon of a CI band (NaN entries dropped)."""
    keep = [i for i in range(len(x)) if low[i] is not None and high[i] is not None]
    xs = [x[i] for i in keep]
    return xs + xs[::-1], [high[i] for i in keep] + [low[i] for i in keep][::-1]


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def profile_figure(data: dict):
    """Plotly figure of a `profiles.json`: a panel per metric, a line per (stack, group), CI bands."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(1, len(METRICS), subplot_titles=list(METRICS.values()), horizontal_spacing=0.07)
    layers = data["layers"]
    for s, (spec, stats) in enumerate(data["stacks"].items()):
        for c, metric in enumerate(METRICS, start=1):
            for g, group in enumerate(data["groups"]):
                pick = lambda key: [row[g] for row in stats[metric][key]]  # noqa: E731
                color = COLORS[group]
                bx, by = _band(layers, pick("low"), pick("high"))
                fig.add_trace(go.Scatter(x=bx, y=by, mode="lines", fill="toself", fillcolor=_rgba(color, 0.15), line=dict(width=0),
                                         hoverinfo="skip", showlegend=False, legendgroup=f"{spec}/{group}"), 1, c)
                fig.add_trace(go.Scatter(x=layers, y=pick("mean"), mode="lines+markers", name=f"{stack_label(spec)}: {group}",
                                         legendgroup=f"{spec}/{group}", showlegend=c == 1,
                                         line=dict(color=color, dash=DASHES[s % len(DASHES)])), 1, c)
    fig.update_xaxes(title_text="decoder layer")
    fig.update_layout(title=f"{data['backbone']}: layer profiles from the {data['queries']} query rows "
                            f"({data['n_questions']} questions, 95% CI bands)", height=430,
                      margin=dict(l=40, r=20, t=80, b=40))
    return fig


def profile_png(data: dict):
    """The same profiles as a matplotlib figure."""
    plt = plt_agg()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6), squeeze=False)
    layers = data["layers"]
    f = lambda v: np.array([np.nan if x is None else x for x in v], dtype=float)  # noqa: E731
    for s, (spec, stats) in enumerate(data["stacks"].items()):
        for ax, metric in zip(axes[0], METRICS):
            for g, group in enumerate(data["groups"]):
                mean, low, high = (f([row[g] for row in stats[metric][k]]) for k in ("mean", "low", "high"))
                ls = ["-", "--", ":", "-."][s % 4]
                ax.plot(layers, mean, ls, color=COLORS[group], label=f"{stack_label(spec)}: {group}", marker=".")
                ax.fill_between(layers, low, high, color=COLORS[group], alpha=0.15)
            ax.set_title(METRICS[metric], fontsize=9)
            ax.set_xlabel("decoder layer")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"{data['backbone']}: layer profiles ({data['n_questions']} questions, 95% CI)", fontsize=9)
    fig.tight_layout()
    return fig


def resolve_activation_layers(backbone, layers) -> list[int]:
    """`auto` -> {0, L//2, L-1}; otherwise as `resolve_layers`. Layer 0 (the LLM input) is always included."""
    if layers == "auto":
        n = backbone.num_layers
        return sorted({0, n // 2, n - 1})
    return sorted({0, *resolve_layers(backbone, layers)})


def run_activations(backbone, records: Sequence, cfg: dict, out_dir: Path,
                    stacks: Mapping[str, dict | None] | None = None, ci: dict | None = None,
                    progress: bool = True) -> AnalysisResult:
    """Activation profiles of `records` on the backbone alone (stacks change no layer's input
    before the lowest gated layer; this analysis shows the backbone's own activations).

    Args:
        cfg: the app's `activations:` config: `layers` (`auto` = first, middle, last), `groups`,
            `top_dims` (how many largest dims per group are listed in the summary), `batch_size`.
        out_dir: writes `activations/activations.json` and `activations/activations.png`.

    Returns:
        `AnalysisResult` with one figure (a panel per ViT / decoder layer, mean `|x|` per dimension
        per group) and, in `summary`, the top dims per group and layer and the group norms at the
        LLM input with CIs.

    Raises:
        ValueError: a layer out of range, an unknown or unavailable group.
    """
    ci = ci or {}
    folder = Path(out_dir) / "activations"
    layers = resolve_activation_layers(backbone, cfg.get("layers", "auto"))
    groups = resolve_groups(backbone, cfg.get("groups", "auto"))
    top = int(cfg.get("top_dims", 5))
    identity = identity_of(backbone, records, {**cfg, "layers": layers, "groups": groups, **ci}, ["none"])
    path = folder / "activations.json"
    if not is_done(folder, identity):
        obs = observe(backbone, records, None, layers, groups, "last", maps=False, abs_x_layers=layers, vit=True,
                      batch_size=cfg.get("batch_size", 8), progress="activations" if progress else None)
        with np.errstate(invalid="ignore"):
            llm = {l: np.nanmean(np.stack([o.abs_x[l] for o in obs]), 0) for l in layers}  # (G, D)
            vit = np.nanmean(np.stack([o.vit_abs_x for o in obs]), 0)  # (2, D_vit)
        norm0 = dict(zip(("mean", "low", "high", "n"),
                         mean_ci(np.stack([o.norm[0] for o in obs]), ci.get("ci_level", 0.95),
                                 ci.get("bootstrap_samples", 2000))))
        panels = {"vit": {"groups": ["vit_vsink", "vit_other"], "abs_x": vit},
                  **{f"layer {l}": {"groups": groups, "abs_x": llm[l]} for l in layers}}
        tops = {name: {g: [int(d) for d in np.argsort(-np.nan_to_num(p["abs_x"][i], nan=-1))[:top]]
                       for i, g in enumerate(p["groups"]) if not np.isnan(p["abs_x"][i]).all()}
                for name, p in panels.items()}
        data = {"backbone": backbone.name, "layers": layers, "groups": groups, "n_questions": len(records),
                "panels": panels, "norm_at_input": norm0, "top_dims": tops}
        write_json(path, jsonable(data))
        data = read_json(path)
        files = [path, save_png(activation_png(data), folder / "activations.png")]
        mark_done(folder, identity, files, {"top_dims": tops, "norm_at_input": data["norm_at_input"]})
    marker, data = read_json(folder / "done.json"), read_json(path)
    return AnalysisResult("activations", [activation_figure(data)], [Path(f) for f in marker["files"]],
                          marker["summary"])


def activation_figure(data: dict):
    """Plotly figure of an `activations.json`: a panel per ViT / decoder layer, `|x|` per dim per group."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(data["panels"])
    fig = make_subplots(1, len(names) + 1, subplot_titles=[*names, "norm at LLM input (95% CI)"],
                        horizontal_spacing=0.04)
    for c, name in enumerate(names, start=1):
        panel = data["panels"][name]
        for g, group in enumerate(panel["groups"]):
            values = panel["abs_x"][g]
            if all(v is None for v in values):
                continue
            fig.add_trace(go.Scatter(y=values, mode="lines", name=group, legendgroup=group, showlegend=c <= 2,
                                     line=dict(color=COLORS[group], width=1)), 1, c)
    norm = data["norm_at_input"]
    fig.add_trace(go.Bar(x=data["groups"], y=norm["mean"], marker_color=[COLORS[g] for g in data["groups"]],
                         error_y=dict(type="data", symmetric=False,
                                      array=[None if h is None else h - m for m, h in zip(norm["mean"], norm["high"])],
                                      arrayminus=[None if lo is None else m - lo for m, lo in zip(norm["mean"], norm["low"])]),
                         showlegend=False), 1, len(names) + 1)
    fig.update_xaxes(title_text="dimension", col=1)
    fig.update_layout(title=f"{data['backbone']}: mean |x| per dimension and token group "
                            f"({data['n_questions']} questions)", height=400, margin=dict(l=40, r=20, t=80, b=40))
    return fig


def activation_png(data: dict):
    """The same activation profiles as a matplotlib figure."""
    plt = plt_agg()
    names = list(data["panels"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        panel = data["panels"][name]
        for g, group in enumerate(panel["groups"]):
            values = np.array([np.nan if v is None else v for v in panel["abs_x"][g]], dtype=float)
            ax.plot(values, color=COLORS[group], lw=0.8, label=group)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("dimension")
        ax.set_yscale("log")
    axes[0, 0].set_ylabel("mean |x|")
    axes[0, -1].legend(fontsize=6)
    fig.tight_layout()
    return fig
