"""One attention function for every gate, registered with transformers.

`lsg` is registered in `AttentionInterface` together with a matching entry in
`AttentionMaskInterface` (without the mask registration transformers would build no
causal or padding mask for an unknown implementation). Decoder layers whose
attention module carries a `LayerBinding` (set by `lsg.attach`) apply their gates;
ungated layers and calls outside `attach` keep the backbone's own path (SDPA, or the
explicit eager path, equal to HF eager up to float rounding).

- Gates that touch only keys stay on SDPA: scaling column j's logits by c equals
  scaling `k_j` by c, so the key tensor is rescaled and SDPA runs unchanged.
- Gates that need the logits, weights or mask get the explicit path, which computes
  the attention matrix only for the query rows it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lsg.context import LayerView, RunState, rows_view
from lsg.gates.base import MATRIX_HOOKS, Gate, HookPoint

ATTN_IMPLEMENTATION = "lsg"
BINDING_ATTR = "_lsg_binding"


@dataclass
class LayerBinding:
    """The gates of one decoder layer and the run they belong to."""

    layer: int
    gates: list[Gate]
    run: RunState


def full_mask(mask: torch.Tensor | None, n_q: int, n_kv: int, device) -> torch.Tensor:
    """Boolean mask `(B or 1, 1, n_q, n_kv)`, True = may attend. `None` means causal, with
    query i at absolute position `n_kv - n_q + i` (the KV cache holds the earlier ones)."""
    if mask is None:
        q_pos = torch.arange(n_kv - n_q, n_kv, device=device)[:, None]
        return (torch.arange(n_kv, device=device)[None, :] <= q_pos)[None, None]
    if mask.dtype != torch.bool:  # an additive float mask
        return mask > torch.finfo(mask.dtype).min / 2
    return mask


def _sdpa_rows(module, query, key, value, mask, scaling, lo: int, hi: int, **kwargs) -> torch.Tensor:
    """SDPA outputs `(B, hi - lo, H, d_head)` for query rows `lo:hi`."""
    n_q, n_kv = query.shape[2], key.shape[2]
    if lo == 0 and hi == n_q:
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)[0]
    rows_mask = full_mask(mask, n_q, n_kv, query.device)[:, :, lo:hi]
    return sdpa_attention_forward(module, query[:, :, lo:hi], key, value, rows_mask, scaling=scaling, **kwargs)[0]


def _sdpa_with_row_keys(module, query, key, value, mask, scaling, lo, hi, row_scales, **kwargs):
    """SDPA for rows `lo:hi` where each (key scale, rows) pair applies to its rows only.

    Rows are grouped by which scales apply to them; each group present runs one SDPA
    over the span of rows it occupies (a VAF gate: prefix rows unscaled, text rows scaled).
    """
    if not row_scales:
        return _sdpa_rows(module, query, key, value, mask, scaling, lo, hi, **kwargs)
    code = sum(rows[:, lo:hi].long() << i for i, (_, rows) in enumerate(row_scales))  # (B, hi - lo)
    out = None
    for c in code.unique().tolist():
        scale = torch.ones_like(row_scales[0][0])
        for i, (s, _) in enumerate(row_scales):
            if c >> i & 1:
                scale = scale * s
        hit = code == c
        span = hit.any(0).nonzero().flatten()
        a, b = int(span[0]), int(span[-1]) + 1
        part = _sdpa_rows(module, query, key * scale[:, None, :, None].to(key.dtype), value, mask, scaling,
                          lo + a, lo + b, **kwargs)
        if out is None:
            out = part.new_zeros(query.shape[0], hi - lo, *part.shape[2:])
        out[:, a:b] = torch.where(hit[:, a:b, None, None], part, out[:, a:b])
    return out


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
    row_scales: list[tuple[torch.Tensor, torch.Tensor]] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with the matrix materialised for the given query rows, applying the
    gates' logit and weight edits.

    Args:
        query: `(B, H, T_q, d_head)` (the rows to compute); key, value: `(B, H_kv, T_kv, d_head)`.
        mask: boolean `(B or 1, 1, T_q, T_kv)` for these rows, True = may attend, or None (causal).
        scaling: `1 / sqrt(d_head)` usually.
        view: the gates' view of these rows.
        row_scales: (`(B, T_kv)` scale, `(B, T_q)` rows) pairs: logits of those rows are
            multiplied column-wise by the scale.

    Returns:
        (`(B, T_q, H, d_head)` outputs, `(B, H, T_q, T_kv)` weights), as HF's eager path.
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    mask = full_mask(mask, query.shape[2], key.shape[2], query.device)
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    for scale, rows in row_scales:
        logits = torch.where(rows[:, None, :, None], logits * scale[:, None, None, :].to(logits.dtype), logits)
    for gate, state in zip(gates, states):
        if HookPoint.LOGITS in gate.hook_points:
            logits = gate.edit_logits(view, state, logits)
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    for gate, state in zip(gates, states):
        if HookPoint.WEIGHTS in gate.hook_points:
            weights = gate.edit_weights(view, state, weights)
    output = torch.matmul(weights, value)
    return output.transpose(1, 2).contiguous(), weights


def _first_row(rows: torch.Tensor) -> int:
    """First query row (over the batch) that is True in `(B, T_q)`, or T_q if none."""
    hit = rows.any(0).nonzero()
    return int(hit[0]) if len(hit) else rows.shape[1]


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
    the KV cache; returns `(B, T_q, H, d_head)` and the weights of the explicit rows
    (or None when everything ran on SDPA).

    Order of edits: keys (all rows), values, mask, then per-row keys, logits and
    weights, then per-head outputs.
    """
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    binding: LayerBinding | None = getattr(module, BINDING_ATTR, None)
    if binding is None or not binding.gates:  # an ungated layer keeps the backbone's own path
        if binding is not None and binding.run.base_implementation == "eager":
            return explicit_attention(module, query, key, value, attention_mask, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    run, gates = binding.run, binding.gates
    n_q, n_kv = query.shape[2], key.shape[2]
    view = LayerView(binding.layer, run.ctx, n_kv - n_q, n_q)
    states = [run.ctx.gate_state.get((binding.layer, i)) for i in range(len(gates))]
    hooks = set().union(*(g.hook_points for g in gates))
    mask = attention_mask
    for gate, state in zip(gates, states):
        if HookPoint.KEYS in gate.hook_points and (scale := gate.key_scale(view, state)) is not None:
            key = key * scale[:, None, :, None].to(key.dtype)
        if HookPoint.VALUES in gate.hook_points:
            value = gate.edit_values(view, state, value)
    if HookPoint.MASK in hooks:
        mask = full_mask(mask, n_q, n_kv, query.device).expand(query.shape[0], 1, n_q, n_kv)
        for gate, state in zip(gates, states):
            if HookPoint.MASK in gate.hook_points:
                mask = gate.edit_mask(view, state, mask)
    row_scales = [rs for g, st in zip(gates, states)
                  if HookPoint.ROW_KEYS in g.hook_points and (rs := g.row_key_scale(view, st)) is not None]
    if run.base_implementation == "eager":
        first = 0
    elif hooks & MATRIX_HOOKS:
        first = min(_first_row(g.matrix_rows(view, st)) for g, st in zip(gates, states) if g.hook_points & MATRIX_HOOKS)
    else:
        first = n_q
    parts, weights = [], None
    if first > 0:
        parts.append(_sdpa_with_row_keys(module, query, key, value, mask, scaling, 0, first, row_scales,
                                         dropout=dropout, **kwargs))
    if first < n_q:
        rows_mask = full_mask(mask, n_q, n_kv, query.device)[:, :, first:]
        out, weights = explicit_attention(module, query[:, :, first:], key, value, rows_mask, scaling,
                                          rows_view(view, first), gates, states,
                                          [(s, r[:, first:]) for s, r in row_scales])
        parts.append(out)
    output = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    for gate, state in zip(gates, states):
        if HookPoint.HEAD_OUTPUTS in gate.hook_points:
            output = gate.edit_head_outputs(view, state, output, value)
    return output, weights


AttentionInterface.register(ATTN_IMPLEMENTATION, lsg_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
