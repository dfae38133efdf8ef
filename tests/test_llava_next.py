"""LLaVA-NeXT, loaded through the user path from a tiny-random hub-format checkpoint: V-sinks mapped
through AnyRes crops, unpadding and newline tokens (checked against where the model itself puts
each patch's feature); every gate in generation, from a prefix and under both paddings; eager =
SDPA; the analysis maps against eager `output_attentions`; train / compare / calibrate as a user
runs them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lsg
from lsg.analysis.data import load_questions
from lsg.segments import Segments
from tests.conftest import samples
from tests.hand import (
    assert_eager_matches_sdpa,
    assert_spec_generates_as_recompute,
    vsinks_with_planted_patch,
)
from tests.tiny_families import (SPECS, assert_gate_refused_by, assert_maps_match_eager, assert_padding_invariant,
    assert_suffix_matches_full_forward, assert_vit_profile_matches, check_user_commands, decoder_inputs, load_tiny)
from tests.tiny_llava_next import save_tiny_llava_next

# 96x60 px (W x H): best pinpoint 64x64, so a base crop + 2x2 sub-crops whose stitched 8x8 patch
# grid is unpadded to rows 1..6 (8 * 60 / 96 = 5 rows of image, rounded, padding 1 row each side).
UNPADDED = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 96, 3), dtype=np.uint8))
TWO_CROPS = Image.new("RGB", (60, 30), (200, 30, 30))  # best pinpoint 32x64: a base crop + 1x2 sub-crops
SIDE = 4  # 32 px crops / 8 px patches
CROPS = 5  # every test image: base crop + 2x2 sub-crops


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return save_tiny_llava_next(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="module")
def nxt(next_dir):
    return load_tiny("llava-next", next_dir)


@pytest.fixture(scope="module")
def nxt_eager(next_dir):
    return load_tiny("llava-next", next_dir, attn_implementation="eager")


def batch_of(bb, answers=True, side="left"):
    images, questions, replies = samples(2)
    return bb.build_batch([images[0], UNPADDED], questions, replies if answers else None, padding_side=side)


def test_the_checkpoint_loads_as_llava_next_and_is_refused_by_other_families(nxt, next_dir, tmp_path):
    assert type(nxt.model).__name__ == "LlavaNextForConditionalGeneration" and nxt.family.name == "llava-next"
    # only config.json: the refusal comes before any weight (or processor) is read
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((next_dir / "config.json").read_text())
    for other in ("llava-1.5-7b", "llava-onevision", "qwen2-vl"):
        with pytest.raises(ValueError, match="model_type='llava_next'.*use a model config of family 'llava-next'"):
            lsg.load_backbone(other, hf_id=str(bare))
    (bare / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    with pytest.raises(ValueError, match="family 'llava-next' reads \\['llava_next'\\].*family 'llava-onevision'"):
        lsg.load_backbone("llava-next", hf_id=str(bare))
    (bare / "config.json").write_text(json.dumps({"model_type": "made_up_vlm"}))
    with pytest.raises(ValueError, match="'made_up_vlm'.*not supported. Supported families: .*llava-next"):
        lsg.load_backbone("llava-next", hf_id=str(bare))


def test_newline_tokens_are_never_v_sinks(nxt):
    """Independent of the mapping: the newline positions are where the decoder's input embedding
    is the model's `image_newline` vector. With every ViT patch flagged, exactly the other visual
    tokens must be V-sinks, unpadding included."""
    batch = batch_of(nxt, answers=False)
    newline = (decoder_inputs(nxt, batch) == nxt.model.model.image_newline).all(-1)
    seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], nxt.image_token_id)
    assert newline.sum(1).tolist() == [8, 6]  # 2x2 sub-crops: 8 rows; unpadded to 6 rows
    assert seg.vis.sum(1).tolist() == [16 + 8 * 9, 16 + 6 * 9]
    flags = nxt.family.patches_to_tokens(nxt.model, torch.ones(2 * CROPS * SIDE**2, dtype=torch.bool),
                                         {"image_sizes": batch["image_sizes"]})
    assert torch.equal(flags, (seg.vis & ~newline)[seg.vis])


# (crop of the unpadded image, patch within it) -> its visual token, by hand: tokens 0-15 are the
# base crop; then the kept stitched rows 1..6 of 8 patches, each followed by a newline (9 a row).
# Sub-crop 1 (top left) patch 5 = stitched (1, 1) -> kept row 0; sub-crop 4 (bottom right) patch 0
# = stitched (4, 4) -> kept row 3; sub-crop 1 patch 1 = stitched row 0, cut by the unpadding.
@pytest.mark.parametrize("crop, patch, token", [(0, 6, 6), (1, 5, 16 + 1), (4, 0, 16 + 3 * 9 + 4), (1, 1, None)])
def test_a_planted_vit_sink_lands_where_the_model_puts_its_patch(nxt, crop, patch, token):
    """The V-sink mask equals the positions whose decoder input embedding a change of that one
    ViT patch changes (the model's own crop order, unpadding and newlines), and the hand index."""
    batch = batch_of(nxt, answers=False)
    row = CROPS + crop  # the second image's crops come after the first image's

    def plant(module, args, output):
        hidden = output.hidden_states[nxt.model.config.vision_feature_layer]
        hidden[row, 1 + patch] = 0.0  # 1 +: the CLS token comes first
        hidden[row, 1 + patch, 0] = 1000.0

    vsink, vis = vsinks_with_planted_patch(nxt, batch, plant)
    moved = (decoder_inputs(nxt, batch, plant) != decoder_inputs(nxt, batch)).any(-1)
    assert torch.equal(vsink, moved)
    expected = torch.zeros_like(vis)
    if token is not None:
        expected[1, vis[1].nonzero().flatten()[token]] = True
    assert torch.equal(vsink, expected)


@pytest.mark.parametrize("crop, patch, cell", [(0, 6, (0, 1, 2)), (1, 5, (1, 0, 1)), (4, 0, (1, 3, 4))])
def test_token_grid_places_a_planted_vsink_on_its_image_cell(nxt, crop, patch, cell):
    """Panel 0 the base crop, panel 1 the unpadded stitched grid (rows counted from the first kept row)."""
    batch = nxt.build_batch([UNPADDED], ["How many objects are in the image ?"])

    def plant(module, args, output):
        output.hidden_states[nxt.model.config.vision_feature_layer][crop, 1 + patch, 0] = 1000.0

    vsink, vis = vsinks_with_planted_patch(nxt, batch, plant)
    flags = vsink[0][vis[0]]
    grid = nxt.family.token_grid(nxt.model, batch)[0]
    assert int(flags.sum()) == 1 and tuple(grid[flags.nonzero().item()].tolist()) == cell
    assert (grid[:, 0] == -1).sum() == 6 and grid.max(0).values.tolist() == [1, 5, 7]  # newlines; 6 x 8 cells


def test_left_and_right_padding_give_the_same_loss_under_a_gate(nxt):
    assert_padding_invariant(nxt, lambda side: batch_of(nxt, side=side))


@pytest.mark.parametrize("spec", SPECS + ["lsg@2"])
def test_every_gate_generates_through_the_kv_cache_as_full_recompute(nxt, spec):
    assert_spec_generates_as_recompute(nxt, spec)


@pytest.mark.parametrize("spec", ["var", "outro", "var@2-3+oracle@1:0.2"])
def test_suffix_from_a_prefix_equals_the_full_gated_forward(nxt, spec):
    assert_suffix_matches_full_forward(nxt, batch_of(nxt), spec)


def test_eager_attention_gives_what_sdpa_gives_with_every_kind_of_gate(nxt, nxt_eager):
    assert_eager_matches_sdpa(nxt, nxt_eager, batch_of)


def test_analysis_maps_and_group_mass_match_eager_output_attentions(nxt, nxt_eager, tmp_path_factory):
    """`lsg.analysis.data.observe`'s maps (last prompt row over the visual tokens) and visual
    attention mass, against transformers' eager `output_attentions=True` weights; its per-image
    ViT profile (mean |x| of V-sink and other patches) against the ViT features split by hand,
    for two images of different numbers of views."""
    questions = load_questions({"name": "shapes", "root": str(tmp_path_factory.getbasetemp() / "shapes"), "n": 6},
                               2)
    questions[1] = dataclasses.replace(questions[1], image_loader=lambda: TWO_CROPS)
    obs, _, seg, feats = assert_maps_match_eager(nxt, nxt_eager, questions, vit=True, visual_mass=True)
    assert_vit_profile_matches(obs, torch.split(feats, [CROPS * SIDE**2, 3 * SIDE**2]))
    for b, o in enumerate(obs):
        assert o.grid.shape == (seg.vis[b].sum(), 3)


@pytest.mark.slow
def test_train_compare_evaluate_and_calibrate_run_as_a_user_runs_them(next_dir, tmp_path):
    check_user_commands(tmp_path, next_dir, "llava-next")


def test_a_gate_checkpoint_is_refused_by_another_family(nxt, tmp_path):
    assert_gate_refused_by(nxt, lsg.load_backbone("tiny-random"), tmp_path, match="llava-next")


def test_the_family_declares_the_inputs_its_batches_hold_and_its_token_map_reads(nxt):
    """The batch keys `build_batch` gives are the family's `model_inputs`; inside `attach` the
    patch -> token map receives exactly the declared `layout_inputs` of the call (`image_sizes`);
    a processor output without them is refused, naming what is missing."""
    batch = batch_of(nxt)
    assert set(batch) == set(nxt.family.model_inputs) == {"input_ids", "attention_mask", "labels", "pixel_values",
                                                           "image_sizes"}
    with torch.no_grad(), lsg.attach(nxt, {}) as run:
        nxt.model(**batch)
        assert set(run.inputs) == set(nxt.family.layout_inputs) == {"image_sizes"}
        assert torch.equal(run.inputs["image_sizes"], batch["image_sizes"])
    images, questions, _ = samples(1)
    encoding = dict(nxt.processor(images=images, text=[nxt.prompt_text(questions[0])]))
    del encoding["image_sizes"]
    with pytest.raises(ValueError, match="lacks \\['image_sizes'\\].*family 'llava-next'"):
        nxt.family.pixel_inputs(encoding, torch.float32)
