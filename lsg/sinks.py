"""Sink dimensions, sink values and the V-sink / L-sink / text-sink sets (docs/methods.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

NORMALISATIONS = ("raw", "rms")
SCOPES = ("layer", "upto")


@dataclass
class SinkConfig:
    """How sinks are found on one backbone. Every field is a Hydra config value.

    Attributes:
        vit_dims: ViT sink dimensions (e.g. CLIP-L/14-336: [650]); empty = none known.
        llm_dims: LLM sink dimensions (e.g. LLaMA-2-7B: [1415, 2533]).
        tau_vit: V-sink threshold on `phi` of the ViT feature-layer hidden state.
        tau_llm: L-sink / text-sink threshold on `phi(x^l)`; one float for every layer,
            or a list with one value per decoder layer.
        normalisation: "raw" (`max |x[d]|`, as LSG) or "rms" (`max |x[d]| / rms(x)`, as VAR).
        lsink_scope: "layer" (flagged at layer l itself) or "upto" (flagged at any layer <= l).
    """

    vit_dims: list[int] = field(default_factory=list)
    llm_dims: list[int] = field(default_factory=list)
    tau_vit: float | None = None
    tau_llm: float | list[float] | None = None
    normalisation: str = "raw"
    lsink_scope: str = "layer"

    def __post_init__(self):
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"sinks.normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}.")
        if self.lsink_scope not in SCOPES:
            raise ValueError(f"sinks.lsink_scope must be one of {SCOPES}, got {self.lsink_scope!r}.")
        self.vit_dims, self.llm_dims = list(self.vit_dims), list(self.llm_dims)
        if not isinstance(self.tau_llm, (int, float, type(None))):
            self.tau_llm = [float(t) for t in self.tau_llm]

    @property
    def has_vsinks(self) -> bool:
        return bool(self.vit_dims) and self.tau_vit is not None

    @property
    def has_llm_sinks(self) -> bool:
        return bool(self.llm_dims) and self.tau_llm is not None

    def tau_at(self, layer: int) -> float:
        """L-sink threshold at decoder layer `layer`."""
        if self.tau_llm is None:
            raise ValueError("sinks.tau_llm is not set: calibrate it for this backbone (docs/methods.md section 7).")
        return self.tau_llm[layer] if isinstance(self.tau_llm, list) else float(self.tau_llm)

    def to_dict(self) -> dict:
        return {"vit_dims": self.vit_dims, "llm_dims": self.llm_dims, "tau_vit": self.tau_vit,
                "tau_llm": self.tau_llm, "normalisation": self.normalisation, "lsink_scope": self.lsink_scope}


def sink_value(hidden: torch.Tensor, dims: Sequence[int], normalisation: str = "raw") -> torch.Tensor:
    """`phi(x) = max_{d in dims} |x[d]|`, optionally divided by `rms(x)` (docs/methods.md section 2).

    Args:
        hidden: `(..., D)` hidden states.
        dims: sink dimensions, each in `[0, D)`.
        normalisation: "raw" or "rms".

    Returns:
        `(...)` float32 sink values (raw activation units, or multiples of the RMS).

    Raises:
        ValueError: no dims, a dim out of range, or an unknown normalisation.
    """
    if not dims:
        raise ValueError("sink_value needs at least one sink dimension.")
    if max(dims) >= hidden.shape[-1] or min(dims) < 0:
        raise ValueError(f"sink dims {list(dims)} out of range for hidden size {hidden.shape[-1]}.")
    x = hidden.detach().float()
    phi = x[..., list(dims)].abs().amax(-1)
    if normalisation == "rms":
        return phi / x.pow(2).mean(-1).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    if normalisation != "raw":
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}.")
    return phi
