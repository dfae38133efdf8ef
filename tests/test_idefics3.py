"""Idefics3 and SmolVLM, loaded through the user path from tiny-random hub-format checkpoints: V-sinks
mapped through the pixel-shuffle connector and the sub-image order (checked against where the model
places each patch's feature), marker tokens never V-sinks, every gate in generation, from a prefix
and under both paddings, the attention maps against transformers' eager weights, and train /
compare / calibrate as a user runs them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import lsg
from lsg.analysis.data import load_questions, observe
from lsg.data.record import VQARecord
from lsg.segments import Segments
from tests.conftest import samples
from tests.hand import assert_eager_matches_sdpa, assert_spec_generates_as_recompute, vsinks_with_planted_patch
from tests.tiny_families import (SPECS, assert_gate_refused_by, assert_maps_match_eager, assert_padding_invariant,
    assert_suffix_matches_full_forward, check_user_commands, decoder_inputs, load_tiny)
from tests.tiny_idefics3 import PATCH_PX, ROW_COL, SCALE, TILE_PX, save_tiny_idefics3

# model config -> (family, transformers class, config.json model_type)
VARIANTS = {"idefics3": ("idefics3", "Idefics3ForConditionalGeneration", "idefics3"),
            "smolvlm2": ("smolvlm", "SmolVLMForConditionalGeneration", "smolvlm")}
SIDE = TILE_PX // PATCH_PX  # ViT patches per tile side (8)
N = SIDE // SCALE  # merged tokens per tile side (4)
SQUARE = Image.new("RGB", (40, 40), (30, 200, 30))  # 2 x 2 sub-images + the global image
WIDE = Image.new("RGB", (60, 30), (200, 30, 30))  # 1 x 2 sub-images + the global image
QUESTION = "How many objects are in the image ?"


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory, variant):
    # seed 1: under seed 0 one of SmolVLM's greedy steps has the end-of-turn token as its argmax,
    # which generate may not pick before min_new_tokens (the cache-vs-recompute check needs it to)
    return save_tiny_idefics3(tmp_path_factory.mktemp(f"tiny-{variant}"), seed=1, family=VARIANTS[variant][0])


@pytest.fixture(scope="module")
def bb(folder, variant):
    return load_tiny(variant, folder)


@pytest.fixture(scope="module")
def eager(folder, variant):
    return load_tiny(variant, folder, attn_implementation="eager")


def test_the_checkpoint_loads_in_its_family_and_is_refused_by_the_others(bb, folder, variant, tmp_path):
    family, model_class, model_type = VARIANTS[variant]
    assert type(bb.model).__name__ == model_class and bb.family.name == family
    assert bb.family.language_model(bb.model) is bb.model.model.text_model
    # Only config.json: another family's config refuses it before any weight is read.
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    for other in ["llava-1.5-7b", "qwen2-vl", *(v for v in VARIANTS if v != variant)]:
        with pytest.raises(ValueError, match=f"model_type='{model_type}'.*use a model config of family '{family}'"):
            lsg.load_backbone(other, hf_id=str(tmp_path))


def test_marker_tokens_are_sys_tokens_and_never_v_sinks(bb):
    """With every ViT patch a sink, exactly the `<image>` tokens are V-sinks. The other tokens of
    the image's span are the processor's markers (named here by their strings); they are `sys`."""
    batch = bb.build_batch([SQUARE, WIDE], [QUESTION, QUESTION + " ?"], padding_side="left")

    def plant_everywhere(module, args, output):
        output.last_hidden_state[..., 0] = 1000.0

    vsink, vis = vsinks_with_planted_patch(bb, batch, plant_everywhere)
    assert torch.equal(vsink, vis)
    seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], bb.image_token_id)
    markers = bb.tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<global-img>", "\n", *ROW_COL])
    for b, n_tiles in enumerate([5, 3]):
        pos = vis[b].nonzero().flatten()
        span = torch.zeros_like(vis[b])
        span[pos[0]:pos[-1] + 1] = True
        inside = span & ~vis[b]
        assert int(vis[b].sum()) == n_tiles * N * N
        assert torch.isin(batch["input_ids"][b][inside], torch.tensor(markers)).all()
        assert (seg.sys[b] & inside).equal(inside) and not (vsink[b] & inside).any()
    # The markers join one image's runs; a second image after text is still refused.
    ids = batch["input_ids"][:1]
    with pytest.raises(ValueError, match=r"hold \[2\] images"):
        Segments.from_batch(torch.cat([ids, bb.tokenizer(["How"], return_tensors="pt")["input_ids"], ids], 1), None,
                            bb.image_token_id)
    with pytest.raises(ValueError, match=r"hold \[5\] images"):  # a plain id names no marker: one run per tile
        Segments.from_batch(ids, batch["attention_mask"][:1], int(bb.image_token_id))


# (image of sample 1, tile of that image, ViT patch in the tile, expected (panel, row, col) on token_grid)
PLANTED = [(WIDE, 1, 5 * SIDE + 6, (1, 5 // SCALE, N + 6 // SCALE)),  # sub-image (1, 2), patch row 5, col 6
           (WIDE, 2, 3 * SIDE + 5, (0, 3 // SCALE, 5 // SCALE)),  # the global image
           (SQUARE, 2, 7 * SIDE, (1, N + 7 // SCALE, 0))]  # sub-image (2, 1), patch row 7, col 0


@pytest.mark.parametrize("image, tile, patch, cell", PLANTED)
def test_a_planted_vit_sink_lands_where_the_model_places_its_patch_and_on_its_grid_cell(bb, image, tile, patch,
                                                                                         cell):
    """Independent of the family's map: the token is the one decoder input the planted patch
    changes (the connector's shuffle and the model's own placement of the tiles' features); the
    cell follows from the image processor's rows x cols and the patch's position."""
    batch = bb.build_batch([SQUARE, image], [QUESTION, QUESTION], padding_side="left")
    row = 5 + tile  # ViT rows: sample 0's 5 tiles, then sample 1's

    def plant(module, args, output):
        output.last_hidden_state[row, patch] = 0.0
        output.last_hidden_state[row, patch, 0] = 1000.0

    changed = (decoder_inputs(bb, batch, plant) != decoder_inputs(bb, batch)).any(-1)
    vsink, vis = vsinks_with_planted_patch(bb, batch, plant)
    assert int(changed.sum()) == 1 and torch.equal(vsink, changed)
    layout = bb.processor.image_processor(images=[[image]], return_row_col_info=True)
    rows, cols = layout["rows"][0][0], layout["cols"][0][0]
    assert (rows, cols) == ((1, 2) if image is WIDE else (2, 2))
    grid = bb.family.token_grid(bb.model, batch)[1]
    assert grid.shape == ((rows * cols + 1) * N * N, 3)
    assert tuple(grid[vsink[1][vis[1]].nonzero().item()].tolist()) == cell


def test_left_and_right_padding_give_the_same_loss_under_a_gate(bb):
    images, questions, answers = samples(3)
    questions = [q + " ?" * (3 * i) for i, q in enumerate(questions)]
    assert_padding_invariant(bb, lambda side: bb.build_batch(images, questions, answers, padding_side=side))


@pytest.mark.parametrize("spec", SPECS + ["lsg@2"])
def test_every_gate_generates_through_the_kv_cache_as_full_recompute(bb, spec):
    assert_spec_generates_as_recompute(bb, spec)


@pytest.mark.parametrize("spec", ["var", "outro", "var@2-3+oracle@1:0.2"])
def test_suffix_from_a_prefix_equals_the_full_gated_forward(bb, spec):
    images, questions, answers = samples(3)
    batch = bb.build_batch(images, [q + " ?" * i for i, q in enumerate(questions)], answers, padding_side="left")
    assert_suffix_matches_full_forward(bb, batch, spec)


@pytest.mark.slow
def test_train_compare_evaluate_and_calibrate_run_as_a_user_runs_them(tmp_path):
    """Once, on SmolVLM (Idefics3 shares every line of the adapter the entry points use)."""
    folder = save_tiny_idefics3(tmp_path / "tiny-smolvlm2", seed=1, family=VARIANTS["smolvlm2"][0])
    check_user_commands(tmp_path, folder, "smolvlm2")


def test_eager_attention_gives_what_sdpa_gives_with_every_kind_of_gate(bb, eager):
    images, questions, answers = samples(3)
    assert_eager_matches_sdpa(bb, eager, lambda b: b.build_batch(images, questions, answers, padding_side="left"))


def test_attention_maps_and_group_mass_match_eager_output_attentions(bb, eager, tmp_path_factory):
    """`lsg.analysis.observe` (inside attach, SDPA) against transformers' eager weights of the last
    prompt token over the visual tokens, and the token grid it reads is the family's."""
    records = load_questions({"name": "shapes", "root": str(tmp_path_factory.getbasetemp() / "shapes"), "n": 6}, 2)
    obs, batch, _, _ = assert_maps_match_eager(bb, eager, records)
    grids = eager.family.token_grid(eager.model, batch)
    for b, o in enumerate(obs):
        np.testing.assert_allclose(o.attn_mass.sum(1), 1.0, atol=1e-4)  # the groups cover every key
        assert np.array_equal(o.grid, grids[b].numpy()) and sorted(set(o.grid[:, 0])) == [0, 1]


def test_the_vit_activation_profile_reads_each_image_s_own_tiles(bb):
    """Images with 5 and 3 tiles in one batch: each image's mean |x| over its V-sink / other patches
    is taken over its own tiles (counted here from the image processor's rows x cols)."""
    square = samples(1)[0][0]
    wide = square.crop((0, 0, square.width, square.height // 2))
    records = [VQARecord(f"q{i}", QUESTION, "1", image_loader=lambda image=image: image)
               for i, image in enumerate([square, wide])]
    feats = []
    handle = bb.family.vit_module(bb.model).register_forward_hook(
        lambda m, a, out: feats.append(out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])))
    try:
        obs = observe(bb, records, None, [0], ["ordinary"], "last", maps=False, vit=True)
    finally:
        handle.remove()
    layout = bb.processor.image_processor(images=[[square], [wide]], return_row_col_info=True)
    tiles = [r[0] * c[0] + 1 for r, c in zip(layout["rows"], layout["cols"])]
    assert tiles == [5, 3]
    sinks = bb.sinks
    for o, x in zip(obs, torch.split(feats[0], [t * SIDE * SIDE for t in tiles])):
        phi = x[:, sinks.vit_dims].abs().amax(-1) / x.pow(2).mean(-1).sqrt()
        flagged = phi >= sinks.tau_vit
        assert 0 < int(flagged.sum()) < len(x)
        np.testing.assert_allclose(o.vit_abs_x, torch.stack([x[flagged].abs().mean(0), x[~flagged].abs().mean(0)]),
                                   rtol=1e-5, atol=1e-6)


def test_a_gate_checkpoint_is_refused_by_another_family(bb, tiny, tmp_path):
    assert_gate_refused_by(bb, tiny, tmp_path, match=bb.name)


def test_the_family_declares_the_inputs_its_batches_hold(bb):
    images, questions, answers = samples(2)
    batch = bb.build_batch(images, questions, answers)
    assert set(batch) == set(bb.family.model_inputs) == {"input_ids", "attention_mask", "labels", "pixel_values",
                                                          "pixel_attention_mask"}
    with torch.no_grad(), lsg.attach(bb, {}) as run:
        bb.model(**batch)
        assert run.inputs == {}  # the tiles' order is the tokens' order: the map reads no call argument


def test_a_processor_without_the_pixel_mask_is_refused_naming_it(bb):
    image_processor = bb.processor.image_processor
    image_processor.do_pad = False  # tiles of each image kept apart: no pixel_attention_mask
    try:
        with pytest.raises(ValueError, match=r"lacks \['pixel_attention_mask'\].*'" + bb.family.name):
            bb.build_batch([SQUARE], [QUESTION])
    finally:
        image_processor.do_pad = True
