"""OutRo (SPEC section 5 "OutRo", the authors' released code) against hand computation."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import lsg
from lsg.specs import parse_stack
from lsg.context import ForwardContext, LayerView
from lsg.gates.outro import OutRoGate, OutRoState, massive_activation_sinks
from lsg.segments import Segments
from lsg.sinks import SinkConfig
from tests.hand import assert_cache_matches_recompute, attention_by_hand, causal_allowed
from tests.hand import attention_outputs, hand_segments, logits_with

# The tiny random backbone has no massive activations (max |x| is ~6x the median, never
# 100), so the model tests use test-time thresholds: with these, layers 1 and 2 of the
# test batch have sinks, some shared and some new at layer 2.
TINY = dict(abs_thr=0.0, med_mul=5.0)
WINDOW = dict(start=1, end=3)  # L = 4: enhancement interval max(1, 4 // 7) = 1, every window layer


# --------------------------------------------------------------------------- hand computations


def hand_sinks(x, prompt, abs_thr, med_mul):
    """`(B, T)`: prompt tokens with `max_d |x| >= max(abs_thr, med_mul * median)`, the lower
    median of `|x|` over the sample's prompt tokens and every channel, in Python."""
    sinks = torch.zeros(prompt.shape, dtype=torch.bool)
    for b in range(x.shape[0]):
        median = statistics.median_low(x[b][prompt[b]].abs().flatten().tolist())
        threshold = max(abs_thr, med_mul * median)
        for i in prompt[b].nonzero().flatten().tolist():
            sinks[b, i] = max(abs(v) for v in x[b, i].tolist()) >= threshold
    return sinks


def hand_rotation(o, v, gamma, temp, rescale):
    """One head output `o` `(d,)` turned toward `v` `(d,)`, SPEC section 5, in float64."""
    o, v = o.double(), v.double()
    dot = float(o @ v)
    cos = dot / (max(float(o.norm()), 1e-12) * max(float(v.norm()), 1e-12))
    m = math.tanh(max(cos, 0.0) / temp)
    turned = o + gamma * m * (abs(dot) / (float(v @ v) + 1e-8)) * v
    return turned * float(o.norm()) / (float(turned.norm()) + 1e-8) if rescale else turned


def hand_rotate_heads(o, v, sinks, rows, gamma=3.0, temp=0.1, rescale=True):
    """Per-head outputs `o` `(B, T, H, d)` with rows `(B, T)` turned toward the mean value of
    `sinks` `(B, T)` of their KV head (query head h reads KV head h // (H / H_kv))."""
    o = o.clone()
    rep = o.shape[2] // v.shape[1]
    for b in range(o.shape[0]):
        if not sinks[b].any():
            continue
        for h in range(o.shape[2]):
            vbar = v[b, h // rep][sinks[b]].double().mean(0)
            for i in rows[b].nonzero().flatten().tolist():
                o[b, i, h] = hand_rotation(o[b, i, h], vbar, gamma, temp, rescale).to(o.dtype)
    return o


def relaxed(allowed, rows, prompt):
    """`allowed` `(B, T, T)` with `rows` `(B, T)` attending to exactly the prompt keys."""
    return torch.where(rows[:, :, None], prompt[:, None, :], allowed)


def gated_run(bb, batch, gates, layers):
    """(self-attention outputs `{layer: (B, T, D)}`, hidden states entering each layer) of
    a forward with `gates` attached."""
    return attention_outputs(bb, batch, gates, layers, with_hidden=True)


def window_gates(gate):
    return {layer: gate for layer in gate.default_layers(gate.num_layers)}


def toy_context(attention_mask, labels, T):
    """A ForwardContext over `(B, T)` tokens: sys [0, 2), vis [2, 4), user after, per the
    real tokens of `attention_mask`; `labels` mark `out` tokens."""
    ids = torch.zeros(attention_mask.shape, dtype=torch.long)
    ids[:, 2:4] = 7
    seg = Segments.from_batch(ids, attention_mask, 7, labels)
    return ForwardContext(seg, SinkConfig(), n_prefill=T)


# --------------------------------------------------------------------------- sinks


def test_sinks_use_the_per_sample_median_of_prompt_tokens_without_padding_or_answers():
    B, T, D = 4, 10, 2
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :6] = 0  # left padding, most of sample 1
    mask[3, 2:] = 0  # right padding
    prompt = mask.bool().clone()
    prompt[0, 4:] = False  # tokens 4-9 of sample 0 are answers
    x = torch.ones(B, T, D)
    x[0, 4:], x[0, 9, 1] = 3.0, 500.0  # answers: would lift the median to 3; never sinks
    x[1], x[1, :6], x[1, 0, 0] = 10.0, 30.0, 500.0  # another scale; padding would lift the median to 30
    x[0, 1, 0], x[1, 7, 1], x[2, 6, 0] = 7.0, -70.0, 6.5  # planted: >= 6 x their sample's median
    x[3, :2] = torch.tensor([[1.0, 3.0], [2.0, -13.0]])  # lower median 2 (not 2.5, the midpoint): 13 >= 12
    got = massive_activation_sinks(x, prompt, abs_thr=0.0, med_mul=6.0)
    torch.testing.assert_close(got, hand_sinks(x, prompt, 0.0, 6.0), atol=0, rtol=0)
    assert [row.nonzero().flatten().tolist() for row in got] == [[1], [7], [6], [1]]
    # Each choice of the SPEC matters here: a median with padding and answers, or one
    # median for the whole batch, flags other tokens.
    assert not torch.equal(hand_sinks(x, mask.bool(), 0.0, 6.0) & prompt, got), "padding/answers in the median"
    batch_median = statistics.median_low(x[prompt].abs().flatten().tolist())
    assert not torch.equal((x.abs().amax(-1) >= 6.0 * batch_median) & prompt, got), "one median for the batch"
    # The threshold is max(abs_thr, med_mul * median): abs_thr binds above 6 x median.
    bound = massive_activation_sinks(x, prompt, abs_thr=6.8, med_mul=6.0)
    assert [row.nonzero().flatten().tolist() for row in bound] == [[1], [7], [], [1]]
    assert not massive_activation_sinks(x, prompt, abs_thr=100.0, med_mul=6.0).any()


def test_sinks_in_the_model_match_the_hand_rule(tiny, batch):
    vis, prompt, real = hand_segments(tiny, batch)
    gate = OutRoGate(tiny.num_layers, **WINDOW, **TINY)
    with torch.no_grad(), lsg.attach(tiny, window_gates(gate)) as run:
        hidden = tiny.model(**batch, output_hidden_states=True).hidden_states
        states = {layer: run.ctx.gate_state[(layer, 0)] for layer in gate.default_layers(tiny.num_layers)}
    for layer, state in states.items():
        expected = hand_sinks(hidden[layer], prompt, **TINY)
        assert expected.any(), f"layer {layer} of the test batch needs sinks"
        torch.testing.assert_close(state.sinks, expected, atol=0, rtol=0)


# --------------------------------------------------------------------------- layers


def test_window_and_enhancement_layers_follow_the_depth():
    def enhancement_layers(gate):
        return [layer for layer in range(gate.num_layers) if gate.is_enhancement_layer(layer)]

    g32 = OutRoGate(32)  # window 0 .. 29, interval 32 // 7 = 4
    assert g32.default_layers(32) == list(range(30))
    assert enhancement_layers(g32) == [0, 4, 8, 12, 16, 20, 24, 28]
    g28 = OutRoGate(28)  # Qwen2-7B depth: window 0 .. 25, interval 4
    assert g28.default_layers(28) == list(range(26))
    assert enhancement_layers(g28) == [0, 4, 8, 12, 16, 20, 24]
    g24 = OutRoGate(24)  # interval 3
    assert enhancement_layers(g24) == [0, 3, 6, 9, 12, 15, 18, 21]
    g4 = OutRoGate(4)  # interval max(1, 0) = 1: window 0, 1
    assert g4.default_layers(4) == [0, 1] and enhancement_layers(g4) == [0, 1]
    narrowed = OutRoGate(32, start=3, end=21)
    assert narrowed.default_layers(32) == list(range(3, 21))
    assert enhancement_layers(narrowed) == [4, 8, 12, 16, 20]
    assert enhancement_layers(OutRoGate(32, enhance_interval=10)) == [0, 10, 20]


def run_prepare(gate, ctx, hidden_by_layer):
    """Call `prepare` layer by layer as `lsg.attach` does; returns `{layer: OutRoState}`."""
    T = hidden_by_layer[min(hidden_by_layer)].shape[1]
    for layer, hidden in sorted(hidden_by_layer.items()):
        ctx.gate_state[(layer, 0)] = gate.prepare(LayerView(layer, ctx, 0, T), hidden)
    return {layer: ctx.gate_state[(layer, 0)] for layer in hidden_by_layer}


def planted(T, positions, D=3):
    """`(1, T, D)` hidden state, 1 everywhere but 50 at channel 1 of `positions`."""
    x = torch.ones(1, T, D)
    x[0, positions, 1] = 50.0
    return x


def as_lists(masks):
    return [m[0].nonzero().flatten().tolist() for m in masks]


@pytest.mark.parametrize("apply_once,interval,enhanced", [
    (True, 1, [[1, 3], [4], [5], []]),  # each position at most once
    (False, 1, [[1, 3], [3, 4], [4, 5], [5]]),  # every sink of every enhancement layer
    (True, 2, [[1, 3], [], [4, 5], []]),  # layers 1 and 3 are not enhancement layers
])
def test_each_position_is_enhanced_at_most_once_and_rotation_skips_earlier_sinks(apply_once, interval, enhanced):
    T = 9  # sys 0-1, vis 2-3, user 4-6, out 7-8
    labels = torch.full((1, T), -100)
    labels[0, 7:] = 1
    ctx = toy_context(torch.ones(1, T, dtype=torch.long), labels, T)
    gate = OutRoGate(8, apply_once=apply_once, enhance_interval=interval, med_mul=10.0, abs_thr=0.0)
    sinks = [[1, 3], [3, 4, 8], [4, 5], [5]]  # position 8 is an answer token: never a sink
    states = run_prepare(gate, ctx, {layer: planted(T, s) for layer, s in enumerate(sinks)})
    assert as_lists(s.sinks for s in states.values()) == [[1, 3], [3, 4], [4, 5], [5]]
    assert as_lists(s.seen for s in states.values()) == [[1, 3], [1, 3, 4], [1, 3, 4, 5], [1, 3, 4, 5]]
    assert as_lists(s.enhance for s in states.values()) == enhanced
    off = run_prepare(OutRoGate(8, relax=False, med_mul=10.0, abs_thr=0.0), toy_context(
        torch.ones(1, T, dtype=torch.long), labels, T), {layer: planted(T, s) for layer, s in enumerate(sinks)})
    assert not any(s.enhance.any() for s in off.values())


def test_each_forward_reads_its_own_previous_layer_and_the_gate_keeps_nothing_after_it():
    """`prepare` at layer l continues layer l - 1 of the same forward (`OutRoGate.states_of`),
    even with another forward in between (e.g. an activation-checkpointing recompute), and
    the record goes with the forward's context."""
    T = 9
    labels = torch.full((1, T), -100)
    gate = OutRoGate(8, med_mul=10.0, abs_thr=0.0)
    first, second = (toy_context(torch.ones(1, T, dtype=torch.long), labels, T) for _ in range(2))
    a = run_prepare(gate, first, {0: planted(T, [1]), 1: planted(T, [3])})
    b = run_prepare(gate, second, {0: planted(T, [5]), 1: planted(T, [6])})
    a[2] = gate.prepare(LayerView(2, first, 0, T), planted(T, [4]))
    assert as_lists([a[2].seen]) == [[1, 3, 4]], "layer 2 of the first forward continues its own layer 1"
    assert as_lists([b[1].seen]) == [[5, 6]]
    for record, states in ((gate.states_of(first).layers, a), (gate.states_of(second).layers, b)):
        assert record.keys() == states.keys() and all(record[layer] is states[layer] for layer in states)
    with pytest.raises(ValueError, match="needs its state from layer 1"):  # a new forward starts at `start`
        gate.prepare(LayerView(2, toy_context(torch.ones(1, T, dtype=torch.long), labels, T), 0, T, True),
                     planted(T, [4]))
    assert len(gate.forwards) == 2, "the failed forward's context is gone, and its record with it"
    del first, second
    assert gate.forwards == {}, "no state outlives its forward"


# --------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("gamma,temp,rescale", [(3.0, 0.1, True), (0.7, 2.0, False)])
def test_rotation_matches_the_formula_with_gqa_and_skips_sinks_padding_and_sinkless_samples(gamma, temp, rescale):
    g = torch.Generator().manual_seed(1)
    B, T, H, H_kv, d = 3, 8, 4, 2, 5
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 0] = 0  # left padding in sample 1
    labels = torch.full((B, T), -100)
    labels[:, 6:] = 1
    view = LayerView(1, toy_context(mask, labels, T), 0, T)
    outputs = torch.randn(B, T, H, d, generator=g)
    outputs[2] *= 1e-3  # small outputs: even a rescale by |o| / (|o| + 1e-8) would show
    value = torch.randn(B, H_kv, T, d, generator=g)
    outputs[0, 4] = value[0, :, [0, 3]].mean(1).repeat_interleave(2, 0)  # cos = 1: a strong turn
    sinks = torch.zeros(B, T, dtype=torch.bool)
    sinks[0, [0, 3]] = True
    sinks[1, 2] = True  # sample 2 has no sink at this layer
    seen = sinks.clone()
    seen[0, 5] = True  # a sink of an earlier window layer
    state = OutRoState(sinks, seen, torch.zeros_like(sinks), torch.zeros_like(sinks))
    gate = OutRoGate(4, gamma=gamma, temp=temp, rescale=rescale)
    got = gate.edit_head_outputs(view, state, outputs, value)
    rows = mask.bool() & ~seen
    expected = hand_rotate_heads(outputs.double(), value, sinks, rows, gamma, temp, rescale)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    untouched = ~rows | ~sinks.any(1, keepdim=True)
    assert torch.equal(got[untouched], outputs[untouched])
    assert (got[rows & sinks.any(1, keepdim=True)] - outputs[rows & sinks.any(1, keepdim=True)]).abs().max() > 0.1
    if rescale:
        torch.testing.assert_close(got.norm(dim=-1), outputs.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_decoded_tokens_are_rotated_with_the_prefill_sink_value():
    g = torch.Generator().manual_seed(2)
    T, H, H_kv, d = 8, 4, 2, 5
    labels = torch.full((1, T), -100)
    ctx = toy_context(torch.ones(1, T, dtype=torch.long), labels, T)
    ctx.segments = ctx.segments.extend(2)  # two decode steps later
    view = LayerView(1, ctx, T + 1, 1)
    outputs, value = torch.randn(1, 1, H, d, generator=g), torch.randn(1, H_kv, T + 2, d, generator=g)
    sinks = torch.zeros(1, T, dtype=torch.bool)
    sinks[0, [1, 5]] = True
    state = OutRoState(sinks, sinks, sinks, sinks)
    got = OutRoGate(4).edit_head_outputs(view, state, outputs, value)
    expected = hand_rotate_heads(outputs.double(), value[:, :, :T], sinks, torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    mask = torch.ones(1, 1, 1, T + 2, dtype=torch.bool)
    assert torch.equal(OutRoGate(4).edit_mask(view, state, mask), mask), "no enhancement at decode steps"


# --------------------------------------------------------------------------- in the model


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_enhanced_rows_are_noncausal_attention_over_the_prompt_once_per_position(tiny, tiny_eager, batch, impl):
    bb = tiny if impl == "sdpa" else tiny_eager
    vis, prompt, real = hand_segments(bb, batch)
    assert (batch["labels"] != -100).any(), "answers must stay out of the enhanced rows' keys"
    gate = OutRoGate(bb.num_layers, **WINDOW, **TINY, rotate=False)
    got, hidden = gated_run(bb, batch, window_gates(gate), [1, 2])
    causal = causal_allowed(batch["attention_mask"])
    s1 = hand_sinks(hidden[1], prompt, **TINY)
    s2 = hand_sinks(hidden[2], prompt, **TINY)
    assert (s2 & s1).any() and (s2 & ~s1).any(), "need sinks enhanced before and new ones at layer 2"
    for layer, enhanced in ((1, s1), (2, s2 & ~s1)):
        expected = attention_by_hand(bb, hidden[layer], layer, relaxed(causal, enhanced, prompt))
        torch.testing.assert_close(got[layer][real], expected[real], atol=1e-5, rtol=1e-4)
        plain = attention_by_hand(bb, hidden[layer], layer, causal)
        assert (got[layer][enhanced] - plain[enhanced]).abs().amax(-1).min() > 1e-5, "every enhanced row changes"
    twice = attention_by_hand(bb, hidden[2], 2, relaxed(causal, s2, prompt))
    assert (got[2][s2 & s1] - twice[s2 & s1]).abs().max() > 1e-4, "a position is enhanced at most once"


def test_rotation_in_the_model_equals_hand_rotation_and_skips_earlier_sinks(tiny, batch):
    vis, prompt, real = hand_segments(tiny, batch)
    gate = OutRoGate(tiny.num_layers, **WINDOW, **TINY, relax=False)
    got, hidden = gated_run(tiny, batch, window_gates(gate), [1, 2])
    causal = causal_allowed(batch["attention_mask"])
    s1 = hand_sinks(hidden[1], prompt, **TINY)
    s2 = hand_sinks(hidden[2], prompt, **TINY)
    assert (s1 & ~s2).any(), "need sinks of layer 1 that are not sinks of layer 2"
    for layer, sinks, seen in ((1, s1, s1), (2, s2, s1 | s2)):
        expected = attention_by_hand(tiny, hidden[layer], layer, causal,
                                     edit_heads=lambda o, v: hand_rotate_heads(o, v, sinks, real & ~seen))
        torch.testing.assert_close(got[layer][real], expected[real], atol=1e-5, rtol=1e-4)
    only_this_layer = attention_by_hand(tiny, hidden[2], 2, causal,
                                        edit_heads=lambda o, v: hand_rotate_heads(o, v, s2, real & ~s2))
    earlier = s1 & ~s2 & real
    assert (got[2][earlier] - only_this_layer[earlier]).abs().max() > 1e-4, "earlier sinks must not rotate"


def test_both_parts_off_give_the_baseline_and_each_part_changes_the_logits(tiny, batch):
    with torch.no_grad():
        base = tiny.model(**batch).logits
    off = OutRoGate(tiny.num_layers, **TINY, relax=False, rotate=False)
    torch.testing.assert_close(logits_with(tiny, batch, window_gates(off)), base, atol=1e-6, rtol=1e-5)
    for part in (dict(relax=False), dict(rotate=False)):
        gate = OutRoGate(tiny.num_layers, **TINY, **part)
        assert (logits_with(tiny, batch, window_gates(gate)) - base).abs().max() > 1e-4, part


@pytest.mark.parametrize("parts", [dict(), dict(rotate=False), dict(relax=False)])
def test_generation_with_kv_cache_matches_full_recompute(tiny, parts):
    gate = OutRoGate(tiny.num_layers, **TINY, **parts)
    assert_cache_matches_recompute(tiny, window_gates(gate))


def test_sdpa_and_eager_backbones_give_equal_logits(tiny, tiny_eager, batch):
    gates = window_gates(OutRoGate(tiny.num_layers, **TINY))
    torch.testing.assert_close(logits_with(tiny, batch, gates), logits_with(tiny_eager, batch, gates),
                               atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- config


def test_the_outro_spec_covers_its_window_with_one_shared_gate(tiny):
    """`outro` without layers spans the released window 0 .. L-3 with one gate object (its
    defaults agree with conf/gate/outro.yaml: tests/test_gate_registry.py)."""
    stack = parse_stack("outro", tiny)
    assert sorted(stack.layers) == list(range(tiny.num_layers - 2))
    assert len({id(g) for gates in stack.layers.values() for g in gates}) == 1, "one gate shared by its window"


def test_outro_bad_config_and_placement_get_clear_errors(tiny, batch):
    with pytest.raises(ValueError, match="needs num_layers"):
        OutRoGate()
    with pytest.raises(ValueError, match="0 <= start < end <= num_layers"):
        OutRoGate(4, start=2, end=2)
    with pytest.raises(ValueError, match="0 <= start < end <= num_layers"):
        OutRoGate(4, end=5)
    with pytest.raises(ValueError, match="0 <= start < end <= num_layers"):
        OutRoGate(2)  # default end L - 2 = 0: an empty window
    with pytest.raises(ValueError, match="temp must be > 0"):
        OutRoGate(4, temp=0.0)
    with pytest.raises(ValueError, match="enhance_interval must be >= 1"):
        OutRoGate(4, enhance_interval=0)
    with pytest.raises(ValueError, match="abs_thr and med_mul must be >= 0"):
        OutRoGate(4, med_mul=-1.0)
    with pytest.raises(ValueError, match="built for 4 layers, not 32"):
        OutRoGate(4).default_layers(32)
    with pytest.raises(ValueError, match="outside its window"):
        with torch.no_grad(), lsg.attach(tiny, {3: OutRoGate(tiny.num_layers)}):
            tiny.model(**batch)
    with pytest.raises(ValueError, match="needs its state from layer 0"):
        with torch.no_grad(), lsg.attach(tiny, {1: OutRoGate(tiny.num_layers)}):
            tiny.model(**batch)
