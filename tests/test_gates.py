"""Gates against attention computed by hand (SPEC sections 1-4)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import lsg
from lsg.context import ForwardContext, LayerView
from lsg.gates import KeyScaleGate, LSGGate
from lsg.gates.lsg import SIGNALS
from lsg.gates.base import git_commit
from lsg.segments import Segments
from lsg.sinks import SinkConfig
from lsg.scoring import answer_loss
from tests.conftest import samples
from tests.hand import assert_cache_matches_recompute, attention_by_hand, causal_allowed

LAYER = 2


def hand_groups(bb, batch, layer):
    """V-sink / L-sink / ordinary group per token, recomputed from raw hidden states.

    Independent of lsg.sinks and lsg.context: V-sinks from the ViT feature layer,
    L-sinks from the hidden state entering `layer`, both with the rms criterion.
    """
    cfg = bb.sinks
    with torch.no_grad():
        vit = bb.model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
        feats = vit.hidden_states[bb.model.config.vision_feature_layer][:, 1:]
        out = bb.model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    x = out.hidden_states[layer]

    def rms_phi(h):
        return h[..., cfg.vit_dims if h is feats else cfg.llm_dims].abs().amax(-1) / h.pow(2).mean(-1).sqrt()

    vis = (batch["input_ids"] == bb.image_token_id) & batch["attention_mask"].bool()
    groups = torch.full(vis.shape, -1)
    vflags = (rms_phi(feats) >= cfg.tau_vit).flatten()
    vsink = torch.zeros_like(vis)
    vsink[vis] = vflags
    lsink = (rms_phi(x) >= cfg.tau_llm) & vis & ~vsink
    groups[vis] = 2
    groups[lsink] = 1
    groups[vsink] = 0
    return groups, x


def gated_attention_output(bb, batch, gates):
    captured = {}
    attn = bb.decoder_layers[LAYER].self_attn

    def keep(module, args, output):
        captured["out"] = output[0]

    handle = attn.register_forward_hook(keep)
    try:
        with torch.no_grad(), lsg.attach(bb, gates):
            bb.model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    return captured["out"]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_key_scale_gate_equals_attention_with_hand_scaled_keys(impl, tiny, tiny_eager, batch):
    bb = tiny if impl == "sdpa" else tiny_eager
    coefficients = torch.tensor([0.3, 1.7, 0.6])
    groups, x = hand_groups(bb, batch, LAYER)
    assert all((groups == g).any() for g in range(3)), "test data must contain every group"
    scale = torch.where(groups >= 0, coefficients[groups.clamp_min(0)], torch.ones(()))
    expected = attention_by_hand(bb, x, LAYER, causal_allowed(batch["attention_mask"]), key_scale=scale)
    got = gated_attention_output(bb, batch, {LAYER: KeyScaleGate(coefficients.tolist(), "vsink-lsink-ordinary")})
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)
    # and the gate really changed something
    assert not torch.allclose(got[real], attention_by_hand(bb, x, LAYER, causal_allowed(batch["attention_mask"]))[real], atol=1e-4)


def test_lsg_gate_with_gain_1_halves_visual_keys(tiny, batch):
    groups, x = hand_groups(tiny, batch, LAYER)
    scale = torch.where(groups >= 0, torch.tensor(0.5), torch.tensor(1.0))
    expected = attention_by_hand(tiny, x, LAYER, causal_allowed(batch["attention_mask"]), key_scale=scale)
    got = gated_attention_output(tiny, batch, {LAYER: LSGGate(tiny.hidden_size, "vsink-rest", gain=1.0)})
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grouping", ["vsink-rest", "vsink-lsink-ordinary", "lsink-rest"])
def test_lsg_gate_with_gain_G_is_identity_at_init(tiny, batch, grouping):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        base = tiny.model(**inputs).logits
        with lsg.attach(tiny, {LAYER: LSGGate(tiny.hidden_size, grouping, gain="G")}):
            gated = tiny.model(**inputs).logits
    assert torch.equal(base, gated) or torch.allclose(base, gated, atol=1e-6)
    with torch.no_grad(), lsg.attach(tiny, {LAYER: LSGGate(tiny.hidden_size, grouping, gain=1.0)}):
        halved = tiny.model(**inputs).logits
    assert (halved - base).abs().max() > 1e-4


def gate_ratios(bb, batch, gate, layer=LAYER):
    with torch.no_grad(), lsg.attach(bb, {layer: gate}) as run:
        loss = answer_loss(bb, batch)
        ratios = gate.ratios(run.ctx.gate_state[(layer, 0)])
    return ratios, loss


def trained_like_gate(hidden_size, signal="last"):
    """An LSG gate with random (non-uniform) output, so ratios depend on the input."""
    torch.manual_seed(1)
    gate = LSGGate(hidden_size, "vsink-lsink-ordinary", signal=signal)
    torch.nn.init.normal_(gate.fc2.weight, std=0.1)
    return gate


@pytest.mark.parametrize("signal", SIGNALS)
def test_answer_tokens_do_not_change_gate_ratio(tiny, signal):
    """Teacher forcing: other answers (other tokens, other lengths) leave every signal's ratios as they were."""
    images, questions, answers = samples()
    gate = trained_like_gate(tiny.hidden_size, signal)
    r1, _ = gate_ratios(tiny, tiny.build_batch(images, questions, answers), gate)
    other = ["Z " + a + " ( A B C" for a in answers]
    r2, _ = gate_ratios(tiny, tiny.build_batch(images, questions, other), gate)
    assert r1.std(0).max() > 1e-3, "ratios should vary across samples"
    torch.testing.assert_close(r1, r2, atol=0, rtol=0)


@pytest.mark.parametrize("signal", SIGNALS)
def test_left_and_right_padding_give_same_ratios_and_loss(tiny, signal):
    """Padding is never read: left and right padding give every signal the same ratios."""
    images, questions, answers = samples()
    questions = [q + " ?" * (3 * i) for i, q in enumerate(questions)]
    gate = trained_like_gate(tiny.hidden_size, signal)
    right = tiny.build_batch(images, questions, answers, padding_side="right")
    left = tiny.build_batch(images, questions, answers, padding_side="left")
    assert not torch.equal(right["attention_mask"], left["attention_mask"])
    seg_r = Segments.from_batch(right["input_ids"], right["attention_mask"], tiny.image_token_id, right["labels"])
    seg_l = Segments.from_batch(left["input_ids"], left["attention_mask"], tiny.image_token_id, left["labels"])
    for name in ("sys", "vis", "user", "out"):
        assert getattr(seg_r, name).sum(1).tolist() == getattr(seg_l, name).sum(1).tolist()
    r_right, loss_right = gate_ratios(tiny, right, gate)
    # Left padding shifts positions; give the model the same RoPE positions as right padding.
    r_left, loss_left = gate_ratios(tiny, {**left, "position_ids": (left["attention_mask"].cumsum(1) - 1).clamp_min(0)},
                                    gate)
    torch.testing.assert_close(r_left, r_right, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_left, loss_right, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gate_factory", [
    lambda d: trained_like_gate(d),
    lambda d: KeyScaleGate([0.2, 1.5, 0.7], "vsink-lsink-ordinary"),
])
def test_generation_with_kv_cache_matches_full_recompute(tiny, gate_factory):
    gate = gate_factory(tiny.hidden_size)
    with torch.no_grad():
        assert_cache_matches_recompute(tiny, {LAYER: gate, 0: KeyScaleGate([0.5, 2.0, 1.0], "vsink-lsink-ordinary")})


@pytest.mark.parametrize("cache_keyword", ["cache", "past_key_values"])
def test_gated_decode_step_through_either_cache_keyword_matches_full_recompute(tiny, cache_keyword):
    """transformers >= 5.24 hands the KV cache to `LlavaModel.forward` as `cache=`, earlier
    releases as `past_key_values=`: a decode step under either name must extend the prefill's
    gate context (not be taken for a new prefill of one token)."""
    from transformers import DynamicCache

    images, questions, _ = samples(3)
    batch = tiny.build_batch(images, questions, padding_side="left")
    gates = {LAYER: trained_like_gate(tiny.hidden_size), 0: KeyScaleGate([0.5, 2.0, 1.0], "vsink-lsink-ordinary")}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad(), lsg.attach(tiny, gates) as run:
        cache = DynamicCache(config=tiny.model.config.text_config)
        hidden = tiny.model.model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                                  position_ids=positions, use_cache=True, **{cache_keyword: cache}).last_hidden_state
        new = tiny.model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
        step = tiny.model.model(input_ids=new, attention_mask=mask, position_ids=positions[:, -1:] + 1,
                                use_cache=True, **{cache_keyword: cache}).last_hidden_state[:, -1]
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]  # the decoded token is `out`, as in the cached step
        run.labels = labels  # the run state's labels reach the context of the next forward
        full = tiny.model.model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                                position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                                use_cache=False).last_hidden_state[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_gate_checkpoint_round_trip_and_refusal(tmp_path, tiny, batch):
    gate = trained_like_gate(tiny.hidden_size)
    path = gate.save(tmp_path / "g.safetensors", backbone="tiny-random", layer=LAYER, sinks=tiny.sinks.to_dict())
    loaded = LSGGate.load(path, backbone="tiny-random", layer=LAYER, sinks=tiny.sinks.to_dict())
    r1, _ = gate_ratios(tiny, batch, gate)
    r2, _ = gate_ratios(tiny, batch, loaded)
    torch.testing.assert_close(r1, r2, atol=0, rtol=0)
    assert (tmp_path / "g.json").read_text().count('"backbone": "tiny-random"') == 1
    assert gate.metadata == {}, "a gate built in this process has no checkpoint metadata"
    assert loaded.metadata == json.loads((tmp_path / "g.json").read_text())
    assert loaded.metadata["layer"] == LAYER and loaded.metadata["config"] == gate.config()
    with pytest.raises(ValueError, match="backbone"):
        LSGGate.load(path, backbone="smol-llava")
    with pytest.raises(ValueError, match="layer"):
        LSGGate.load(path, layer=LAYER + 1)
    with pytest.raises(ValueError, match="sinks"):
        LSGGate.load(path, sinks={**tiny.sinks.to_dict(), "tau_llm": 99.0})
    with pytest.raises(ValueError, match="keyscale"):
        KeyScaleGate.load(path)


HAND_SIGNAL_POSITIONS = {  # per sample, the positions each signal reads in the batch built below, by hand
    "last": [[5], [7], [6]],  # the last prompt token (sample 2 has no answer: its last real token)
    "mean_all": [list(range(6)), list(range(8)), list(range(7))],  # every prompt token: no answer, no padding
    "mean_visual": [[2, 3, 4]] * 3,  # the image tokens
}


@pytest.mark.parametrize("signal", SIGNALS)
def test_lsg_ratios_of_a_prepared_state_are_the_softmax_of_its_mlp_on_its_signal(signal):
    """`LSGGate.ratios(prepare(...))` against LayerNorm -> Linear -> GELU -> Linear -> softmax
    written out in float64 on the signal's tokens (the last prompt token, the mean over the prompt
    or over the image tokens; paper Appendix D.2), their positions found by hand."""
    B, T, D, image_id = 3, 9, 16, 7
    PARAM_STD = 0.5  # random weights: ratios away from 0 and 1, different per sample
    ids = torch.zeros(B, T, dtype=torch.long)
    ids[:, 2:5] = image_id  # sys 0-1, vis 2-4, user 5..
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 7:] = 0  # right padding in sample 2
    labels = torch.full((B, T), -100)
    labels[0, 6:] = 1  # answers from 6: last prompt token 5
    labels[1, 8] = 1  # answer at 8: last prompt token 7
    last_prompt = [5, 7, 6]  # sample 2 has no answer: its last real token (HAND_SIGNAL_POSITIONS)
    seg = Segments.from_batch(ids, mask, image_id, labels)
    vsink = torch.zeros(B, T, dtype=torch.bool)
    vsink[:, 2] = True
    ctx = ForwardContext(seg, SinkConfig(), vsink=vsink, n_prefill=T)
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)  # the default init too: the test does not depend on the tests run before it
    gate = LSGGate(D, "vsink-rest", signal=signal)
    with torch.no_grad():  # every parameter away from its init, so each one shows in the ratios
        for p in gate.parameters():
            p.add_(torch.randn(p.shape, generator=g) * PARAM_STD)
    hidden = torch.randn(B, T, D, generator=g) * 3 + 1
    hidden = hidden + torch.randn(B, 1, D, generator=g) * 2  # a direction per sample, so that the means differ
    assert seg.last_prompt.tolist() == last_prompt
    with torch.no_grad():
        got = gate.ratios(gate.prepare(LayerView(LAYER, ctx, 0, T), hidden))
    w = {k: v.double() for k, v in gate.state_dict().items()}

    def by_hand(read: str) -> torch.Tensor:  # (B, G) from the tokens the signal `read` reads
        x = torch.stack([hidden[b, HAND_SIGNAL_POSITIONS[read][b]].double().mean(0) for b in range(B)])  # (B, D)
        normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + gate.norm.eps)
        h = (normed * w["norm.weight"] + w["norm.bias"]) @ w["fc1.weight"].T + w["fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        z = h @ w["fc2.weight"].T + w["fc2.bias"]  # (B, G)
        e = torch.exp(z - z.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)

    expected = by_hand(signal)
    assert got.shape == (B, 2)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    distinct = ~torch.eye(B, dtype=torch.bool)
    assert torch.cdist(expected, expected)[distinct].min() > 1e-3, "the samples must differ for the test to mean much"
    for other in set(SIGNALS) - {signal}:  # reading another signal's tokens would fail the comparison above
        assert (by_hand(other) - expected).abs().max() > 1e-3, other
    assert KeyScaleGate([1.0, 1.0]).ratios(vsink) is None, "a gate without ratios says so"


def test_registry_builds_by_name_and_lists_known_on_error():
    assert isinstance(lsg.gates.get("keyscale", coefficients=[1, 1]), KeyScaleGate)
    with pytest.raises(ValueError, match="Known gates: .*keyscale.*lsg"):
        lsg.gates.get("nope")


def test_bad_gate_inputs_get_clear_errors(tiny):
    with pytest.raises(ValueError, match="out of range.*0..3"):
        with lsg.attach(tiny, {7: KeyScaleGate([1, 1])}):
            pass
    with pytest.raises(ValueError, match="give 3 coefficients"):
        KeyScaleGate([1, 1], "vsink-lsink-ordinary")
    with pytest.raises(ValueError, match="Unknown grouping"):
        LSGGate(8, grouping="sinks")
    with pytest.raises(ValueError, match="Unknown gate signal 'mean'; known: last, mean_all, mean_visual"):
        LSGGate(8, signal="mean")


def test_a_gate_trained_with_a_signal_is_loaded_with_it(tmp_path, tiny, batch):
    """The signal is part of the gate's config: saved in the checkpoint, and the loaded gate reads it."""
    gate = trained_like_gate(tiny.hidden_size, "mean_visual")
    path = gate.save(tmp_path / "g.safetensors", backbone="tiny-random", layer=LAYER)
    loaded = LSGGate.load(path, backbone="tiny-random", layer=LAYER)
    assert loaded.signal == "mean_visual" and loaded.metadata["config"]["signal"] == "mean_visual"
    torch.testing.assert_close(gate_ratios(tiny, batch, loaded)[0], gate_ratios(tiny, batch, gate)[0], atol=0, rtol=0)
    last = trained_like_gate(tiny.hidden_size, "last")
    assert (gate_ratios(tiny, batch, last)[0] - gate_ratios(tiny, batch, loaded)[0]).abs().max() > 1e-4


def test_attach_removes_everything_when_the_block_raises(tiny, batch):
    """An error inside the block (after hooks, bindings and the attention path were switched
    on) leaves the backbone exactly as before."""
    from lsg.attention import ATTN_IMPLEMENTATION, BINDING_ATTR

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = tiny.model
    layers = tiny.decoder_layers
    with torch.no_grad():
        base = model(**inputs).logits
    hooks_before = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with lsg.attach(tiny, {LAYER: KeyScaleGate([0.1, 3.0, 0.5], "vsink-lsink-ordinary")}):
            assert model.config.text_config._attn_implementation == ATTN_IMPLEMENTATION
            assert all(hasattr(layer.self_attn, BINDING_ATTR) for layer in layers)
            raise RuntimeError("boom")
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not any(hasattr(layer.self_attn, BINDING_ATTR) for layer in layers)
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()] == hooks_before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
    with lsg.attach(tiny, {}):  # and a new block can start
        pass


def test_vsink_gate_on_backbone_without_vit_sink_is_a_clear_error(tiny, batch):
    from lsg.sinks import SinkConfig

    no_vit = SinkConfig(llm_dims=[0], tau_llm=1.2, normalisation="rms")
    with pytest.raises(ValueError, match="needs V-sinks"):
        with torch.no_grad(), lsg.attach(tiny, {LAYER: KeyScaleGate([1, 1], "vsink-rest")}, sinks=no_vit):
            tiny.model(**{k: v for k, v in batch.items() if k != "labels"})


# --------------------------------------------------------------------------- git commit


def git(cwd, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


def fresh_repo(root: Path, files: dict[str, str]) -> str:
    """A new git repository at `root` holding `files` (path -> text) in one commit; its HEAD."""
    root.mkdir(parents=True)
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "one")
    return git(root, "rev-parse", "HEAD")


BASE_SOURCE = Path(lsg.gates.base.__file__).read_text()
LSG_PYPROJECT = '[project]\nname = "lsg"\nversion = "0"\n'


@pytest.mark.slow
def test_git_commit_of_an_installed_copy_inside_another_checkout_is_none(tmp_path):
    """`pip install --target` / site-packages inside some other git checkout: its HEAD is not
    the package's commit."""
    installed = "site-packages/lsg/gates/base.py"
    head = fresh_repo(tmp_path / "other", {"README.md": "another project\n", installed: BASE_SOURCE})
    assert git_commit(tmp_path / "other" / installed) is None, f"recorded the surrounding checkout's HEAD {head}"
    # at the top level of a checkout, but of another project (or of none)
    fresh_repo(tmp_path / "named", {"pyproject.toml": '[project]\nname = "other"\n', "lsg/gates/base.py": BASE_SOURCE})
    assert git_commit(tmp_path / "named" / "lsg/gates/base.py") is None
    fresh_repo(tmp_path / "bare", {"lsg/gates/base.py": BASE_SOURCE})
    assert git_commit(tmp_path / "bare" / "lsg/gates/base.py") is None


@pytest.mark.slow
def test_git_commit_of_a_checkout_of_this_project_is_its_head(tmp_path):
    head = fresh_repo(tmp_path / "clone", {"pyproject.toml": LSG_PYPROJECT, "lsg/gates/base.py": BASE_SOURCE})
    assert git_commit(tmp_path / "clone" / "lsg/gates/base.py") == head
    root = Path(lsg.gates.base.__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("lsg is not imported from its git checkout")
    assert git_commit() == git(root, "rev-parse", "HEAD")
