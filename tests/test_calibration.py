"""Calibration (SPEC section 7) finds massive dimensions planted in a tiny model's weights, finds
dim 507 on the embedded backbone, and writes its Figure S2 plots."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import torch

import lsg
from lsg.calibration import calibrate, plot_report
from tests.conftest import samples

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout whose entry scripts run

LLM_DIM, VIT_DIM = 37, 11


def test_calibration_recovers_dims_planted_in_the_weights(tmp_path):
    bb = lsg.load_backbone("tiny-random", attn_implementation="eager", seed=3)
    with torch.no_grad():
        # A massive activation on the first token of every prompt, carried by the residual stream
        # (Sun et al.: |x| > 100 and > 1000 x the token's median |x|) ...
        first = bb.tokenizer.convert_tokens_to_ids("<|im_start|>")
        bb.model.model.language_model.embed_tokens.weight[first, LLM_DIM] = 3000.0
        # ... and one in the ViT feature layer (-2: the first of its 2 layers' output), via an MLP bias.
        bb.model.model.vision_tower.encoder.layers[0].mlp.fc2.bias[VIT_DIM] = 2000.0
    bb.sinks = dataclasses.replace(bb.sinks, llm_dims=[LLM_DIM])  # positions and phi are read at this dim
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


def test_calibrate_py_finds_dim_507_on_the_embedded_backbone(tmp_path):
    # SmolLM2-135M's massive activation (~770) is a few hundred times the median |x|: ratio=100, not 7B's 1000.
    result = subprocess.run([sys.executable, str(REPO_ROOT / "calibrate.py"), "n_samples=8", "ratio=100",
                             f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                            capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("LLM massive dims"))
    assert line.split("[(")[1].startswith("507,")  # the top massive dim
    assert (tmp_path / "sink-histograms.png").exists() and (tmp_path / "sink-counts.png").exists()
