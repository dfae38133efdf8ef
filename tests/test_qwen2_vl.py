"""Qwen2-VL and Qwen2.5-VL, loaded through the user path from tiny-random hub-format checkpoints:
the 2x2 merger's V-sink mapping (through Qwen2.5-VL's window order), M-RoPE (key scaling commutes
with it; both paddings), every gate in generation and from a prefix, and train / compare /
calibrate as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import lsg
from lsg.segments import Segments
from tests.conftest import samples
from tests.hand import assert_eager_matches_sdpa, assert_spec_generates_as_recompute, vsinks_with_planted_patch
from tests.tiny_families import (SPECS, assert_cached_suffix_matches_full_forward, assert_padding_invariant,
    assert_suffix_matches_full_forward, check_user_commands, load_tiny, save_tiny_qwen2_vl)

# model config -> (tiny checkpoint version, image px, merged tokens per side). Qwen2.5-VL gets 64 px
# images so its 32 px attention windows reorder the ViT's patch groups.
VARIANTS = {"qwen2-vl": ("2", 32, 2), "qwen2.5-vl": ("2.5", 64, 4)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, variant):
    version, size, _ = VARIANTS[variant]
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp(f"tiny-{variant}"), image_size=size, version=version)


@pytest.fixture(scope="module")
def qwen(qwen_dir, variant):
    return load_tiny(variant, qwen_dir)


def test_the_checkpoint_loads_in_its_family_and_is_refused_by_the_others(qwen, qwen_dir, variant):
    expected = {"qwen2-vl": "Qwen2VLForConditionalGeneration", "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration"}
    assert type(qwen.model).__name__ == expected[variant] and qwen.family.name == variant
    model_type = json.loads((qwen_dir / "config.json").read_text())["model_type"]
    for other in ["llava-1.5-7b", *(v for v in VARIANTS if v != variant)]:
        with pytest.raises(ValueError, match=f"model_type='{model_type}'.*use a model config of family '{variant}'"):
            lsg.load_backbone(other, hf_id=str(qwen_dir))


def test_vit_features_in_token_order_are_what_the_merger_reads(qwen):
    """Merging the features `vit_features` returns gives the model's own merged tokens, in the
    order they enter the decoder (for Qwen2.5-VL, after undoing the window order)."""
    images, questions, _ = samples(2)
    batch = qwen.build_batch(images, questions)
    seen = {}
    vit = qwen.family.vit_module(qwen.model)
    handle = vit.register_forward_hook(lambda m, args, kwargs, out: seen.update(
        feats=qwen.family.vit_features(qwen.model, args, kwargs, out), merged=out.pooler_output), with_kwargs=True)
    try:
        with torch.no_grad():
            qwen.model(**batch)
    finally:
        handle.remove()
    torch.testing.assert_close(vit.merger(seen["feats"]), seen["merged"])


def test_each_merged_token_covers_a_2x2_block_of_patches(qwen, variant):
    """Independent of the code under test: light one 8 px patch of a black image and find which
    rows of pixel_values change; they must be the 4 consecutive rows of the merged token that
    covers the patch's 2x2 block (raster order of the 2x2 blocks)."""
    _, size, side = VARIANTS[variant]
    black = Image.new("RGB", (size, size))
    base = qwen.build_batch([black], ["How many objects ?"])["pixel_values"]
    for row, col in [(0, 0), (1, 2), (2 * side - 1, 2 * side - 1)]:
        lit = np.zeros((size, size, 3), dtype=np.uint8)
        lit[8 * row:8 * row + 8, 8 * col:8 * col + 8] = 255
        pixels = qwen.build_batch([Image.fromarray(lit)], ["How many objects ?"])["pixel_values"]
        changed = (pixels - base).abs().sum(-1).nonzero().flatten().tolist()
        token = (row // 2) * side + col // 2
        assert len(changed) == 1 and changed[0] // 4 == token
    flags = torch.zeros(16, dtype=torch.bool)
    flags[[5, 14]] = True  # patches of merged tokens 1 and 3
    assert qwen.family.patches_to_tokens(qwen.model, flags).tolist() == [False, True, False, True]


def test_a_planted_vit_sink_marks_its_merged_visual_token(qwen, variant):
    images, questions, _ = samples(2)
    batch = qwen.build_batch(images, questions, padding_side="left")
    planted = 9  # row 9 of the ViT output: patch group 2 of image 0; image 1 untouched
    group = planted // 4
    if variant == "qwen2.5-vl":  # the ViT output is in window order: group g is token window_index[g]
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(batch["image_grid_thw"], 2, 32, 8)
        group = int(window_index[group])
        assert group != planted // 4

    def plant(module, args, output):
        output.last_hidden_state[planted] = 0.0
        output.last_hidden_state[planted, 0] = 1000.0
        return output

    vsink, vis = vsinks_with_planted_patch(qwen, batch, plant)
    expected = torch.zeros_like(vis)
    expected[0, vis[0].nonzero().flatten()[group]] = True
    assert torch.equal(vsink, expected)


def test_left_and_right_padding_give_the_same_loss_under_a_gate(qwen, variant):
    images, questions, answers = samples(3)
    questions = [q + " ?" * (3 * i) for i, q in enumerate(questions)]

    def check(batch):
        seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], qwen.image_token_id, batch["labels"])
        assert seg.vis.sum(1).tolist() == [VARIANTS[variant][2] ** 2] * 3

    assert_padding_invariant(qwen, lambda side: qwen.build_batch(images, questions, answers, padding_side=side),
                             check=check)


@pytest.mark.parametrize("spec", SPECS + ["lsg@2"])
def test_every_gate_generates_through_the_kv_cache_as_full_recompute(qwen, spec):
    assert_spec_generates_as_recompute(qwen, spec)


@pytest.mark.parametrize("spec", ["var", "outro", "oracle@2:0.3/0.5/0.9", "var@2-3+oracle@1:0.2"])
def test_suffix_from_a_prefix_equals_the_full_gated_forward(qwen, spec):
    images, questions, answers = samples(3)
    batch = qwen.build_batch(images, [q + " ?" * i for i, q in enumerate(questions)], answers, padding_side="left")
    layers, prefix, _ = assert_suffix_matches_full_forward(qwen, batch, spec)
    assert prefix.position_ids is not None and prefix.position_ids.shape[0] >= 3  # M-RoPE ids kept
    # The per-sample cache, reassembled into a batch of another width and padding side.
    other = qwen.build_batch(images[1:], [q + " ?" * i for i, q in enumerate(questions)][1:], answers[1:],
                             padding_side="right")
    assert_cached_suffix_matches_full_forward(qwen, layers, batch, other, ["b", "c"])


@pytest.mark.slow
def test_train_compare_evaluate_and_calibrate_run_as_a_user_runs_them(qwen_dir, variant, tmp_path):
    check_user_commands(tmp_path, qwen_dir, variant)


def test_eager_attention_gives_what_sdpa_gives_with_every_kind_of_gate(qwen, qwen_dir, variant):
    """Key-only gates stay on SDPA, gates that need the attention matrix (VAR, VAF, knockout) get
    it; under eager attention every path must agree with SDPA, in scoring and in generation."""
    eager = load_tiny(variant, qwen_dir, attn_implementation="eager")
    images, questions, answers = samples(3)
    assert_eager_matches_sdpa(qwen, eager, lambda bb: bb.build_batch(images, questions, answers, padding_side="left"))

def test_the_family_declares_the_inputs_its_batches_hold(qwen):
    images, questions, answers = samples(2)
    batch = qwen.build_batch(images, questions, answers)
    assert set(batch) == set(qwen.family.model_inputs) == {"input_ids", "attention_mask", "labels", "pixel_values",
                                                            "image_grid_thw", "mm_token_type_ids"}
    with torch.no_grad(), lsg.attach(qwen, {}) as run:
        qwen.model(**batch)
        assert run.inputs == {}  # one patch group is one token: the map reads no call argument
