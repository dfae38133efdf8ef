"""LoRA on one decoder layer's attention projections: the parameter-matched baseline of the
LSG paper (Table S4), trained and evaluated through the same gate machinery.

The low-rank update is peft's LoRA for `nn.Linear` (Hu et al. 2021; peft `lora.Linear`):
`y = W x + (alpha / r) B A x`, A initialised Kaiming-uniform (a = sqrt 5), B zero, so the
gate is the identity at init. It is added by forward hooks on the layer's own projection
modules while an `attach` block is open, so the frozen backbone is never modified and can
serve other gates; tests/test_lora.py checks the output against peft's injected adapter.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from lsg.gates.base import Gate, HookPoint, register
from lsg.gates.lsg import LSGGate

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention projections, named as in LLaMA / Qwen2 / Mistral


def lsg_parameter_count(hidden_size: int, width: int = 64, groups: int = 2) -> int:
    """Parameters of the LSG gate of this width (LayerNorm, D -> width -> groups)."""
    return sum(p.numel() for p in LSGGate(hidden_size, "vsink-rest" if groups == 2 else "vsink-lsink-ordinary",
                                          width=width).parameters())


@register
class LoRAGate(Gate):
    """LoRA of rank `rank` on `targets` of the decoder layer it is attached at.

    Args:
        shapes: target name -> [in_features, out_features] of that projection.
        rank: r; "auto" = the LSG gate's parameter count (`match_width`, `match_groups`)
            divided by the parameters per rank, sum of (in + out), rounded, at least 1.
        alpha: peft's `lora_alpha`; the update is scaled by alpha / r (None = r: scale 1).
        dropout: on the LoRA input (peft's `lora_dropout`).
        match_width, match_groups: the LSG gate whose parameter count "auto" matches.
        hidden_size: D of the LLM (for "auto").

    Raises:
        ValueError: no target, or a rank below 1.
    """

    name = "lora"
    hook_points = frozenset({HookPoint.MODULES})
    trainable = True

    def __init__(self, shapes: dict[str, Sequence[int]], rank: int | str = "auto", alpha: float | None = None,
                 dropout: float = 0.0, hidden_size: int | None = None, match_width: int = 64, match_groups: int = 2):
        super().__init__()
        if not shapes:
            raise ValueError("LoRAGate needs at least one target projection.")
        per_rank = sum(i + o for i, o in shapes.values())
        if rank == "auto":
            if hidden_size is None:
                raise ValueError("rank='auto' needs hidden_size to count the LSG gate's parameters.")
            rank = max(1, round(lsg_parameter_count(hidden_size, match_width, match_groups) / per_rank))
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        self.shapes = {k: [int(i), int(o)] for k, (i, o) in shapes.items()}
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else rank)
        self.dropout_p, self.hidden_size = float(dropout), hidden_size
        self.match_width, self.match_groups = match_width, match_groups
        self.lora_A = nn.ModuleDict({k: nn.Linear(i, self.rank, bias=False) for k, (i, o) in self.shapes.items()})
        self.lora_B = nn.ModuleDict({k: nn.Linear(self.rank, o, bias=False) for k, (i, o) in self.shapes.items()})
        for k in self.shapes:  # peft's default init: the update is zero at init
            nn.init.kaiming_uniform_(self.lora_A[k].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[k].weight)
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def build(cls, backbone, targets: Sequence[str] = TARGETS, **config) -> "LoRAGate":
        """Read the target projections' shapes from the backbone's first decoder layer (every
        layer has the same), e.g. `self_attn.q_proj`."""
        layer = backbone.decoder_layers[0]
        modules = dict(layer.named_modules())
        shapes = {}
        for t in targets:
            found = [m for n, m in modules.items() if n.split(".")[-1] == t and isinstance(m, nn.Linear)]
            if len(found) != 1:
                raise ValueError(f"LoRA target {t!r} is not one nn.Linear of this backbone's decoder layer; "
                                 f"its linear layers: {sorted(n for n, m in modules.items() if isinstance(m, nn.Linear))}.")
            shapes[t] = [found[0].in_features, found[0].out_features]
        return cls(shapes, hidden_size=backbone.hidden_size, **config)

    def config(self) -> dict[str, Any]:
        return {"shapes": self.shapes, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout_p,
                "hidden_size": self.hidden_size, "match_width": self.match_width, "match_groups": self.match_groups}

    def delta(self, target: str, x: torch.Tensor) -> torch.Tensor:
        """The LoRA update `(alpha / r) B A dropout(x)` of one target for its input `x (..., in)`."""
        a, b = self.lora_A[target], self.lora_B[target]
        return b(a(self.dropout(x.to(a.weight.dtype)))) * self.scaling

    def install(self, layer: int, decoder_layer: nn.Module) -> list:
        handles = []
        modules = dict(decoder_layer.named_modules())
        for target in self.shapes:
            module = next(m for n, m in modules.items() if n.split(".")[-1] == target)

            def hook(mod, args, output, target=target):
                return output + self.delta(target, args[0]).to(output.dtype)

            handles.append(module.register_forward_hook(hook))
        return handles
