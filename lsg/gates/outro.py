"""OutRo (Yoo, Jang, Chung 2026): sink enhancement and output rotation, docs/methods.md section 5 "OutRo".

docs/methods.md follows the authors' released code (kaistmm/OutRo, `model/outro.py`); the
abstract in `papers/` is background only. Both parts act on the per-head attention
output `o` (before `o_proj`) of the layers of a window, enhancement first, then rotation.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from lsg.context import ForwardContext, LayerView, fit_columns
from lsg.gates.base import Gate, HookPoint, register


def massive_activation_sinks(hidden: torch.Tensor, prompt: torch.Tensor, abs_thr: float,
                             med_mul: float) -> torch.Tensor:
    """Sinks `(B, T)`: prompt tokens whose largest `|x|` over all channels reaches
    `max(abs_thr, med_mul * median|x|)` (docs/methods.md section 5 "OutRo", the Sun et al. rule).

    The median runs over every channel of the sample's prompt tokens (padding and `out`
    tokens excluded), one per sample; it is the lower median, as `torch.median` in the
    released code. Leaving `out` out keeps a teacher-forced forward or a full recompute
    on the same sinks as the prefill of KV-cache generation.

    Args:
        hidden: `(B, T, D)` hidden state entering the layer.
        prompt: `(B, T)` bool, the real prompt tokens.

    Returns:
        `(B, T)` bool, True at the sinks (never outside `prompt`).
    """
    magnitude = hidden.detach().abs().float()
    median = magnitude.masked_fill(~prompt[..., None], float("nan")).flatten(1).nanmedian(1).values  # (B,)
    threshold = (med_mul * median).clamp_min(abs_thr)  # NaN (a sample without prompt) flags nothing
    return (magnitude.amax(-1) >= threshold[:, None]) & prompt


def rotate_toward_sink(outputs: torch.Tensor, vbar: torch.Tensor, gamma: float, temp: float,
                       rescale: bool) -> torch.Tensor:
    """OutRo's output rotation (docs/methods.md section 5 "OutRo"), elementwise over the leading dims:
    `c = cos(o, v̄)`, `m = tanh(relu(c) / temp)`,
    `o' = o + gamma * m * (|o·v̄| / (|v̄|² + 1e-8)) * v̄`, and with `rescale`
    `o'' = o' * |o| / (|o'| + 1e-8)`. A zero `v̄` leaves `o` unchanged.

    Args:
        outputs: `(..., d)` per-head outputs `o`.
        vbar: `(..., d)` broadcastable mean sink value of each output's KV head.
    """
    o, v = outputs.float(), vbar.float()
    cos = (F.normalize(o, dim=-1) * F.normalize(v, dim=-1)).sum(-1, keepdim=True)
    gate = torch.tanh(torch.relu(cos) / temp)
    projection = (o * v).sum(-1, keepdim=True).abs() / (v.pow(2).sum(-1, keepdim=True) + 1e-8) * v
    turned = o + gamma * gate * projection
    if rescale:
        turned = turned * (o.norm(dim=-1, keepdim=True) / (turned.norm(dim=-1, keepdim=True) + 1e-8))
    return turned.to(outputs.dtype)


@dataclass
class OutRoState:
    """What one window layer decided at prefill. Masks are `(B, T_prefill)` bool.

    Attributes:
        sinks: this layer's sinks; `v̄` is the mean of their value vectors.
        seen: sinks at this or any earlier window layer; rotation skips them.
        enhance: positions whose output this layer replaces (enhancement).
        enhanced: positions enhanced at this or any earlier layer of this forward.
    """

    sinks: torch.Tensor
    seen: torch.Tensor
    enhance: torch.Tensor
    enhanced: torch.Tensor


@dataclass(eq=False)
class OutRoForward:
    """The states one `OutRoGate` prepared in one forward, by decoder layer: where window
    layer `l` finds the state of layer `l - 1`.

    Attributes:
        ctx: weak reference to that forward's `ForwardContext` (the record never keeps a
            forward alive; the gate drops the record when the context goes).
        layers: decoder layer -> the `OutRoState` the gate's `prepare` returned there.
    """

    ctx: weakref.ReferenceType
    layers: dict[int, OutRoState] = field(default_factory=dict)


@register
class OutRoGate(Gate):
    """OutRo as released by its authors (docs/methods.md section 5 "OutRo"), both parts switchable.

    The gate sits at every layer of its window `start <= l < end` (`default_layers`).
    At prefill, entering each window layer `l`, it finds the sinks of `l`
    (`massive_activation_sinks`). Then, in the attention of `l`:

    1. Sink enhancement (`relax`), prefill only, at enhancement layers
       `l % enhance_interval == 0` (default interval `max(1, L // 7)`): the per-head
       output of every sink `s` of `l` becomes `softmax(q_s K^T / sqrt(d)) V` over every
       real prompt position, future ones included (`q`, `K` after RoPE, GQA as
       `repeat_kv`). Done through the MASK hook: the sink's row attends to exactly the
       prompt keys (never padding, never `out` tokens), so the layer stays on SDPA and a
       teacher-forced forward or full recompute enhances exactly as the prefill of
       KV-cache generation does.
       `apply_once` (the released code's flag, default on): a position is enhanced at
       most once per forward; a sink already enhanced at an earlier enhancement layer is
       left to ordinary causal attention here. Off: every sink of every enhancement
       layer is enhanced, including those enhanced before.
    2. Output rotation (`rotate`), at every window layer where the sample has at least
       one sink: `v̄_g` = mean value vector of the layer's sinks, per KV head `g`. Every
       real token that was not a sink at this or any earlier window layer (`out` tokens
       included; padding rows untouched) has each head `h` turned toward `v̄_{g(h)}` by
       `rotate_toward_sink`. Enhanced rows are sinks of this layer, so never rotated.

    Decode steps: sinks, `v̄` (recomputed from the cached prefill values, which are the
    same) and the enhanced set come from prefill; a decoded token is never a sink, is
    never enhanced, and is rotated at every window layer that has sinks.

    Cross-layer state: `prepare` at layer `l > start` reads the `OutRoState` this gate
    prepared at layer `l - 1` of the same forward (sinks seen so far, positions enhanced so
    far) from `states_of(view.ctx)`, its `OutRoForward` record of that forward. So the gate
    must sit at every window layer from `start` up to its deepest layer; elsewhere it
    refuses to run.

    Args:
        num_layers: decoder depth L (for the default window and interval).
        start, end: window `start <= l < end`; `end=None` means `L - 2`.
        relax: part 1, sink enhancement.
        rotate: part 2, output rotation.
        apply_once: enhance each position at most once per forward.
        abs_thr, med_mul: sink threshold `max(abs_thr, med_mul * median|x|)`.
        gamma, temp, rescale: rotation strength, gate temperature, norm preservation.
        enhance_interval: enhancement at layers `l % interval == 0`; None = `max(1, L // 7)`.

    Raises:
        ValueError: a bad config; at run time, the gate attached outside its window or
            without its state from the previous window layer.
    """

    name = "outro"
    hook_points = frozenset({HookPoint.HIDDEN, HookPoint.MASK, HookPoint.HEAD_OUTPUTS})

    def __init__(self, num_layers: int | None = None, start: int = 0, end: int | None = None,
                 relax: bool = True, rotate: bool = True, apply_once: bool = True,
                 abs_thr: float = 100.0, med_mul: float = 1000.0, gamma: float = 3.0, temp: float = 0.1,
                 rescale: bool = True, enhance_interval: int | None = None):
        super().__init__()
        if num_layers is None or int(num_layers) < 1:
            raise ValueError(f"OutRoGate needs num_layers, the backbone's decoder depth (got {num_layers!r}): "
                             f"it sets the window end L - 2 and the enhancement interval max(1, L // 7).")
        self.num_layers = int(num_layers)
        self.start = int(start)
        self.end = self.num_layers - 2 if end is None else int(end)
        if not 0 <= self.start < self.end <= self.num_layers:
            raise ValueError(f"OutRoGate window start={self.start}, end={self.end} must satisfy "
                             f"0 <= start < end <= num_layers={self.num_layers} (end defaults to L - 2).")
        self.enhance_interval = max(1, self.num_layers // 7) if enhance_interval is None else int(enhance_interval)
        if self.enhance_interval < 1:
            raise ValueError(f"OutRoGate enhance_interval must be >= 1 (or null), got {enhance_interval!r}.")
        if temp <= 0:
            raise ValueError(f"OutRoGate temp must be > 0, got {temp!r}.")
        if abs_thr < 0 or med_mul < 0:
            raise ValueError(f"OutRoGate abs_thr and med_mul must be >= 0, got {abs_thr!r} and {med_mul!r}.")
        self.relax, self.rotate, self.apply_once = bool(relax), bool(rotate), bool(apply_once)
        self.abs_thr, self.med_mul = float(abs_thr), float(med_mul)
        self.gamma, self.temp, self.rescale = float(gamma), float(temp), bool(rescale)
        self.forwards: dict[int, OutRoForward] = {}  # id(ForwardContext) -> its record, while it lives

    def __getstate__(self) -> dict[str, Any]:
        """Pickle and deepcopy without `forwards` (bound to live forwards of this process)."""
        return {**super().__getstate__(), "forwards": {}}

    def config(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "start": self.start, "end": self.end, "relax": self.relax,
                "rotate": self.rotate, "apply_once": self.apply_once, "abs_thr": self.abs_thr,
                "med_mul": self.med_mul, "gamma": self.gamma, "temp": self.temp, "rescale": self.rescale,
                "enhance_interval": self.enhance_interval}

    @classmethod
    def build(cls, backbone, **config) -> "OutRoGate":
        """The gate for a loaded backbone: `num_layers` (null in its config) is the backbone's depth."""
        if config.get("num_layers") is None:
            config = {**config, "num_layers": backbone.num_layers}
        return cls(**config)

    def default_layers(self, num_layers: int) -> list[int]:
        """The window `start .. end - 1` (default `0 .. L - 3`): the gate sits at every window layer."""
        if num_layers != self.num_layers:
            raise ValueError(f"OutRoGate was built for {self.num_layers} layers, not {num_layers}.")
        return list(range(self.start, self.end))

    def is_enhancement_layer(self, layer: int) -> bool:
        """Window layers with `layer % enhance_interval == 0` (docs/methods.md section 5 "OutRo")."""
        return self.start <= layer < self.end and layer % self.enhance_interval == 0

    def states_of(self, ctx: ForwardContext) -> OutRoForward:
        """The record of the forward `ctx` belongs to: a new one for a new forward, dropped from
        `forwards` as soon as `ctx` is freed (the gate keeps nothing past its forwards)."""
        key = id(ctx)
        record = self.forwards.get(key)
        if record is None or record.ctx() is not ctx:
            forwards = self.forwards
            record = forwards[key] = OutRoForward(weakref.ref(ctx, lambda _: forwards.pop(key, None)))
        return record

    def prepare(self, view: LayerView, hidden: torch.Tensor) -> OutRoState:
        """Sinks of this layer `(B, T)` from `hidden` `(B, T, D)`, and the running sets."""
        layer = view.layer
        if not self.start <= layer < self.end:
            raise ValueError(f"OutRoGate attached at layer {layer}, outside its window start={self.start} <= l < "
                             f"end={self.end}; attach it at its default_layers or change start/end.")
        prompt = fit_columns(view.segments.prompt, hidden.shape[1]).to(hidden.device)
        sinks = massive_activation_sinks(hidden, prompt, self.abs_thr, self.med_mul)
        states = self.states_of(view.ctx)
        if layer == self.start:
            seen, enhanced = sinks, torch.zeros_like(sinks)
        else:
            previous = states.layers.get(layer - 1)
            if previous is None:
                raise ValueError(f"OutRoGate at layer {layer} needs its state from layer {layer - 1} (sinks of "
                                 f"earlier window layers, positions already enhanced): attach it at every layer "
                                 f"of its window {self.start}..{self.end - 1}, or set start={layer}.")
            seen, enhanced = previous.seen | sinks, previous.enhanced
        enhance = sinks & ~enhanced if self.apply_once else sinks
        if not (self.relax and self.is_enhancement_layer(layer)):
            enhance = torch.zeros_like(sinks)
        states.layers[layer] = OutRoState(sinks, seen, enhance, enhanced | enhance)
        return states.layers[layer]

    def edit_mask(self, view: LayerView, state: OutRoState, mask: torch.Tensor) -> torch.Tensor:
        """Enhanced rows attend to exactly the prompt keys; `mask`: `(B, 1, T_q, T_kv)` bool."""
        if not view.is_prefill or not state.enhance.any():
            return mask
        rows = fit_columns(state.enhance, view.q_start + view.n_queries)[:, view.query_slice]  # (B, T_q)
        keys = fit_columns(view.segments.prompt, mask.shape[-1])  # (B, T_kv)
        return torch.where(rows[:, None, :, None], keys[:, None, None, :], mask)

    def edit_head_outputs(self, view: LayerView, state: OutRoState, outputs: torch.Tensor,
                          value: torch.Tensor) -> torch.Tensor:
        """Rotate `(B, T_q, H, d)` outputs toward `v̄` from `value` `(B, H_kv, T_kv, d)`."""
        if not self.rotate:
            return outputs
        n_prefill = state.sinks.shape[1]
        weights = state.sinks.float() / state.sinks.sum(1, keepdim=True).clamp_min(1)  # (B, T_prefill)
        vbar = torch.einsum("bt,bgtd->bgd", weights, value[:, :, :n_prefill].float())  # (B, H_kv, d)
        vbar = repeat_kv(vbar[:, :, None], outputs.shape[2] // value.shape[1])[:, :, 0]  # (B, H, d)
        seg, n_seen = view.segments, view.q_start + view.n_queries
        real = (seg.prompt | seg.out)[:, view.query_slice]
        rows = real & ~fit_columns(state.seen, n_seen)[:, view.query_slice] & state.sinks.any(1, keepdim=True)
        turned = rotate_toward_sink(outputs, vbar[:, None], self.gamma, self.temp, self.rescale)
        return torch.where(rows[:, :, None, None], turned, outputs)
