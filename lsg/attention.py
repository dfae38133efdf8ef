"""One attention function for every gate, registered with transformers.

`lsg` is registered in `AttentionInterface` together with a matching entry in
`AttentionMaskInterface` (without the mask registration transformers would build no
causal or padding mask for an unknown implementation). Decoder layers whose
attention module carries a `LayerBinding` (set by `lsg.attach`) apply their gates;
any other call falls through to the backbone's own implementation.

- Gates that touch only keys stay on SDPA: scaling column j's logits by c equals
  scaling `k_j` by c, so the key tensor is rescaled and SDPA runs unchanged.
- Gates that need the logits, weights or mask get the explicit path, which computes
  the attention matrix only for the query rows it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lsg.context import LayerView

if TYPE_CHECKING:
    from lsg.attach import AttachedRun
    from lsg.gates.base import Gate

ATTN_IMPLEMENTATION = "lsg"
BINDING_ATTR = "_lsg_binding"


@dataclass
class LayerBinding:
    """The gates of one decoder layer and the run they belong to."""

    layer: int
    gates: list["Gate"]
    run: "AttachedRun"


def causal_bool_mask(n_q: int, n_kv: int, device) -> torch.Tensor:
    """`(1, 1, n_q, n_kv)` True where query i (absolute position n_kv - n_q + i) may see key j."""
    q_pos = torch.arange(n_kv - n_q, n_kv, device=device)[:, None]
    return (torch.arange(n_kv, device=device)[None, :] <= q_pos)[None, None]


def explicit_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    view: LayerView | None = None,
    gates: list["Gate"] = (),
    states: list = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with the matrix materialised, applying the gates' matrix edits.

    Args:
        query: `(B, H, T_q, d_head)`; key, value: `(B, H_kv, T_kv, d_head)` (post-RoPE).
        mask: boolean `(B or 1, 1, T_q, T_kv)`, True = may attend, or None (causal).
        scaling: `1 / sqrt(d_head)` usually.

    Returns:
        (`(B, T_q, H, d_head)` outputs, `(B, H, T_q, T_kv)` weights), as HF's eager path.
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    if mask is None:
        mask = causal_bool_mask(query.shape[2], key.shape[2], query.device)
    elif mask.dtype != torch.bool:  # an additive float mask
        mask = mask > torch.finfo(mask.dtype).min / 2
    for gate, state in zip(gates, states):
        mask = gate.edit_mask(view, state, mask) if hasattr(gate, "edit_mask") else mask
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    for gate, state in zip(gates, states):
        logits = gate.edit_logits(view, state, logits) if hasattr(gate, "edit_logits") else logits
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    for gate, state in zip(gates, states):
        weights = gate.edit_weights(view, state, weights) if hasattr(gate, "edit_weights") else weights
    output = torch.matmul(weights, value)
    return output.transpose(1, 2).contiguous(), weights


def lsg_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function (signature of transformers' AttentionInterface).

    Shapes: query `(B, H, T_q, d_head)`, key/value `(B, H_kv, T_kv, d_head)` including
    the KV cache; returns `(B, T_q, H, d_head)` and the weights (explicit path) or None.
    """
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    binding: LayerBinding | None = getattr(module, BINDING_ATTR, None)
    if binding is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    run = binding.run
    n_q, n_kv = query.shape[2], key.shape[2]
    view = LayerView(binding.layer, run.ctx, n_kv - n_q, n_q, is_prefill=n_kv == n_q)
    states = [run.ctx.gate_state.get((binding.layer, i)) for i in range(len(binding.gates))]
    for gate, state in zip(binding.gates, states):
        scale = gate.key_scale(view, state)
        if scale is not None:
            key = key * scale[:, None, :, None].to(key.dtype)
    if run.base_implementation == "sdpa" and not any(g.needs_matrix for g in binding.gates):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    return explicit_attention(module, query, key, value, attention_mask, scaling, view, binding.gates, states)


AttentionInterface.register(ATTN_IMPLEMENTATION, lsg_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
