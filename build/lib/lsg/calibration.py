"""Sink calibration and statistics for a backbone (SPEC section 7).

- Massive-activation dimensions (Sun et al. 2024): (token, dim) with `|x| > min_abs` and
  `|x| > ratio * median |x|` of that hidden state; dims flagged in most middle layers.
- Per layer: the sink value `phi` of visual tokens (bulk vs outliers), how many visual
  tokens each threshold flags, text sinks, and the share of the last prompt token's
  visual attention that flagged tokens take.
- A suggested threshold per layer: the middle (in log space) of the widest gap between
  the bulk of visual `phi` values and the top few percent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from lsg.backbones import Backbone
from lsg.segments import Segments
from lsg.sinks import sink_value


@dataclass
class LayerStats:
    layer: int
    vis_phi_median: float
    vis_phi_p99: float
    vis_phi_max: float
    flagged_per_image: float  # visual tokens with phi >= tau (mean per image)
    flagged_any_upto_per_image: float  # flagged at any layer <= this one
    text_sinks_per_sample: float
    flagged_attention_share: float  # of the last prompt token's visual attention, mean over heads/samples
    suggested_tau: float | None


@dataclass
class CalibrationReport:
    massive_dims: list[tuple[int, int]]  # (dim, number of layers where it was flagged)
    massive_positions: dict[int, int]  # position -> count, for the top dim
    vit_norm_ratio_max: float  # largest patch norm / median patch norm at the ViT feature layer, per batch
    vit_massive_dims: list[tuple[int, int]]
    layers: list[LayerStats] = field(default_factory=list)
    vis_phi: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> every visual token's phi (Figure S2)


def massive_dims(hidden: torch.Tensor, real: torch.Tensor, min_abs: float, ratio: float) -> Counter:
    """Dims with some real token where `|x| > min_abs` and `|x| > ratio * median|x|` of its state.

    Args:
        hidden: `(B, T, D)`; real: `(B, T)` bool mask of non-padding tokens.
    """
    x = hidden.detach().float().abs()
    median = x.median(dim=-1, keepdim=True).values
    hit = (x > min_abs) & (x > ratio * median) & real[..., None]
    return Counter(hit.any(0).any(0).nonzero().flatten().tolist())


def suggest_threshold(values: torch.Tensor, top_fraction: float = 0.05) -> float | None:
    """Middle (geometric) of the widest log-gap among the top `top_fraction` of values, or None."""
    v = values.float().clamp_min(1e-6).sort().values
    start = int(len(v) * (1 - top_fraction))
    if len(v) < 2 or start >= len(v) - 1:
        return None
    logs = v[max(start - 1, 0):].log()
    gaps = logs[1:] - logs[:-1]
    i = int(gaps.argmax())
    return float((logs[i] + logs[i + 1]).div(2).exp())


@torch.no_grad()
def calibrate(backbone: Backbone, batches: list[dict], tau: float | None = None, min_abs: float = 100.0,
              ratio: float = 1000.0, top_fraction: float = 0.05) -> CalibrationReport:
    """Measure sinks on `batches` (prompt-only model inputs). `tau` defaults to the backbone's
    `sinks.tau_llm`; dims default to the backbone's `sinks.llm_dims`, else the top massive dim.

    The backbone must use eager attention for the attention-share statistic
    (`load_backbone(name, attn_implementation="eager")`).
    """
    model, cfg = backbone.model, backbone.sinks
    num_layers = backbone.num_layers
    dims_by_layer: list[set[int]] = [set() for _ in range(num_layers)]
    vit_dims: Counter = Counter()
    positions: Counter = Counter()
    per_layer = [{"phi": [], "flag": 0, "upto": 0, "text": 0, "share": [], "n_img": 0, "n": 0}
                 for _ in range(num_layers)]
    vit_ratio = 0.0
    dims = cfg.llm_dims
    collected = []
    for batch in batches:
        seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], backbone.image_token_id)  # host
        batch = backbone.on_device(batch)
        captured = []  # the ViT features the projector reads, (N_patches, D), via the family adapter
        vit = backbone.family.vit_module(model)
        handle = vit.register_forward_hook(
            lambda module, args, kwargs, output: captured.append(
                backbone.family.vit_features(model, args, kwargs, output).float()), with_kwargs=True)
        try:
            out = model(**batch, output_hidden_states=True, output_attentions=True)
        finally:
            handle.remove()
        real = batch["attention_mask"].bool()
        for layer in range(num_layers):
            dims_by_layer[layer] |= set(massive_dims(out.hidden_states[layer], real, min_abs, ratio))
        feats = torch.cat(captured)[None]  # (1, N_patches of the batch, D)
        norms = feats.norm(dim=-1)
        vit_ratio = max(vit_ratio, float((norms.amax(1) / norms.median(1).values).max()))
        vit_dims.update(massive_dims(feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device), min_abs, ratio).keys())
        # the second pass reads every layer of every batch: keep it in host memory, not on the GPU
        out.hidden_states = tuple(h.cpu() for h in out.hidden_states)
        out.attentions = tuple(a.cpu() for a in out.attentions)
        collected.append((out, seg, real.cpu()))
    dim_layers = Counter(d for found in dims_by_layer for d in found)  # dim -> layers where flagged
    if not dims:
        dims = [dim_layers.most_common(1)[0][0]] if dim_layers else []
    tau = tau if tau is not None else (cfg.tau_at(0) if cfg.tau_llm is not None else None)
    for out, seg, real in collected:
        upto = torch.zeros_like(seg.vis)
        rows = torch.arange(seg.vis.shape[0], device=seg.vis.device)
        for layer in range(num_layers):
            x = out.hidden_states[layer]
            if dims:
                phi = sink_value(x, dims, cfg.normalisation)
                if layer == num_layers // 2:
                    top = x[..., dims[0]].abs().masked_fill(~real, 0).argmax(1)
                    positions.update(top.tolist())
                s = per_layer[layer]
                s["phi"].append(phi[seg.vis])
                s["n_img"] += seg.vis.shape[0]
                if tau is not None:
                    layer_tau = cfg.tau_at(layer) if cfg.tau_llm is not None else tau
                    flag = (phi >= layer_tau) & seg.vis
                    upto |= flag
                    s["flag"] += int(flag.sum())
                    s["upto"] += int(upto.sum())
                    s["text"] += int(((phi >= layer_tau) & seg.text).sum())
                    attn = out.attentions[layer][rows, :, seg.last_prompt].float()  # (B, H, T)
                    vis_mass = (attn * seg.vis[:, None]).sum(-1).clamp_min(1e-12)
                    s["share"].append(((attn * flag[:, None]).sum(-1) / vis_mass).mean(1))
    layers, vis_phi = [], {}
    for layer, s in enumerate(per_layer):
        if not s["phi"]:
            continue
        phi = vis_phi[layer] = torch.cat(s["phi"]).float().cpu()
        n = max(s["n_img"], 1)
        layers.append(LayerStats(
            layer, float(phi.median()), float(phi.quantile(0.99)), float(phi.max()), s["flag"] / n, s["upto"] / n,
            s["text"] / n, float(torch.cat(s["share"]).mean()) if s["share"] else float("nan"),
            suggest_threshold(phi, top_fraction)))
    return CalibrationReport(dim_layers.most_common(8), dict(positions.most_common(5)), vit_ratio,
                             vit_dims.most_common(8), layers, vis_phi)


def plot_report(report: CalibrationReport, out_dir, title: str = "") -> tuple:
    """Figure S2 as two PNGs in `out_dir`: `sink-histograms.png` (per layer, the histogram of
    log10 phi of visual tokens with the suggested threshold) and `sink-counts.png` (visual
    tokens flagged per image at each layer and at any layer up to it). Returns the two paths."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {s.layer: s for s in report.layers}
    layers = sorted(report.vis_phi)
    cols = min(6, max(1, len(layers)))
    rows = -(-len(layers) // cols) if layers else 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        ax.hist(report.vis_phi[layer].clamp_min(1e-6).log10().numpy(), bins=40, color="tab:blue")
        ax.set_yscale("log")
        tau = stats[layer].suggested_tau
        if tau:
            ax.axvline(torch.tensor(tau).log10().item(), color="tab:red", lw=1)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{title} log10 sink value of visual tokens (red: suggested threshold)", fontsize=9)
    fig.tight_layout()
    hist_path = out_dir / "sink-histograms.png"
    fig.savefig(hist_path, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([s.layer for s in report.layers], [s.flagged_per_image for s in report.layers], "o-", label="at layer")
    ax.plot([s.layer for s in report.layers], [s.flagged_any_upto_per_image for s in report.layers], "s--",
            label="at any layer <= l")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("flagged visual tokens / image")
    ax.set_title(f"{title} L-sink candidates per layer", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    count_path = out_dir / "sink-counts.png"
    fig.savefig(count_path, dpi=110)
    plt.close(fig)
    return hist_path, count_path
