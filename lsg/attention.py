"""One attention function for every gate, registered with transformers; which kernel runs where.

Inside `lsg.attach` the language model's attention implementation is an lsg one, registered in
`AttentionInterface` with the mask function of the backbone's own ("base") implementation in
`AttentionMaskInterface` (without a mask registration transformers builds no causal or padding
mask for an unknown implementation):

- `lsg` (`sdpa_mask`: boolean 4-D masks) for `sdpa`, `eager` and any registered kernel that
  takes SDPA's masks;
- `lsg_padding` (`flash_attention_mask`: a 2-D padding mask, or None) for `flash_attention_2`,
  `flash_attention_3`, `flash_attention_4` and hub kernels registered with their masks.

Decoder layers whose attention module carries a `LayerBinding` (set by `lsg.attach`) apply
their gates. What each layer calls (`layer_kernel`, `lsg.attach.kernel_plan`):

- ungated layers, and gates that only scale keys (oracle, LSG: scaling column j's logits by c
  equals scaling `k_j` by c), edit values (mean-v, zero-v) or per-head outputs, run the base
  kernel itself on the edited inputs (FlashAttention stays FlashAttention);
- ROW_KEYS gates (VAF, SPEAR) call the base kernel once per span of query rows sharing a key
  scale (prompt rows with the original keys, text rows with the scaled ones);
- LOGITS/WEIGHTS gates (VAR) run the rows before the first row they edit on the base kernel
  and the rest on the explicit path, which materialises the attention matrix of those rows only;
- MASK gates (knockout, OutRo) edit a boolean 4-D mask: the base kernel when it takes one,
  else (a padding-mask kernel) SDPA with that mask;
- an `eager` backbone runs the explicit path everywhere (equal to HF eager up to float rounding).

A base kernel called on a subset of query rows under a padding mask gets the keys up to the
last of those rows, so its bottom-right-aligned causal mask lines up; the explicit rows of a
padding-mask backbone get the boolean mask built from the 2-D one (causal, key not padded,
within `sliding_window` when the layer has one). Base implementations whose masks are
neither (`flex_attention`'s block masks) run SDPA in every layer, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    flash_attention_mask,
    sdpa_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lsg.context import LayerView, RunState, rows_view
from lsg.gates.base import MATRIX_HOOKS, Gate, HookPoint

ATTN_IMPLEMENTATION = "lsg"  # the lsg implementation for bases taking boolean 4-D masks (sdpa_mask)
PADDING_IMPLEMENTATION = "lsg_padding"  # ... for bases taking a 2-D padding mask (flash_attention_mask)
LSG_IMPLEMENTATIONS = {ATTN_IMPLEMENTATION: sdpa_mask, PADDING_IMPLEMENTATION: flash_attention_mask}
BINDING_ATTR = "_lsg_binding"
SDPA, EAGER = "sdpa", "eager"
EXPLICIT = "explicit"  # the explicit path (`explicit_attention`), HF eager's equal


def takes_padding_mask(implementation: str) -> bool:
    """Whether the registered attention `implementation` takes a 2-D padding mask (or None) rather
    than a 4-D one: its mask function in transformers' `AttentionMaskInterface` is
    `flash_attention_mask` (FlashAttention 2/3/4, hub kernels registered with their masks)."""
    return implementation != EAGER and ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) is flash_attention_mask


def resolve_base(implementation: str | None) -> str:
    """The implementation ungated layers run inside `attach` for a backbone loaded with
    `implementation`: itself when lsg can run it (eager, or a kernel registered with
    `sdpa_mask` or `flash_attention_mask`), else "sdpa" with a warning (e.g. `flex_attention`,
    whose block masks the gates cannot edit). None (transformers' default) is "sdpa"."""
    implementation = implementation or SDPA
    if implementation == EAGER or ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) in LSG_IMPLEMENTATIONS.values():
        return implementation
    warnings.warn(f"lsg.attach: the backbone's attention implementation {implementation!r} builds masks the gates "
                  f"cannot edit; inside attach every layer runs 'sdpa'. Kept as they are: eager, sdpa, "
                  f"flash_attention_2/3/4 and kernels registered with their masks.", stacklevel=3)
    return SDPA


def lsg_implementation(base: str) -> str:
    """The registered lsg implementation whose masks match `base` (a `resolve_base` result)."""
    return PADDING_IMPLEMENTATION if takes_padding_mask(base) else ATTN_IMPLEMENTATION


@dataclass(frozen=True)
class LayerKernel:
    """What one decoder layer's attention calls inside `attach` (`layer_kernel`).

    Attributes:
        kernel: what the layer's query rows run on unless a gate needs their matrix: the base
            implementation ("flash_attention_2", "sdpa", a registered kernel), "sdpa" (a MASK
            gate under a padding-mask base: the edited mask is 4-D), or "explicit" (an eager base:
            every row on the explicit path).
        row_spans: ROW_KEYS gates: `kernel` is called once per span of rows sharing a key scale.
        matrix_rows: LOGITS/WEIGHTS gates: the rows from the first one a gate edits (`Gate.matrix_rows`,
            over the batch) run on the explicit path, the rows before it on `kernel`.
    """

    kernel: str
    row_spans: bool = False
    matrix_rows: bool = False


def layer_kernel(gates: Sequence[Gate], base: str) -> LayerKernel:
    """The kernel choice of a decoder layer with `gates` (empty = ungated) on a backbone whose
    ungated layers run `base` (a `resolve_base` result); see the module docstring."""
    hooks = set().union(*(g.hook_points for g in gates))
    if base == EAGER:
        return LayerKernel(EXPLICIT)
    kernel = SDPA if HookPoint.MASK in hooks and takes_padding_mask(base) else base
    return LayerKernel(kernel, row_spans=HookPoint.ROW_KEYS in hooks, matrix_rows=bool(hooks & MATRIX_HOOKS))


@dataclass
class LayerBinding:
    """The gates of one decoder layer, the run they belong to and the layer's `LayerKernel`."""

    layer: int
    gates: list[Gate]
    run: RunState
    kernel: LayerKernel


def full_mask(mask: torch.Tensor | None, n_q: int, n_kv: int, device,
              sliding_window: int | None = None) -> torch.Tensor:
    """Boolean mask `(B or 1, 1, n_q, n_kv)`, True = may attend, from what a mask function built.

    Query i sits at key position `n_kv - n_q + i` (the KV cache holds the earlier ones).

    Args:
        mask: None (causal, no padding), a 2-D `(B, n_kv)` padding mask (True/1 = real key;
            FlashAttention's), or a 4-D boolean or additive float mask (returned as boolean).
        sliding_window: the layer's window (key j visible from position p iff `p - j <
            sliding_window`), applied to None and 2-D masks; a 4-D mask already holds it.

    Raises:
        ValueError: a 2-D mask whose width is not `n_kv` (e.g. a static cache).
    """
    if mask is not None and mask.dim() == 4:
        return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    q_pos = torch.arange(n_kv - n_q, n_kv, device=device)[:, None]
    k_pos = torch.arange(n_kv, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    allowed = allowed[None, None]
    if mask is None:
        return allowed
    if mask.shape[-1] != n_kv:
        raise ValueError(f"A 2-D padding mask of {mask.shape[-1]} columns for {n_kv} keys: lsg gates need a mask "
                         f"over every key (use the dynamic KV cache, not a static one).")
    return allowed & mask.bool()[:, None, None, :]


class _ConfigView:
    """A config that reports `implementation` as its attention implementation."""

    def __init__(self, config, implementation: str):
        self._config, self._attn_implementation = config, implementation

    def __getattr__(self, name):
        return getattr(self._config, name)


class _KernelModule:
    """An attention module as a base kernel sees it inside `attach`: its config reports the base
    implementation (transformers' `flash_attention_forward` picks its library by
    `module.config._attn_implementation`, which inside attach is the lsg one); every other
    attribute is the module's."""

    def __init__(self, module: torch.nn.Module, implementation: str):
        self._module, self.config = module, _ConfigView(module.config, implementation)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _run_kernel(name: str, module, query, key, value, mask, scaling, **kwargs) -> torch.Tensor:
    """Outputs `(B, T_q, H, d_head)` of the registered attention function `name`."""
    if name != SDPA:
        module = _KernelModule(module, name)
    return ALL_ATTENTION_FUNCTIONS[name](module, query, key, value, mask, scaling=scaling, **kwargs)[0]


def _kernel_rows(name: str, module, query, key, value, mask, scaling, lo: int, hi: int, **kwargs) -> torch.Tensor:
    """Outputs `(B, hi - lo, H, d_head)` of query rows `lo:hi` on kernel `name`.

    A padding-mask kernel gets the keys (and mask columns) up to the last of these rows, so its
    bottom-right-aligned causal mask lines up; its padded query rows are zero (as FlashAttention
    gives for a whole call). A 4-D-mask kernel gets these rows of the full boolean mask.
    """
    n_q, n_kv = query.shape[2], key.shape[2]
    if lo == 0 and hi == n_q:
        return _run_kernel(name, module, query, key, value, mask, scaling, **kwargs)
    if takes_padding_mask(name):
        cut = n_kv - n_q + hi
        out = _run_kernel(name, module, query[:, :, lo:hi], key[:, :, :cut], value[:, :, :cut],
                          None if mask is None else mask[:, :cut], scaling, **kwargs)
        if mask is None:
            return out
        real = mask[:, n_kv - n_q + lo:cut].bool()[:, :, None, None]
        return torch.where(real, out, torch.zeros((), dtype=out.dtype, device=out.device))
    rows_mask = full_mask(mask, n_q, n_kv, query.device, kwargs.get("sliding_window"))[:, :, lo:hi]
    return _run_kernel(name, module, query[:, :, lo:hi], key, value, rows_mask, scaling, **kwargs)


def _rows_with_row_keys(name: str, module, query, key, value, mask, scaling, lo, hi, row_scales, **kwargs):
    """Rows `lo:hi` on kernel `name` where each (key scale, rows) pair applies to its rows only.

    Rows are grouped by which scales apply to them; each group present runs one kernel call
    over the span of rows it occupies (a VAF gate: prefix rows unscaled, text rows scaled).
    """
    if not row_scales:
        return _kernel_rows(name, module, query, key, value, mask, scaling, lo, hi, **kwargs)
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
        part = _kernel_rows(name, module, query, key * scale[:, None, :, None].to(key.dtype), value, mask, scaling,
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
    gates: list[Gate] = (),
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
    the KV cache; `attention_mask` what the base's mask function built (4-D boolean for `lsg`,
    2-D padding or None for `lsg_padding`); returns `(B, T_q, H, d_head)` and the weights of
    the explicit rows (or None when every row ran on a kernel). The layer's `LayerKernel` says
    which kernel runs which rows (module docstring).

    Order of edits: keys (all rows), values, mask, then per-row keys, logits and
    weights, then per-head outputs.
    """
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_q, n_kv = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    binding: LayerBinding | None = getattr(module, BINDING_ATTR, None)
    if binding is None:  # an attention module attach did not bind: SDPA on the boolean mask
        causal = attention_mask is None and n_q in (1, n_kv)  # SDPA's own causal flag is right then
        mask = None if causal else full_mask(attention_mask, n_q, n_kv, query.device, window)
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    run, gates, plan = binding.run, binding.gates, binding.kernel
    if not gates:  # an ungated layer keeps the backbone's own kernel
        if plan.kernel == EXPLICIT:
            return explicit_attention(module, query, key, value, full_mask(attention_mask, n_q, n_kv, query.device,
                                                                           window), scaling)
        return _run_kernel(plan.kernel, module, query, key, value, attention_mask, scaling, dropout=dropout,
                           **kwargs), None
    if n_kv != run.ctx.total_len:  # gates index keys by position from 0
        raise RuntimeError(
            f"Decoder layer {binding.layer} attends over {n_kv} keys but the gate context holds "
            f"{run.ctx.total_len} positions: the KV cache drops or pads keys (a sliding-window or static cache). "
            f"Inside lsg.attach, let generate make its own cache (attach makes it keep every position) or pass "
            f"a DynamicCache() without a config.")
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
        mask = full_mask(mask, n_q, n_kv, query.device, window).expand(query.shape[0], 1, n_q, n_kv)
        for gate, state in zip(gates, states):
            if HookPoint.MASK in gate.hook_points:
                mask = gate.edit_mask(view, state, mask)
    row_scales = [rs for g, st in zip(gates, states)
                  if HookPoint.ROW_KEYS in g.hook_points and (rs := g.row_key_scale(view, st)) is not None]
    if plan.kernel == EXPLICIT:
        first = 0
    elif plan.matrix_rows:
        first = min(_first_row(g.matrix_rows(view, st)) for g, st in zip(gates, states) if g.hook_points & MATRIX_HOOKS)
    else:
        first = n_q
    parts, weights = [], None
    if first > 0:
        parts.append(_rows_with_row_keys(plan.kernel, module, query, key, value, mask, scaling, 0, first, row_scales,
                                         dropout=dropout, **kwargs))
    if first < n_q:
        rows_mask = full_mask(mask, n_q, n_kv, query.device, window)[:, :, first:]
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
AttentionInterface.register(PADDING_IMPLEMENTATION, lsg_attention_forward)
for _name, _mask in LSG_IMPLEMENTATIONS.items():
    AttentionMaskInterface.register(_name, _mask)
del _name, _mask
