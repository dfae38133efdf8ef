"""LLaVA-OneVision, loaded through the user path from a tiny-random hub-format checkpoint: V-sinks
mapped through AnyRes crops, unpadding and newline tokens; every gate in generation, from a
prefix and under both paddings; train / compare / calibrate as a user runs them."""

from __future__ import annotations


import pytest
import torch
from PIL import Image

import lsg
from lsg.segments import Segments
from tests.conftest import samples
from tests.hand import assert_eager_matches_sdpa, assert_spec_generates_as_recompute, vsinks_with_planted_patch
from tests.tiny_families import (SPECS, assert_gate_refused_by, assert_padding_invariant,
    assert_suffix_matches_full_forward, check_user_commands, load_tiny, save_tiny_onevision, save_tiny_qwen2_vl)

WIDE = Image.new("RGB", (60, 30), (200, 30, 30))  # best pinpoint 32x64: base crop + 1x2 sub-crops, no unpadding


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    return save_tiny_onevision(tmp_path_factory.mktemp("tiny-onevision"))


@pytest.fixture(scope="module")
def ov(ov_dir):
    return load_tiny("llava-onevision", ov_dir)


def batch_of(ov, answers=True, side="left"):
    images, questions, replies = samples(2)
    return ov.build_batch([images[0], WIDE], questions, replies if answers else None, padding_side=side)


def test_the_checkpoint_loads_as_onevision_and_is_refused_by_other_families(ov, ov_dir):
    assert type(ov.model).__name__ == "LlavaOnevisionForConditionalGeneration" and ov.family.name == "llava-onevision"
    for other in ("llava-1.5-7b", "qwen2-vl"):
        with pytest.raises(ValueError, match="model_type='llava_onevision'.*family 'llava-onevision'"):
            lsg.load_backbone(other, hf_id=str(ov_dir))


def test_newline_tokens_are_never_v_sinks(ov):
    """Independent of the mapping: the newline positions are where the decoder's input embedding
    is the model's `image_newline` vector. With every ViT patch flagged, exactly the other visual
    tokens must be V-sinks."""
    batch = batch_of(ov, answers=False)
    seen = {}
    lm = ov.family.language_model(ov.model)
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            ov.model(**batch)
    finally:
        handle.remove()
    newline = (seen["embeds"] == ov.model.model.image_newline).all(-1)
    seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], ov.image_token_id)
    assert newline.sum(1).tolist() == [8, 4]  # 2x2 sub-crops: 8 rows; 1x2 sub-crops: 4 rows
    n_patches = (5 + 3) * 16  # base crop + sub-crops, 16 patches each
    flags = ov.family.patches_to_tokens(ov.model, torch.ones(n_patches, dtype=torch.bool),
                                        {"image_sizes": batch["image_sizes"]})
    assert torch.equal(flags, (seg.vis & ~newline)[seg.vis])


@pytest.mark.parametrize("crop, patch, token", [(0, 5, 5), (1, 6, 16 + 9 + 2), (2, 6, 16 + 9 + 4 + 2)])
def test_a_planted_vit_sink_lands_on_its_token_through_the_crops(ov, crop, patch, token):
    """The wide image: tokens 0-15 are the base crop; then the 1x2 sub-crops stitched into 4 rows
    of 8 patches, each row followed by a newline (9 tokens a row). Patch 6 = row 1, column 2."""
    batch = batch_of(ov, answers=False)
    row = 5 + crop  # the wide image's crops come after the first image's 5

    def plant(module, args, output):
        output.hidden_states[-1][row, patch] = 0.0
        output.hidden_states[-1][row, patch, 0] = 1000.0

    vsink, vis = vsinks_with_planted_patch(ov, batch, plant)
    expected = torch.zeros_like(vis)
    expected[1, vis[1].nonzero().flatten()[token]] = True
    assert torch.equal(vsink, expected)


def test_left_and_right_padding_give_the_same_loss_under_a_gate(ov):
    assert_padding_invariant(ov, lambda side: batch_of(ov, side=side))


@pytest.mark.parametrize("spec", SPECS + ["lsg@2"])
def test_every_gate_generates_through_the_kv_cache_as_full_recompute(ov, spec):
    assert_spec_generates_as_recompute(ov, spec)


@pytest.mark.parametrize("spec", ["var", "outro", "var@2-3+oracle@1:0.2"])
def test_suffix_from_a_prefix_equals_the_full_gated_forward(ov, spec):
    assert_suffix_matches_full_forward(ov, batch_of(ov), spec)


@pytest.mark.slow
def test_train_compare_evaluate_and_calibrate_run_as_a_user_runs_them(ov_dir, tmp_path):
    check_user_commands(tmp_path, ov_dir, "llava-onevision")


def test_eager_attention_gives_what_sdpa_gives_with_every_kind_of_gate(ov, ov_dir):
    assert_eager_matches_sdpa(ov, load_tiny("llava-onevision", ov_dir, attn_implementation="eager"), batch_of)


def test_a_gate_checkpoint_is_refused_by_another_family(ov, ov_dir, tmp_path):
    qwen = load_tiny("qwen2-vl", save_tiny_qwen2_vl(tmp_path / "qwen"))
    assert_gate_refused_by(ov, qwen, tmp_path, match="llava-onevision")


def test_the_family_declares_the_inputs_its_batches_hold_and_its_token_map_reads(ov):
    """The batch keys `build_batch` gives are the family's `model_inputs`; inside `attach` the
    patch -> token map receives exactly the declared `layout_inputs` of the call (`image_sizes`)."""
    batch = batch_of(ov)
    assert set(batch) == set(ov.family.model_inputs) == {"input_ids", "attention_mask", "labels", "pixel_values",
                                                          "image_sizes"}
    with torch.no_grad(), lsg.attach(ov, {}) as run:
        ov.model(**batch)
        assert set(run.inputs) == set(ov.family.layout_inputs) == {"image_sizes"}
        assert torch.equal(run.inputs["image_sizes"], batch["image_sizes"])
