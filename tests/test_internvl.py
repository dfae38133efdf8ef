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
from lsg.analysis.data import available_groups, load_questions, observe
from lsg.gates import LSGGate
from lsg.prefix import compute_prefixes, run_suffix
from lsg.scoring import answer_loss, decoder_hidden
from lsg.segments import Segments
from lsg.specs import parse_stack
from tests.conftest import samples
from tests.hand import (
    assert_eager_matches_sdpa,
    assert_spec_generates_as_recompute,
    vsinks_with_planted_patch,
)
from tests.tiny_families import SINKS, SPECS, check_user_commands, real
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
    return lsg.load_backbone("internvl3", hf_id=str(ivl_dir), dtype="float32", sinks=SINKS)


@pytest.fixture(scope="module")
def ivl_eager(ivl_dir):
    return lsg.load_backbone("internvl3", hf_id=str(ivl_dir), dtype="float32", sinks=SINKS,
                             attn_implementation="eager")


def batch_of(bb, answers=True, side="left"):
    images, questions, replies = samples(2)
    return bb.build_batch([images[0], WIDE], questions, replies if answers else None, padding_side=side)


def decoder_inputs(bb, batch, plant=None):
    """`(B, T, D)` input embeddings of the decoder (the model's own placement of every image
    feature), with `plant` as a forward hook on the ViT if given."""
    seen = {}
    lm = bb.family.language_model(bb.model)
    handles = [lm.register_forward_pre_hook(lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True)]
    if plant is not None:
        handles.append(bb.family.vit_module(bb.model).register_forward_hook(plant))
    try:
        with torch.no_grad():
            bb.model(**bb.model_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
    return seen["embeds"]


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
    stack = parse_stack("oracle@2:0.3/0.5/0.9+var@1", ivl)
    losses = {}
    for side in ("left", "right"):
        with torch.no_grad(), lsg.attach(ivl, stack.layers):
            losses[side] = answer_loss(ivl, batch_of(ivl, side=side))
    torch.testing.assert_close(losses["left"], losses["right"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", SPECS + ["lsg@2"])
def test_every_gate_generates_through_the_kv_cache_as_full_recompute(ivl, spec):
    assert_spec_generates_as_recompute(ivl, spec)


@pytest.mark.parametrize("spec", ["var", "outro", "var@2-3+oracle@1:0.2"])
def test_suffix_from_a_prefix_equals_the_full_gated_forward(ivl, spec):
    batch = batch_of(ivl)
    stack = parse_stack(spec, ivl)
    with torch.no_grad():
        with lsg.attach(ivl, stack.layers):
            plain = decoder_hidden(ivl, batch)
        start = min(stack.layers)
        prefix = compute_prefixes(ivl, batch, [start])[0][start]
        torch.testing.assert_close(real(run_suffix(ivl, prefix, stack.layers), batch), real(plain, batch),
                                   atol=2e-5, rtol=1e-4)


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
    layers = list(range(ivl.num_layers))
    groups = available_groups(ivl)
    obs = observe(ivl, questions, None, layers, groups, "last", batch_size=2, vit=True)
    batch = ivl_eager.build_batch([r.load_image() for r in questions], [r.question for r in questions])
    feats = []
    vit = ivl_eager.family.vit_module(ivl_eager.model)
    handle = vit.register_forward_hook(lambda m, a, k, out: feats.append(
        ivl_eager.family.vit_features(ivl_eager.model, a, k, out)), with_kwargs=True)
    try:
        with torch.no_grad():
            attn = torch.stack(ivl_eager.model(**ivl_eager.model_inputs(batch), output_attentions=True).attentions)
    finally:
        handle.remove()
    for o, x in zip(obs, torch.split(feats[0], [SQUARE_TILES * SIDE**2, 3 * SIDE**2])):
        sink = x[:, SINKS["vit_dims"]].abs().amax(-1) / x.pow(2).mean(-1).sqrt() >= SINKS["tau_vit"]
        hand = [x[sel].abs().mean(0) if sel.any() else torch.full((x.shape[1],), torch.nan) for sel in (sink, ~sink)]
        np.testing.assert_allclose(o.vit_abs_x, torch.stack(hand).numpy(), rtol=1e-5, atol=1e-6)
    seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], ivl.image_token_id)
    vis_groups = [groups.index(g) for g in ("vsink", "lsink", "ordinary") if g in groups]
    for b, o in enumerate(obs):
        rows = attn[:, b, :, seg.last_prompt[b]]  # (L, H, T)
        np.testing.assert_allclose(np.stack([o.maps[l] for l in layers]), rows[:, :, seg.vis[b]].numpy(),
                                   atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.nansum(o.attn_mass[:, vis_groups], 1),
                                   rows.mean(1)[:, seg.vis[b]].sum(-1).numpy(), atol=2e-5)
        assert o.grid.shape == (seg.vis[b].sum(), 3)


@pytest.mark.slow
def test_train_compare_evaluate_and_calibrate_run_as_a_user_runs_them(ivl_dir, tmp_path):
    check_user_commands(tmp_path, ivl_dir, "internvl3")


def test_a_gate_checkpoint_is_refused_by_another_family(ivl, tmp_path):
    gate = LSGGate(ivl.hidden_size, "vsink-lsink-ordinary")
    gate.save(tmp_path / "g.safetensors", backbone=ivl.name, backbone_fingerprint=ivl.fingerprint, layer=2,
              sinks=ivl.sinks.to_dict())
    with pytest.raises(ValueError, match="internvl3"):
        parse_stack(f"lsg:{tmp_path / 'g.safetensors'}", lsg.load_backbone("tiny-random"))


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
