"""VAF and SPEAR: logits equal hand-scaled logits in text rows, and nowhere else (SPEC section 5)."""

from __future__ import annotations

import pytest
import torch

import lsg
from lsg.gates import SPEARGate, VAFGate
from lsg.segments import Segments
from tests.hand import assert_cache_matches_recompute, attention_by_hand, causal_allowed
from tests.test_gates import LAYER, gated_attention_output

ALPHA, BETA = 1.3, 0.8  # far from 1 so a wrong column or row shows


def hand_logit_scale(bb, batch, x, kind: str) -> torch.Tensor:
    """(B, T, T) multiplier: text rows (user/out) x column scale; other rows 1."""
    seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], bb.image_token_id, batch.get("labels"))
    col = torch.ones(seg.vis.shape)
    if kind == "vaf":
        col[seg.sys] = BETA
    else:
        cfg = bb.sinks
        phi = x[..., cfg.llm_dims].abs().amax(-1) / x.pow(2).mean(-1).sqrt()  # rms criterion of tiny-random
        text_sink = (phi >= cfg.tau_llm) & seg.sys
        assert text_sink.any() and (seg.sys & ~text_sink).any(), "test data must have sys sinks and non-sinks"
        col[(seg.sys & ~text_sink) | seg.user | seg.out] = BETA
    col[seg.vis] = ALPHA
    rows = seg.user | seg.out
    return torch.where(rows[:, :, None], col[:, None, :].expand(-1, col.shape[1], -1), torch.ones(()))


@pytest.mark.parametrize("kind,gate_cls", [("vaf", VAFGate), ("spear", SPEARGate)])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_text_rows_see_hand_scaled_logits_and_other_rows_are_untouched(tiny, tiny_eager, batch, kind, gate_cls, impl):
    bb = tiny if impl == "sdpa" else tiny_eager
    with torch.no_grad():
        x = bb.model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states[LAYER]
    scale = hand_logit_scale(bb, batch, x, kind)
    allowed = causal_allowed(batch["attention_mask"])
    expected = attention_by_hand(bb, x, LAYER, allowed, logit_scale=scale)
    baseline = attention_by_hand(bb, x, LAYER, allowed)
    got = gated_attention_output(bb, batch, {LAYER: gate_cls(ALPHA, BETA)})
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)
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
