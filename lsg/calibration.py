"""Sink calibration and statistics for a backbone (docs/methods.md section 7).

- Massive-activation dimensions (Sun et al. 2024): (token, dim) with `|x| > min_abs` and
  `|x| > ratio * median |x|` of that hidden state; dims flagged in most middle layers.
- Per layer: the sink value `phi` of visual tokens (bulk vs outliers), how many visual
  tokens each threshold flags, text sinks, and the share of the last prompt token's
  visual attention that flagged tokens take.
- A suggested threshold per layer: the middle (in log space) of the widest gap between
  the bulk of visual `phi` values and the top few percent.

Batches are streamed: each batch's hidden states and attention maps are reduced to running
counts, sums, maxima and a fixed-bin histogram of `phi` (`PhiHistogram`) and dropped before
the next batch, so memory does not grow with the number of prompts.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

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


@dataclass(eq=False)
class PhiHistogram:
    """Streamed histogram of sink values `phi` in fixed log10 bins, with each bin's exact min and max.

    `bins_per_decade` bins per decade span `[10**log10_min, 10**log10_max)`; values below
    (0 included) count in the first bin, values above in the last. State: three `(n_bins,)`
    tensors, whatever the number of values.

    Precision, against the same statistic of all values sorted:
    - `n` and `max` are exact.
    - `order_statistic` (so `median`, `quantile`) lies within its bin's `[min, max]`: relative error
      below `10**(1/bins_per_decade) - 1` (0.23% at 1000 bins per decade) inside the range, exact
      for a bin's smallest and largest value.
    - `suggest_threshold` is exact whenever the widest gap among the top values lies between two
      bins, which it surely does when it is wider than one bin (a factor `10**(1/bins_per_decade)`);
      otherwise no gap is that wide and it returns a point of the widest gap between bins.
    """

    log10_min: float
    log10_max: float
    bins_per_decade: int
    counts: torch.Tensor  # (n_bins,) int64
    lo: torch.Tensor  # (n_bins,) float64, smallest value in the bin (+inf when empty)
    hi: torch.Tensor  # (n_bins,) float64, largest value in the bin (-inf when empty)

    @classmethod
    def empty(cls, log10_range: Sequence[float], bins_per_decade: int) -> "PhiHistogram":
        """An empty histogram over `log10_range = (log10_min, log10_max)`.

        Raises:
            ValueError: `bins_per_decade < 1` or an empty range.
        """
        log10_min, log10_max = (float(v) for v in log10_range)
        if int(bins_per_decade) != bins_per_decade or bins_per_decade < 1 or not log10_min < log10_max:
            raise ValueError(f"phi histogram needs an integer bins_per_decade >= 1 and log10_min < log10_max, got "
                             f"{bins_per_decade} and {list(log10_range)}.")
        n_bins = math.ceil((log10_max - log10_min) * bins_per_decade)
        return cls(log10_min, log10_max, int(bins_per_decade), torch.zeros(n_bins, dtype=torch.long),
                   torch.full((n_bins,), math.inf, dtype=torch.float64),
                   torch.full((n_bins,), -math.inf, dtype=torch.float64))

    def add(self, phi: torch.Tensor) -> None:
        """Count the values of `phi` (any shape, any device; non-negative sink values).

        Raises:
            ValueError: `phi` holds NaN.
        """
        v = phi.detach().flatten().to("cpu", torch.float64)
        if v.isnan().any():
            raise ValueError("phi holds NaN: the backbone's hidden states overflowed (try float32 or bfloat16).")
        b = ((v.log10() - self.log10_min) * self.bins_per_decade).floor().clamp(0, len(self.counts) - 1).long()
        self.counts += torch.bincount(b, minlength=len(self.counts))
        self.lo.scatter_reduce_(0, b, v, "amin")
        self.hi.scatter_reduce_(0, b, v, "amax")

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def max(self) -> float:
        return float(self.hi.max()) if self.n else math.nan

    def order_statistic(self, k: int) -> float:
        """The `k`-th smallest value (0-based), interpolated by rank between its bin's min and max."""
        cum = self.counts.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor(k), right=True))
        count, before = int(self.counts[b]), int(cum[b]) - int(self.counts[b])
        lo, hi = float(self.lo[b]), float(self.hi[b])
        return lo if count == 1 else lo + (hi - lo) * (k - before) / (count - 1)

    def median(self) -> float:
        """The lower median, as `torch.median` (NaN when empty)."""
        return self.order_statistic((self.n - 1) // 2) if self.n else math.nan

    def quantile(self, q: float) -> float:
        """The `q`-quantile with linear interpolation, as `torch.quantile` (NaN when empty)."""
        if not self.n:
            return math.nan
        pos = q * (self.n - 1)
        k = math.floor(pos)
        low = self.order_statistic(k)
        return low if k + 1 >= self.n else low + (pos - k) * (self.order_statistic(k + 1) - low)

    def suggest_threshold(self, top_fraction: float) -> float | None:
        """Middle (geometric) of the widest log-gap among the top `top_fraction` of values (and the
        value just below them), or None when fewer than two values are in that range. Values below
        `10**log10_min` count as `10**log10_min`."""
        n = self.n
        start = int(n * (1 - top_fraction))
        if n < 2 or start >= n - 1:
            return None
        first = max(start - 1, 0)  # rank of the lowest value of the search
        cum = self.counts.cumsum(0)
        b0 = int(torch.searchsorted(cum, torch.tensor(first), right=True))
        bins = b0 + self.counts[b0:].nonzero().flatten()
        floor = 10.0 ** self.log10_min
        lo, hi = self.lo[bins].clamp_min(floor), self.hi[bins].clamp_min(floor)
        if len(bins) == 1:  # every searched value in one bin: no gap wider than a bin
            return float((lo[0] * hi[0]).sqrt())
        gaps = lo[1:].log() - hi[:-1].log()  # exact: between the largest of a bin and the smallest of the next
        i = int(gaps.argmax())
        return float((hi[i] * lo[i + 1]).sqrt())

    def log10_bins(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(log10 bin centres, counts)` of the non-empty bins, for plotting."""
        full = self.counts.nonzero().flatten()
        return self.log10_min + (full.double() + 0.5) / self.bins_per_decade, self.counts[full]


@dataclass
class CalibrationReport:
    massive_dims: list[tuple[int, int]]  # (dim, number of layers where it was flagged)
    massive_positions: dict[int, int]  # position -> count, for the top dim
    vit_norm_ratio_max: float  # largest patch norm / median patch norm at the ViT feature layer, per batch
    vit_massive_dims: list[tuple[int, int]]
    layers: list[LayerStats] = field(default_factory=list)
    vis_phi_hist: dict[int, PhiHistogram] = field(default_factory=dict)  # layer -> histogram of visual phi (Figure S2)


def massive_dims(hidden: torch.Tensor, real: torch.Tensor, min_abs: float, ratio: float) -> Counter:
    """Dims with some real token where `|x| > min_abs` and `|x| > ratio * median|x|` of its state.

    Args:
        hidden: `(B, T, D)`; real: `(B, T)` bool mask of non-padding tokens.
    """
    x = hidden.detach().float().abs()
    median = x.median(dim=-1, keepdim=True).values
    hit = (x > min_abs) & (x > ratio * median) & real[..., None]
    return Counter(hit.any(0).any(0).nonzero().flatten().tolist())


@dataclass
class _Census:
    """Running massive-dimension census over batches: which dims each decoder layer's input
    flags, which dims the ViT feature layer flags, and the largest ViT norm ratio of a batch."""

    dims_by_layer: list[set[int]]
    vit_dims: Counter = field(default_factory=Counter)
    vit_norm_ratio_max: float = 0.0


@dataclass
class _LayerTotals:
    """Running sums of one layer's sink statistics over batches."""

    phi: PhiHistogram  # visual tokens' phi
    n_img: int = 0
    flagged: int = 0
    flagged_upto: int = 0
    text_sinks: int = 0
    share_sum: float = 0.0  # sum over samples of the flagged share of visual attention (mean over heads)
    share_n: int = 0


def _forward(backbone: Backbone, batch: dict, attentions: bool, vit_features: bool):
    """`(model output, ViT features (N_patches, D_vit) or None)` of one prompt-only batch on the backbone's
    device; the output's `hidden_states[l]` is the hidden state entering decoder layer l as the gates read it
    (`Backbone.layer_inputs`: with Qwen3-VL's DeepStack additions, which transformers' own lack)."""
    model, family = backbone.model, backbone.family
    captured = []  # the ViT features the projector reads, (N_patches, D), via the family adapter
    handle = family.vit_module(model).register_forward_hook(
        lambda module, args, kwargs, output: captured.append(family.vit_features(model, args, kwargs, output).float()),
        with_kwargs=True) if vit_features else None
    try:
        with backbone.layer_inputs() as entering:
            out = model(**batch, output_attentions=attentions)
    finally:
        if handle is not None:
            handle.remove()
    out.hidden_states = tuple(entering[layer] for layer in range(backbone.num_layers))
    return out, (torch.cat(captured) if vit_features else None)


def _count_massive(census: _Census, hidden_states, feats: torch.Tensor, real: torch.Tensor, min_abs: float,
                   ratio: float) -> None:
    """Add one batch to `census`: `hidden_states[l]` `(B, T, D)` is decoder layer l's input, `real`
    `(B, T)` marks non-padding tokens, `feats` `(N_patches, D_vit)` are the batch's ViT features."""
    for layer, found in enumerate(census.dims_by_layer):
        found |= set(massive_dims(hidden_states[layer], real, min_abs, ratio))
    norms = feats.norm(dim=-1)
    census.vit_norm_ratio_max = max(census.vit_norm_ratio_max, float(norms.amax() / norms.median()))
    census.vit_dims.update(massive_dims(feats[None], torch.ones(1, len(feats), dtype=torch.bool, device=feats.device),
                                        min_abs, ratio).keys())


def _add_sink_stats(totals: list[_LayerTotals], positions: Counter, out, seg: Segments, real: torch.Tensor,
                    dims: list[int], normalisation: str, taus: list[float] | None) -> None:
    """Add one batch's per-layer sink statistics at `dims` to `totals`, and the positions of the
    top dim's largest `|x|` at the middle layer to `positions`."""
    upto = torch.zeros_like(seg.vis)
    rows = torch.arange(seg.vis.shape[0], device=seg.vis.device)
    for layer, t in enumerate(totals):
        x = out.hidden_states[layer]
        phi = sink_value(x, dims, normalisation)  # (B, T)
        if layer == len(totals) // 2:
            positions.update(x[..., dims[0]].abs().masked_fill(~real, 0).argmax(1).tolist())
        t.phi.add(phi[seg.vis])
        t.n_img += seg.vis.shape[0]
        if taus is None:
            continue
        flag = (phi >= taus[layer]) & seg.vis
        upto |= flag
        t.flagged += int(flag.sum())
        t.flagged_upto += int(upto.sum())
        t.text_sinks += int(((phi >= taus[layer]) & seg.text).sum())
        attn = out.attentions[layer][rows, :, seg.last_prompt].float()  # (B, H, T)
        vis_mass = (attn * seg.vis[:, None]).sum(-1).clamp_min(1e-12)
        share = ((attn * flag[:, None]).sum(-1) / vis_mass).mean(1)  # (B,)
        t.share_sum += float(share.double().sum())
        t.share_n += len(share)


@torch.no_grad()
def calibrate(backbone: Backbone, batches: Iterable[dict], tau: float | None = None, min_abs: float = 100.0,
              ratio: float = 1000.0, top_fraction: float = 0.05, phi_bins_per_decade: int = 1000,
              phi_log10_range: Sequence[float] = (-6.0, 6.0)) -> CalibrationReport:
    """Measure sinks on `batches`, streamed: one batch's hidden states and attention maps at a time.

    Args:
        backbone: loaded with eager attention for the attention-share statistic
            (`load_backbone(name, attn_implementation="eager")`).
        batches: prompt-only model inputs (`Backbone.build_batch` without answers), each with
            `input_ids` and `attention_mask` `(B, T)`; any iterable (a generator is read once) when
            the backbone's `sinks.llm_dims` is set. Without it the top massive dim is found first,
            in a pass of its own, and `phi` read at it in a second pass: `batches` must then be
            re-iterable (a list, or an object whose `__iter__` builds them again).
        tau: threshold on `phi` for the per-layer counts; default the backbone's `sinks.tau_llm`
            (per layer); no counts when neither is set.
        min_abs, ratio: massive-activation criterion (`massive_dims`), in activation units / a factor.
        top_fraction: share of the largest visual `phi` values searched for the suggested threshold.
        phi_bins_per_decade, phi_log10_range: the `PhiHistogram` that median, p99 and the suggested
            threshold are read from (its docstring gives their precision).

    Returns:
        `CalibrationReport`; `layers` and `vis_phi_hist` are empty when no sink dim is known or found.

    Raises:
        ValueError: `sinks.llm_dims` is empty and `batches` is a one-shot iterator; a bad histogram setting.
    """
    cfg, num_layers = backbone.sinks, backbone.num_layers
    dims = list(cfg.llm_dims)
    if not dims and iter(batches) is batches:
        raise ValueError("sinks.llm_dims is empty: calibration finds the top massive dim in a first pass over the "
                         "batches, then reads phi at it in a second, so `batches` must be re-iterable (a list, or "
                         "an object whose __iter__ builds them again), not a one-shot iterator or generator.")
    if tau is not None:
        taus = [float(tau)] * num_layers
    else:
        taus = [cfg.tau_at(layer) for layer in range(num_layers)] if cfg.tau_llm is not None else None
    census = _Census([set() for _ in range(num_layers)])
    totals = [_LayerTotals(PhiHistogram.empty(phi_log10_range, phi_bins_per_decade)) for _ in range(num_layers)]
    positions: Counter = Counter()

    def read(batch: dict, count_massive: bool, sink_stats: bool) -> None:
        # Everything this batch produces is a local here: gone when it returns, before the next batch.
        batch = backbone.on_device(batch)
        seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], backbone.image_token_id)
        real = batch["attention_mask"].bool()
        out, feats = _forward(backbone, batch, attentions=sink_stats and taus is not None, vit_features=count_massive)
        if count_massive:
            _count_massive(census, out.hidden_states, feats, real, min_abs, ratio)
        if sink_stats:
            _add_sink_stats(totals, positions, out, seg, real, dims, cfg.normalisation, taus)

    for batch in batches:
        read(batch, count_massive=True, sink_stats=bool(dims))
    dim_layers = Counter(d for found in census.dims_by_layer for d in found)  # dim -> layers where flagged
    if not dims and dim_layers:
        dims = [dim_layers.most_common(1)[0][0]]
        for batch in batches:
            read(batch, count_massive=False, sink_stats=True)
    read_layers = {layer: t for layer, t in enumerate(totals) if dims and t.n_img}
    layers = []
    for layer, t in read_layers.items():
        n = t.n_img
        layers.append(LayerStats(
            layer, t.phi.median(), t.phi.quantile(0.99), t.phi.max, t.flagged / n, t.flagged_upto / n,
            t.text_sinks / n, t.share_sum / t.share_n if t.share_n else float("nan"),
            t.phi.suggest_threshold(top_fraction)))
    return CalibrationReport(dim_layers.most_common(8), dict(positions.most_common(5)), census.vit_norm_ratio_max,
                             census.vit_dims.most_common(8), layers,
                             {layer: t.phi for layer, t in read_layers.items()})


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
    layers = sorted(report.vis_phi_hist)
    cols = min(6, max(1, len(layers)))
    rows = -(-len(layers) // cols) if layers else 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        log10_phi, counts = report.vis_phi_hist[layer].log10_bins()
        ax.hist(log10_phi.numpy(), bins=40, weights=counts.numpy(), color="tab:blue")
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
