"""VAF and SPEAR: logits equal hand-scaled logits in text rows, and nowhere else (SPEC section 5)."""

from __future__ import annotations

import pytest
import torch

import lsg
from lsg.gates import SPEARGate, VAFGate
from tests.hand import assert_cache_matches_recompute, attention_by_hand, causal_allowed
from tests.hand import attention_outputs, hand_segments

LAYER = 2

ALPHA, BETA = 1.3, 0.8  # far from 1 so a wrong column or row shows


def hand_logit_scale(bb, batch, x, kind: str) -> torch.Tensor:
    """(B, T, T) multiplier: text rows (user/out) x column scale; other rows 1. Segments by
    hand (`hand_segments`): with labels, answer tokens are `out` rows and columns."""
    vis, prompt, real = hand_segments(bb, batch)
    pos = torch.arange(vis.shape[1]).expand_as(vis)
    first_vis = torch.where(vis, pos, vis.shape[1]).amin(1, keepdim=True)
    last_vis = torch.where(vis, pos, -1).amax(1, keepdim=True)
    sys, user, out = prompt & (pos < first_vis), prompt & (pos > last_vis), real & ~prompt
    col = torch.ones(vis.shape)
    if kind == "vaf":
        col[sys] = BETA
    else:
        cfg = bb.sinks
        phi = x[..., cfg.llm_dims].abs().amax(-1) / x.pow(2).mean(-1).sqrt()  # rms criterion of tiny-random
        text_sink = (phi >= cfg.tau_llm) & sys
        assert text_sink.any() and (sys & ~text_sink).any(), "test data must have sys sinks and non-sinks"
        col[(sys & ~text_sink) | user | out] = BETA
    col[vis] = ALPHA
    rows = user | out
    return torch.where(rows[:, :, None], col[:, None, :].expand(-1, col.shape[1], -1), torch.ones(()))


@pytest.fixture(scope="module")
def sharp():
    """tiny-random with sharper attention at LAYER (q and k weights x 8, logits x 64): at
    random init one logit is ~0.01, too small for scaling a single column to show."""
    def build(impl):
        bb = lsg.load_backbone("tiny-random", attn_implementation=impl)
        attn = bb.decoder_layers[LAYER].self_attn
        with torch.no_grad():
            attn.q_proj.weight.mul_(8.0)
            attn.k_proj.weight.mul_(8.0)
        return bb
    return {"sdpa": build("sdpa"), "eager": build("eager")}


@pytest.mark.parametrize("labelled", [False, True], ids=["prompt-only", "with-answers"])
@pytest.mark.parametrize("kind,gate_cls", [("vaf", VAFGate), ("spear", SPEARGate)])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_text_rows_see_hand_scaled_logits_and_other_rows_are_untouched(sharp, batch, kind, gate_cls, impl,
                                                                       labelled):
    """With answers (teacher forcing), answer tokens are `out`: VAF scales their rows, and SPEAR
    also suppresses their columns for the answer tokens after them."""
    bb = sharp[impl]
    inputs = batch if labelled else {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        x = bb.model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states[LAYER]
    scale = hand_logit_scale(bb, inputs, x, kind)
    if labelled:
        out = batch["attention_mask"].bool() & (batch["labels"] != -100)
        assert out.sum(1).min() >= 2, "each sample needs two answer tokens: an out row sees an out column"
    allowed = causal_allowed(batch["attention_mask"])
    expected = attention_by_hand(bb, x, LAYER, allowed, logit_scale=scale)
    baseline = attention_by_hand(bb, x, LAYER, allowed)
    got = attention_outputs(bb, inputs, {LAYER: gate_cls(ALPHA, BETA)}, [LAYER])[LAYER]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)
    if labelled:  # the answer rows alone, where SPEAR also suppresses the earlier answer columns
        torch.testing.assert_close(got[out], expected[out], atol=1e-6, rtol=1e-5)
    text_rows = (scale != 1).any(-1)
    untouched = real & ~text_rows
    torch.testing.assert_close(got[untouched], baseline[untouched], atol=1e-5, rtol=1e-4)
    assert (got[real & text_rows] - baseline[real & text_rows]).abs().max() > 1e-4


@pytest.mark.parametrize("gate_cls", [VAFGate, SPEARGate])
def test_layers_without_the_gate_are_unchanged(tiny, batch, gate_cls):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        base = tiny.model(**inputs, output_hidden_states=True).hidden_states
        with lsg.attach(tiny, {LAYER: gate_cls(ALPHA, BETA)}):
            gated = tiny.model(**inputs, output_hidden_states=True).hidden_states
    for layer in range(LAYER + 1):  # hidden states entering layers <= LAYER: untouched
        assert torch.equal(base[layer], gated[layer])
    assert not torch.allclose(base[LAYER + 1], gated[LAYER + 1])


@pytest.mark.parametrize("gate_cls", [VAFGate, SPEARGate])
def test_generation_with_kv_cache_matches_full_recompute(tiny, gate_cls):
    with torch.no_grad():
        assert_cache_matches_recompute(tiny, {1: gate_cls(ALPHA, BETA), LAYER: gate_cls(ALPHA, BETA)})


def test_default_layers_scale_with_depth():
    assert VAFGate.default_layers(32) == [9, 10, 11, 12, 13, 14]
    assert SPEARGate.default_layers(30) == [8, 9, 10, 11, 12, 13]
