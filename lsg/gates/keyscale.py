"""Fixed per-group key scales: the oracle sweep of docs/methods.md section 4."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lsg.context import GROUPINGS, LayerView, scale_by_group
from lsg.gates.base import AUTO_GROUPING, Gate, HookPoint, backbone_grouping, register


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
    spec_names = ("keyscale", "oracle")
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
    def build(cls, backbone, grouping: str = AUTO_GROUPING, **config) -> "KeyScaleGate":
        """The gate for a loaded backbone: `grouping="auto"` (conf/gate/keyscale.yaml) is the
        backbone's `default_grouping`."""
        return cls(grouping=backbone_grouping(grouping, backbone), **config)

    @classmethod
    def oracle(cls, alpha: float, grouping: str = "vsink-rest") -> "KeyScaleGate":
        """docs/methods.md section 4: first-group keys x alpha, the rest x (1 - alpha)."""
        return cls([alpha] + [1.0 - alpha] * (len(GROUPINGS[grouping]) - 1), grouping)

    @classmethod
    def from_spec(cls, spec_name: str, arg: str, backbone, config: dict) -> "KeyScaleGate":
        """`oracle@L:0.3` = the oracle of alpha 0.3 in the config's grouping (first group x 0.3,
        the rest x 0.7); `oracle@L:0.3/0.5/0.9` = one coefficient per group of the 3-group
        split (V-sinks / L-sinks / ordinary, the paper's stage 2) or of the config's grouping;
        `keyscale@L` = the config's coefficients (docs/methods.md section 4). The config's grouping "auto"
        is the backbone's `default_grouping`.

        Raises:
            ValueError: an oracle without alpha, not a number, or a coefficient list that fits
                no grouping.
        """
        grouping = backbone_grouping(config.get("grouping", AUTO_GROUPING), backbone)
        if not arg:
            if spec_name == "oracle":
                raise ValueError(f"{spec_name!r}: the oracle needs a layer and alpha, e.g. oracle@10:0.3")
            return cls.build(backbone, **config)
        try:
            values = [float(x) for x in arg.split("/")]
        except ValueError:
            raise ValueError(f"Bad oracle argument {arg!r}: give alpha (0.3) or per-group coefficients "
                             f"(0.3/0.5/0.9).") from None
        if len(values) == 1:
            return cls.oracle(values[0], grouping)
        if len(values) == len(GROUPINGS["vsink-lsink-ordinary"]):
            return cls(values, "vsink-lsink-ordinary")
        return cls(values, grouping)

    def config(self) -> dict[str, Any]:
        return {"coefficients": self.coefficients.tolist(), "grouping": self.grouping}

    def prepare(self, view: LayerView, hidden: torch.Tensor) -> torch.Tensor:
        return view.ctx.visual_groups(self.grouping, view.layer)

    def key_scale(self, view: LayerView, groups: torch.Tensor) -> torch.Tensor:
        return scale_by_group(groups, self.coefficients.to(groups.device), view.q_start + view.n_queries)
