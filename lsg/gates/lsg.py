"""LSG: Layer-wise Sink Gating, the trainable gate (docs/methods.md section 3)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn

from lsg.context import GROUPINGS, LayerView, scale_by_group
from lsg.gates.base import AUTO_GROUPING, Gate, HookPoint, backbone_grouping, register

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
# What the gate reads (LSG paper Appendix D.2, docs/methods.md section 3): the hidden state of the last
# prompt token (the paper's default), or the mean over every prompt token or over the visual tokens.
# Padding and answer tokens are never read (`lsg.segments.Segments.prompt`, `.vis`).
SIGNALS = ("last", "mean_all", "mean_visual")


class LSGState(NamedTuple):
    """What the LSG gate decided at prefill for one forward.

    Attributes:
        ratios: `(B, G)` softmax group ratios, rows summing to 1.
        groups: `(B, T_prefill)` group index of every visual token, -1 for text and padding.
    """

    ratios: torch.Tensor
    groups: torch.Tensor


@register
class LSGGate(Gate):
    """`r = softmax(W2 act(W1 LayerNorm(x_last) + b1) + b2)`; visual key j of group g is
    scaled by `c_g = gain * r_g` in this layer (docs/methods.md section 3, LSG paper Eq. 3-4).

    Args:
        hidden_size: D of the LLM (576 for SmolLM2-135M, 4096 for LLaMA-2-7B).
        grouping: "vsink-rest" (paper default), "vsink-lsink-ordinary" or "lsink-rest".
        gain: 1.0 (paper: every visual key halved at init) or the number of groups
            (exact identity at init); the string "G" means the number of groups.
        width: hidden width of the MLP (64 in the paper).
        activation: "gelu" (default; the paper does not say), "relu", "silu", "tanh".
        signal: what `x` is (paper Appendix D.2 ablation): "last" (default, the paper's: the hidden
            state of the last prompt token), "mean_all" (mean over every prompt token: system, image
            and question) or "mean_visual" (mean over the image tokens). Padding and answer tokens
            are never read, so the ratios stay causal under teacher forcing.

    The last linear is zero at init, so `r` is uniform.

    Raises:
        ValueError: unknown grouping, activation or signal (the message lists the known ones).
    """

    name = "lsg"
    hook_points = frozenset({HookPoint.HIDDEN, HookPoint.KEYS})
    trainable = True

    def __init__(self, hidden_size: int, grouping: str = "vsink-rest", gain: float | str = 1.0,
                 width: int = 64, activation: str = "gelu", signal: str = "last"):
        super().__init__()
        if grouping not in GROUPINGS:
            raise ValueError(f"Unknown grouping {grouping!r}; known: {', '.join(GROUPINGS)}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}.")
        if signal not in SIGNALS:
            raise ValueError(f"Unknown gate signal {signal!r}; known: {', '.join(SIGNALS)} (gate.signal=...).")
        self.grouping, self.width, self.activation, self.signal = grouping, width, activation, signal
        self.num_groups = len(GROUPINGS[grouping])
        self.gain = float(self.num_groups if gain == "G" else gain)
        self.norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, width)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(width, self.num_groups)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    @classmethod
    def build(cls, backbone, grouping: str = AUTO_GROUPING, **config) -> "LSGGate":
        """The gate for a loaded backbone: `hidden_size` from it, and `grouping="auto"` (the shipped
        default, conf/gate/lsg.yaml) resolved to `backbone.default_grouping` (vsink-rest when the
        backbone has V-sinks, else lsink-rest; docs/methods.md)."""
        return super().build(backbone, grouping=backbone_grouping(grouping, backbone), **config)

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.norm.normalized_shape[0], "grouping": self.grouping, "gain": self.gain,
                "width": self.width, "activation": self.activation, "signal": self.signal}

    def group_ratios(self, x_last: torch.Tensor) -> torch.Tensor:
        """Gate ratios `(B, G)` (rows sum to 1) from gate inputs `(B, D)` (`gate_input`)."""
        x = x_last.to(self.fc1.weight.dtype)
        return torch.softmax(self.fc2(self.act(self.fc1(self.norm(x)))), dim=-1)

    def gate_input(self, view: LayerView, hidden: torch.Tensor) -> torch.Tensor:
        """The gate's input `x` `(B, D)` from the prefill hidden state `(B, T, D)` entering the layer,
        per `signal`: the last prompt token's row, or the float32 mean over the prompt tokens
        (`mean_all`) or the image tokens (`mean_visual`) of each sample; padding and answer tokens
        (teacher forcing) are never read (paper Appendix D.2)."""
        segments = view.segments
        if self.signal == "last":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return hidden[rows, segments.last_prompt.to(hidden.device)]
        mask = (segments.prompt if self.signal == "mean_all" else segments.vis)[:, :hidden.shape[1]]
        weights = mask.to(device=hidden.device, dtype=torch.float32)
        return torch.einsum("btd,bt->bd", hidden.float(), weights) / weights.sum(1, keepdim=True).clamp_min(1.0)

    def prepare(self, view: LayerView, hidden: torch.Tensor) -> LSGState:
        """Ratios from `hidden` `(B, T, D)` read per `signal` (`gate_input`), and the visual groups."""
        return LSGState(self.group_ratios(self.gate_input(view, hidden)),
                        view.ctx.visual_groups(self.grouping, view.layer))

    def ratios(self, state: LSGState) -> torch.Tensor:
        """The `(B, G)` softmax ratios of `state` (from `prepare`), groups in `GROUPINGS[grouping]` order."""
        return state.ratios

    def key_scale(self, view: LayerView, state: LSGState) -> torch.Tensor:
        return scale_by_group(state.groups, self.gain * state.ratios, view.q_start + view.n_queries)
