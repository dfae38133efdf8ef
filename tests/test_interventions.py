"""Sink causal interventions (SPEC section 5, SPEAR section 4) against attention computed by hand.

Also holds the hand-attention and generation helpers that test_var.py and test_outro.py use.
"""

from __future__ import annotations


import pytest
import torch

import lsg
from lsg.context import ForwardContext, LayerView
from lsg.gates.base import Gate, HookPoint
from lsg.gates.interventions import KeyKnockoutGate, MeanValueGate, ZeroValueGate
from lsg.segments import Segments
from lsg.sinks import SinkConfig
from tests.conftest import samples
from tests.hand import (assert_cache_matches_recompute, attention_by_hand, attention_outputs, causal_allowed,  # noqa: F401
                        hand_segments, hand_sinks, layer_input, logits_with, sink_case)

LAYER = 2


def toy_view(T=8, prompt_len=6, layer=0, n_prefill=None):
    """A LayerView over one sample: sys [0, 1], vis [2, 3], user [4, prompt_len), out after.
    Sinks config: dim 0, raw, tau 10."""
    ids = torch.zeros(1, T, dtype=torch.long)
    ids[0, 2:4] = 7
    labels = torch.full((1, T), -100)
    labels[0, prompt_len:] = 1
    seg = Segments.from_batch(ids, None, 7, labels)
    ctx = ForwardContext(seg, SinkConfig(llm_dims=[0], tau_llm=10.0), n_prefill=n_prefill or T)
    return LayerView(layer, ctx, 0, T)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("keys,queries", [("sinks", "user_out"), ("visual_sinks", "text"), ("sys_sinks", "all")])
def test_knockout_equals_attention_with_hand_masked_keys(tiny, tiny_eager, batch, impl, keys, queries):
    bb = tiny if impl == "sdpa" else tiny_eager
    vis, prompt, real, x, sinks = sink_case(bb, batch, LAYER)
    chosen = {"sinks": sinks, "visual_sinks": sinks & vis, "sys_sinks": sinks & ~vis & (vis.cumsum(1) == 0)}[keys]
    rows = {"user_out": real & (vis.cumsum(1) == vis.sum(1, keepdim=True)) & ~vis & (vis.cumsum(1) > 0),
            "text": real & ~vis, "all": real}[queries]
    assert chosen.any() and rows.any()
    base = causal_allowed(batch["attention_mask"])
    knocked = base & ~(rows[:, :, None] & chosen[:, None, :])
    allowed = torch.where(knocked.any(-1, keepdim=True), knocked, base)  # a row never loses every key
    expected = attention_by_hand(bb, x, LAYER, allowed)
    got = attention_outputs(bb, batch, {LAYER: KeyKnockoutGate(keys, queries)}, [LAYER])[LAYER]
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)
    changed = (allowed != base).any(-1) & real
    assert changed.any(), "the knockout must change some rows"
    unchanged = attention_by_hand(bb, x, LAYER, base)
    torch.testing.assert_close(got[real & ~changed], unchanged[real & ~changed], atol=1e-5, rtol=1e-4)


def test_knockout_skips_a_row_that_would_lose_every_key():
    view = toy_view()
    chosen = torch.zeros(1, 8, dtype=torch.bool)
    chosen[0, 0] = True  # position 0 knocked out for every query: row 0 would see nothing
    mask = torch.ones(8, 8).tril().bool()[None, None]
    got = KeyKnockoutGate("sinks", "all").edit_mask(view, chosen, mask)
    assert got[0, 0, 0].tolist() == mask[0, 0, 0].tolist()
    assert not got[0, 0, 1:, 0].any()
    torch.testing.assert_close(got[0, 0, :, 1:], mask[0, 0, :, 1:], atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_zero_value_equals_attention_with_hand_zeroed_sink_values(tiny, tiny_eager, batch, impl):
    bb = tiny if impl == "sdpa" else tiny_eager
    vis, prompt, real, x, sinks = sink_case(bb, batch, LAYER)

    def zero(v):
        return v.masked_fill(sinks[:, None, :, None], 0.0)

    expected = attention_by_hand(bb, x, LAYER, causal_allowed(batch["attention_mask"]), edit_values=zero)
    got = attention_outputs(bb, batch, {LAYER: ZeroValueGate()}, [LAYER])[LAYER]
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_mean_value_equals_attention_with_hand_substituted_sink_values(tiny, tiny_eager, batch, impl):
    bb = tiny if impl == "sdpa" else tiny_eager
    vis, prompt, real, x, sinks = sink_case(bb, batch, LAYER)
    assert (batch["labels"] != -100).any(), "need answer tokens (kept out of the mean)"

    def substitute(v):
        v = v.clone()
        for b in range(v.shape[0]):
            population = prompt[b] & ~sinks[b]
            mean = v[b][:, population].mean(1)  # (H_kv, d)
            v[b][:, sinks[b]] = mean[:, None]
        return v

    expected = attention_by_hand(bb, x, LAYER, causal_allowed(batch["attention_mask"]), edit_values=substitute)
    got = attention_outputs(bb, batch, {LAYER: MeanValueGate()}, [LAYER])[LAYER]
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gate_factory", [
    lambda: KeyKnockoutGate("sinks", "all"),
    lambda: ZeroValueGate("text_sinks"),
    lambda: MeanValueGate("sinks"),
])
def test_generation_with_kv_cache_matches_full_recompute(tiny, gate_factory):
    gate = gate_factory()
    assert_cache_matches_recompute(tiny, {1: gate, LAYER: gate})


def test_intervention_leaves_earlier_layers_untouched(tiny, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        base = tiny.model(**inputs, output_hidden_states=True).hidden_states
        with lsg.attach(tiny, {LAYER: MeanValueGate()}):
            gated = tiny.model(**inputs, output_hidden_states=True).hidden_states
    for layer in range(LAYER + 1):
        torch.testing.assert_close(gated[layer], base[layer], atol=0, rtol=0)
    assert (gated[LAYER + 1] - base[LAYER + 1]).abs().max() > 1e-4


def test_intervention_inputs_get_clear_errors(tiny, batch):
    with pytest.raises(ValueError, match="Unknown key set"):
        KeyKnockoutGate("bos")
    with pytest.raises(ValueError, match="Unknown query set"):
        KeyKnockoutGate("sinks", "sys")
    with pytest.raises(ValueError, match="no default layers"):
        ZeroValueGate.default_layers(4)
    no_vit = SinkConfig(llm_dims=[0], tau_llm=1.2, normalisation="rms")
    with pytest.raises(ValueError, match="needs V-sinks"):
        with torch.no_grad(), lsg.attach(tiny, {LAYER: ZeroValueGate("vsinks")}, sinks=no_vit):
            tiny.model(**{k: v for k, v in batch.items() if k != "labels"})


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_two_gates_at_one_layer_compose_key_scales_multiply_value_edits_in_list_order(tiny, tiny_eager, batch, impl):
    """`{layer: [a, b]}`: key scales multiply; value edits apply in list order (a, then b)."""
    from lsg.gates import KeyScaleGate

    bb = tiny if impl == "sdpa" else tiny_eager
    vis, prompt, real, x, sinks = sink_case(bb, batch, LAYER)
    first, second = KeyScaleGate([0.3, 1.7, 0.6], "vsink-lsink-ordinary"), KeyScaleGate([2.0, 0.5, 1.5],
                                                                                         "vsink-lsink-ordinary")
    with torch.no_grad(), lsg.attach(bb, {LAYER: first}) as run:
        bb.model(**batch)
        groups = run.ctx.visual_groups("vsink-lsink-ordinary", LAYER)  # the groups both gates scale
    product = torch.tensor([0.3 * 2.0, 1.7 * 0.5, 0.6 * 1.5])
    key_scale = torch.where(groups >= 0, product[groups.clamp_min(0)], torch.ones(()))
    expected = attention_by_hand(bb, x, LAYER, causal_allowed(batch["attention_mask"]), key_scale=key_scale)
    got = attention_outputs(bb, batch, {LAYER: [first, second]}, [LAYER])[LAYER]
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)

    def zero(v):
        return v.masked_fill(sinks[:, None, :, None], 0.0)

    def substitute(v):  # sink values <- mean value of the other prompt tokens
        v = v.clone()
        for b in range(v.shape[0]):
            v[b][:, sinks[b]] = v[b][:, prompt[b] & ~sinks[b]].mean(1)[:, None]
        return v

    for order, edit in (([ZeroValueGate(), MeanValueGate()], lambda v: substitute(zero(v))),
                        ([MeanValueGate(), ZeroValueGate()], lambda v: zero(substitute(v)))):
        expected = attention_by_hand(bb, x, LAYER, causal_allowed(batch["attention_mask"]), edit_values=edit)
        got = attention_outputs(bb, batch, {LAYER: order}, [LAYER])[LAYER]
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


class PrefillProbe(Gate):
    """Records what the attention path shows a key-only gate: `prepare` calls, and per attention
    call `(is_prefill, q_start, n_queries)`; edits nothing."""

    hook_points = frozenset({HookPoint.KEYS})

    def __init__(self):
        super().__init__()
        self.prepared, self.calls = 0, []

    def prepare(self, view, hidden):
        self.prepared += 1
        assert view.is_prefill

    def key_scale(self, view, state):
        self.calls.append((view.is_prefill, view.q_start, view.n_queries))
        return None


def test_prefill_is_the_call_that_sees_the_whole_prompt_and_only_that_one(tiny):
    """Through `generate` with the KV cache: the gate prepares once, and the attention call it
    sees as prefill is exactly the one whose queries are the whole prompt (q_start 0, T rows);
    every decode step is one new row after it."""
    images, questions, _ = samples(2)
    batch = tiny.build_batch(images, questions, padding_side="left")
    T, new = batch["input_ids"].shape[1], 3
    probe = PrefillProbe()
    with torch.no_grad(), lsg.attach(tiny, {1: probe}):
        tiny.model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert probe.prepared == 1
    assert probe.calls == [(True, 0, T)] + [(False, T + step, 1) for step in range(new - 1)]
