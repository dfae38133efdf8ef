"""VAR (SPEC section 5, Kang et al. 2025 Sec. 5) against redistribution computed by hand."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import lsg
from lsg.context import ForwardContext, LayerView
from lsg.gates.var import VARGate
from lsg.segments import Segments
from lsg.sinks import SinkConfig
from tests.hand import (assert_cache_matches_recompute, hand_segments, hand_sinks, layer_input,
                                      logits_with)

LAYER = 2
# Tiny-random has no real sinks: thresholds that give visual sinks at LAYER and a mix of
# selected and unselected (head, query) pairs (asserted in each test).
TAU, RHO, MIN_MASS, P = 0.8, 0.9, 0.25, 0.6


def hand_var(weights, vis, sinks, rows, p, rho, min_mass, reading="paper"):
    """VAR by hand, one (sample, head, query) pair at a time, in float64.

    Returns (edited weights, selected `(B, H, T_q)`).
    """
    a = weights.double()
    out = a.clone()
    B, H, T_q, _ = a.shape
    selected = torch.zeros(B, H, T_q, dtype=torch.bool)
    for b in range(B):
        S, V = sinks[b], vis[b]
        rest = V & ~S
        for h in range(H):
            for i in range(T_q):
                if not rows[b, i]:
                    continue
                row = a[b, h, i]
                m_vis, m_rest, m_sink = row[V].sum(), row[rest].sum(), row[S].sum()
                if m_vis < min_mass or m_rest == 0:
                    continue
                if reading == "paper" and m_rest / m_vis < rho:
                    continue
                if reading == "code" and (not (V & S).any() or row[V & S].sum() / m_vis > rho):
                    continue
                moved = p if reading == "paper" else 1 - p
                omega = moved * m_sink
                out[b, h, i, S] = (1 - moved) * row[S]
                out[b, h, i, rest] = row[rest] + omega * row[rest] / m_rest
                selected[b, h, i] = True
    return out, selected


def toy_case(seed=0):
    """Two samples, T = 10: sys [0, 1], vis [2, 7), user [7, 9), out [9]; sinks by hand:
    sample 0: BOS (0) and visual token 3 (and out token 9, which must not count);
    sample 1: BOS only (no visual sink). Weights: random causal rows, 3 heads."""
    g = torch.Generator().manual_seed(seed)
    B, T, D, H = 2, 10, 16, 3
    ids = torch.zeros(B, T, dtype=torch.long)
    ids[:, 2:7] = 5
    labels = torch.full((B, T), -100)
    labels[:, 9] = 1
    seg = Segments.from_batch(ids, None, 5, labels)
    ctx = ForwardContext(seg, SinkConfig(llm_dims=[0], tau_llm=99.0, normalisation="rms"), n_prefill=T)
    view = LayerView(LAYER, ctx, 0, T)
    hidden = torch.randn(B, T, D, generator=g)
    hidden[..., 0] = 0.0
    hidden[0, [0, 3, 9], 0] = 100.0
    hidden[1, 0, 0] = 100.0
    logits = torch.randn(B, H, T, T, generator=g) * 1.5
    weights = logits.masked_fill(~torch.ones(T, T).tril().bool(), float("-inf")).softmax(-1)
    sinks = torch.zeros(B, T, dtype=torch.bool)
    sinks[0, [0, 3]] = True
    sinks[1, 0] = True
    return view, hidden, weights, seg, sinks


def toy_var_edit():
    """The toy case edited by a VAR gate: (weights, seg, sinks, edited weights, selected pairs)."""
    view, hidden, weights, seg, sinks = toy_case()
    gate = VARGate(p=P, rho=RHO, min_visual_mass=0.45, tau=2.0)
    state = gate.prepare(view, hidden)
    return weights, seg, sinks, gate.edit_weights(view, state, weights), gate.selected(view, state, weights)


def test_var_finds_prompt_sinks_only():
    view, hidden, _, _, sinks = toy_case()
    got = VARGate(tau=2.0).prepare(view, hidden)
    assert got.tolist() == sinks.tolist()  # out token 9 has massive activation but is not a sink


@pytest.mark.parametrize("reading", ["paper", "code"])
def test_var_matches_hand_redistribution_on_synthetic_weights(reading):
    view, hidden, weights, seg, sinks = toy_case()
    rho = RHO if reading == "paper" else 1 - RHO
    gate = VARGate(p=P, rho=rho, min_visual_mass=0.45, tau=2.0, reading=reading)
    got = gate.edit_weights(view, gate.prepare(view, hidden), weights)
    rows = seg.user | seg.out
    expected, selected = hand_var(weights, seg.vis, sinks, rows, P, rho, 0.45, reading)
    in_rows = selected.new_zeros(selected.shape) | rows[:, None, :]
    assert selected.any() and (in_rows & ~selected).any(), "need selected and unselected pairs"
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    if reading == "code":
        assert not selected[1].any(), "the released code selects nothing without a visual sink"
    else:
        assert selected[1].any(), "the paper's r = 1 without visual sinks: BOS mass goes to the image"


def test_var_preserves_row_sums():
    view, hidden, weights, _, _ = toy_case()
    gate = VARGate(p=P, rho=RHO, min_visual_mass=0.45, tau=2.0)
    got = gate.edit_weights(view, gate.prepare(view, hidden), weights)
    torch.testing.assert_close(got.sum(-1), weights.sum(-1), atol=1e-6, rtol=0)


def test_var_moves_fraction_p_of_sink_mass_to_visual_non_sinks_in_proportion():
    weights, seg, sinks, got, selected = toy_var_edit()
    assert selected.any()
    for b, h, i in selected.nonzero().tolist():
        a, new = weights[b, h, i].double(), got[b, h, i].double()
        S, rest = sinks[b], seg.vis[b] & ~sinks[b]
        torch.testing.assert_close(new[S], (1 - P) * a[S], atol=1e-7, rtol=1e-6)  # every sink loses p
        gained = new[rest] - a[rest]
        torch.testing.assert_close(gained.sum(), P * a[S].sum(), atol=1e-7, rtol=1e-6)  # Omega lands on vis \ S
        torch.testing.assert_close(gained / a[rest], (gained.sum() / a[rest].sum()).expand(int(rest.sum())),
                                   atol=1e-6, rtol=1e-5)  # in proportion to a_ij
        other = ~S & ~rest
        torch.testing.assert_close(new[other], a[other], atol=0, rtol=0)


def test_var_leaves_unselected_pairs_and_other_rows_bit_identical():
    weights, seg, _, got, selected = toy_var_edit()
    assert (~selected & (seg.user | seg.out)[:, None, :]).any()
    assert torch.equal(got[~selected], weights[~selected])
    assert not selected[:, :, :7].any()  # sys and vis rows are never edited


def test_var_decode_step_edits_the_new_out_row_with_prefill_sinks():
    view, hidden, weights, seg, sinks = toy_case()
    gate = VARGate(p=P, rho=0.5, min_visual_mass=0.3, tau=2.0)
    state = gate.prepare(view, hidden)
    ctx = view.ctx
    ctx.segments = seg.extend(1)  # one decoded token at position 10
    step = LayerView(LAYER, ctx, 10, 1)
    row = torch.tensor([0.15, 0.05, 0.1, 0.2, 0.1, 0.05, 0.1, 0.05, 0.05, 0.05, 0.1]).expand(2, 3, 1, -1)
    got = gate.edit_weights(step, state, row)
    expected, selected = hand_var(row, ctx.segments.vis, torch.cat([sinks, torch.zeros(2, 1, dtype=torch.bool)], 1),
                                  torch.ones(2, 1, dtype=torch.bool), P, 0.5, 0.3)
    assert selected.all()
    torch.testing.assert_close(got.double(), expected, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(got[..., 10], row[..., 10], atol=0, rtol=0)  # the new token is no sink


def captured_weights(bb, batch, gates):
    captured = {}

    def keep(module, args, output):
        captured["weights"] = output[1]

    handle = bb.model.model.language_model.layers[LAYER].self_attn.register_forward_hook(keep)
    try:
        with torch.no_grad(), (lsg.attach(bb, gates) if gates else nullcontext()):
            bb.model(**batch)
    finally:
        handle.remove()
    return captured["weights"]


def test_var_attention_weights_in_the_model_equal_hand_redistribution(tiny_eager, batch):
    bb = tiny_eager
    vis, prompt, real = hand_segments(bb, batch)
    sinks = hand_sinks(bb, layer_input(bb, batch, LAYER), prompt, TAU)
    assert (sinks & vis).any(), "test data must have visual sinks"
    base = captured_weights(bb, batch, None)
    got = captured_weights(bb, batch, {LAYER: VARGate(p=P, rho=RHO, min_visual_mass=MIN_MASS, tau=TAU)})
    rows = real & ~vis & (vis.cumsum(1) == vis.sum(1, keepdim=True))  # user and out
    expected, selected = hand_var(base, vis, sinks, rows, P, RHO, MIN_MASS)
    assert selected.any() and (rows[:, None, :] & ~selected).any(), "need selected and unselected pairs"
    real_rows = real[:, None, :].expand_as(selected)
    torch.testing.assert_close(got.double()[real_rows], expected[real_rows], atol=1e-6, rtol=1e-5)
    sums = got[real_rows].sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[~selected], base[~selected], atol=1e-6, rtol=1e-5)


def test_generation_with_kv_cache_matches_full_recompute(tiny):
    gate = VARGate(p=P, rho=0.8, min_visual_mass=0.2, tau=TAU)
    assert_cache_matches_recompute(tiny, {1: gate, LAYER: gate})


def test_sdpa_and_eager_backbones_give_equal_logits(tiny, tiny_eager, batch):
    gates = {LAYER: VARGate(p=P, rho=RHO, min_visual_mass=MIN_MASS, tau=TAU)}
    sdpa, eager = logits_with(tiny, batch, gates), logits_with(tiny_eager, batch, gates)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        base = tiny.model(**batch).logits
    assert (sdpa - base).abs().max() > 1e-4, "the gate must change the logits"


def test_var_default_layers_skip_the_first_two_and_the_last():
    assert VARGate.default_layers(32) == list(range(2, 31))
    assert VARGate.default_layers(4) == [2]


def test_var_bad_inputs_get_clear_errors(tiny, batch):
    with pytest.raises(ValueError, match="Unknown VAR reading"):
        VARGate(reading="blog")
    no_llm = SinkConfig(vit_dims=[0], tau_vit=1.5)
    with pytest.raises(ValueError, match="LLM sink dimensions"):
        with torch.no_grad(), lsg.attach(tiny, {LAYER: VARGate()}, sinks=no_llm):
            tiny.model(**batch)
