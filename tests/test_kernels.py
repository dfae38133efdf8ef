"""Which attention kernel each decoder layer calls inside `lsg.attach` (the backbone's own kernel
where the gates allow it): the plan per gate kind under FlashAttention-2, SDPA and eager bases, and
the calls themselves through a kernel registered under a test name with FlashAttention's interface
(a 2-D padding mask, unpadded bottom-right-aligned causal attention, zeros on padded query rows),
computed with SDPA: gated outputs equal the SDPA backbone's under every gate kind, with left and
right padding, at prefill and through the KV cache, and the kernel sees exactly the layers and
query rows it should. FlashAttention itself needs a GPU: scripts/gpu_check.sh runs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    flash_attention_mask,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

import lsg
from lsg.attach import kernel_plan
from lsg.attention import (
    EXPLICIT,
    PADDING_IMPLEMENTATION,
    LayerKernel,
    full_mask,
    layer_kernel,
    resolve_base,
)
from lsg.gates import LSGGate
from lsg.specs import parse_stack
from tests.conftest import samples
from tests.hand import generate_and_recompute
from tests.tiny_families import SINKS, SPECS

# No "flash" in the name: transformers would take it for a FlashAttention build and look for the library.
PADDED = "padded_recorder"
CALLS: list[tuple] = []  # ("forward", T) at each decoder forward, (layer, first row, end row) per kernel call
ALL_SPECS = [*SPECS, "lsg@2"]
NEW_TOKENS = 3
# gate name -> (kernel under a padding-mask base: "base" = the base itself, row spans, explicit matrix rows),
# from the design: key / value / head-output edits keep the kernel, VAF/SPEAR split rows by key scale,
# VAR needs its rows' matrix, a 4-D mask edit cannot go to FlashAttention.
EXPECTED = {"var": ("base", False, True), "vaf": ("base", True, False), "spear": ("base", True, False),
            "outro": ("sdpa", False, False), "knockout": ("sdpa", False, False), "keyscale": ("base", False, False),
            "mean-v": ("base", False, False), "zero-v": ("base", False, False), "lsg": ("base", False, False)}


def padded_recorder(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                    is_causal=None, **kwargs):
    """FlashAttention's contract, computed with SDPA: each sample's padded keys and queries are
    dropped (queries: the mask's last T_q columns, or the one decode row), the causal mask is
    aligned bottom-right among the real tokens, and padded query rows give zeros."""
    assert module.config._attn_implementation == PADDED  # FlashAttention picks its library by this name
    assert attention_mask is None or attention_mask.dim() == 2, "a padding-mask kernel got a 4-D mask"
    batch, heads, n_q, _ = query.shape
    n_kv = key.shape[2]
    if getattr(module, "layer_idx", None) is not None:
        CALLS.append((module.layer_idx, n_kv - n_q, n_kv))
    ones = torch.ones(batch, n_kv, dtype=torch.bool, device=query.device)
    key_real = ones if attention_mask is None else attention_mask.bool()
    query_real = ones[:, :n_q] if attention_mask is None or n_q == 1 else attention_mask[:, -n_q:].bool()
    allowed = query_real[:, :, None] & key_real[:, None, :]
    if is_causal if is_causal is not None else module.is_causal:
        qi, kj = query_real.cumsum(1) - 1, key_real.cumsum(1) - 1  # index among the sample's real tokens
        shift = key_real.sum(1) - query_real.sum(1)
        back = qi[:, :, None] + shift[:, None, None] - kj[:, None, :]  # how far key j lies behind query i
        allowed &= back >= 0
        if sliding_window is not None and n_kv > sliding_window:
            allowed &= back < sliding_window
    rep = heads // key.shape[1]
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1),
                                         attn_mask=allowed[:, None], scale=scaling)
    out = torch.where(allowed.any(-1)[:, None, :, None], out, torch.zeros((), dtype=out.dtype))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PADDED, padded_recorder)
AttentionMaskInterface.register(PADDED, flash_attention_mask)


@pytest.fixture(scope="module")
def backbones(tiny_hub_dir):
    """The tiny hub-format LLaVA loaded as a user would, with SDPA and with the padding-mask kernel."""
    return tuple(lsg.load_backbone("llava-1.5-7b", hf_id=str(tiny_hub_dir), dtype="float32", sinks=SINKS,
                                   attn_implementation=impl) for impl in ("sdpa", PADDED))


def gates_of(spec: str, bb) -> dict:
    if spec.startswith("lsg@"):  # a random LSG gate whose ratios move (a trained one needs a checkpoint)
        torch.manual_seed(1)
        gate = LSGGate(bb.hidden_size, "vsink-lsink-ordinary")
        torch.nn.init.normal_(gate.fc2.weight, std=0.5)
        return {int(spec[4:]): [gate]}
    return parse_stack(spec, bb).layers


def expected_kernel(gates, base: str) -> LayerKernel:
    """By hand from `EXPECTED`: what a layer with `gates` should call on a backbone running `base`."""
    if base == "eager":
        return LayerKernel(EXPLICIT)
    kernel, spans, matrix = "base", False, False
    for gate in gates:
        k, s, m = EXPECTED[gate.name]
        kernel = "sdpa" if k == "sdpa" else kernel
        spans, matrix = spans or s, matrix or m
    return LayerKernel(base if kernel == "base" else "sdpa", spans, matrix)


@pytest.mark.parametrize("base", ["flash_attention_2", "sdpa", "eager"])
def test_each_gate_kind_keeps_the_base_kernel_unless_it_needs_the_matrix_or_a_4d_mask(backbones, base):
    sdpa, _ = backbones
    for spec in ALL_SPECS:
        layers = gates_of(spec, sdpa)
        for layer in range(sdpa.num_layers):
            gates = layers.get(layer, [])
            assert layer_kernel(gates, base) == expected_kernel(gates, base), (spec, layer)


def test_the_plan_of_a_backbone_names_its_own_kernel(backbones):
    sdpa, padded = backbones
    layers = gates_of("var@2-3+oracle@1:0.2", sdpa)
    assert kernel_plan(padded, layers) == [LayerKernel(PADDED), LayerKernel(PADDED),
                                           LayerKernel(PADDED, matrix_rows=True), LayerKernel(PADDED, matrix_rows=True)]
    assert kernel_plan(padded, gates_of("knockout@1", sdpa))[1] == LayerKernel("sdpa")
    assert kernel_plan(sdpa, gates_of("vaf@1-2", sdpa))[1:3] == [LayerKernel("sdpa", row_spans=True)] * 2
    with pytest.raises(ValueError):
        kernel_plan(sdpa, {sdpa.num_layers: layers[1]})


def test_a_kernel_whose_masks_the_gates_cannot_edit_falls_back_to_sdpa_with_a_warning():
    assert resolve_base("flash_attention_3") == "flash_attention_3" and resolve_base(None) == "sdpa"
    with pytest.warns(UserWarning, match="'flex_attention'.*every layer runs 'sdpa'"):
        assert resolve_base("flex_attention") == "sdpa"


@pytest.mark.parametrize("window", [None, 3])
def test_the_explicit_rows_mask_from_a_padding_mask_is_transformers_own(window):
    """At prefill and at a decode step (queries last), with left and right padding and a sliding
    window: the boolean mask built from a 2-D padding mask is what transformers' `sdpa_mask`
    builds for the same queries."""
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    mask_fn = sliding_window_causal_mask_function(window) if window else None
    for n_q in (7, 2, 1):
        theirs = sdpa_mask(batch_size=2, q_length=n_q, kv_length=7, q_offset=7 - n_q, attention_mask=padding,
                           allow_is_causal_skip=False, **({"mask_function": mask_fn} if window else {}))
        assert torch.equal(full_mask(padding, n_q, 7, "cpu", window), theirs), n_q


def forwards(calls) -> list[tuple[int, set]]:
    """`CALLS` split per decoder forward: (query length, {(layer, first row, end row)})."""
    out = []
    for call in calls:
        if call[0] == "forward":
            out.append((call[1], set()))
        else:
            out[-1][1].add(call)
    return out


def expected_calls(gates: dict, n_layers: int, text: torch.Tensor, decode_position: int | None = None) -> set:
    """The kernel calls a forward should make, by hand: `text` `(B, T)` marks user/answer rows (the
    rows VAR edits and VAF scales keys for); a decode step (`decode_position`: its key position)
    is one text row."""
    calls = set()
    for layer in range(n_layers):
        names = {g.name for g in gates.get(layer, [])}
        if names & {"knockout", "outro"}:
            continue  # a 4-D mask edit: SDPA, not the padding-mask kernel
        if decode_position is not None:
            if "var" not in names:
                calls.add((layer, decode_position, decode_position + 1))
            continue
        cols = text.any(0).nonzero().flatten()
        if "var" in names:
            if int(cols[0]) > 0:
                calls.add((layer, 0, int(cols[0])))
        elif names & {"vaf", "spear"}:
            rest = (~text).any(0).nonzero().flatten()
            calls |= {(layer, int(cols[0]), int(cols[-1]) + 1), (layer, int(rest[0]), int(rest[-1]) + 1)}
        else:
            calls.add((layer, 0, text.shape[1]))
    return calls


def text_rows(bb, batch) -> torch.Tensor:
    """Real tokens after each sample's image (user text and answers), from the raw batch."""
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    last_image = torch.where(ids == bb.image_token_id, pos, -1).amax(1, keepdim=True)
    return real & (pos > last_image)


def lsg_logits(bb, batch, gates) -> torch.Tensor:
    with lsg.attach(bb, gates):
        return bb.model(**batch).logits


@pytest.fixture(scope="module")
def recorded(backbones):
    """A forward pre-hook on decoder layer 0 of the padded backbone marks each forward in `CALLS`."""
    _, padded = backbones
    handle = padded.decoder_layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: CALLS.append(("forward", (args[0] if args else kwargs["hidden_states"]).shape[1])),
        with_kwargs=True)
    yield
    handle.remove()


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_gated_outputs_on_a_padding_mask_kernel_equal_sdpa_and_the_kernel_runs_where_planned(backbones, recorded,
                                                                                               spec):
    sdpa, padded = backbones
    gates = gates_of(spec, sdpa)
    images, questions, answers = samples(3)
    questions = [q + " ?" * (3 * i) for i, q in enumerate(questions)]
    for side in ("left", "right"):  # prefill, teacher-forced answers
        batch = sdpa.build_batch(images, questions, answers, padding_side=side)
        real = batch["attention_mask"].bool()
        CALLS.clear()
        with torch.no_grad():
            logits = [lsg_logits(bb, batch, gates)[real] for bb in (sdpa, padded)]
        torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-4)
        [(n, seen)] = forwards(CALLS)
        assert seen == expected_calls(gates, sdpa.num_layers, text_rows(sdpa, batch)), side
    batch = sdpa.build_batch(images, questions, padding_side="left")  # generation through the KV cache
    width = batch["input_ids"].shape[1]
    CALLS.clear()
    with torch.no_grad():
        gen, recomputed = generate_and_recompute(padded, batch, gates, NEW_TOKENS)
        with lsg.attach(sdpa, gates):
            reference = sdpa.model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                            do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(gen.sequences, reference.sequences)
    for step in range(NEW_TOKENS):
        torch.testing.assert_close(gen.logits[step], recomputed[step], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gen.logits[step], reference.logits[step], atol=1e-5, rtol=1e-4)
    text = text_rows(sdpa, batch)
    steps = forwards(CALLS)
    assert [n for n, _ in steps] == [width, *[1] * (NEW_TOKENS - 1), *range(width, width + NEW_TOKENS)]
    for i, (n, seen) in enumerate(steps):
        if n == 1:  # decode step i: its query is key position width + i - 1
            assert seen == expected_calls(gates, sdpa.num_layers, text, width + i - 1), (spec, i)
        else:  # generate's prefill, then the recompute of each step (generated tokens are answers)
            grown = torch.cat([text, text.new_ones(text.shape[0], n - width)], 1)
            assert seen == expected_calls(gates, sdpa.num_layers, grown), (spec, n)


def test_attach_runs_the_padding_mask_lsg_function_and_restores_the_kernel(backbones):
    _, padded = backbones
    config = padded.family.text_config(padded.model)
    with lsg.attach(padded, {}) as run:
        assert config._attn_implementation == PADDING_IMPLEMENTATION and run.base_implementation == PADDED
    assert config._attn_implementation == PADDED
