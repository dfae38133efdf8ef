"""Per-forward state shared by the hooks and the attention function, as typed objects.

`RunState` is the live state of one `lsg.attach` block, reachable from the model
(`run_state(model)`): its settings, the labels and ViT flags waiting for the next
context, and the current `ForwardContext`. `ForwardContext` is built once per model call
(prefill or decode step) from the batch: segments, V-sinks, the sink values of the hidden
state entering each hooked layer, and the state each gate computed at prefill.
`LayerView` is what a gate sees inside decoder layer `l`: positions of the current queries
and keys, and the token groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lsg.segments import Segments
from lsg.sinks import SinkConfig

def fit_columns(values: torch.Tensor, n: int, fill: bool | int = False) -> torch.Tensor:
    """A `(B, T)` per-position tensor cut or padded with `fill` to `(B, n)`.

    Prefill-time sets (sinks, groups) have the prompt's length; decoded positions come
    after it and are never sinks (`fill=False`) or visual (`fill=-1` for group indices).
    """
    if values.shape[1] >= n:
        return values[:, :n]
    return torch.cat([values, values.new_full((values.shape[0], n - values.shape[1]), fill)], 1)


GROUPINGS = {
    # name -> group names, in the order of the gate's ratio vector r (docs/methods.md section 3)
    "vsink-rest": ("vsink", "rest"),
    "vsink-lsink-ordinary": ("vsink", "lsink", "ordinary"),
    "lsink-rest": ("lsink", "rest"),
}


@dataclass
class ForwardContext:
    """What one model call knows about its tokens. Tensors are `(B, T_total)` unless noted.

    Attributes:
        segments: token segments over every position seen so far (prompt + decoded).
        sinks: the backbone's sink configuration.
        vsink: V-sink mask, or None if the ViT sink was not measured.
        sink_phi: layer -> `(B, T_prefill)` sink value of the hidden state entering the layer.
        gate_state: (layer, gate index) -> whatever the gate computed at prefill.
        n_prefill: number of positions of the prefill call (decoded tokens come after).

    `is_prefill` is the one definition of "this is the prefill call" that every hook, gate and
    the attention function read.
    """

    segments: Segments
    sinks: SinkConfig
    vsink: torch.Tensor | None = None
    sink_phi: dict[int, torch.Tensor] = field(default_factory=dict)
    gate_state: dict[tuple[int, int], Any] = field(default_factory=dict)
    n_prefill: int = 0

    @property
    def total_len(self) -> int:
        """Positions seen so far: the prompt's, plus one per decode step."""
        return self.segments.vis.shape[1]

    @property
    def is_prefill(self) -> bool:
        """True while the forward that sees the prompt runs (no decoded position yet): sink values
        and gate state are computed then, and reused by every decode step."""
        return self.n_prefill == self.total_len

    def require_vsinks(self) -> torch.Tensor:
        if self.vsink is None:
            raise ValueError(
                "This gate needs V-sinks, but the backbone has no ViT sink dimension / threshold configured "
                "(model.sinks.vit_dims, model.sinks.tau_vit). Use a grouping without V-sinks (e.g. "
                "grouping=lsink-rest) or calibrate the ViT sink (docs/methods.md section 7)."
            )
        return fit_columns(self.vsink, self.total_len)

    def flagged(self, layer: int) -> torch.Tensor:
        """Tokens `(B, T_total)` with `phi(x^layer) >= tau_llm(layer)`, by the configured scope."""
        if not self.sinks.has_llm_sinks:
            raise ValueError(
                "This gate needs LLM sinks, but the backbone has no LLM sink dims / tau_llm configured "
                "(model.sinks.llm_dims, model.sinks.tau_llm): calibrate them (docs/methods.md section 7)."
            )
        layers = range(layer + 1) if self.sinks.lsink_scope == "upto" else [layer]
        masks = [self.sink_phi[l] >= self.sinks.tau_at(l) for l in layers if l in self.sink_phi]
        if not masks:
            raise RuntimeError(f"No sink values were recorded for layer {layer}; was the gate attached there?")
        return fit_columns(torch.stack(masks).any(0), self.total_len)

    def lsinks(self, layer: int) -> torch.Tensor:
        """L-sinks at `layer`: visual, not V-sinks, flagged (docs/methods.md section 2)."""
        vis = self.segments.vis
        vsink = fit_columns(self.vsink, self.total_len) if self.vsink is not None else torch.zeros_like(vis)
        return self.flagged(layer) & vis & ~vsink

    def text_sinks(self, layer: int) -> torch.Tensor:
        """Non-visual real tokens with massive activation at `layer`."""
        return self.flagged(layer) & self.segments.text

    def visual_groups(self, grouping: str, layer: int) -> torch.Tensor:
        """Group index `(B, T_total)` of every visual token (-1 for text and padding).

        Raises:
            ValueError: unknown grouping, or the grouping needs sinks the backbone lacks.
        """
        if grouping not in GROUPINGS:
            raise ValueError(f"Unknown grouping {grouping!r}; known: {', '.join(GROUPINGS)}.")
        vis = self.segments.vis
        groups = torch.full(vis.shape, -1, dtype=torch.long, device=vis.device)
        groups[vis] = len(GROUPINGS[grouping]) - 1  # the last group is "the rest"
        if grouping.startswith("vsink"):
            groups[self.require_vsinks() & vis] = 0
        if grouping == "vsink-lsink-ordinary":
            groups[self.lsinks(layer)] = 1
        if grouping == "lsink-rest":
            groups[self.lsinks(layer)] = 0
        return groups


RUN_ATTR = "_lsg_run"  # the attribute of the top-level model holding an attach block's RunState


@dataclass
class RunState:
    """Live state of one `lsg.attach` block. Tensors are `(B, T)` unless noted.

    Attributes:
        sinks: the block's sink configuration.
        base_implementation: the attention implementation ungated layers run (the backbone's own:
            "sdpa", "eager", "flash_attention_2", any registered kernel; `lsg.attention.resolve_base`).
        ctx: the context of the current (or last) forward; given at start for a suffix run.
        labels: labels of the next forward (answers are `out` tokens, so teacher forcing never
            moves the last prompt token); set by `lsg.scoring` or the top-level model's call,
            taken by the context that forward builds.
        vit_flags: `(N_patches,)` V-sink flags read from the ViT before the forward that builds
            the context (`generate` encodes images first), taken by that context.
        inputs: the call arguments of the current prefill named in `Family.layout_inputs`
            (e.g. `image_sizes`), for the family's patch -> token map.
        layout: arguments of `Family.layout_calls` since the last prefill.
    """

    sinks: SinkConfig
    base_implementation: str
    ctx: ForwardContext | None = None
    labels: torch.Tensor | None = None
    vit_flags: torch.Tensor | None = None
    inputs: dict | None = None
    layout: dict = field(default_factory=dict)

    def take_labels(self) -> torch.Tensor | None:
        """The waiting labels (None if none), cleared so they serve one forward only."""
        labels, self.labels = self.labels, None
        return labels

    def clear(self) -> None:
        """Drop every per-forward tensor (the block is over)."""
        self.ctx = self.inputs = self.labels = self.vit_flags = None
        self.layout = {}


def run_state(model) -> RunState | None:
    """The `RunState` of the attach block on `model` (the top-level model), None outside one."""
    return vars(model).get(RUN_ATTR)


@dataclass(init=False)
class LayerView:
    """A gate's view of decoder layer `layer` during one attention call.

    Attributes:
        layer: 0-based decoder layer.
        ctx: the forward context.
        q_start: absolute position of the first query row (0 at prefill).
        n_queries: query rows in this call (T_q); keys cover positions `[0, q_start + n_queries)`.
        is_prefill: (property) the context's `ForwardContext.is_prefill`.
    """

    layer: int
    ctx: ForwardContext
    q_start: int
    n_queries: int

    def __init__(self, layer: int, ctx: ForwardContext, q_start: int, n_queries: int,
                 is_prefill: bool | None = None):
        """`is_prefill` (deprecated, optional) is only checked against `ctx.is_prefill`.

        Raises:
            ValueError: `is_prefill` given and different from the context's.
        """
        self.layer, self.ctx, self.q_start, self.n_queries = layer, ctx, q_start, n_queries
        if is_prefill is not None and bool(is_prefill) != ctx.is_prefill:
            raise ValueError(f"LayerView(is_prefill={is_prefill}) but the context is "
                             f"{'at' if ctx.is_prefill else 'past'} its prefill ({ctx.n_prefill} prefill positions, "
                             f"{ctx.total_len} in all); drop the argument, the context decides.")

    @property
    def is_prefill(self) -> bool:
        return self.ctx.is_prefill

    @property
    def segments(self) -> Segments:
        return self.ctx.segments

    @property
    def query_slice(self) -> slice:
        return slice(self.q_start, self.q_start + self.n_queries)


def scale_by_group(groups: torch.Tensor, coefficients: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Per-key scale `(B, n_kv)`: `coefficients[..., g]` for a visual key of group g, 1 for text.

    Args:
        groups: `(B, T)` group index from `ForwardContext.visual_groups` (-1 = text).
        coefficients: `(G,)` or `(B, G)` per-group scales.
        n_kv: number of key positions in this attention call; positions past `T`
            (decoded tokens) are text.
    """
    groups = fit_columns(groups, n_kv, fill=-1)
    coefficients = coefficients.expand(groups.shape[0], -1) if coefficients.dim() == 1 else coefficients
    picked = coefficients.gather(1, groups.clamp_min(0))
    return torch.where(groups >= 0, picked, torch.ones_like(picked))


def rows_view(view: LayerView, first_row: int) -> LayerView:
    """The same layer view restricted to query rows `first_row:` of the call."""
    return LayerView(view.layer, view.ctx, view.q_start + first_row, view.n_queries - first_row)
