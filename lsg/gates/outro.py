"""OutRo (Yoo, Jang, Chung 2026): sink-guided causal relaxation and output rotation, SPEC section 5.

Only the paper's abstract is public here; this module implements the SPEC's reading of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from lsg.context import LayerView, fit_columns
from lsg.gates.base import Gate, HookPoint, register
from lsg.gates.var import llm_sinks
from lsg.sinks import NORMALISATIONS


def relax_layer_for(num_layers: int) -> int:
    """SPEC default l* = round(L/7) (5 for a 32-layer model; L/7 is never a tie)."""
    return round(num_layers / 7)


def rotate_layers_for(num_layers: int) -> list[int]:
    """Default rotation layers l*+1 .. L//2 (6..16 for a 32-layer model)."""
    return list(range(relax_layer_for(num_layers) + 1, num_layers // 2 + 1))


@dataclass
class OutRoState:
    """Per-layer state from prefill: sinks `(B, T_prefill)` and which parts apply here."""

    sinks: torch.Tensor
    relax: bool
    rotate: bool


def rotate_toward(outputs: torch.Tensor, u: torch.Tensor, lam: float) -> torch.Tensor:
    """`o~ = o + lam * tanh(relu(cos(o, u))) * |o| * u/|u|`, rescaled to `|o|`.

    Args:
        outputs: `(..., d)` per-head outputs `o`.
        u: `(..., d)` broadcastable target directions (zero vectors leave `o` unchanged).
    """
    o, u = outputs.float(), u.float()
    eps = torch.finfo(torch.float32).tiny
    o_norm = o.norm(dim=-1, keepdim=True)
    u_norm = u.norm(dim=-1, keepdim=True)
    u_hat = u / u_norm.clamp_min(eps)
    cos = (o * u_hat).sum(-1, keepdim=True) / o_norm.clamp_min(eps)
    turned = o + lam * torch.tanh(torch.relu(cos)) * o_norm * u_hat
    turned = turned * (o_norm / turned.norm(dim=-1, keepdim=True).clamp_min(eps))
    return torch.where((o_norm > 0) & (u_norm > 0), turned, o).to(outputs.dtype)


@register
class OutRoGate(Gate):
    """The SPEC's reading of OutRo's two parts (only the abstract is public), each switchable.

    1. Causal relaxation (`relax`), at `relax_layer` only, at prefill only: the query rows
       of the sink tokens attend to every real prompt token, future ones included (never to
       padding and never to `out` tokens, so a teacher-forced forward or a full recompute
       relaxes exactly as the prefill of KV-cache generation does).
       Consequence: the sink tokens' outputs at `relax_layer` change, so their hidden
       states, and the keys and values they write into the cache in every later layer,
       carry information from the whole prompt. Decode steps add no relaxed rows (a
       decoded token is never a sink); the cached K/V stay as the relaxed prefill made them.
    2. Output rotation (`rotate`), at the layers in `rotate_layers`: the per-head attention
       output `o_i` of every real non-sink token is turned toward the mean sink value `u`
       of its head (the mean of that KV head's value vectors over the sink positions,
       GQA-expanded to query heads): `o~ = o + lam * tanh(relu(cos(o, u))) * |o| * u/|u|`,
       then rescaled to `|o|`. Sink rows, padding rows and samples without sinks are left
       unchanged. Needs no attention weights, so the layer stays on SDPA.

    Sinks (both parts): prompt tokens with massive activation entering the layer
    (`phi >= tau`); `tau=None` uses the backbone's sink config (`model.sinks`).

    Layers. Attach the gate at `default_layers(L)` (or any subset of
    `{relax_layer} ∪ rotate_layers`): at each layer it applies the parts configured for that
    layer. Defaults: `relax_layer = round(L/7)` (SPEC), and rotation at `relax_layer+1 ..
    L//2` (our choice, not from the paper): after the relaxation, so the sink value already
    carries the prompt-wide context gathered by relaxation, through the first half of the
    network where context is integrated, and away from the deep layers where residual
    norms grow and sink detection over-flags (SPEC section 2).

    Args:
        num_layers: decoder depth L, used for the default layers (not needed if both
            `relax_layer` and `rotate_layers` are given).
        relax_layer: l* (default round(L/7)).
        rotate_layers: rotation layers (default relax_layer+1 .. L//2).
        relax: apply part 1.
        rotate: apply part 2.
        lam: rotation strength lambda (0.1; not given in the abstract).
        tau: sink threshold on `phi`; None = the backbone's sink config.
        normalisation: "raw" or "rms" for `tau`; None = the backbone's.

    Raises:
        ValueError: default layers requested without `num_layers`; attached at a layer
            that is neither `relax_layer` nor in `rotate_layers`.
    """

    name = "outro"
    hook_points = frozenset({HookPoint.HIDDEN, HookPoint.MASK, HookPoint.HEAD_OUTPUTS})

    def __init__(self, num_layers: int | None = None, relax_layer: int | None = None,
                 rotate_layers: Sequence[int] | None = None, relax: bool = True, rotate: bool = True,
                 lam: float = 0.1, tau: float | None = None, normalisation: str | None = None):
        super().__init__()
        if (relax_layer is None or rotate_layers is None) and num_layers is None:
            raise ValueError("OutRoGate needs num_layers (the backbone's decoder depth) for its default layers, "
                             "or explicit relax_layer and rotate_layers.")
        if normalisation is not None and normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS} or None, got {normalisation!r}.")
        self.num_layers = num_layers
        self.relax_layer = relax_layer_for(num_layers) if relax_layer is None else int(relax_layer)
        self.rotate_layers = rotate_layers_for(num_layers) if rotate_layers is None else [int(l) for l in rotate_layers]
        self.relax, self.rotate, self.lam = bool(relax), bool(rotate), float(lam)
        self.tau = None if tau is None else float(tau)
        self.normalisation = normalisation

    @staticmethod
    def default_layers(num_layers: int) -> list[int]:
        """`round(L/7)` (relaxation) and `round(L/7)+1 .. L//2` (rotation)."""
        return [relax_layer_for(num_layers)] + rotate_layers_for(num_layers)

    def config(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "relax_layer": self.relax_layer, "rotate_layers": self.rotate_layers,
                "relax": self.relax, "rotate": self.rotate, "lam": self.lam, "tau": self.tau,
                "normalisation": self.normalisation}

    def prepare(self, view: LayerView, hidden: torch.Tensor) -> OutRoState:
        if view.layer != self.relax_layer and view.layer not in self.rotate_layers:
            raise ValueError(f"OutRoGate attached at layer {view.layer}, which is neither its relax_layer "
                             f"({self.relax_layer}) nor one of its rotate_layers {self.rotate_layers}.")
        return OutRoState(llm_sinks(view, hidden, self.tau, self.normalisation),
                          relax=self.relax and view.layer == self.relax_layer,
                          rotate=self.rotate and view.layer in self.rotate_layers)

    def edit_mask(self, view: LayerView, state: OutRoState, mask: torch.Tensor) -> torch.Tensor:
        if not (state.relax and view.is_prefill):
            return mask
        n_kv = mask.shape[-1]
        rows = fit_columns(state.sinks, view.q_start + view.n_queries)[:, view.query_slice]  # (B, T_q)
        keys = fit_columns(view.segments.prompt, n_kv)  # (B, T_kv)
        return mask | (rows[:, None, :, None] & keys[:, None, None, :])

    def edit_head_outputs(self, view: LayerView, state: OutRoState, outputs: torch.Tensor,
                          value: torch.Tensor) -> torch.Tensor:
        if not state.rotate:
            return outputs
        n_kv = value.shape[2]
        sinks = fit_columns(state.sinks, n_kv)  # (B, T_kv)
        weights = sinks.to(value.dtype) / sinks.sum(1, keepdim=True).clamp_min(1).to(value.dtype)
        u = torch.einsum("bt,bhtd->bhd", weights, value)  # (B, H_kv, d); zero without sinks
        u = repeat_kv(u[:, :, None], outputs.shape[2] // value.shape[1])[:, :, 0]  # (B, H, d)
        seg = view.segments
        real = (seg.sys | seg.vis | seg.user | seg.out)[:, view.query_slice]
        rows = real & ~fit_columns(state.sinks, view.q_start + view.n_queries)[:, view.query_slice]  # (B, T_q)
        turned = rotate_toward(outputs, u[:, None], self.lam)
        return torch.where(rows[:, :, None, None], turned, outputs)
