"""OutRo (SPEC section 5, the SPEC's reading of the abstract) against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

import lsg
from lsg.gates.outro import OutRoGate, OutRoState
from tests.test_interventions import (assert_cache_matches_recompute, attention_by_hand, attention_outputs,
                                      causal_allowed, logits_with, sink_case,
                                      toy_view)

RELAX, ROTATE = 1, 2  # the defaults for the 4-layer tiny backbone: round(4/7) = 1, then 2 .. 4 // 2
LAM = 0.5  # far from 0 so a wrong rotation shows


def hand_rotation(o, u, lam):
    """`o~ = o + lam tanh(relu(cos(o, u))) |o| u/|u|`, rescaled to `|o|`, for one vector pair."""
    o, u = o.double(), u.double()
    cos = float(o @ u / (o.norm() * u.norm()))
    turned = o + lam * math.tanh(max(cos, 0.0)) * o.norm() * u / u.norm()
    return turned * o.norm() / turned.norm()


def test_rotation_matches_the_formula_preserves_norms_and_leaves_sink_rows_alone():
    g = torch.Generator().manual_seed(0)
    view = toy_view(T=8, prompt_len=6)  # sys [0, 1], vis [2, 3], user [4, 6), out [6, 8)
    H, H_kv, d = 4, 2, 5
    outputs = torch.randn(1, 8, H, d, generator=g)
    value = torch.randn(1, H_kv, 8, d, generator=g)
    sinks = torch.zeros(1, 8, dtype=torch.bool)
    sinks[0, [0, 3]] = True
    got = OutRoGate(relax_layer=0, rotate_layers=[0], lam=LAM).edit_head_outputs(
        view, OutRoState(sinks, relax=False, rotate=True), outputs, value)
    torch.testing.assert_close(got[0, sinks[0]], outputs[0, sinks[0]], atol=0, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), outputs.norm(dim=-1), atol=1e-6, rtol=1e-5)
    turned = 0
    for i in (~sinks[0]).nonzero().flatten().tolist():
        for h in range(H):
            u = value[0, h // (H // H_kv), sinks[0]].mean(0)  # query head h reads KV head h // 2
            expected = hand_rotation(outputs[0, i, h], u, LAM)
            torch.testing.assert_close(got[0, i, h].double(), expected, atol=1e-6, rtol=1e-5)
            turned += int(not torch.allclose(expected.float(), outputs[0, i, h]))
    assert turned > 0, "some outputs must point toward u (cos > 0) and turn"


def test_rotation_without_sinks_changes_nothing():
    view = toy_view()
    outputs, value = torch.randn(1, 8, 4, 5), torch.randn(1, 2, 8, 5)
    got = OutRoGate(relax_layer=0, rotate_layers=[0]).edit_head_outputs(
        view, OutRoState(torch.zeros(1, 8, dtype=torch.bool), relax=False, rotate=True), outputs, value)
    assert torch.equal(got, outputs)


def test_relaxed_sink_rows_see_the_whole_prompt_but_not_answers_or_padding():
    view = toy_view(T=8, prompt_len=6)
    sinks = torch.zeros(1, 8, dtype=torch.bool)
    sinks[0, [0, 3]] = True
    causal = torch.ones(8, 8).tril().bool()[None, None]
    got = OutRoGate(relax_layer=0, rotate_layers=[]).edit_mask(view, OutRoState(sinks, True, False), causal)
    expected = causal.clone()
    expected[0, 0, [0, 3], :6] = True
    assert torch.equal(got, expected)


def test_rotation_in_the_model_equals_hand_rotated_head_outputs(tiny, batch):
    vis, prompt, real, x, sinks = sink_case(tiny, batch, ROTATE)

    def rotate(o, v):
        o = o.clone()
        rep = o.shape[2] // v.shape[1]
        for b in range(o.shape[0]):
            u = v[b][:, sinks[b]].mean(1).repeat_interleave(rep, 0)  # (H, d)
            for i in (real[b] & ~sinks[b]).nonzero().flatten().tolist():
                for h in range(o.shape[2]):
                    o[b, i, h] = hand_rotation(o[b, i, h], u[h], LAM).float()
        return o

    expected = attention_by_hand(tiny, x, ROTATE, causal_allowed(batch["attention_mask"]), edit_heads=rotate)
    baseline = attention_by_hand(tiny, x, ROTATE, causal_allowed(batch["attention_mask"]))
    gate = OutRoGate(relax_layer=RELAX, rotate_layers=[ROTATE], relax=False, lam=LAM)
    got = attention_outputs(tiny, batch, {ROTATE: gate}, [ROTATE])[ROTATE]
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)
    assert (got[real] - baseline[real]).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_relaxation_changes_only_sink_rows_and_only_at_its_layer(tiny, tiny_eager, batch, impl):
    bb = tiny if impl == "sdpa" else tiny_eager
    vis, prompt, real, x, sinks = sink_case(bb, batch, RELAX)
    assert (batch["labels"] != -100).any()
    layers = range(bb.num_layers)
    base = attention_outputs(bb, batch, None, layers)
    gate = OutRoGate(relax_layer=RELAX, rotate_layers=[ROTATE], rotate=False)
    got = attention_outputs(bb, batch, {RELAX: gate}, layers)
    # Exact on SDPA; on eager, ungated layers run SDPA while attached (lsg.attention falls
    # through to SDPA), which differs from HF's eager kernel by float rounding.
    tol = 0.0 if impl == "sdpa" else 1e-6
    for layer in range(RELAX):
        torch.testing.assert_close(got[layer], base[layer], atol=tol, rtol=0)
    non_sink = real & ~sinks
    torch.testing.assert_close(got[RELAX][non_sink], base[RELAX][non_sink], atol=1e-6, rtol=1e-5)
    assert (got[RELAX][sinks] - base[RELAX][sinks]).abs().amax(-1).min() > 1e-5, "every sink row must change"
    allowed = causal_allowed(batch["attention_mask"]) | (sinks[:, :, None] & prompt[:, None, :])
    expected = attention_by_hand(bb, x, RELAX, allowed)
    torch.testing.assert_close(got[RELAX][real], expected[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("parts", [dict(), dict(rotate=False), dict(relax=False)])
def test_generation_with_kv_cache_matches_full_recompute(tiny, parts):
    gate = OutRoGate(tiny.num_layers, lam=LAM, **parts)
    assert_cache_matches_recompute(tiny, {layer: gate for layer in OutRoGate.default_layers(tiny.num_layers)})


def test_sdpa_and_eager_backbones_give_equal_logits(tiny, tiny_eager, batch):
    gate = OutRoGate(tiny.num_layers, lam=LAM)
    gates = {layer: gate for layer in OutRoGate.default_layers(tiny.num_layers)}
    sdpa, eager = logits_with(tiny, batch, gates), logits_with(tiny_eager, batch, gates)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        base = tiny.model(**batch).logits
    assert (sdpa - base).abs().max() > 1e-4


def test_outro_default_layers_scale_with_depth():
    assert OutRoGate.default_layers(32) == [5] + list(range(6, 17))
    assert OutRoGate.default_layers(4) == [RELAX, ROTATE]
    gate = OutRoGate(32)
    assert (gate.relax_layer, gate.rotate_layers) == (5, list(range(6, 17)))


def test_outro_bad_inputs_get_clear_errors(tiny, batch):
    with pytest.raises(ValueError, match="needs num_layers"):
        OutRoGate()
    with pytest.raises(ValueError, match="neither its relax_layer"):
        with torch.no_grad(), lsg.attach(tiny, {3: OutRoGate(tiny.num_layers)}):
            tiny.model(**batch)
