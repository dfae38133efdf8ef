"""Segments (SPEC section 1) and sink values (SPEC section 2) against direct computation."""

from __future__ import annotations

import pytest
import torch

from lsg.segments import Segments, last_prompt_positions
from lsg.sinks import SinkConfig, sink_value

IMG = 9


def test_segments_of_a_hand_written_batch_under_left_and_right_padding():
    # sys sys img img user user | answer answer ; second sample one token shorter prompt.
    rows = [[1, 2, IMG, IMG, 3, 4, 5, 6], [1, IMG, IMG, 3, 4, 5, 6]]
    answers = [2, 2]
    for side in ("left", "right"):
        width = 8
        ids = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        labels = torch.full((2, width), -100)
        for b, r in enumerate(rows):
            start = width - len(r) if side == "left" else 0
            ids[b, start:start + len(r)] = torch.tensor(r)
            mask[b, start:start + len(r)] = 1
            labels[b, start + len(r) - answers[b]:start + len(r)] = torch.tensor(r[-answers[b]:])
        seg = Segments.from_batch(ids, mask, IMG, labels)
        assert seg.sys.sum(1).tolist() == [2, 1]
        assert seg.vis.sum(1).tolist() == [2, 2]
        assert seg.user.sum(1).tolist() == [2, 2]
        assert seg.out.sum(1).tolist() == [2, 2]
        offset = torch.tensor([0, 1]) if side == "left" else torch.tensor([0, 0])
        assert (seg.last_prompt - offset).tolist() == [5, 4]
        assert not (seg.sys & seg.vis).any() and not (seg.user & seg.out).any()
        assert ((seg.sys | seg.vis | seg.user | seg.out) == mask.bool()).all()


def test_last_prompt_without_labels_is_the_last_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert last_prompt_positions(mask).tolist() == [4, 3]


def test_extend_adds_out_tokens():
    seg = Segments.from_batch(torch.tensor([[1, IMG, 3]]), None, IMG)
    grown = seg.extend(2)
    assert grown.out[0].tolist() == [False, False, False, True, True]
    assert grown.vis[0].tolist() == [False, True, False, False, False]


def test_sink_value_raw_and_rms_match_direct_computation():
    x = torch.randn(2, 5, 16)
    x[0, 0, 3] = 50.0
    raw = sink_value(x, [3, 7], "raw")
    torch.testing.assert_close(raw, torch.maximum(x[..., 3].abs(), x[..., 7].abs()))
    rms = sink_value(x, [3, 7], "rms")
    torch.testing.assert_close(rms, raw / x.pow(2).mean(-1).sqrt())
    assert rms[0, 0] > 3.0  # one 50 among 16 unit-scale dims is ~4 x the rms


@pytest.mark.parametrize("kwargs,match", [
    ({"normalisation": "l2"}, "normalisation"), ({"lsink_scope": "all"}, "lsink_scope")])
def test_bad_sink_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinkConfig(**kwargs)


def test_sink_value_rejects_out_of_range_dims():
    with pytest.raises(ValueError, match="out of range for hidden size 16"):
        sink_value(torch.zeros(1, 16), [16])


def test_a_prompt_without_an_image_or_with_two_images_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Sample\(s\) \[1\] hold \[0\] images.*exactly one image"):
        Segments.from_batch(torch.tensor([[1, IMG, 3, 4], [1, 2, 3, 4]]), None, IMG)
    with pytest.raises(ValueError, match=r"Sample\(s\) \[0\] hold \[2\] images"):
        Segments.from_batch(torch.tensor([[1, IMG, IMG, 3, IMG, 4]]), None, IMG)
    # Image tokens under padding do not count: one real image is fine.
    seg = Segments.from_batch(torch.tensor([[IMG, 1, IMG, 3]]), torch.tensor([[0, 1, 1, 1]]), IMG)
    assert seg.vis[0].tolist() == [False, False, True, False]


def flagged_by_hand(phi: dict[int, torch.Tensor], taus: list[float], layer: int, scope: str) -> torch.Tensor:
    """Tokens with phi >= tau(l) at `layer` ("layer"), or at any recorded l <= layer ("upto")."""
    layers = [layer] if scope == "layer" else [l for l in phi if l <= layer]
    out = torch.zeros_like(phi[layer], dtype=torch.bool)
    for l in layers:
        out |= phi[l] >= taus[l]
    return out


@pytest.mark.parametrize("scope", ["layer", "upto"])
def test_lsinks_follow_per_layer_thresholds_and_the_scope(scope):
    """Per-layer `tau_llm` lists and `lsink_scope` (both the embedded defaults) against a hand rule:
    a token flagged only at layer 1 is an L-sink at layer 3 under "upto", not under "layer"."""
    from lsg.context import ForwardContext

    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, 3]])
    taus = [100.0, 5.0, 50.0, 20.0]
    phi = {0: torch.tensor([[900.0, 1, 1, 1, 1, 1]]),     # layer 0: nothing reaches 100 but the BOS
           1: torch.tensor([[9.0, 6, 1, 1, 1, 1]]),       # token 1 flagged at layer 1 only
           2: torch.tensor([[9.0, 1, 60, 1, 1, 1]]),      # token 2 at layer 2 only
           3: torch.tensor([[30.0, 1, 1, 25, 19, 1]])}    # token 3 at layer 3; token 4 just under 20
    ctx = ForwardContext(Segments.from_batch(ids, None, IMG), SinkConfig(llm_dims=[0], tau_llm=taus,
                                                                         lsink_scope=scope), sink_phi=phi)
    vis = ids == IMG
    for layer in range(4):
        expected = flagged_by_hand(phi, taus, layer, scope)
        assert ctx.flagged(layer).tolist() == expected.tolist(), layer
        assert ctx.lsinks(layer).tolist() == (expected & vis).tolist(), layer
        assert ctx.text_sinks(layer).tolist() == (expected & ~vis).tolist(), layer
    want = {"layer": [False, False, False, True, False, False], "upto": [False, True, True, True, False, False]}
    assert ctx.lsinks(3)[0].tolist() == want[scope]


def test_the_context_is_at_prefill_until_a_decoded_position_is_added():
    """`ForwardContext.is_prefill` is the one definition every hook, gate and the attention
    function read; a `LayerView` reports its context's and refuses to be told otherwise."""
    from lsg.context import ForwardContext, LayerView

    ids = torch.tensor([[1, IMG, IMG, 3, 4]])
    ctx = ForwardContext(Segments.from_batch(ids, None, IMG), SinkConfig(), n_prefill=5)
    assert ctx.is_prefill and LayerView(0, ctx, 0, 5).is_prefill
    ctx.segments = ctx.segments.extend(1)  # the first decode step
    assert not ctx.is_prefill and not LayerView(0, ctx, 5, 1).is_prefill
    assert LayerView(0, ctx, 5, 1, is_prefill=False).q_start == 5  # the older call form, checked
    with pytest.raises(ValueError, match="is_prefill=True.*past its prefill"):
        LayerView(0, ctx, 5, 1, is_prefill=True)
