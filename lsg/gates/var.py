"""VAR: Visual Attention Redistribution (Kang et al., ICLR 2025), docs/methods.md section 5."""

from __future__ import annotations

from typing import Any

import torch

from lsg.context import LayerView, fit_columns
from lsg.gates.base import Gate, HookPoint, register
from lsg.sinks import NORMALISATIONS, sink_value

READINGS = ("paper", "code")


def llm_sinks(view: LayerView, hidden: torch.Tensor, tau: float | None, normalisation: str | None) -> torch.Tensor:
    """Prompt tokens `(B, T)` with massive activation entering `view.layer`.

    `tau=None` uses the backbone's sink configuration (`ForwardContext.flagged`); otherwise
    `phi(x) >= tau` over the backbone's `llm_dims`, normalised by `normalisation` (None = the
    backbone's). Decoded / answer tokens are never sinks, so a teacher-forced or fully
    recomputed forward finds the same set as prefill + KV cache.

    Raises:
        ValueError: the backbone has no LLM sink dimensions configured.
    """
    cfg = view.ctx.sinks
    if tau is None:
        flagged = view.ctx.flagged(view.layer)
    else:
        if not cfg.llm_dims:
            raise ValueError("This gate needs LLM sink dimensions, but the backbone has none configured "
                             "(model.sinks.llm_dims): calibrate them (docs/methods.md section 7).")
        flagged = sink_value(hidden, cfg.llm_dims, normalisation or cfg.normalisation) >= tau
    flagged = flagged.to(view.segments.vis.device)
    return fit_columns(flagged, hidden.shape[1]) & fit_columns(view.segments.prompt, hidden.shape[1])


@register
class VARGate(Gate):
    """Recycle attention from sink tokens into the visual non-sink tokens of image-centric
    (head, query) pairs (Kang et al. 2025, Sec. 5; docs/methods.md section 5 "VAR").

    At the layer it is attached to (default layers 2..L-2: the last layer is skipped, Sec. 6.1):

    1. Sinks `S`: real prompt tokens, text and visual, with `phi(x_j) >= tau` entering the
       layer, found at prefill and kept for decoding (decoded tokens are never sinks).
    2. For each head h and query row i in `user`/`out`: `m_vis = sum_{j in vis} a_ij`,
       `r = sum_{j in vis \\ S} a_ij / m_vis` (paper Eq. 3). The pair is image-centric if
       `m_vis >= min_visual_mass` (Sec. 5.1: heads with visual mass < 0.2 are discarded) and
       `r >= rho`. (The paper edits every text row, Sec. 5.2; `sys` rows precede the image
       and have `m_vis = 0`, so this is the same set.)
    3. Image-centric pairs: `a_ij <- (1 - p) a_ij` for `j in S`; the budget
       `Omega = p * sum_{j in S} a_ij` is added to `j in vis \\ S` in proportion to `a_ij`
       (Sec. 5.2 and Eq. 4). Rows still sum to 1; every other pair is left bit-identical.

    Which sinks give up mass: all of `S`, text sinks (BOS, `.`, `\\n`) included, not only
    the visual sinks. The paper defines `Ǐ^l` as every token with `phi >= tau`, "visual
    and text tokens" (Sec. 4.1), uses the visual subset `Ǐ_vis^l` only in the ratio of
    Eq. 3 and in the receiving set of Eq. 4, and takes the budget over `j in Ǐ^l`
    (Sec. 5.2: `Omega = p * sum_{j in Ǐ} alpha_ij`). The released code agrees (it scales
    text and visual sinks alike).

    `reading="code"` reproduces the released code (MICV-yonsei/VisAttnSink, `HeadFork` and
    `VARProcessor.attn_redist`) instead:
    - selection: the visual *sink share* `1 - r = sum_{j in vis ∩ S} a_ij / m_vis` must be
      `<= rho` (so `rho` bounds the sink share; `rho_code = 1 - rho_paper` selects the same
      pairs up to ties), with `m_vis >= min_visual_mass`, and nothing is selected for a
      sample without any visual sink at this layer;
    - redistribution: sinks keep `p` of their weight (`a_ij <- p a_ij`) and the moved
      budget is `(1 - p) * sum_{j in S} a_ij`, i.e. `p` is the kept, not the moved, share.
    The code's `1e-6` smoothing of the sink share and its batch-size-1 index bookkeeping
    are not reproduced.

    Without a visual sink at the layer, `r = 1` (Eq. 3): every pair with enough visual mass
    is image-centric and the text sinks' budget goes to the image. A pair whose visual
    non-sink mass is zero is never selected (nothing would receive Omega).

    Args:
        p: share of the sink mass moved (paper; 0.6, Sec. 6.1), or kept (`reading="code"`).
        rho: image-centric threshold: 0.8 general VL (default), 0.5 hallucination, 0.9
            vision-centric (Sec. 6.1, App. B.2).
        min_visual_mass: minimum `m_vis` of a selected pair (0.2, Sec. 5.1).
        tau: sink threshold on `phi` (20 with rms normalisation, Sec. 4.1 / 6.1);
            None = the backbone's own sink config (`model.sinks`).
        normalisation: "rms" (VAR) or "raw"; used only when `tau` is given.
        reading: "paper" (docs/methods.md default) or "code".
    """

    name = "var"
    hook_points = frozenset({HookPoint.HIDDEN, HookPoint.WEIGHTS})

    def __init__(self, p: float = 0.6, rho: float = 0.8, min_visual_mass: float = 0.2, tau: float | None = 20.0,
                 normalisation: str = "rms", reading: str = "paper"):
        super().__init__()
        if reading not in READINGS:
            raise ValueError(f"Unknown VAR reading {reading!r}; known: {', '.join(READINGS)}.")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}.")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}.")
        self.p, self.rho, self.min_visual_mass = float(p), float(rho), float(min_visual_mass)
        self.tau = None if tau is None else float(tau)
        self.normalisation, self.reading = normalisation, reading

    @staticmethod
    def default_layers(num_layers: int) -> list[int]:
        """Layers 2..L-2: from where massive activations emerge (App. A.2) to the
        penultimate layer (the last layer is skipped, Sec. 6.1 / docs/methods.md)."""
        return list(range(2, num_layers - 1))

    def config(self) -> dict[str, Any]:
        return {"p": self.p, "rho": self.rho, "min_visual_mass": self.min_visual_mass, "tau": self.tau,
                "normalisation": self.normalisation, "reading": self.reading}

    def prepare(self, view: LayerView, hidden: torch.Tensor) -> torch.Tensor:
        """Sinks `S` `(B, T_prefill)`."""
        return llm_sinks(view, hidden, self.tau, self.normalisation)

    def matrix_rows(self, view: LayerView, sinks: torch.Tensor) -> torch.Tensor:
        seg = view.segments
        return (seg.user | seg.out)[:, view.query_slice]

    def masses(self, view: LayerView, sinks: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attention mass `(B, H, T_q)` of each query row on vis, vis ∩ S, vis \\ S and S, in float32.

        Column sums are matrix products with the `(B, 1, T_kv, 1)` masks, so no
        weight-sized temporary is made."""
        n_kv = weights.shape[-1]
        vis = fit_columns(view.segments.vis, n_kv)
        sink = fit_columns(sinks, n_kv).to(vis.device)
        cols = {"vis": vis, "vis_sink": vis & sink, "vis_rest": vis & ~sink, "sink": sink}
        a = weights.float()
        return {k: (a @ m[:, None, :, None].float()).squeeze(-1) for k, m in cols.items()}

    def selected(self, view: LayerView, sinks: torch.Tensor, weights: torch.Tensor,
                 masses: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Image-centric pairs `(B, H, T_q)` of `weights` `(B, H, T_q, T_kv)`."""
        m = masses if masses is not None else self.masses(view, sinks, weights)
        m_vis = m["vis"].clamp_min(torch.finfo(torch.float32).tiny)
        rows = self.matrix_rows(view, sinks)[:, None, :]
        ok = rows & (m["vis"] >= self.min_visual_mass) & (m["vis"] > 0) & (m["vis_rest"] > 0)
        if self.reading == "paper":
            return ok & (m["vis_rest"] / m_vis >= self.rho)  # Eq. 3: r >= rho
        n_kv = weights.shape[-1]
        has_vis_sink = (fit_columns(view.segments.vis, n_kv) & fit_columns(sinks, n_kv)).any(1)[:, None, None]
        return ok & has_vis_sink & (m["vis_sink"] / m_vis <= self.rho)  # code: sink share <= rho

    def edit_weights(self, view: LayerView, sinks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n_kv = weights.shape[-1]
        m = self.masses(view, sinks, weights)
        moved = self.p if self.reading == "paper" else 1.0 - self.p
        omega = moved * m["sink"]  # (B, H, T_q)
        gain = omega / m["vis_rest"].clamp_min(torch.finfo(torch.float32).tiny)  # Eq. 4, on vis minus S
        sink = fit_columns(sinks, n_kv).to(weights.device)[:, None, None, :].float()
        rest = fit_columns(view.segments.vis, n_kv)[:, None, None, :].float() * (1.0 - sink)
        factor = 1.0 - moved * sink + rest * gain[..., None]  # (B, H, T_q, T_kv)
        chosen = self.selected(view, sinks, weights, m)[..., None]
        return torch.where(chosen, (weights.float() * factor).to(weights.dtype), weights)
