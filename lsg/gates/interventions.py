"""Causal interventions on sink tokens (docs/methods.md section 5, from SPEAR section 4): key knockout,
zeroed sink values, mean-value substitution. Analysis tools, not methods: no default layers.

Token sets (`keys=` / `tokens=`), all restricted to real prompt tokens (sys, vis, user) and,
except V-sinks, found from the hidden state entering the layer by the backbone's sink config
(`model.sinks`, `ForwardContext.flagged`):

- "sinks": every flagged token, text and visual;
- "text_sinks": flagged sys and user tokens;
- "sys_sinks": flagged sys tokens (SPEAR's sink tokens: BOS and the first `.` of the system prompt);
- "visual_sinks": flagged visual tokens (VAR's visual sink tokens, Kang et al. App. D.3 Eq. 7);
- "vsinks": V-sinks (from the ViT; fixed over layers, docs/methods.md section 2);
- "lsinks": L-sinks (flagged visual tokens that are not V-sinks).

Decoded / answer tokens are never in a set, so a teacher-forced forward or a full recompute
sees the same sets as prefill + KV cache.
"""

from __future__ import annotations

from typing import Any

import torch

from lsg.context import LayerView, fit_columns
from lsg.gates.base import Gate, HookPoint, register

TOKEN_SETS = ("sinks", "text_sinks", "sys_sinks", "visual_sinks", "vsinks", "lsinks")
QUERY_SETS = ("user_out", "text", "all")


def token_set(view: LayerView, which: str) -> torch.Tensor:
    """Tokens `(B, T_total)` of a named set at `view.layer` (see the module docstring)."""
    ctx, seg = view.ctx, view.segments
    if which == "vsinks":
        found = ctx.require_vsinks() & seg.vis
    elif which == "lsinks":
        found = ctx.lsinks(view.layer)
    else:
        flagged = ctx.flagged(view.layer).to(seg.vis.device)
        found = flagged & {"sinks": view.segments.prompt, "text_sinks": seg.sys | seg.user, "sys_sinks": seg.sys,
                           "visual_sinks": seg.vis}[which]
    return found & view.segments.prompt


def query_set(view: LayerView, which: str) -> torch.Tensor:
    """Query rows `(B, T_total)`: "user_out" (SPEAR 4.1: `user` and `out`), "text" (sys, user,
    out: VAR App. D.3 Eq. 7) or "all" (every real token)."""
    seg = view.segments
    return {"user_out": seg.user | seg.out, "text": seg.sys | seg.user | seg.out,
            "all": seg.sys | seg.vis | seg.user | seg.out}[which]


def _check(which: str, known: tuple[str, ...], what: str) -> str:
    if which not in known:
        raise ValueError(f"Unknown {what} {which!r}; known: {', '.join(known)}.")
    return which


class _Intervention(Gate):
    """Shared: the token set is found at prefill; no default layers."""

    tokens: str

    def __init__(self, tokens: str = "sinks", kind: str = "token set"):
        super().__init__()
        self.tokens = _check(tokens, TOKEN_SETS, kind)

    def config(self) -> dict[str, Any]:
        return {"tokens": self.tokens}

    def prepare(self, view: LayerView, hidden: torch.Tensor) -> torch.Tensor:
        """Chosen tokens `(B, T_prefill)`."""
        return token_set(view, self.tokens)

    @staticmethod
    def default_layers(num_layers: int) -> list[int]:
        raise ValueError("Sink interventions are analysis tools with no default layers: choose the layers "
                         "(e.g. one layer at a time, or every layer from where the sinks emerge).")


@register
class KeyKnockoutGate(_Intervention):
    """Attention knockout: the chosen query rows cannot attend to the chosen keys
    (SPEAR section 4.1: keys = sink tokens, queries = `user` and `out`; VAR App. D.3 Eq. 7:
    keys = visual sinks, queries = text).

    A row that would be left with no attendable key (e.g. BOS knocked out for BOS's own
    row with `queries="all"`) keeps its original mask: the knockout is skipped for that row,
    since a fully masked softmax row is undefined.

    Args:
        keys: token set knocked out (module docstring; default "sinks").
        queries: "user_out" (default, SPEAR 4.1), "text" or "all".
    """

    name = "knockout"
    hook_points = frozenset({HookPoint.MASK})

    def __init__(self, keys: str = "sinks", queries: str = "user_out"):
        super().__init__(keys, kind="key set")
        self.queries = _check(queries, QUERY_SETS, "query set")

    def config(self) -> dict[str, Any]:
        return {"keys": self.tokens, "queries": self.queries}

    def edit_mask(self, view: LayerView, chosen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n_kv = mask.shape[-1]
        rows = query_set(view, self.queries)[:, view.query_slice]  # (B, T_q)
        keys = fit_columns(chosen, n_kv)  # (B, T_kv)
        knocked = mask & ~(rows[:, None, :, None] & keys[:, None, None, :])
        return torch.where(knocked.any(-1, keepdim=True), knocked, mask)


@register
class ZeroValueGate(_Intervention):
    """`V` of the chosen tokens set to zero for every query; attention weights unchanged
    (SPEAR section 4.2).

    Args:
        tokens: token set (module docstring; default "sinks").
    """

    name = "zero-v"
    hook_points = frozenset({HookPoint.VALUES})

    def edit_values(self, view: LayerView, chosen: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        keep = ~fit_columns(chosen, value.shape[2])
        return value * keep[:, None, :, None].to(value.dtype)


@register
class MeanValueGate(_Intervention):
    """`V` of the chosen tokens replaced, per sample and KV head, by the mean `V` of the
    other real prompt tokens; attention weights unchanged (SPEAR section 4.3, "population
    mean computed from non-sink tokens").

    The population is the prompt (sys, vis, user) minus the chosen set, so decoded tokens
    never enter it and generation with the KV cache equals a full recompute. The mean is
    over the whole prompt, so a replaced early sink carries the mean of later prompt tokens
    to the rows before them: the substitution is deliberately not causal within the prompt.
    A sample with no other prompt token keeps its values.

    Args:
        tokens: token set (module docstring; default "sinks").
    """

    name = "mean-v"
    hook_points = frozenset({HookPoint.VALUES})

    def edit_values(self, view: LayerView, chosen: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        n_kv = value.shape[2]
        chosen = fit_columns(chosen, n_kv)
        population = fit_columns(view.segments.prompt, n_kv) & ~chosen  # (B, T_kv)
        count = population.sum(1)  # (B,)
        mean = torch.einsum("bt,bhtd->bhd", population.to(value.dtype), value)
        mean = mean / count.clamp_min(1).to(value.dtype)[:, None, None]  # (B, H_kv, d_head)
        replace = chosen & (count > 0)[:, None]
        return torch.where(replace[:, None, :, None], mean[:, :, None, :], value)
