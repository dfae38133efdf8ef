"""Calibration (SPEC section 7) finds massive dimensions planted in a tiny model's weights, finds
dim 507 on the embedded backbone, and writes its Figure S2 plots. It streams its batches: its
statistics equal those of all batches at once, and its memory does not grow with the prompts."""

from __future__ import annotations

import dataclasses
import gc
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import lsg
from lsg.calibration import PhiHistogram, calibrate, plot_report
from tests.conftest import PROMPTS_PER_BATCH, samples

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout whose entry points run
CALIBRATE_CFG = OmegaConf.load(REPO_ROOT / "conf" / "calibrate.yaml")
HISTOGRAM = {"phi_bins_per_decade": CALIBRATE_CFG.phi_bins_per_decade,
             "phi_log10_range": tuple(CALIBRATE_CFG.phi_log10_range)}
BIN_FACTOR = 10 ** (1 / CALIBRATE_CFG.phi_bins_per_decade)  # one histogram bin, as a factor on phi

LLM_DIM, VIT_DIM = 37, 11


def planted_backbone():
    """Tiny random backbone with a massive activation planted at LLM_DIM and at VIT_DIM."""
    bb = lsg.load_backbone("tiny-random", attn_implementation="eager", seed=3)
    with torch.no_grad():
        # A massive activation on the first token of every prompt, carried by the residual stream
        # (Sun et al.: |x| > 100 and > 1000 x the token's median |x|) ...
        first = bb.tokenizer.convert_tokens_to_ids("<|im_start|>")
        bb.family.language_model(bb.model).embed_tokens.weight[first, LLM_DIM] = 3000.0
        # ... and one in the ViT feature layer (-2: the first of its 2 layers' output), via an MLP bias.
        bb.model.model.vision_tower.encoder.layers[0].mlp.fc2.bias[VIT_DIM] = 2000.0
    return bb


def test_calibration_recovers_dims_planted_in_the_weights(tmp_path):
    bb = planted_backbone()
    bb.sinks = dataclasses.replace(bb.sinks, llm_dims=[LLM_DIM])  # positions and phi are read at this dim
    first = bb.tokenizer.convert_tokens_to_ids("<|im_start|>")
    images, questions, _ = samples(4)
    batch = bb.build_batch(images, questions)
    report = calibrate(bb, [batch])
    assert dict(report.massive_dims)[LLM_DIM] == bb.num_layers  # flagged at every layer
    assert report.vit_massive_dims[0][0] == VIT_DIM
    # Its largest value sits on a planted token (<|im_start|> opens the system and the user turn).
    assert sum(report.massive_positions.values()) == 4
    assert all((batch["input_ids"][:, p] == first).all() for p in report.massive_positions)
    hist, counts = plot_report(report, tmp_path, "tiny")
    assert hist.stat().st_size > 1000 and counts.stat().st_size > 1000
    plain = calibrate(lsg.load_backbone("tiny-random", attn_implementation="eager", seed=3),
                      [bb.build_batch(images, questions)])
    assert LLM_DIM not in dict(plain.massive_dims) and VIT_DIM not in dict(plain.vit_massive_dims)


def test_calibration_without_sink_dims_reads_phi_at_the_dim_it_finds():
    bb = planted_backbone()
    batches = [bb.build_batch(*samples(4, offset=i)[:2]) for i in (0, 4)]
    bb.sinks = dataclasses.replace(bb.sinks, llm_dims=[LLM_DIM])
    configured = calibrate(bb, batches)
    bb.sinks = dataclasses.replace(bb.sinks, llm_dims=[])
    found = calibrate(bb, batches)  # a list: read twice, first for the dim, then for phi at it
    assert dataclasses.replace(found, vis_phi_hist={}) == dataclasses.replace(configured, vis_phi_hist={})
    assert found.layers and all(torch.equal(found.vis_phi_hist[layer].counts, hist.counts)
                                for layer, hist in configured.vis_phi_hist.items())
    with pytest.raises(ValueError, match="re-iterable"):
        calibrate(bb, iter(batches))


def test_phi_histogram_order_statistics_and_threshold_match_the_sorted_values():
    torch.manual_seed(0)
    bulk = torch.randn(5000).mul(0.7).exp()  # log-normal bulk of visual phi ...
    outliers = torch.rand(200).mul(30).add(60)  # ... and a top few percent far above it
    values = torch.cat([bulk, outliers, torch.zeros(3), torch.tensor([1e-9, 3e7])])  # below and above the range
    hist = PhiHistogram.empty(HISTOGRAM["phi_log10_range"], HISTOGRAM["phi_bins_per_decade"])
    for chunk in values[torch.randperm(len(values))].split(333):
        hist.add(chunk)
    v = values.double().sort().values
    assert hist.n == len(v) and hist.max == v[-1]
    for q in (0.01, 0.5, 0.9, 0.99):
        exact = float(torch.quantile(v, q))
        assert exact / BIN_FACTOR <= hist.quantile(q) <= exact * BIN_FACTOR
    assert hist.median() == pytest.approx(float(v.median()), rel=BIN_FACTOR - 1)
    top_fraction = 0.05
    by_hand = widest_gap_middle(values, top_fraction, floor=10 ** HISTOGRAM["phi_log10_range"][0])
    assert hist.suggest_threshold(top_fraction) == pytest.approx(by_hand, rel=1e-9)
    assert hist.suggest_threshold(0.0) is None and PhiHistogram.empty((-1, 1), 10).suggest_threshold(0.5) is None
    with pytest.raises(ValueError):
        PhiHistogram.empty((1.0, 1.0), 10)


def widest_gap_middle(values, top_fraction, floor):
    """Geometric middle of the widest log-gap among the top `top_fraction` of all `values` sorted
    (and the value below them); asserts the gap is wider than one histogram bin."""
    v = values.double().clamp_min(floor).sort().values
    logs = v[max(int(len(v) * (1 - top_fraction)) - 1, 0):].log()
    gaps = logs[1:] - logs[:-1]
    i = int(gaps.argmax())
    assert gaps[i] > math.log(BIN_FACTOR), "the exact gap must be wider than a bin for an exact threshold"
    return float((logs[i] + logs[i + 1]).div(2).exp())


@torch.no_grad()
def statistics_by_hand(bb, batches, dims, taus, min_abs, ratio, top_fraction):
    """The calibration report's statistics from every batch's hidden states and attention maps held
    at once, in plain torch: `(massive dims, positions, ViT ratio, ViT dims, per-layer dicts)`."""
    outs = [bb.model(**b, output_hidden_states=True, output_attentions=True) for b in batches]
    num_layers, mid = bb.num_layers, bb.num_layers // 2
    cfg = bb.model.config
    vit = [bb.model.model.vision_tower(b["pixel_values"], output_hidden_states=True)
           .hidden_states[cfg.vision_feature_layer][:, 1:].flatten(0, 1) for b in batches]  # (N_patches, D_vit)

    def flagged_dims(x, real):  # x (B, T, D), real (B, T)
        a = x.abs()
        hit = (a > min_abs) & (a > ratio * a.median(-1, keepdim=True).values) & real[..., None]
        return set(hit.flatten(0, 1).any(0).nonzero().flatten().tolist())

    reals = [b["attention_mask"].bool() for b in batches]
    vis = [(b["input_ids"] == cfg.image_token_id) & r for b, r in zip(batches, reals)]
    last = [(r * torch.arange(r.shape[1])).amax(1) for r in reals]  # the last real (prompt) token
    massive = Counter(d for layer in range(num_layers)
                      for d in set().union(*(flagged_dims(o.hidden_states[layer], r) for o, r in zip(outs, reals))))
    positions = Counter(p for o, r in zip(outs, reals)
                        for p in o.hidden_states[mid][..., dims[0]].abs().masked_fill(~r, 0).argmax(1).tolist())
    vit_ratio = max(float(f.norm(dim=-1).max() / f.norm(dim=-1).median()) for f in vit)
    vit_dims = Counter(d for f in vit for d in flagged_dims(f[None], torch.ones(1, len(f), dtype=torch.bool)))
    layers, upto = [], [torch.zeros_like(v) for v in vis]
    for layer in range(num_layers):
        phis = [o.hidden_states[layer][..., dims].abs().amax(-1) / o.hidden_states[layer].pow(2).mean(-1).sqrt()
                for o in outs]  # rms normalisation
        all_vis_phi = torch.cat([p[v] for p, v in zip(phis, vis)])
        flags = [(p >= taus[layer]) & v for p, v in zip(phis, vis)]
        upto = [u | f for u, f in zip(upto, flags)]
        shares = []
        for o, f, v, lp in zip(outs, flags, vis, last):
            a = o.attentions[layer][torch.arange(len(lp)), :, lp]  # (B, H, T): the last prompt token's row
            shares.append(((a * f[:, None]).sum(-1) / (a * v[:, None]).sum(-1)).mean(1))
        n_img = sum(len(v) for v in vis)
        layers.append({
            "median": float(all_vis_phi.median()), "p99": float(all_vis_phi.quantile(0.99)),
            "max": float(all_vis_phi.max()), "n_vis": len(all_vis_phi),
            "flagged_per_image": sum(int(f.sum()) for f in flags) / n_img,
            "flagged_any_upto_per_image": sum(int(u.sum()) for u in upto) / n_img,
            "text_sinks_per_sample": sum(int(((p >= taus[layer]) & r & ~v).sum())
                                         for p, r, v in zip(phis, reals, vis)) / n_img,
            "flagged_attention_share": float(torch.cat(shares).mean()),
            "suggested_tau": widest_gap_middle(all_vis_phi, top_fraction, floor=10 ** HISTOGRAM["phi_log10_range"][0]),
        })
    return massive, positions, vit_ratio, vit_dims, layers


def test_streamed_statistics_equal_the_statistics_of_all_batches_at_once():
    bb = lsg.load_backbone("tiny-random", attn_implementation="eager")
    taus = [1.0, 1.2, 0.9, 1.4]  # per layer
    bb.sinks = dataclasses.replace(bb.sinks, tau_llm=taus)
    assert len(taus) == bb.num_layers and bb.sinks.normalisation == "rms"
    batches = []
    for i, padding_side in enumerate(("right", "left", "right")):
        images, questions, _ = samples(PROMPTS_PER_BATCH, offset=PROMPTS_PER_BATCH * i)
        questions = [q + " ?" * (j + i) for j, q in enumerate(questions)]  # prompts of different lengths: padding
        batches.append(bb.build_batch(images, questions, padding_side=padding_side))
    min_abs, ratio, top_fraction = 0.03, 3.0, 0.05  # the tiny model's |x| ~ 0.01-0.1: flags some dims
    report = calibrate(bb, (b for b in batches), None, min_abs, ratio, top_fraction, **HISTOGRAM)
    massive, positions, vit_ratio, vit_dims, layers = statistics_by_hand(
        bb, batches, bb.sinks.llm_dims, taus, min_abs, ratio, top_fraction)
    assert massive and vit_dims, "the criterion must flag some dims for the comparison to mean something"
    assert report.massive_dims == massive.most_common(8)
    assert report.massive_positions == dict(positions.most_common(5))
    assert report.vit_norm_ratio_max == pytest.approx(vit_ratio, rel=1e-6)
    assert report.vit_massive_dims == vit_dims.most_common(8)
    assert [s.layer for s in report.layers] == list(range(bb.num_layers)) == sorted(report.vis_phi_hist)
    for s, hand in zip(report.layers, layers):
        assert report.vis_phi_hist[s.layer].n == hand["n_vis"]
        assert s.vis_phi_max == pytest.approx(hand["max"], rel=1e-6)
        assert s.vis_phi_median == pytest.approx(hand["median"], rel=BIN_FACTOR - 1)  # read from the histogram
        assert s.vis_phi_p99 == pytest.approx(hand["p99"], rel=BIN_FACTOR - 1)
        assert s.suggested_tau == pytest.approx(hand["suggested_tau"], rel=1e-6)
        for key in ("flagged_per_image", "flagged_any_upto_per_image", "text_sinks_per_sample",
                    "flagged_attention_share"):
            assert getattr(s, key) == pytest.approx(hand[key], rel=1e-5), key


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the garbage collector can reach."""
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.layout == torch.strided and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[(obj.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def calibration_peak_bytes(bb, n_prompts: int) -> int:
    """Most tensor bytes held beyond those held before `calibrate` runs on `n_prompts` prompts fed
    by a generator, sampled after each forward pass (the batch's hidden states and attention maps
    all alive) and at each request for a batch: deterministic, unlike the process's RSS."""
    peak = 0

    def sample(*_):
        nonlocal peak
        peak = max(peak, live_tensor_bytes() - before)

    def prompt_batches():
        for offset in range(0, n_prompts, PROMPTS_PER_BATCH):
            sample()
            yield bb.build_batch(*samples(PROMPTS_PER_BATCH, offset=offset)[:2])

    gc.collect()
    before = live_tensor_bytes()
    handle = bb.model.register_forward_hook(sample)
    try:
        calibrate(bb, prompt_batches(), **HISTOGRAM)
    finally:
        handle.remove()
    return peak


def test_calibration_peak_memory_does_not_grow_with_the_number_of_prompts():
    bb = lsg.load_backbone("tiny-random", attn_implementation="eager")
    peak_8, peak_32 = calibration_peak_bytes(bb, 8), calibration_peak_bytes(bb, 32)
    assert peak_32 <= 1.1 * peak_8, f"peak tensor bytes: {peak_8} for 8 prompts, {peak_32} for 32"


@pytest.mark.slow
def test_calibrate_cli_finds_dim_507_on_the_embedded_backbone(tmp_path):
    # SmolLM2-135M's massive activation (~770) is a few hundred times the median |x|: ratio=100, not 7B's 1000.
    result = subprocess.run([sys.executable, "-m", "lsg.cli.calibrate", "n_samples=8", "ratio=100",
                             f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                            capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("LLM massive dims"))
    assert line.split("[(")[1].startswith("507,")  # the top massive dim
    assert (tmp_path / "sink-histograms.png").exists() and (tmp_path / "sink-counts.png").exists()
