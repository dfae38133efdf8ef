"""Shared loading and the one instrumented forward every sink analysis reads (docs/analysis.md).

`load_questions` picks the questions; `observe` runs them through the backbone, batched, with a
gate stack (or none) and a `RowRecorder` appended at each analysed decoder layer. The recorder is
a read-only gate: it asks the attention path for the explicit matrix of the query rows it needs
(the last prompt token, optionally every user / answer query), so no layer materialises the full
attention matrix and nothing is computed through `output_attentions`. Because it sits after the
stack's gates in each layer, it sees the attention weights those gates produced.

Token groups (docs/methods.md section 2), over real tokens: `text_sink` (text tokens with massive
activation at the layer), `vsink` (V-sinks), `lsink` (L-sinks at the layer), `ordinary` (the other
visual tokens), `other_text` (the other text tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

import lsg
from lsg.backbones import Backbone
from lsg.context import LayerView, fit_columns
from lsg.data.record import VQARecord
from lsg.gates.base import Gate, HookPoint
from lsg.scoring import decoder_hidden
from lsg.sinks import sink_value

GROUPS = ("text_sink", "vsink", "lsink", "ordinary", "other_text")
QUERIES = ("last", "user", "answer", "user+answer")


def available_groups(backbone: Backbone) -> list[str]:
    """The groups this backbone's sink config can tell apart: V-sinks need `sinks.vit_dims` and
    `tau_vit`; text sinks and L-sinks need `sinks.llm_dims` and `tau_llm`."""
    sinks = backbone.sinks
    return [g for g in GROUPS if not (g == "vsink" and not sinks.has_vsinks)
            and not (g in ("text_sink", "lsink") and not sinks.has_llm_sinks)]


def resolve_groups(backbone: Backbone, groups: str | Sequence[str]) -> list[str]:
    """`"auto"` -> `available_groups`; a list is checked.

    Raises:
        ValueError: an unknown group, or one this backbone does not have (naming the allowed ones).
    """
    have = available_groups(backbone)
    if groups == "auto":
        return have
    groups = [groups] if isinstance(groups, str) else list(groups)
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"Unknown token group {g!r}; known groups: {', '.join(GROUPS)} (or auto).")
        if g not in have:
            raise ValueError(f"Token group {g!r} is not available on backbone '{backbone.name}' (its sink config "
                             f"{backbone.sinks.to_dict()}); available: {', '.join(have)}. Configure the sinks "
                             f"(conf/model/{backbone.name}.yaml, docs/methods.md section 7) or use groups=auto.")
    return groups


def resolve_layers(backbone: Backbone, layers: str | int | Sequence[int]) -> list[int]:
    """`all`, `every:K`, `3-7`, an int or a list -> sorted decoder layers (`lsg.specs.parse_sweep_layers`).

    Raises:
        ValueError: bad syntax, or a layer out of range (naming the backbone's `0..L-1`).
    """
    from lsg.specs import parse_sweep_layers

    try:
        return parse_sweep_layers(layers, backbone.num_layers)
    except ValueError as error:
        raise ValueError(f"layers={layers!r}: {error} Backbone '{backbone.name}' has decoder layers "
                         f"0..{backbone.num_layers - 1}.") from None


def load_questions(bench_cfg: dict, n_questions: int, question_ids: Sequence[str] | None = None) -> list[VQARecord]:
    """The questions to analyse: `question_ids` of the benchmark (or data split) if given, else its first
    `n_questions`.

    Raises:
        ValueError: an unknown id (naming some known ones), no question, or a question without an image.
    """
    from lsg.benchmarks import get_benchmark

    cfg = dict(bench_cfg)
    records = get_benchmark(cfg.pop("name"), **cfg).load()
    if question_ids:
        by_id = {r.id: r for r in records}
        missing = [q for q in question_ids if str(q) not in by_id]
        if missing:
            raise ValueError(f"question_ids {missing} are not in the benchmark; its ids include "
                             f"{', '.join(list(by_id)[:8])}, ...")
        records = [by_id[str(q)] for q in question_ids]
    else:
        records = records[:n_questions]
    if not records:
        raise ValueError("No question to analyse: n_questions must be >= 1 and the benchmark non-empty.")
    check_images(records)
    return records


def check_images(records: Sequence[VQARecord]) -> None:
    """Raise ValueError naming every question without an image (each analysis reads one image per question)."""
    bad = [r.id for r in records if r.image_path is None and r.image_loader is None]
    if bad:
        raise ValueError(f"Question(s) {bad[:5]} have no image; sink analyses need exactly one image per "
                         f"question: drop text-only questions (question_ids=[...]).")


@dataclass
class LayerRecord:
    """What the recorder read at one decoder layer for one batch.

    Attributes:
        maps: per sample, `(H, N_visual)` attention weights of the last prompt token over its visual tokens.
        lsink: per sample, `(N_visual,)` L-sink flags at this layer.
        attn_per_token: `(B, G)` mean per-token attention (head mean) from the query rows to each
            group, averaged over the rows; NaN where a sample has no token of the group.
        attn_mass: `(B, G)` total attention (head mean) to each group, averaged over the rows.
        norm: `(B, G)` mean L2 norm of the hidden state entering the layer over the group's tokens.
        abs_x: `(B, G, D)` mean `|x|` per dimension over the group's tokens (activation layers only).
    """

    maps: list[torch.Tensor] = field(default_factory=list)
    lsink: list[torch.Tensor] = field(default_factory=list)
    attn_per_token: torch.Tensor | None = None
    attn_mass: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    abs_x: torch.Tensor | None = None


def group_masks(ctx, layer: int, groups: Sequence[str]) -> torch.Tensor:
    """`(G, B, T)` bool masks of `groups` at `layer` from a forward context (docs/methods.md section 2).

    The groups partition the real tokens whatever subset is asked for: "ordinary" is always the
    visual tokens that are neither V-sinks nor L-sinks, "other_text" the text tokens that are not
    text sinks (a backbone without V-sinks, or without LLM sinks, has those groups empty)."""
    seg = ctx.segments
    vis, text = seg.vis, seg.text
    none = torch.zeros_like(vis)
    vsink = ctx.require_vsinks() & vis if ctx.vsink is not None else none
    lsink = ctx.lsinks(layer) if ctx.sinks.has_llm_sinks else none
    tsink = ctx.text_sinks(layer) if ctx.sinks.has_llm_sinks else none
    masks = {"text_sink": tsink, "vsink": vsink, "lsink": lsink, "ordinary": vis & ~vsink & ~lsink,
             "other_text": text & ~tsink}
    return torch.stack([masks[g] for g in groups])


class RowRecorder(Gate):
    """A read-only gate that records, at one decoder layer, the attention rows of chosen queries
    and hidden-state statistics per token group into `store` (a `LayerRecord`). It edits nothing.

    Args:
        groups: group names (`GROUPS`).
        queries: which query rows the group statistics average over (`QUERIES`); maps always use
            the last prompt token.
        maps: keep the last prompt token's attention over the visual tokens.
        abs_x: keep the per-dimension mean `|x|` per group.
    """

    name = "analysis-recorder"
    hook_points = frozenset({HookPoint.HIDDEN, HookPoint.WEIGHTS})

    def __init__(self, groups: Sequence[str], queries: str, maps: bool, abs_x: bool):
        super().__init__()
        self.groups, self.queries, self.want_maps, self.want_abs_x = list(groups), queries, maps, abs_x
        self.store = LayerRecord()

    def prepare(self, view: LayerView, hidden: torch.Tensor) -> dict:
        ctx, seg = view.ctx, view.segments
        masks = group_masks(ctx, view.layer, self.groups)  # (G, B, T)
        x = hidden.detach().float()
        m = masks.float()
        count = m.sum(-1)  # (G, B)
        self.store.norm = (torch.einsum("gbt,bt->bg", m, x.norm(dim=-1)) / count.T).cpu()
        if self.want_abs_x:
            self.store.abs_x = (torch.einsum("gbt,btd->bgd", m, x.abs()) / count.T[..., None]).cpu()
        last = torch.zeros_like(seg.vis)
        last[torch.arange(len(last)), seg.last_prompt] = True
        stat_rows = {"last": last, "user": seg.user, "answer": seg.out, "user+answer": seg.user | seg.out}[self.queries]
        if "lsink" in self.groups:
            lsink = ctx.lsinks(view.layer)
            self.store.lsink = [lsink[b][seg.vis[b]].cpu() for b in range(len(last))]
        return {"masks": masks, "stat_rows": stat_rows, "rows": stat_rows | last}

    def matrix_rows(self, view: LayerView, state: dict) -> torch.Tensor:
        return fit_columns(state["rows"], view.ctx.total_len)[:, view.query_slice]

    def edit_weights(self, view: LayerView, state: dict, weights: torch.Tensor) -> torch.Tensor:
        seg, w = view.segments, weights.detach().float()  # (B, H, T_q, T_kv)
        B, _, n_q, n_kv = w.shape
        if self.want_maps:
            last = w[torch.arange(B), :, seg.last_prompt - view.q_start]  # (B, H, T_kv)
            self.store.maps = [last[b][:, seg.vis[b]].cpu() for b in range(B)]
        masks = fit_columns(state["masks"].flatten(0, 1), n_kv).view(len(self.groups), B, n_kv).float()
        rows = fit_columns(state["stat_rows"], n_kv)[:, view.query_slice]  # (B, T_q)
        mean_w = w.mean(1)  # (B, T_q, T_kv): head mean
        mass = torch.einsum("bij,gbj->bgi", mean_w, masks)
        # tokens of each group a query row may see (causal): keys 0 .. its own position
        seen = masks.cumsum(-1)[..., view.q_start:view.q_start + n_q].permute(1, 0, 2)  # (B, G, T_q)
        per_token = torch.where(seen > 0, mass / seen.clamp_min(1), torch.nan)
        r = rows[:, None].float()
        self.store.attn_mass = ((mass * r).sum(-1) / r.sum(-1)).cpu()
        n_rows = (r * (seen > 0)).sum(-1)
        self.store.attn_per_token = (torch.nan_to_num(per_token * r).sum(-1) / n_rows).cpu()
        self.store.attn_per_token[n_rows.cpu() == 0] = torch.nan
        return weights


@dataclass
class Observation:
    """One question seen through one gate stack (numpy arrays; `L` = the analysed layers).

    Attributes:
        id: the question's id.
        grid: `(N_visual, 3)` (panel, row, col) of each visual token (`Family.token_grid`).
        vsink: `(N_visual,)` V-sink flags, or None when the backbone has no V-sinks.
        lsink: layer -> `(N_visual,)` L-sink flags (empty without LLM sinks).
        maps: layer -> `(H, N_visual)` last prompt token's attention over the visual tokens.
        attn_per_token, attn_mass, norm: `(L, G)` (see `LayerRecord`).
        abs_x: layer -> `(G, D)` (activation layers only).
        vit_abs_x: `(2, D_vit)` mean `|x|` per ViT dim over [V-sink patches, other patches] at the
            feature layer (NaN row when there is none), or None when not asked for.
    """

    id: str
    grid: np.ndarray
    vsink: np.ndarray | None
    lsink: dict[int, np.ndarray]
    maps: dict[int, np.ndarray]
    attn_per_token: np.ndarray
    attn_mass: np.ndarray
    norm: np.ndarray
    abs_x: dict[int, np.ndarray]
    vit_abs_x: np.ndarray | None = None


def _vit_split(n_patches: int, n_images: int) -> list[int]:
    """Patches per image of a batch whose family does not tell them (`Family.patches_per_image`):
    an equal split (every image the same number of patches), else the whole batch as one unit."""
    return [n_patches // n_images] * n_images if n_patches % n_images == 0 else [n_patches]


@torch.no_grad()
def observe(backbone: Backbone, records: Sequence[VQARecord], stack: dict[int, list[Gate]] | None,
            layers: Sequence[int], groups: Sequence[str], queries: str = "last", maps: bool = True,
            abs_x_layers: Sequence[int] = (), vit: bool = False, batch_size: int = 8,
            progress: str | None = None) -> list[Observation]:
    """Run `records` through `backbone` with `stack` attached and record every analysed layer.

    Args:
        stack: `{layer: [gates]}` (`lsg.specs.parse_stack(...).layers`), or None / {} for the backbone alone.
        layers: decoder layers to record (0-based); the layers above the highest analysed or
            gated one are skipped.
        groups: token groups (`resolve_groups`).
        queries: the query rows of the group statistics (`QUERIES`); "answer" teacher-forces each
            record's reference answer (`str(record.answer)`).
        maps: keep the last prompt token's attention over visual tokens at every analysed layer.
        abs_x_layers: layers (among `layers`) where the per-dimension `|x|` per group is kept.
        vit: also read the ViT feature layer (`Family.vit_features`) for the ViT activation profile.
        batch_size: questions per forward.
        progress: title of a progress bar (None = none).

    Returns:
        one `Observation` per record, in order.

    Raises:
        ValueError: an unknown `queries`; a question without an image.
    """
    from lsg.evaluation import batches, images_and_questions

    if queries not in QUERIES:
        raise ValueError(f"queries={queries!r}; allowed: {', '.join(QUERIES)}.")
    check_images(records)
    stack = dict(stack or {})
    layers = sorted(layers)
    top = max([*layers, *stack])
    out: list[Observation] = []
    model, family = backbone.model, backbone.family
    for start in batches(len(records), batch_size, progress):
        chunk = records[start:start + batch_size]
        images, prompts = images_and_questions(chunk)
        answers = [str(r.answer) for r in chunk] if queries in ("answer", "user+answer") else None
        batch = backbone.on_device(backbone.build_batch(images, prompts, answers))
        recorders = {l: RowRecorder(groups, queries, maps, l in abs_x_layers) for l in layers}
        gates = {l: [*stack.get(l, []), *([recorders[l]] if l in recorders else [])] for l in range(top + 1)}
        captured = []
        handle = None
        if vit:
            handle = family.vit_module(model).register_forward_hook(
                lambda module, args, kwargs, output: captured.append(
                    family.vit_features(model, args, kwargs, output).float()), with_kwargs=True)
        try:
            with lsg.attach(backbone, {l: g for l, g in gates.items() if g}) as run, \
                    backbone.skip_decoder_layers(range(top + 1, backbone.num_layers)):
                decoder_hidden(backbone, batch)
                ctx = run.ctx
                vsink_mask = ctx.vsink if "vsink" in groups else None
                vis = ctx.segments.vis
        finally:
            if handle is not None:
                handle.remove()
        grids = family.token_grid(model, batch)
        vit_rows = _vit_rows(backbone, captured, batch, len(chunk)) if vit else [None] * len(chunk)
        for b, record in enumerate(chunk):
            stack_g = lambda name: np.stack([getattr(recorders[l].store, name)[b].numpy() for l in layers])  # noqa: E731
            out.append(Observation(
                id=record.id, grid=grids[b].numpy(),
                vsink=None if vsink_mask is None else vsink_mask[b][vis[b]].cpu().numpy(),
                lsink={l: recorders[l].store.lsink[b].numpy() for l in layers if recorders[l].store.lsink},
                maps={l: recorders[l].store.maps[b].numpy() for l in layers if maps},
                attn_per_token=stack_g("attn_per_token"), attn_mass=stack_g("attn_mass"), norm=stack_g("norm"),
                abs_x={l: recorders[l].store.abs_x[b].numpy() for l in abs_x_layers},
                vit_abs_x=vit_rows[b]))
    return out


def _vit_rows(backbone: Backbone, captured: list[torch.Tensor], batch: dict, n_images: int) -> list:
    """Per image, `(2, D_vit)` mean `|x|` over [V-sink patches, other patches] at the ViT feature layer."""
    feats = torch.cat(captured)  # (N_patches, D_vit)
    sinks = backbone.sinks
    flags = (sink_value(feats, sinks.vit_dims, sinks.normalisation) >= sinks.tau_vit) if sinks.has_vsinks \
        else torch.zeros(len(feats), dtype=torch.bool, device=feats.device)
    split = backbone.family.patches_per_image(backbone.model, batch) or _vit_split(len(feats), n_images)
    rows = []
    for f, s in zip(torch.split(feats.abs(), split), torch.split(flags, split)):
        mean = lambda sel: (f[sel].mean(0) if sel.any() else torch.full((f.shape[1],), torch.nan))  # noqa: E731
        rows.append(torch.stack([mean(s), mean(~s)]).cpu().numpy())
    return rows if len(rows) == n_images else rows * n_images


def jsonable(value: Any, digits: int = 6) -> Any:
    """numpy arrays and scalars as (rounded) lists and floats, NaN as None; dicts and lists recursed."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, digits) for v in value]
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            rounded = np.round(value.astype(np.float64), digits).astype(object)
            rounded[np.isnan(value)] = None
            return rounded.tolist()
        return value.tolist()
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else round(float(value), digits)
    if isinstance(value, np.integer):
        return int(value)
    return value
