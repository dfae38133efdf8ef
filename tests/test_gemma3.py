"""Gemma 3, loaded through the user path from a tiny-random hub-format checkpoint: V-sinks mapped
through the average-pooling projector, the model's own masks (bidirectional image block, sliding
windows) reaching the `lsg` attention path on SDPA and explicit rows, every gate in generation
(sliding layers keep every key), from a prefix and under both paddings, the analysis against
eager attention, and train / compare / calibrate as a user runs them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import lsg
from lsg.analysis.data import load_questions
from lsg.gates import KeyScaleGate
from lsg.scoring import decoder_hidden
from lsg.segments import Segments
from lsg.sinks import SinkConfig
from lsg.specs import parse_stack
from tests.conftest import samples
from tests.hand import assert_eager_matches_sdpa, assert_spec_generates_as_recompute, vsinks_with_planted_patch
from tests.tiny_families import (SINKS, SPECS, assert_cached_suffix_matches_full_forward, assert_gate_refused_by,
    assert_maps_match_eager, assert_padding_invariant, assert_suffix_matches_full_forward, check_user_commands,
    load_tiny)
from tests.tiny_gemma3 import (
    GEMMA3_SPECIAL,
    IMAGE_PX,
    LAYER_TYPES,
    PATCH_PX,
    SLIDING_WINDOW,
    SOFT_TOKENS,
    save_tiny_gemma3,
)

GRID = IMAGE_PX // PATCH_PX  # 8 x 8 ViT patches per image
SIDE = int(SOFT_TOKENS ** 0.5)  # 4 x 4 soft tokens
POOL = GRID // SIDE  # 2 x 2 patches per soft token
SLIDING, GLOBAL = LAYER_TYPES.index("sliding_attention"), LAYER_TYPES.index("full_attention")
IMAGE_TOKEN_ID = GEMMA3_SPECIAL.index("<image_soft_token>") + 2  # word_tokenizer: <pad>, <unk>, then the specials


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return load_tiny("gemma3", gemma_dir)


@pytest.fixture(scope="module")
def gemma_eager(gemma_dir):
    return load_tiny("gemma3", gemma_dir, attn_implementation="eager")


def batch_of(bb, answers=True, side="left", n=3):
    images, questions, replies = samples(n)
    return bb.build_batch(images, [q + " ?" * i for i, q in enumerate(questions)], replies if answers else None,
                          padding_side=side)


def hand_mask(batch, sliding: bool) -> torch.Tensor:
    """`(B, T, T)` True = may attend, from the batch alone: real keys, causal OR both tokens are
    image soft tokens (one image per prompt), AND `i - j < window` on a sliding layer (the window
    bounds how far back a query sees; a soft token sees every later soft token of its image)."""
    real_keys = batch["attention_mask"].bool()[:, None, :]
    image = batch["input_ids"] == IMAGE_TOKEN_ID
    T = image.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = ((j <= i)[None] | (image[:, :, None] & image[:, None, :])) & real_keys
    return allowed & (i - j < SLIDING_WINDOW)[None] if sliding else allowed


@torch.no_grad()
def gemma_attention_by_hand(bb, x, layer, allowed, key_scale=None):
    """Self-attention output `(B, T, D)` of Gemma 3 decoder layer `layer` from its input `x`:
    RMS-normed q and k, RoPE of the layer type at positions 0..T-1, logits scaled by
    `query_pre_attn_scalar ** -0.5`, `key_scale (B, T)` on the rotated keys, `allowed (B, T, T)`."""
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    layer_mod = bb.decoder_layers[layer]
    attn, config = layer_mod.self_attn, bb.family.text_config(bb.model)
    B, T, _ = x.shape
    d = config.head_dim
    h = layer_mod.input_layernorm(x)
    q = attn.q_norm(attn.q_proj(h).view(B, T, -1, d)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(h).view(B, T, -1, d)).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, -1, d).transpose(1, 2)
    cos, sin = bb.family.language_model(bb.model).rotary_emb(h, torch.arange(T)[None], config.layer_types[layer])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if key_scale is not None:
        k = k * key_scale[:, None, :, None]
    rep = q.shape[1] // k.shape[1]
    logits = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * config.query_pre_attn_scalar ** -0.5
    weights = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    o = (weights @ v.repeat_interleave(rep, 1)).transpose(1, 2)
    return attn.o_proj(o.reshape(B, T, -1))


@torch.no_grad()
def attention_output_and_input(bb, batch, layer, gates):
    """(self-attention output, hidden state entering the layer) of `layer`, `(B, T, D)` each."""
    seen = {}
    layer_mod = bb.decoder_layers[layer]
    handles = [layer_mod.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"]),
                                                   with_kwargs=True),
               layer_mod.self_attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))]
    try:
        with lsg.attach(bb, gates):
            decoder_hidden(bb, batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen["out"], seen["x"]


# --------------------------------------------------------------------------- loading and bad input
def test_the_checkpoint_loads_as_gemma3_and_is_refused_by_other_families(gemma, gemma_dir, tmp_path):
    assert type(gemma.model).__name__ == "Gemma3ForConditionalGeneration" and gemma.family.name == "gemma3"
    for other in ("llava-1.5-7b", "qwen2-vl"):
        with pytest.raises(ValueError, match="model_type='gemma3'.*use a model config of family 'gemma3'"):
            lsg.load_backbone(other, hf_id=str(gemma_dir))
    # Another family's checkpoint (config.json only: reading any weight would fail otherwise).
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision", "architectures": ["X"]}))
    with pytest.raises(ValueError, match="model_type='llava_onevision'.*family 'gemma3'.*family 'llava-onevision'"):
        lsg.load_backbone("gemma3", hf_id=str(tmp_path))
    with pytest.raises(ValueError, match="flash_attention_2.*Gemma 3 does not support FlashAttention.*sdpa or eager"):
        lsg.load_backbone("gemma3", hf_id=str(tmp_path), attn_implementation="flash_attention_2")


def test_the_prompt_has_one_bos_and_answers_end_with_end_of_turn(gemma):
    """The hub template starts with `{{ bos_token }}` and the tokenizer adds <bos> too; the family's
    `gemma3` template leaves it to the tokenizer. An answer is closed by <end_of_turn>."""
    batch = batch_of(gemma, side="right", n=1)
    tokens = gemma.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens[0] == "<bos>" and tokens.count("<bos>") == 1
    assert tokens[1:4] == ["<start_of_turn>", "user", "<start_of_image>"]
    labelled = [t for t, lab in zip(tokens, batch["labels"][0].tolist()) if lab != -100]
    assert labelled[-1] == "<end_of_turn>" and tokens.count("<image_soft_token>") == SOFT_TOKENS
    # Gemma 3's format: a system turn joins the first user turn; a follow-up only appends turns.
    with_system = dataclasses.replace(gemma, system_prompt="Be brief.")
    assert with_system.prompt_text("Q1") == ("<start_of_turn>user\nBe brief.\n\n<start_of_image>Q1<end_of_turn>\n"
                                             "<start_of_turn>model\n")
    assert with_system.followup_text("Q1", [], "A1", "Q2") == ("\n<start_of_turn>user\nQ2<end_of_turn>\n"
                                                               "<start_of_turn>model\n")


def test_a_processor_without_the_outputs_the_family_needs_says_which(gemma):
    images, questions, _ = samples(2)
    enc = gemma.processor(images=images, text=[gemma.prompt_text(q) for q in questions])
    with pytest.raises(ValueError, match=r"lacks \['pixel_values'\].*family 'gemma3'"):
        gemma.family.pixel_inputs({k: v for k, v in enc.items() if k != "pixel_values"}, torch.float32)
    crops = {**enc, "pixel_values": list(enc["pixel_values"]) * 2}  # what pan & scan's extra crops look like
    with pytest.raises(ValueError, match="4 images for 2 prompts.*do_pan_and_scan"):
        gemma.family.pixel_inputs(crops, torch.float32)


# --------------------------------------------------------------------------- V-sinks and the token grid
@pytest.mark.parametrize("image, row, col", [(0, 0, 0), (1, 3, 6), (1, 7, 7)])
def test_a_planted_vit_sink_lands_on_the_soft_token_the_projector_pools_it_into(gemma, image, row, col):
    """Independent of the mapping: the soft token whose decoder input embedding changes when the
    patch's ViT output changes is where the model puts it; the V-sink must land there, and the
    token grid must give the patch's cell on the 4 x 4 pooled grid."""
    batch = batch_of(gemma, answers=False, n=2)
    patch = row * GRID + col

    def plant(module, args, output):
        output.last_hidden_state[image, patch] = 0.0
        output.last_hidden_state[image, patch, 0] = 1000.0

    embeds = []
    lm = gemma.family.language_model(gemma.model)
    grab = lm.register_forward_pre_hook(lambda m, a, k: embeds.append(k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            gemma.model(**batch)
            planted = gemma.family.vit_module(gemma.model).register_forward_hook(plant)
            try:
                gemma.model(**batch)
            finally:
                planted.remove()
    finally:
        grab.remove()
    moved = (embeds[0] - embeds[1]).abs().amax(-1) > 0  # (B, T)
    assert int(moved.sum()) == 1 and bool(moved[image].any())
    vsink, vis = vsinks_with_planted_patch(gemma, batch, plant)
    assert torch.equal(vsink, moved)
    token = int(vsink[image][vis[image]].nonzero())
    assert tuple(gemma.family.token_grid(gemma.model, batch)[image][token].tolist()) == (0, row // POOL, col // POOL)


def test_a_soft_token_is_a_v_sink_when_any_of_its_patches_is_and_markers_never_are(gemma):
    batch = batch_of(gemma, answers=False, n=2)
    ids = gemma.tokenizer.convert_tokens_to_ids
    markers = (batch["input_ids"] == ids("<start_of_image>")) | (batch["input_ids"] == ids("<end_of_image>"))
    assert markers.sum(1).tolist() == [2, 2]

    def plant_all(module, args, output):
        output.last_hidden_state[..., 0] = 1000.0

    vsink, vis = vsinks_with_planted_patch(gemma, batch, plant_all)
    assert torch.equal(vsink, vis) and not (vsink & markers).any()
    flags = torch.zeros(2 * GRID * GRID, dtype=torch.bool)
    flags[[GRID + 1, GRID * GRID + 2 * GRID + 5]] = True  # image 0: patch (1, 1); image 1: patch (2, 5)
    expected = torch.zeros(2 * SOFT_TOKENS, dtype=torch.bool)
    expected[[0, SOFT_TOKENS + (2 // POOL) * SIDE + 5 // POOL]] = True
    assert torch.equal(gemma.family.patches_to_tokens(gemma.model, flags), expected)


# --------------------------------------------------------------------------- the model's masks on the lsg path
def test_the_image_block_and_sliding_windows_reach_the_explicit_rows_as_eager_builds_them(gemma_eager):
    """Inside `attach` an eager backbone runs every layer on the project's explicit path with the
    mask transformers builds for `lsg`; its weights must equal transformers' eager weights, zero
    exactly where the hand mask forbids (causal OR image block, AND the window on sliding layers)."""
    batch = batch_of(gemma_eager, answers=False)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        reference = gemma_eager.model(**inputs, output_attentions=True).attentions
        with lsg.attach(gemma_eager, {}):
            ours = gemma_eager.model(**inputs, output_attentions=True).attentions
    for layer, (want, got) in enumerate(zip(reference, ours)):
        allowed = hand_mask(batch, LAYER_TYPES[layer] == "sliding_attention")
        rows = batch["attention_mask"].bool()  # real query rows
        got, want = got.transpose(1, 2)[rows], want.transpose(1, 2)[rows]  # (N_rows, H, T)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert torch.equal(got > 0, allowed[rows][:, None].expand_as(got))
    T = batch["input_ids"].shape[1]
    for sliding in (False, True):  # the case is one the masks decide: soft tokens see later ones
        assert (hand_mask(batch, sliding) & torch.ones(T, T).triu(1).bool())[batch["input_ids"] == IMAGE_TOKEN_ID].any()
    assert (hand_mask(batch, False) & ~hand_mask(batch, True)).any()  # and the window cuts the prompt


@pytest.mark.parametrize("layer", [SLIDING, GLOBAL])
def test_a_key_scaling_gate_on_sdpa_rows_equals_the_hand_computation(gemma, layer):
    """Visual keys x 2 (no V-sink flagged: every soft token is "rest") on a sliding and on a
    global layer: SDPA rows with the model's masks, against the hand attention and hand mask."""
    no_vsinks = dataclasses.replace(gemma, sinks=SinkConfig(**{**SINKS, "tau_vit": 1e9}))
    batch = batch_of(gemma, side="right")
    out, x = attention_output_and_input(no_vsinks, batch, layer, {layer: KeyScaleGate([0.3, 2.0], "vsink-rest")})
    scale = torch.where(batch["input_ids"] == IMAGE_TOKEN_ID, 2.0, 1.0)
    want = gemma_attention_by_hand(gemma, x, layer, hand_mask(batch, layer == SLIDING), key_scale=scale)
    rows = batch["attention_mask"].bool()
    torch.testing.assert_close(out[rows], want[rows], atol=2e-5, rtol=1e-4)
    plain = gemma_attention_by_hand(gemma, x, layer, hand_mask(batch, layer == SLIDING))
    assert (out[rows] - plain[rows]).abs().max() > 1e-3  # the gate moved it


# --------------------------------------------------------------------------- gates end to end
def test_left_and_right_padding_give_the_same_loss_under_a_gate(gemma):
    def check(batch):
        seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], gemma.image_token_id, batch["labels"])
        assert seg.vis.sum(1).tolist() == [SOFT_TOKENS] * 3 and torch.equal(batch["token_type_ids"].bool(), seg.vis)

    assert_padding_invariant(gemma, lambda side: batch_of(gemma, side=side), check=check)


@pytest.mark.parametrize("spec", SPECS + ["lsg@2"])
def test_every_gate_generates_through_the_kv_cache_as_full_recompute(gemma, spec):
    """Prompts are longer than the window: sliding layers' decode steps see every key."""
    assert_spec_generates_as_recompute(gemma, spec)


@pytest.mark.parametrize("spec", ["oracle@0:0.3", "var", "outro", "var@2-3+oracle@1:0.2"])
def test_suffix_from_a_prefix_equals_the_full_gated_forward(gemma, spec):
    """The suffix runs the language model alone: it must get the image block and the windows
    (`Family.decoder_attention_mask`); layer 0's prefix holds the scaled embeddings."""
    batch = batch_of(gemma)
    layers, _, _ = assert_suffix_matches_full_forward(gemma, batch, spec)
    # per-sample entries reassembled with another padding side
    assert_cached_suffix_matches_full_forward(gemma, layers, batch, batch_of(gemma, side="right"), ["a", "b", "c"])


def test_eager_attention_gives_what_sdpa_gives_with_every_kind_of_gate(gemma, gemma_eager):
    assert_eager_matches_sdpa(gemma, gemma_eager, lambda bb: batch_of(bb))


@pytest.mark.slow
def test_train_compare_evaluate_and_calibrate_run_as_a_user_runs_them(gemma_dir, tmp_path):
    check_user_commands(tmp_path, gemma_dir, "gemma3")


def test_a_gate_checkpoint_is_refused_by_another_family(gemma, tiny, tmp_path):
    assert_gate_refused_by(gemma, tiny, tmp_path, match="gemma3")


def test_the_family_declares_the_inputs_its_batches_hold(gemma):
    batch = batch_of(gemma)
    assert set(batch) == set(gemma.family.model_inputs) == {"input_ids", "attention_mask", "labels", "pixel_values",
                                                            "token_type_ids"}
    with torch.no_grad(), lsg.attach(gemma, {}) as run:
        gemma.model(**batch)
        assert run.inputs == {}  # the pooled layout is fixed: the map reads no call argument


# --------------------------------------------------------------------------- analysis
def test_attention_maps_and_group_mass_match_eager_output_attentions(gemma, gemma_eager, tmp_path_factory):
    questions = load_questions({"name": "shapes", "root": str(tmp_path_factory.getbasetemp() / "shapes"), "n": 6}, 3)
    obs, _, _, _ = assert_maps_match_eager(gemma, gemma_eager, questions, visual_mass=True)
    for o in obs:
        np.testing.assert_allclose(o.attn_mass.sum(1), 1.0, atol=1e-4)


def test_a_cache_that_drops_sliding_keys_is_refused_inside_attach(gemma):
    """attach replaces the cache generate makes by one that keeps every position, but keeps a cache
    the caller passes: transformers' sliding-window cache keeps only a sliding layer's window, a
    gate there would scale the wrong keys, so the attention path refuses it."""
    from transformers import DynamicCache

    stack = parse_stack(f"oracle@{SLIDING}:0.3", gemma)
    batch = batch_of(gemma, answers=False)
    assert batch["input_ids"].shape[1] > gemma.model.config.text_config.sliding_window
    sliding = DynamicCache(config=gemma.model.config.get_text_config(decoder=True))
    assert any(layer.is_sliding for layer in sliding.layers)
    with torch.no_grad(), lsg.attach(gemma, stack.layers), pytest.raises(RuntimeError, match="drops or pads keys"):
        gemma.model.generate(**batch, cache=sliding, max_new_tokens=3, do_sample=False)
