"""VAF (ClearSight, CVPR 2025) and SPEAR: column-wise logit scaling for text queries (docs/methods.md section 5).

Pre-softmax logits of text queries (`user`, `out` rows) are multiplied column-wise:
image columns by `alpha_enh`, suppressed columns by `beta_sup`, the rest unchanged.
Multiplying column j's logits by c equals multiplying `k_j` by c, so both gates run on
SDPA with a per-row key set (hook point ROW_KEYS): prefix rows see the original keys,
text rows the scaled ones.
"""

from __future__ import annotations

from typing import Any

import torch

from lsg.context import LayerView
from lsg.gates.base import Gate, HookPoint, register

REFERENCE_DEPTH = 32  # both methods give layers 9-14 of a 32-layer LLaMA (LLaVA-1.5-7B)
REFERENCE_LAYERS = (9, 14)


class _TextRowColumnScale(Gate):
    hook_points = frozenset({HookPoint.ROW_KEYS})

    def __init__(self, alpha_enh: float = 1.15, beta_sup: float = 0.95):
        super().__init__()
        self.alpha_enh, self.beta_sup = float(alpha_enh), float(beta_sup)

    def config(self) -> dict[str, Any]:
        return {"alpha_enh": self.alpha_enh, "beta_sup": self.beta_sup}

    @staticmethod
    def default_layers(num_layers: int) -> list[int]:
        """Layers 9-14 of a 32-layer model, scaled to `num_layers` (docs/methods.md section 5)."""
        lo, hi = (round(b * num_layers / REFERENCE_DEPTH) for b in REFERENCE_LAYERS)
        return list(range(lo, hi + 1))

    def suppressed(self, view: LayerView) -> torch.Tensor:
        raise NotImplementedError

    def column_scale(self, view: LayerView) -> torch.Tensor:
        """Per-column logit scale `(B, T_kv)` for the text rows of this call."""
        n_kv = view.q_start + view.n_queries
        seg = view.segments
        scale = torch.ones(seg.vis.shape, dtype=torch.float32, device=seg.vis.device)
        scale[self.suppressed(view)] = self.beta_sup
        scale[seg.vis] = self.alpha_enh
        return scale[:, :n_kv]

    def row_key_scale(self, view: LayerView, state) -> tuple[torch.Tensor, torch.Tensor]:
        seg = view.segments
        rows = (seg.user | seg.out)[:, view.query_slice]
        return self.column_scale(view), rows


@register
class VAFGate(_TextRowColumnScale):
    """ClearSight's Visual Amplification Fusion: for text queries, image logits x `alpha_enh`
    (1.15) and `sys` logits (sinks included) x `beta_sup` (0.95), layers 9-14 of 32."""

    name = "vaf"

    def suppressed(self, view: LayerView) -> torch.Tensor:
        return view.segments.sys


@register
class SPEARGate(_TextRowColumnScale):
    """SPEAR: like VAF, but suppresses `(sys minus text sinks) + user + out` and leaves the
    text sinks' logits untouched (text sinks: `sys` tokens with massive activation at this
    layer, by the backbone's sink config; LLaVA-1.5-7B: `<s>` and the first `.`).

    Raises:
        ValueError (at run time): the backbone has no LLM sink dims / threshold configured.
    """

    name = "spear"

    def suppressed(self, view: LayerView) -> torch.Tensor:
        seg = view.segments
        sinks = view.ctx.text_sinks(view.layer) & seg.sys
        return (seg.sys & ~sinks) | seg.user | seg.out
