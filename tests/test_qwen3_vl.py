"""Qwen3-VL, loaded through the user path from a tiny-random hub-format checkpoint: V-sinks mapped
through the 2x2 merger onto the decoder's own image-feature positions; DeepStack (ViT block
features added after decoder layers 0 and 1 at the visual tokens) seen by sink values, by a gate's
`prepare` and by a suffix run from a prefix inside the DeepStack range; every gate in generation,
under both paddings, eager = SDPA; the analysis' maps against eager attention; train / compare /
calibrate as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import lsg
from lsg.analysis.data import load_questions
from lsg.gates import KeyScaleGate, LSGGate
from lsg.gates.base import Gate
from lsg.prefix import compute_prefixes, run_suffix
from lsg.scoring import decoder_hidden
from lsg.segments import Segments
from lsg.specs import parse_stack
from tests.conftest import samples
from tests.hand import assert_eager_matches_sdpa, assert_spec_generates_as_recompute, hand_sinks, \
    vsinks_with_planted_patch
from tests.tiny_families import (SINKS, SPECS, assert_cached_suffix_matches_full_forward, assert_gate_refused_by,
    assert_maps_match_eager, assert_padding_invariant, assert_suffix_matches_full_forward, check_user_commands,
    load_tiny, real)
from tests.tiny_qwen3_vl import DEEPSTACK_VISUAL_INDEXES, MERGE, PATCH_PX, save_tiny_qwen3_vl

SIZE = 48  # image px: 6x6 patches of 8 px, 3x3 visual tokens
SIDE = SIZE // PATCH_PX // MERGE  # visual tokens per side
PATCHES = (SIZE // PATCH_PX) ** 2  # ViT patches per image
N_DEEPSTACK = len(DEEPSTACK_VISUAL_INDEXES)  # decoder layers 0..N_DEEPSTACK-1 get DeepStack features


@pytest.fixture(scope="module")
def q3_dir(tmp_path_factory):
    return save_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"), image_size=SIZE)


@pytest.fixture(scope="module")
def q3(q3_dir):
    return load_tiny("qwen3-vl", q3_dir)


@pytest.fixture(scope="module")
def q3_eager(q3_dir):
    return load_tiny("qwen3-vl", q3_dir, attn_implementation="eager")


def batch_of(bb, n=3, answers=True, side="left"):
    images, questions, replies = samples(n)
    return bb.build_batch(images, [q + " ?" * i for i, q in enumerate(questions)], replies if answers else None,
                          padding_side=side)


def planting(rows):
    """A forward pre-hook for the ViT merger: its input rows `rows` (the ViT output `vit_features`
    reads, same tensor) get a massive dim 0 (1000) before the merger reads them."""
    def plant(module, args):
        for row in rows:
            args[0][row] = 0.0
            args[0][row, 0] = 1000.0
    return plant


def decoder_input_embeds(bb, batch, planted_rows=()):
    """`(B, T, D)` the language model's input embeddings (the model's own placement of the merged
    image features), with ViT rows `planted_rows` planted before the merger (`planting`)."""
    seen = {}
    handles = [bb.family.language_model(bb.model).register_forward_pre_hook(
        lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True),
        bb.model.model.visual.merger.register_forward_pre_hook(planting(planted_rows))]
    try:
        with torch.no_grad():
            bb.model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return seen["embeds"]


def vsinks_planted_before_the_merger(bb, batch, rows):
    """V-sink and visual masks `(B, T)` (`tests.hand.vsinks_with_planted_patch`) with ViT rows `rows`
    planted before the merger, so the model's own embeddings move with them."""
    handle = bb.model.model.visual.merger.register_forward_pre_hook(planting(rows))
    try:
        return vsinks_with_planted_patch(bb, batch, lambda *a: None)
    finally:
        handle.remove()


def test_the_checkpoint_loads_as_qwen3_vl_and_other_families_refuse_it_before_reading_weights(q3, q3_dir, tmp_path):
    assert type(q3.model).__name__ == "Qwen3VLForConditionalGeneration" and q3.family.name == "qwen3-vl"
    config_only = tmp_path / "config-only"  # no weights: a refusal must come from config.json alone
    config_only.mkdir()
    (config_only / "config.json").write_text((q3_dir / "config.json").read_text())
    for other in ("llava-1.5-7b", "qwen2-vl", "qwen2.5-vl", "llava-onevision"):
        with pytest.raises(ValueError, match="model_type='qwen3_vl'.*use a model config of family 'qwen3-vl'"):
            lsg.load_backbone(other, hf_id=str(config_only))
    qwen2 = tmp_path / "qwen2-config"
    qwen2.mkdir()
    (qwen2 / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="model_type='qwen2_vl'.*family 'qwen3-vl'.*family 'qwen2-vl'"):
        lsg.load_backbone("qwen3-vl", hf_id=str(qwen2))


def test_vit_features_are_the_merger_input_in_token_order(q3):
    """Merging the features `vit_features` returns gives the model's own merged tokens (the
    feature layer is the last ViT block's output, the merger's input)."""
    seen = {}
    vit = q3.family.vit_module(q3.model)
    handle = vit.register_forward_hook(lambda m, args, kwargs, out: seen.update(
        feats=q3.family.vit_features(q3.model, args, kwargs, out), merged=out.pooler_output), with_kwargs=True)
    try:
        with torch.no_grad():
            q3.model(**batch_of(q3, 2, answers=False))
    finally:
        handle.remove()
    assert seen["feats"].shape[0] == 2 * PATCHES
    torch.testing.assert_close(vit.merger(seen["feats"]), seen["merged"])


def test_a_planted_vit_sink_lands_where_the_model_places_its_merged_token(q3):
    """Independent of the patch -> token map: the positions whose decoder input embedding moves when
    ViT rows are planted (the model's own feature placement) are exactly the V-sinks."""
    batch = batch_of(q3, answers=False)
    rows = [5, PATCHES + 4 * 7 + 2]  # image 0: token 1; image 1: token 7
    moved = (decoder_input_embeds(q3, batch, rows) - decoder_input_embeds(q3, batch)).abs().sum(-1) > 0
    vsink, vis = vsinks_planted_before_the_merger(q3, batch, rows)
    assert moved.sum(1).tolist() == [1, 1, 0]
    assert torch.equal(vsink, moved)
    assert vis[0].nonzero().flatten()[1] == moved[0].nonzero().item()


def test_marker_tokens_are_never_v_sinks(q3):
    """Every ViT patch planted: the V-sinks are exactly the positions where the decoder's input is an
    image feature rather than the token's own embedding, never `<|vision_start|>` / `<|vision_end|>`."""
    batch = batch_of(q3, answers=False)
    embeds = decoder_input_embeds(q3, batch)
    token_embeds = q3.family.language_model(q3.model).embed_tokens(batch["input_ids"])
    features = (embeds != token_embeds).any(-1)
    vsink, vis = vsinks_planted_before_the_merger(q3, batch, range(3 * PATCHES))
    assert torch.equal(vsink, features) and torch.equal(vis, features)
    tok = q3.tokenizer.convert_tokens_to_ids
    markers = (batch["input_ids"] == tok("<|vision_start|>")) | (batch["input_ids"] == tok("<|vision_end|>"))
    assert markers.sum().item() == 6 and not (vsink & markers).any()


def test_token_grid_places_a_lit_pixel_patch_on_its_cell(q3):
    """Light one 8 px patch at (row, col) of a black image; the pixel_values row that changes (the
    processor's own patch order) is planted as a V-sink, and the token it lands on must lie at
    grid cell (row // 2, col // 2)."""
    black = Image.new("RGB", (SIZE, SIZE))
    base = q3.build_batch([black], ["How many objects ?"])
    for row, col in [(0, 0), (1, 4), (5, 2)]:
        lit = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        lit[PATCH_PX * row:PATCH_PX * (row + 1), PATCH_PX * col:PATCH_PX * (col + 1)] = 255
        pixels = q3.build_batch([Image.fromarray(lit)], ["How many objects ?"])["pixel_values"]
        changed = (pixels - base["pixel_values"]).abs().sum(-1).nonzero().flatten().tolist()
        assert len(changed) == 1
        vsink, vis = vsinks_planted_before_the_merger(q3, base, changed)
        flags = vsink[0][vis[0]]
        assert int(flags.sum()) == 1
        grid = q3.family.token_grid(q3.model, base)[0]
        assert tuple(grid[flags.nonzero().item()].tolist()) == (0, row // MERGE, col // MERGE)


class Reads(Gate):
    """A gate that changes nothing and keeps the hidden state its `prepare` receives."""

    def prepare(self, view, hidden):
        return hidden.clone()


def model_layer_inputs(bb, batch):
    """`{layer: (B, T, D)}` hidden state entering each decoder layer in the plain model (pre-hooks),
    and transformers' `output_hidden_states`."""
    seen, handles = {}, []
    for l, layer in enumerate(bb.decoder_layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, l=l: seen.__setitem__(l, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True))
    try:
        with torch.no_grad():
            hidden = bb.model(**batch, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    return seen, hidden


def deepstack_at_visual_tokens(bb, batch):
    """`(N_DEEPSTACK, B, T, D)` the model's DeepStack features (`get_image_features`), at the image
    tokens in order, zero elsewhere."""
    with torch.no_grad():
        feats = bb.model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).deepstack_features
    where = batch["input_ids"] == bb.image_token_id
    out = torch.zeros(len(feats), *where.shape, bb.hidden_size)
    for i, per_image in enumerate(feats):
        out[i][where] = torch.cat(per_image)
    return out


def test_a_gate_and_the_sink_values_read_the_model_own_layer_input_with_deepstack(q3):
    """At every layer, `prepare` (whole forward, and suffix from a prefix at layer 1) and the sink
    values read the hidden state the model's layer receives: `output_hidden_states[l]` plus DeepStack
    feature l-1 at the visual tokens for l <= N_DEEPSTACK (transformers records layer outputs before
    the DeepStack addition)."""
    batch = batch_of(q3)
    inputs, hidden = model_layer_inputs(q3, batch)
    deepstack = deepstack_at_visual_tokens(q3, batch)
    vis = batch["input_ids"] == q3.image_token_id
    for l in range(q3.num_layers):
        expected = hidden[l] + (deepstack[l - 1] if 1 <= l <= N_DEEPSTACK else 0)
        torch.testing.assert_close(inputs[l], expected, atol=1e-6, rtol=1e-5)
        if 1 <= l <= N_DEEPSTACK:
            assert (inputs[l] - hidden[l])[vis].abs().amax() > 1e-3 and torch.equal(inputs[l][~vis], hidden[l][~vis])
    gates = {l: Reads() for l in range(q3.num_layers)}
    with torch.no_grad(), lsg.attach(q3, gates) as run:
        decoder_hidden(q3, batch)
        prepared, phi = dict(run.ctx.gate_state), dict(run.ctx.sink_phi)
    for l in range(q3.num_layers):
        torch.testing.assert_close(prepared[(l, 0)], inputs[l], atol=1e-6, rtol=1e-5)
        x = inputs[l][batch["attention_mask"].bool()]  # real tokens (padding has rms 0)
        torch.testing.assert_close(phi[l][batch["attention_mask"].bool()],
                                   x[:, SINKS["llm_dims"]].abs().amax(-1) / x.pow(2).mean(-1).sqrt())
    state = {}
    with torch.no_grad():
        prefix = compute_prefixes(q3, batch, [1])[0][1]
        run_suffix(q3, prefix, {l: Reads() for l in range(1, q3.num_layers)}, gate_state=state)
    for l in range(1, q3.num_layers):
        torch.testing.assert_close(state[(l, 0)], inputs[l], atol=1e-6, rtol=1e-5)


def test_calibration_reads_phi_on_the_model_own_layer_input_with_deepstack(q3_eager):
    """`lsg.calibration.calibrate`: each layer's visual phi maximum and flagged count are those of the
    hidden state entering the layer (DeepStack included), computed by hand."""
    from lsg.calibration import calibrate

    batch = batch_of(q3_eager, 4, answers=False)
    report = calibrate(q3_eager, [batch], tau=SINKS["tau_llm"])
    inputs, hidden = model_layer_inputs(q3_eager, batch)
    vis = batch["input_ids"] == q3_eager.image_token_id
    for stats in report.layers:
        x = inputs[stats.layer][vis]
        phi = x[:, SINKS["llm_dims"]].abs().amax(-1) / x.pow(2).mean(-1).sqrt()
        assert stats.vis_phi_max == pytest.approx(float(phi.max()), rel=1e-5)
        assert stats.flagged_per_image == pytest.approx(float((phi >= SINKS["tau_llm"]).sum()) / 4)
    naive = hidden[1][vis]  # transformers' record at layer 1: before DeepStack, another max
    assert float((naive[:, SINKS["llm_dims"]].abs().amax(-1) / naive.pow(2).mean(-1).sqrt()).max()) != \
        pytest.approx(report.layers[1].vis_phi_max, rel=1e-3)


@pytest.mark.parametrize("spec", ["oracle@0:0.3/0.5/0.9", "var@1-3", "lsg@1", "var@2-3+oracle@1:0.2", "outro"])
def test_suffix_from_a_prefix_inside_the_deepstack_range_equals_the_full_gated_forward(q3, spec, tmp_path):
    batch = batch_of(q3)
    if spec == "lsg@1":
        torch.manual_seed(1)
        gate = LSGGate(q3.hidden_size, "vsink-lsink-ordinary")
        torch.nn.init.normal_(gate.fc2.weight, std=0.5)
        layers = {1: [gate]}
    else:
        layers = parse_stack(spec, q3).layers
    start = min(layers)
    # a key scale at the start layer, so that the stack surely moves the output of the tiny random model
    layers = {**layers, start: [*layers[start], KeyScaleGate([0.5, 2.0, 1.0], "vsink-lsink-ordinary")]}
    _, prefix, plain = assert_suffix_matches_full_forward(q3, batch, layers)
    with torch.no_grad():
        baseline = decoder_hidden(q3, batch)
    assert (real(plain, batch) - real(baseline, batch)).abs().amax() > 1e-4, "the gates must change the output"
    assert sorted(prefix.additions) == list(range(start, N_DEEPSTACK))  # DeepStack still to add
    # The per-sample cache (host memory; disk shards read back by a new cache), reassembled into
    # a batch of another width and padding side.
    other = batch_of(q3, side="right")
    other = {k: (v[1:] if k not in ("pixel_values", "image_grid_thw") else v) for k, v in other.items()}
    other["image_grid_thw"] = other["image_grid_thw"][1:]
    other["pixel_values"] = other["pixel_values"][PATCHES:]
    for disk in (None, tmp_path / "disk"):
        cached = assert_cached_suffix_matches_full_forward(q3, layers, batch, other, ["b", "c"], disk_dir=disk)
        assert sorted(cached.additions) == sorted(prefix.additions)


def test_left_and_right_padding_give_the_same_loss_under_a_gate(q3):
    def check(batch):
        seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], q3.image_token_id, batch["labels"])
        assert seg.vis.sum(1).tolist() == [SIDE * SIDE] * 3

    assert_padding_invariant(q3, lambda side: batch_of(q3, side=side), spec="oracle@1:0.3/0.5/0.9+var@0", check=check)


@pytest.mark.parametrize("spec", SPECS + ["lsg@2"])
def test_every_gate_generates_through_the_kv_cache_as_full_recompute(q3, spec):
    assert_spec_generates_as_recompute(q3, spec)


def test_eager_attention_gives_what_sdpa_gives_with_every_kind_of_gate(q3, q3_eager):
    assert_eager_matches_sdpa(q3, q3_eager, batch_of)


def test_analysis_maps_match_eager_attention_and_l_sinks_are_read_with_deepstack(q3, q3_eager, tmp_path_factory):
    """`lsg.analysis.observe`: the last prompt token's maps over the visual tokens equal transformers'
    eager `output_attentions`, and its L-sinks at every layer are those of the model's own layer
    input (DeepStack included), computed by hand."""
    root = tmp_path_factory.getbasetemp() / "shapes"  # the split tests/test_analysis.py writes, when run with it
    questions = load_questions({"name": "shapes", "root": str(root), "n": 6}, 3)
    obs, batch, seg, _ = assert_maps_match_eager(q3, q3_eager, questions)
    inputs, _ = model_layer_inputs(q3, q3.model_inputs(batch))
    for o in obs:
        assert o.grid.shape == (SIDE * SIDE, 3)
    vsink = torch.zeros_like(seg.vis)
    vsink[seg.vis] = torch.as_tensor(np.concatenate([o.vsink for o in obs]))
    for l in range(q3.num_layers):
        expected = hand_sinks(q3, inputs[l], seg.vis) & ~vsink
        assert np.array_equal(np.concatenate([o.lsink[l] for o in obs]), expected[seg.vis].numpy()), l


@pytest.mark.slow
def test_train_compare_evaluate_and_calibrate_run_as_a_user_runs_them(q3_dir, tmp_path):
    check_user_commands(tmp_path, q3_dir, "qwen3-vl")


def test_a_gate_checkpoint_is_refused_by_another_family(q3, tiny, tmp_path):
    assert_gate_refused_by(q3, tiny, tmp_path, match="qwen3-vl")


def test_the_family_declares_the_inputs_its_batches_hold(q3):
    batch = batch_of(q3, 2)
    assert set(batch) == set(q3.family.model_inputs) == {"input_ids", "attention_mask", "labels", "pixel_values",
                                                          "image_grid_thw", "mm_token_type_ids"}
    with torch.no_grad(), lsg.attach(q3, {}) as run:
        q3.model(**batch)
        assert run.inputs == {}  # one 2x2 patch group is one token: the map reads no call argument


def test_a_processor_without_the_grid_says_what_is_missing(q3):
    with pytest.raises(ValueError, match=r"lacks \['image_grid_thw'\].*'qwen3-vl'"):
        q3.family.pixel_inputs({"pixel_values": np.zeros((4, 384), dtype=np.float32)}, torch.float32)
