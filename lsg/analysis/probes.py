"""Linear probes on the sink groups of every decoder layer (the LSG paper's Figure 4).

On the synthetic shapes scenes (`lsg.data.shapes`), each image's visual tokens are split per
decoder layer into V-sinks, L-sinks and ordinary visual tokens (docs/methods.md section 2), the
hidden states of a group's tokens are mean-pooled per image, and a logistic-regression probe
predicts a property of the scene from that `(D,)` vector: the object count, and the colour,
shape and size of one object (`scene_targets`), the kinds of the paper's CLEVR probes.

Data flow, top to bottom:
- `load_scenes`: images, prompts and probe targets of N shapes scenes.
- `pooled_features`: one forward per batch reading each layer's input (`Backbone.layer_inputs`),
  inside an `lsg.attach` block without gates, so the project's own `ForwardContext` flags V-sinks (ViT
  feature layer) and L-sinks (sink value of the hidden state entering each layer), and the
  analyses' shared `lsg.analysis.data.group_masks` reads the groups from it. Every layer is read
  from that one forward (no per-layer re-run).
- `fit_probe`: `StandardScaler` + `LogisticRegression` under stratified k-fold
  cross-validation; accuracy on the held-out folds with a percentile-bootstrap CI over images.
- `run`: all of the above for every (target, group, layer), `probes.png` + `probes.json` and
  plotly figures, for `lsg-analyze`.

A group the backbone cannot identify (no V-sinks configured: `sinks.vit_dims`/`tau_vit`; no
L-sinks: `sinks.llm_dims`/`tau_llm`) is reported empty, never approximated by other tokens.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lsg.analysis import data
from lsg.analysis.common import AnalysisResult
from lsg.backbones import Backbone
from lsg.files import atomic_target, read_json, sha256_json, write_json

GROUPS = ("vsink", "lsink", "ordinary")  # visual token groups, docs/methods.md section 2
GROUP_NAMES = {"vsink": "V-sinks", "lsink": "L-sinks", "ordinary": "ordinary"}
GROUP_COLOURS = {"vsink": "#d62728", "lsink": "#1f77b4", "ordinary": "#2ca02c"}
TARGETS = ("count", "colour", "shape", "size")
VERSION = 1  # bump when what the JSON holds changes, so a re-run recomputes instead of reusing

DEFAULTS: dict[str, Any] = {
    "use_records": False,        # false: probe shapes scenes split/0..n_images-1; true: the questions the
                                 # caller passes (lsg-analyze's benchmark questions; they must be shapes scenes)
    "split": "val",              # shapes split the scenes come from
    "n_images": 256,             # scenes 0..n_images-1 of the split
    "batch_size": 16,            # images per forward
    "layers": "all",             # decoder layers probed: all, every:K, 3-7, an int or a list
    "groups": "auto",            # auto = vsink, lsink, ordinary, those the backbone lacks reported empty;
                                 # a list asks for those groups and refuses one the backbone lacks
    "targets": list(TARGETS),    # probe targets, a subset of count, colour, shape, size
    "folds": 5,                  # k of the stratified k-fold cross-validation
    "C": 1.0,                    # inverse L2 strength of the logistic regression (sklearn's C)
    "max_iter": 1000,            # lbfgs iterations per fit
    "seed": 0,                   # fold shuffling and bootstrap resampling
    "bootstrap_samples": 2000,   # image resamples for each accuracy's CI
    "ci_level": 0.95,            # CI coverage
    "progress": True,            # a progress bar over the batches
}


# --------------------------------------------------------------------------- scenes and targets
def scene_targets(labels: dict) -> dict[str, int]:
    """Probe targets of one scene from its `lsg.data.shapes.patch_labels`.

    - `count`: the number of objects (1..6 with the default `ShapesConfig`).
    - `colour`, `shape`, `size`: the label id of *the first object in raster order* (smallest
      row-major cell index; a scene has at most one object per cell, so the choice is
      deterministic): colour 1..8 (`COLOUR_NAMES` index + 1), shape 1..4 (`SHAPES`), size
      1 small / 2 large (`SIZES`).
    """
    first = int(np.flatnonzero(labels["colour"])[0])
    return {"count": int(labels["count"]), **{k: int(labels[k][first]) for k in ("colour", "shape", "size")}}


def class_name(target: str, label: int) -> str:
    """The readable name of a probe target's class id (`scene_targets`): "red", "circle", "3"."""
    from lsg.data.shapes import COLOUR_NAMES, SHAPES, SIZES

    names = {"colour": COLOUR_NAMES, "shape": SHAPES, "size": SIZES}.get(target)
    return str(label) if names is None else names[label - 1]


@dataclass
class Scenes:
    """N shapes scenes for probing.

    Attributes:
        ids: the records' ids (`shapes_<split>_<i>`).
        images: N PIL images.
        prompts: N user questions without the `<image>` tag (visual tokens precede them in the
            causal sequence, so the question cannot change a visual token's hidden state).
        targets: target name -> `(N,)` int64 labels (`scene_targets`).
    """

    ids: list[str]
    images: list
    prompts: list[str]
    targets: dict[str, np.ndarray]


RECORD_ID = re.compile(r"shapes_(?P<split>[A-Za-z0-9]+)_(?P<index>\d+)")


def load_scenes(records: Sequence | None, split: str = "val", n_images: int = 256) -> Scenes:
    """The scenes to probe: `generate_scene_sample(split, i)` for i in range(n_images) when
    `records` is None, else the scenes of the given shapes records (all of them: `VQARecord`s or
    LLaVA-format dicts), regenerated from their ids (`shapes_<split>_<i>`, as
    `generate_scene_sample` / `generate_split` name them with the default `ShapesConfig`), since
    probes need each scene's object labels.

    Raises:
        ValueError: n_images < 1, or a record that is not a single-question shapes record
            (the message names its id and the expected form).
    """
    from lsg.data.shapes import generate_scene_sample

    if records is None:
        if not isinstance(n_images, int) or n_images < 1:
            raise ValueError(f"probes.n_images={n_images!r}: give a positive number of shapes scenes.")
        where = [(split, i) for i in range(n_images)]
    else:
        where = []
        for record in records:
            rid = record.get("id") if isinstance(record, dict) else getattr(record, "id", None)
            match = RECORD_ID.fullmatch(str(rid))
            if match is None:
                raise ValueError(f"Probes need shapes scenes with object labels; question id {rid!r} is not of the "
                                 f"form shapes_<split>_<index> (lsg.data.shapes.generate_scene_sample). Probe the "
                                 f"shapes split instead (probes.use_records=false, probes.split, probes.n_images).")
            where.append((match["split"], int(match["index"])))
    ids, images, prompts, targets = [], [], [], {t: [] for t in TARGETS}
    for split_name, i in where:
        image, record, labels = generate_scene_sample(split_name, i)
        ids.append(record["id"])
        images.append(image)
        prompts.append(record["conversations"][0]["value"].removeprefix("<image>\n"))
        for name, value in scene_targets(labels).items():
            targets[name].append(value)
    return Scenes(ids, images, prompts, {k: np.asarray(v, dtype=np.int64) for k, v in targets.items()})


# --------------------------------------------------------------------------- groups and config
EMPTY_BECAUSE = {  # why a group is empty on a backbone whose sink config cannot identify it
    "vsink": "no V-sinks: the backbone configures no ViT sink dims / threshold (model.sinks.vit_dims, tau_vit)",
    "lsink": "no L-sinks: the backbone configures no LLM sink dims / threshold (model.sinks.llm_dims, tau_llm)",
}


def missing_groups(backbone: Backbone) -> dict[str, str]:
    """The visual groups the backbone's sink config cannot identify (`lsg.analysis.data.available_groups`) -> why."""
    have = data.available_groups(backbone)
    return {g: EMPTY_BECAUSE[g] for g in GROUPS if g not in have}


def resolve_config(backbone: Backbone, cfg: dict | None) -> dict:
    """`DEFAULTS` updated by `cfg`, checked, with `layers` and `groups` made explicit lists.

    Raises:
        ValueError: an unknown key; bad layers or one out of range (`lsg.analysis.data.resolve_layers`
            names the value and the backbone's `0..L-1`); an unknown group or
            target; a group asked for explicitly that the backbone does not have (names it and
            the groups it has); folds < 2.
    """
    cfg = {**DEFAULTS, **dict(cfg or {})}
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown probes option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}.")
    cfg["layers"] = data.resolve_layers(backbone, cfg["layers"])
    missing = missing_groups(backbone)
    if cfg["groups"] == "auto":
        cfg["groups"] = list(GROUPS)
    else:
        groups = [cfg["groups"]] if isinstance(cfg["groups"], str) else list(cfg["groups"])
        have = [g for g in GROUPS if g not in missing]
        for group in groups:
            if group not in GROUPS:
                raise ValueError(f"probes.groups: unknown group {group!r}; use {', '.join(GROUPS)}.")
            if group in missing:
                raise ValueError(f"probes.groups asks for {group!r}, but backbone '{backbone.name}' has "
                                 f"{missing[group]}; its groups: {', '.join(have)}.")
        cfg["groups"] = [g for g in GROUPS if g in groups]
    targets = [cfg["targets"]] if isinstance(cfg["targets"], str) else list(cfg["targets"])
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"probes.targets: unknown target(s) {bad or targets}; use {', '.join(TARGETS)}.")
    cfg["targets"] = [t for t in TARGETS if t in targets]
    if not isinstance(cfg["folds"], int) or cfg["folds"] < 2:
        raise ValueError(f"probes.folds={cfg['folds']!r}: k-fold cross-validation needs an integer k >= 2.")
    return cfg


# --------------------------------------------------------------------------- features
@dataclass
class PooledFeatures:
    """Mean-pooled hidden states of each token group, per decoder layer and image.

    Attributes:
        layers: the decoder layers read, in order (`features[g][i]` is layer `layers[i]`).
        features: group -> `(n_layers, N, D)` float32 CPU tensor, the mean over the group's
            tokens of the hidden state entering the layer (`Backbone.layer_inputs`, the state
            L-sinks are flagged on); NaN rows for images where the group has no token.
        n_tokens: group -> `(n_layers, N)` int64, the group's token count per image.
    """

    layers: list[int]
    features: dict[str, torch.Tensor]
    n_tokens: dict[str, torch.Tensor]


@torch.no_grad()
def pooled_features(backbone: Backbone, images: Sequence, prompts: Sequence[str], layers: Sequence[int],
                    groups: Sequence[str] = GROUPS, batch_size: int = 16, progress: str | None = None
                    ) -> PooledFeatures:
    """Per decoder layer and group, each image's group tokens mean-pooled (docs/methods.md section 2).

    One forward per batch of prompt-only inputs (`Backbone.build_batch` without answers) reading the
    hidden state entering each layer (`Backbone.layer_inputs`), inside
    `lsg.attach(backbone, {}, record_sinks_upto=L-1)`: no gate changes anything, and the block's
    `ForwardContext` holds the segments, V-sinks and every layer's sink values that
    `lsg.analysis.data.group_masks` reads. Ordinary tokens are the visual tokens that are neither
    V-sinks nor L-sinks (of those the backbone can identify).

    Args:
        images, prompts: N images and their questions (without the `<image>` tag).
        layers: 0-based decoder layers.
        groups: among `GROUPS`; one the backbone cannot identify comes back absent from the result.
        batch_size: images per forward.
        progress: title of a progress bar over the batches (None = no bar).

    Returns:
        `PooledFeatures`: `(n_layers, N, D)` features and `(n_layers, N)` token counts per group.

    Raises:
        ValueError: a layer out of range (`Backbone.check_layer`), an unknown group, or no images.
    """
    import lsg
    from lsg.evaluation import batches

    layers = [backbone.check_layer(layer) for layer in layers]
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"Unknown group(s) {bad}; use {', '.join(GROUPS)}.")
    if not images or len(images) != len(prompts):
        raise ValueError(f"pooled_features needs one prompt per image, at least one: {len(images)} images, "
                         f"{len(prompts)} prompts.")
    have = [g for g in GROUPS if g not in missing_groups(backbone)]  # every group the backbone has: ordinary
    groups = [g for g in groups if g in have]                          # excludes all of them
    sums: dict[str, list[torch.Tensor]] = {g: [] for g in groups}  # per batch (n_layers, B, D)
    counts: dict[str, list[torch.Tensor]] = {g: [] for g in groups}  # per batch (n_layers, B)
    for start in batches(len(images), batch_size, progress):
        batch = backbone.on_device(backbone.build_batch(images[start:start + batch_size],
                                                        prompts[start:start + batch_size]))
        with lsg.attach(backbone, {}, record_sinks_upto=backbone.num_layers - 1) as run, \
                backbone.layer_inputs(layers) as hidden:  # entering each layer, DeepStack included
            backbone.model(**backbone.model_inputs(batch), use_cache=False)
            masks = [dict(zip(have, data.group_masks(run.ctx, layer, have))) for layer in layers]  # (B, T) each
        for g in groups:  # one layer at a time: a float32 copy of every layer's states would not fit a 7B model
            sums[g].append(torch.stack([torch.einsum("bt,btd->bd", masks[i][g].float(), hidden[layer].float()).cpu()
                                        for i, layer in enumerate(layers)]))
            counts[g].append(torch.stack([masks[i][g].sum(-1).cpu() for i in range(len(layers))]))
    features, n_tokens = {}, {}
    for g in groups:
        n = torch.cat(counts[g], 1)
        features[g] = torch.cat(sums[g], 1) / n[..., None].clamp_min(1)
        features[g][n == 0] = float("nan")
        n_tokens[g] = n
    return PooledFeatures(list(layers), features, n_tokens)


# --------------------------------------------------------------------------- probes
def accuracy_ci(correct: np.ndarray, samples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI `(low, high)` in percent of the accuracy of `correct` `(N,)` bool,
    images resampled with replacement `samples` times (as `lsg.stats.paired_delta` does for deltas)."""
    correct = np.asarray(correct, dtype=float)
    idx = np.random.default_rng(seed).integers(0, correct.size, size=(samples, correct.size))
    low, high = np.quantile(correct[idx].mean(1), [(1 - level) / 2, (1 + level) / 2])
    return 100 * float(low), 100 * float(high)


def probe_pipeline(C: float = 1.0, max_iter: int = 1000):
    """The probe: `StandardScaler` then L2 `LogisticRegression(C, max_iter)` (lbfgs, multinomial)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


def probe_rows(features: np.ndarray, labels: np.ndarray, folds: int) -> tuple[np.ndarray, str | None]:
    """`(N,)` bool: the images a probe uses, and why it cannot be fitted (None if it can).

    Dropped: images whose group has no token (NaN features), then images of a class with fewer
    than `folds` such images (stratified k folds could not each hold one). A probe needs two
    classes and `2 * folds` images left."""
    keep = ~np.isnan(features).any(1)
    classes, sizes = np.unique(labels[keep], return_counts=True)
    keep &= np.isin(labels, classes[sizes >= folds])
    n_classes = len(np.unique(labels[keep]))
    if n_classes < 2 or keep.sum() < 2 * folds:
        return keep, (f"{int(keep.sum())} images in {n_classes} class(es) with >= {folds} images each "
                      f"(of {int((~np.isnan(features).any(1)).sum())} images with tokens in the group)")
    return keep, None


def fit_probe(features: np.ndarray, labels: np.ndarray, folds: int = 5, C: float = 1.0, max_iter: int = 1000,
              seed: int = 0, bootstrap_samples: int = 2000, ci_level: float = 0.95) -> dict:
    """Held-out accuracy of a linear probe predicting `labels` from `features`.

    `StratifiedKFold(folds, shuffle=True, random_state=seed)` splits the images (`probe_rows`
    first drops images without group tokens and classes rarer than `folds`); each image is
    predicted once, by the probe (`probe_pipeline`) fitted on the other folds
    (`cross_val_predict`). Accuracy is the fraction of those held-out predictions that are
    right; its CI a percentile bootstrap over images (`accuracy_ci`); chance the majority-class
    rate of the images used.

    Args:
        features: `(N, D)` pooled hidden states (NaN rows: no token in the group).
        labels: `(N,)` int class ids.

    Returns:
        `{acc_pct, ci_low_pct, ci_high_pct, chance_pct, fold_acc_pct, n_images, classes, converged}`
        (percent; `classes`: the ids used; `converged`: no fit hit `max_iter`), or
        `{skipped: reason, n_images}` when too few images or classes are left.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    keep, reason = probe_rows(features, labels, folds)
    if reason is not None:
        return {"skipped": reason, "n_images": int(keep.sum())}
    x, y = features[keep], labels[keep]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        predicted = cross_val_predict(probe_pipeline(C, max_iter), x, y, cv=cv)
    correct = predicted == y
    low, high = accuracy_ci(correct, bootstrap_samples, ci_level, seed)
    _, sizes = np.unique(y, return_counts=True)
    return {"acc_pct": 100 * float(correct.mean()), "ci_low_pct": low, "ci_high_pct": high,
            "chance_pct": 100 * float(sizes.max() / len(y)),
            "fold_acc_pct": [100 * float(correct[test].mean()) for _, test in cv.split(x, y)],
            "n_images": len(y), "classes": sorted(int(c) for c in np.unique(y)),
            "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught)}


def probe_grid(pooled: PooledFeatures, targets: dict[str, np.ndarray], cfg: dict) -> dict:
    """`fit_probe` for every target, group and layer: `{target: {group: {layer (str): result}}}`;
    a group of `cfg["groups"]` absent from `pooled` (the backbone cannot identify it) maps to `{}`."""
    options = {k: cfg[k] for k in ("folds", "C", "max_iter", "seed", "bootstrap_samples", "ci_level")}
    return {target: {g: {str(layer): fit_probe(pooled.features[g][i].numpy(), labels, **options)
                         for i, layer in enumerate(pooled.layers)}
                         if g in pooled.features else {}
                     for g in cfg["groups"]}
            for target, labels in targets.items()}


# --------------------------------------------------------------------------- figures
def _series(report: dict, target: str, group: str) -> tuple[list[int], list, list, list]:
    """(layers, acc, ci_low, ci_high) of one line, None where the probe was skipped."""
    cells = report["probes"][target].get(group, {})
    layers = report["layers"]
    get = lambda key: [cells.get(str(l), {}).get(key) for l in layers]  # noqa: E731
    return layers, get("acc_pct"), get("ci_low_pct"), get("ci_high_pct")


def _drawn_groups(report: dict, target: str) -> list[str]:
    """The groups with a line in a target's panel: those the backbone has (empty ones are named in the title)."""
    return [g for g in report["probes"][target] if not report["groups"].get(g)]


def _title(report: dict) -> str:
    empty = [f"{GROUP_NAMES[g]}: none on this backbone" for g, why in report["groups"].items() if why]
    config = report["config"]
    return (f"Linear probes on {report['backbone']} ({report['n_images']} shapes scenes, {config['folds']}-fold, "
            f"{round(100 * config['ci_level'])}% CI)" + (f" — {'; '.join(empty)}" if empty else ""))


def figure(report: dict):
    """Plotly figure of a probes report (`run`'s JSON): one panel per target, held-out accuracy
    (%) vs decoder layer, one line per group with its CI band, the chance line dashed."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    targets = list(report["probes"])
    fig = make_subplots(rows=1, cols=len(targets), subplot_titles=targets, shared_yaxes=True)
    for col, target in enumerate(targets, start=1):
        for group in _drawn_groups(report, target):
            layers, acc, low, high = _series(report, target, group)
            colour, first = GROUP_COLOURS[group], col == 1
            fig.add_trace(go.Scatter(x=layers, y=high, mode="lines", line={"width": 0}, showlegend=False,
                                     hoverinfo="skip", legendgroup=group), row=1, col=col)
            fig.add_trace(go.Scatter(x=layers, y=low, mode="lines", line={"width": 0}, fill="tonexty",
                                     fillcolor=_rgba(colour, 0.2), showlegend=False, hoverinfo="skip",
                                     legendgroup=group), row=1, col=col)
            fig.add_trace(go.Scatter(x=layers, y=acc, mode="lines+markers", name=GROUP_NAMES[group],
                                     line={"color": colour}, legendgroup=group, showlegend=first,
                                     hovertemplate="layer %{x}: %{y:.1f}%<extra>" + GROUP_NAMES[group] + "</extra>"),
                          row=1, col=col)
        fig.add_hline(y=report["targets"][target]["chance_pct"], line_dash="dash", line_color="black",
                      annotation_text="chance", annotation_position="bottom right", row=1, col=col)
        fig.update_xaxes(title_text="decoder layer", row=1, col=col)
    fig.update_yaxes(title_text="held-out accuracy (%)", row=1, col=1)
    fig.update_layout(title=_title(report), height=380, width=max(500, 330 * len(targets)))
    return fig


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def save_png(report: dict, path: str | Path) -> Path:
    """The `figure` as a matplotlib PNG at `path`, written atomically (`lsg.files.atomic_target`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    targets = list(report["probes"])
    fig, axes = plt.subplots(1, len(targets), figsize=(3.4 * len(targets), 3.2), sharey=True, squeeze=False)
    for ax, target in zip(axes[0], targets):
        for group in _drawn_groups(report, target):
            layers, acc, low, high = (np.array(v, dtype=float) for v in _series(report, target, group))
            ax.fill_between(layers, low, high, color=GROUP_COLOURS[group], alpha=0.2, lw=0)
            ax.plot(layers, acc, "o-", ms=3, color=GROUP_COLOURS[group], label=GROUP_NAMES[group])
        ax.axhline(report["targets"][target]["chance_pct"], color="black", ls="--", lw=1, label="chance")
        ax.set_title(target, fontsize=10)
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("held-out accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(_title(report), fontsize=8)
    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- the analysis
def run(backbone: Backbone, records: Sequence | None, cfg: dict | None, out_dir: str | Path) -> AnalysisResult:
    """Linear probes per decoder layer and token group (LSG paper Figure 4) on shapes scenes.

    Scenes: `generate_scene_sample(cfg.split, i)` for i < `cfg.n_images`; with
    `cfg.use_records`, the scenes of `records` instead (shapes questions, `load_scenes`); probes
    need a few hundred labelled scenes, more than the handful of questions an attention map reads. Targets per image: `scene_targets`.
    Features: `pooled_features` (one forward per batch). Probes: `fit_probe` per (target,
    group, layer). Options: `DEFAULTS` (checked by `resolve_config`).

    Writes `out_dir/probes.png` then `out_dir/probes.json` (every number: per target, group and
    layer the held-out accuracy, its CI, per-fold accuracies, chance, images used; per group and
    layer the mean token count; a flat `rows` table), both atomically, the JSON last. A re-run
    whose JSON holds the same key (backbone weights, sinks, processor, options, scene ids)
    reuses it without a forward; an interrupted run leaves no JSON, or the previous one.

    Returns:
        `AnalysisResult(name="probes")`: one plotly figure, the two files, and a summary (per
        target the chance and per group the best layer's accuracy, in percent).

    Raises:
        ValueError: see `resolve_config` (bad layer, group, target, option) and `load_scenes`.
    """
    cfg = resolve_config(backbone, cfg)
    out_dir = Path(out_dir)
    json_path, png_path = out_dir / "probes.json", out_dir / "probes.png"
    scenes = load_scenes(records if cfg["use_records"] else None, cfg["split"], cfg["n_images"])
    options = {k: v for k, v in cfg.items() if k != "progress"}
    key = sha256_json({"version": VERSION, "fingerprint": backbone.fingerprint, "sinks": backbone.sinks.to_dict(),
                       "processor": backbone.processor_digest(), "cfg": options, "ids": scenes.ids})
    report = read_json(json_path)
    if not (isinstance(report, dict) and report.get("key") == key):
        pooled = pooled_features(backbone, scenes.images, scenes.prompts, cfg["layers"], cfg["groups"],
                                 cfg["batch_size"], "probes: hidden states" if cfg["progress"] else None)
        targets = {t: scenes.targets[t] for t in cfg["targets"]}
        report = _report(backbone, cfg, key, scenes, pooled, probe_grid(pooled, targets, cfg))
        save_png(report, png_path)
        write_json(json_path, report, indent=1)
    elif not png_path.exists():
        save_png(report, png_path)
    return AnalysisResult(name="probes", figures=[figure(report)], files=[png_path, json_path],
                          summary=_summary(report))


def _report(backbone: Backbone, cfg: dict, key: str, scenes: Scenes, pooled: PooledFeatures, probes: dict) -> dict:
    missing = missing_groups(backbone)
    targets = {}
    for t in cfg["targets"]:
        labels, sizes = np.unique(scenes.targets[t], return_counts=True)
        targets[t] = {"chance_pct": 100 * float(sizes.max() / sizes.sum()),
                      "classes": {class_name(t, int(c)): int(n) for c, n in zip(labels, sizes)},
                      "definition": "number of objects" if t == "count" else f"{t} of the first object in raster order"}
    rows = [[t, g, layer, *(cell.get(k) for k in ("acc_pct", "ci_low_pct", "ci_high_pct", "chance_pct", "n_images"))]
            for t, by_group in probes.items() for g, by_layer in by_group.items()
            for layer, cell in ((int(l), c) for l, c in by_layer.items())]
    return {
        "name": "probes", "key": key, "version": VERSION, "backbone": backbone.name,
        "fingerprint": backbone.fingerprint, "sinks": backbone.sinks.to_dict(),
        "config": {k: v for k, v in cfg.items() if k != "progress"},
        "n_images": len(scenes.ids), "scene_ids": scenes.ids, "layers": pooled.layers,
        "features": "mean over the group's tokens of the hidden state entering each decoder layer",
        "ci": "percentile bootstrap over images of the held-out (out-of-fold) correctness",
        "groups": {g: missing.get(g) for g in cfg["groups"]},  # None = available, else why it is empty
        "tokens_per_image": {g: {str(l): float(n[i].float().mean()) for i, l in enumerate(pooled.layers)}
                             for g, n in pooled.n_tokens.items()},
        "targets": targets, "probes": probes,
        "columns": ["target", "group", "layer", "acc_pct", "ci_low_pct", "ci_high_pct", "chance_pct", "n_images"],
        "rows": rows,
    }


def _summary(report: dict) -> dict:
    best = {}
    for t, by_group in report["probes"].items():
        best[t] = {"chance_pct": report["targets"][t]["chance_pct"]}
        for g, by_layer in by_group.items():
            fitted = {int(l): c for l, c in by_layer.items() if "acc_pct" in c}
            if fitted:
                layer = max(fitted, key=lambda l: fitted[l]["acc_pct"])
                best[t][g] = {"best_layer": layer, "acc_pct": fitted[layer]["acc_pct"],
                              "ci_low_pct": fitted[layer]["ci_low_pct"], "ci_high_pct": fitted[layer]["ci_high_pct"]}
    return {"n_images": report["n_images"], "empty_groups": [g for g, why in report["groups"].items() if why],
            "best": best}
