"""Fixed per-group key scales: the oracle sweep of SPEC section 4."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lsg.context import GROUPINGS, LayerView, scale_by_group
from lsg.gates.base import Gate, HookPoint, register


@register
class KeyScaleGate(Gate):
    """Visual key j of group g is multiplied by `coefficients[g]`; text keys untouched.

    Args:
        coefficients: one scale per group of `grouping` (e.g. `(alpha, 1 - alpha)`).
        grouping: see `lsg.context.GROUPINGS`.

    Raises:
        ValueError: the number of coefficients differs from the number of groups.
    """

    name = "keyscale"
    hook_points = frozenset({HookPoint.KEYS})

    def __init__(self, coefficients: Sequence[float], grouping: str = "vsink-rest"):
        super().__init__()
        if grouping not in GROUPINGS:
            raise ValueError(f"Unknown grouping {grouping!r}; known: {', '.join(GROUPINGS)}.")
        if len(coefficients) != len(GROUPINGS[grouping]):
            raise ValueError(f"grouping {grouping!r} has groups {GROUPINGS[grouping]}: give "
                             f"{len(GROUPINGS[grouping])} coefficients, got {list(coefficients)}.")
        self.grouping = grouping
        self.register_buffer("coefficients", torch.tensor([float(c) for c in coefficients]))

    @classmethod
    def oracle(cls, alpha: float, grouping: str = "vsink-rest") -> "KeyScaleGate":
        """SPEC section 4: first-group keys x alpha, the rest x (1 - alpha)."""
        return cls([alpha] + [1.0 - alpha] * (len(GROUPINGS[grouping]) - 1), grouping)

    def config(self) -> dict[str, Any]:
        return {"coefficients": self.coefficients.tolist(), "grouping": self.grouping}

    def prepare(self, view: LayerView, hidden: torch.Tensor) -> torch.Tensor:
        return view.ctx.visual_groups(self.grouping, view.layer)

    def key_scale(self, view: LayerView, groups: torch.Tensor) -> torch.Tensor:
        return scale_by_group(groups, self.coefficients.to(groups.device), view.q_start + view.n_queries)
