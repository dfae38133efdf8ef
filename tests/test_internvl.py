"""InternVL (3, `-hf` format), loaded through the user path from a tiny-random hub-format
checkpoint: V-sinks mapped through the tiles and the pixel shuffle (checked against where the
model itself puts each patch's feature), `<img>` / `</img>` never V-sinks; every gate in
generation, from a prefix and under both paddings; eager = SDPA; the analysis maps against eager
`output_attentions`; train / compare / calibrate as a user runs them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lsg
from lsg.analysis.data import load_questions
from tests.conftest import samples
from tests.hand import (
    assert_eager_matches_sdpa,
    assert_spec_generates_as_recompute,
    vsinks_with_planted_patch,
)
from tests.tiny_families import (SPECS, assert_gate_refused_by, assert_maps_match_eager, assert_padding_invariant,
    assert_suffix_matches_full_forward, assert_vit_profile_matches, check_user_commands, decoder_inputs, load_tiny)
from tests.tiny_internvl import save_tiny_internvl

# 96x60 px (W x H): 2x1 tiles + the thumbnail (3 tiles of 4 tokens); the square samples: 2x2 tiles
# + the thumbnail (5 tiles).
WIDE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 96, 3), dtype=np.uint8))
SIDE = 4  # 32 px tiles / 8 px patches; pixel shuffle 0.5: 2 tokens a side, 4 a tile
SQUARE_TILES = 5


@pytest.fixture(scope="module")
def ivl_dir(tmp_path_factory):
    return save_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl"))


@pytest.fixture(scope="module")
def ivl(ivl_dir):
    return load_tiny("internvl3", ivl_dir)


@pytest.fixture(scope="module")
def ivl_eager(ivl_dir):
    return load_tiny("internvl3", ivl_dir, attn_implementation="eager")


def batch_of(bb, answers=True, side="left"):
    images, questions, replies = samples(2)
    return bb.build_batch([images[0], WIDE], questions, replies if answers else None, padding_side=side)


def planting(tile, patch):
    """A ViT forward hook writing 1000 into dim 0 of `patch` (raster order) of tile row `tile`."""
    def plant(module, args, output):
        output.last_hidden_state[tile, 1 + patch] = 0.0  # 1 +: the CLS token comes first
        output.last_hidden_state[tile, 1 + patch, 0] = 1000.0
    return plant


def test_the_checkpoint_loads_as_internvl_and_is_refused_by_other_families(ivl, ivl_dir, tmp_path):
    assert type(ivl.model).__name__ == "InternVLForConditionalGeneration" and ivl.family.name == "internvl"
    bare = tmp_path / "bare"  # only config.json: the refusal comes before any weight (or processor) is read
    bare.mkdir()
    (bare / "config.json").write_text((ivl_dir / "config.json").read_text())
    for other in ("llava-1.5-7b", "llava-next", "qwen2.5-vl"):
        with pytest.raises(ValueError, match="model_type='internvl'.*use a model config of family 'internvl'"):
            lsg.load_backbone(other, hf_id=str(bare))
    (bare / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="family 'internvl' reads \\['internvl'\\].*family 'qwen2-vl'"):
        lsg.load_backbone("internvl3", hf_id=str(bare))


@pytest.mark.parametrize("tile, patch, token", [(0, 0, 0), (1, 6, 4 + 1), (1, 9, 4 + 2), (2, 15, 8 + 3)])
def test_a_planted_vit_sink_lands_where_the_model_puts_its_patch(ivl, tile, patch, token):
    """The V-sink mask equals the positions whose decoder input embedding a change of that one
    ViT patch changes (the model's own tiles and pixel shuffle), and the hand index: tile t's 4
    tokens come t-th, patch (r, c) of the 4x4 grid in token (r // 2) * 2 + c // 2 (patches 6 =
    (1, 2) and 9 = (2, 1) tell rows from columns; tile 2 of the wide image is its thumbnail)."""
    batch = batch_of(ivl, answers=False)
    plant = planting(SQUARE_TILES + tile, patch)  # the wide image's tiles come after the square one's
    vsink, vis = vsinks_with_planted_patch(ivl, batch, plant)
    moved = (decoder_inputs(ivl, batch, plant) != decoder_inputs(ivl, batch)).any(-1)
    assert torch.equal(vsink, moved)
    expected = torch.zeros_like(vis)
    expected[1, vis[1].nonzero().flatten()[token]] = True
    assert torch.equal(vsink, expected)


def test_image_start_and_end_tokens_are_never_v_sinks(ivl):
    """With every ViT patch a V-sink, exactly the `<IMG_CONTEXT>` tokens are V-sinks (read from
    `input_ids`, not from the map): `<img>` and `</img>` around them are not."""
    batch = batch_of(ivl, answers=False)

    def plant_all(module, args, output):
        output.last_hidden_state[:, 1:, 0] = 1000.0

    vsink, _ = vsinks_with_planted_patch(ivl, batch, plant_all)
    tok = ivl.tokenizer
    ids = batch["input_ids"]
    assert torch.equal(vsink, ids == tok.context_image_token_id)
    assert vsink.sum(1).tolist() == [4 * SQUARE_TILES, 4 * 3]
    for marker in (tok.start_image_token_id, tok.end_image_token_id):
        assert (ids == marker).sum(1).tolist() == [1, 1] and not vsink[ids == marker].any()


@pytest.mark.parametrize("tile, patch, cell", [(0, 9, (1, 1, 0)), (1, 6, (2, 0, 1)), (2, 15, (0, 1, 1))])
def test_token_grid_places_a_planted_vsink_on_its_image_cell(ivl, tile, patch, cell):
    """Panel 0 the thumbnail (the last tile), panels 1.. the tiles in order; (row, col) of the
    2x2 token grid of the tile."""
    batch = ivl.build_batch([WIDE], ["How many objects are in the image ?"])
    vsink, vis = vsinks_with_planted_patch(ivl, batch, planting(tile, patch))
    flags = vsink[0][vis[0]]
    grid = ivl.family.token_grid(ivl.model, batch)[0]
    assert int(flags.sum()) == 1 and tuple(grid[flags.nonzero().item()].tolist()) == cell
    assert sorted(map(tuple, grid.tolist())) == sorted((p, r, c) for p in range(3) for r in range(2) for c in range(2))


def test_left_and_right_padding_give_the_same_loss_under_a_gate(ivl):
    assert_padding_invariant(ivl, lambda side: batch_of(ivl, side=side))


@pytest.mark.parametrize("spec", SPECS + ["lsg@2"])
def test_every_gate_generates_through_the_kv_cache_as_full_recompute(ivl, spec):
    assert_spec_generates_as_recompute(ivl, spec)


@pytest.mark.parametrize("spec", ["var", "outro", "var@2-3+oracle@1:0.2"])
def test_suffix_from_a_prefix_equals_the_full_gated_forward(ivl, spec):
    assert_suffix_matches_full_forward(ivl, batch_of(ivl), spec)


def test_eager_attention_gives_what_sdpa_gives_with_every_kind_of_gate(ivl, ivl_eager):
    assert_eager_matches_sdpa(ivl, ivl_eager, batch_of)


def test_analysis_maps_and_group_mass_match_eager_output_attentions(ivl, ivl_eager, tmp_path_factory):
    """`lsg.analysis.data.observe`'s maps (last prompt row over the visual tokens) and visual
    attention mass, against transformers' eager `output_attentions=True` weights; its per-image
    ViT profile (mean |x| of V-sink and other patches) against the ViT features split by hand,
    for two images of different numbers of views."""
    questions = load_questions({"name": "shapes", "root": str(tmp_path_factory.getbasetemp() / "shapes"), "n": 6},
                               2)
    questions[1] = dataclasses.replace(questions[1], image_loader=lambda: WIDE)
    obs, _, seg, feats = assert_maps_match_eager(ivl, ivl_eager, questions, vit=True, visual_mass=True)
    assert_vit_profile_matches(obs, torch.split(feats, [SQUARE_TILES * SIDE**2, 3 * SIDE**2]))
    for b, o in enumerate(obs):
        assert o.grid.shape == (seg.vis[b].sum(), 3)


@pytest.mark.slow
def test_train_compare_evaluate_and_calibrate_run_as_a_user_runs_them(ivl_dir, tmp_path):
    check_user_commands(tmp_path, ivl_dir, "internvl3")


def test_a_gate_checkpoint_is_refused_by_another_family(ivl, tmp_path):
    assert_gate_refused_by(ivl, lsg.load_backbone("tiny-random"), tmp_path, match="internvl3")


def test_the_family_declares_the_inputs_its_batches_hold(ivl):
    """The batch keys `build_batch` gives are the family's `model_inputs`; the patch -> token map
    reads no call argument (the tile count follows from the patches); a processor output
    without pixel values is refused, naming what is missing."""
    batch = batch_of(ivl)
    assert set(batch) == set(ivl.family.model_inputs) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    with torch.no_grad(), lsg.attach(ivl, {}) as run:
        ivl.model(**batch)
        assert run.inputs == {}
    images, questions, _ = samples(1)
    encoding = dict(ivl.processor(images=images, text=[ivl.prompt_text(questions[0])]))
    del encoding["pixel_values"]
    with pytest.raises(ValueError, match="lacks \\['pixel_values'\\].*family 'internvl'"):
        ivl.family.pixel_inputs(encoding, torch.float32)
