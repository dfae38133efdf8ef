"""Independent (by hand) computations the gate tests compare against."""

from __future__ import annotations

import subprocess
from contextlib import nullcontext
import sys
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import lsg
from tests.conftest import samples


def causal_allowed(attention_mask):
    """`(B, T, T)` causal mask over real keys, True = may attend."""
    T = attention_mask.shape[1]
    return torch.ones(T, T).tril().bool()[None] & attention_mask.bool()[:, None, :]


@torch.no_grad()
def attention_by_hand(bb, x, layer, allowed, edit_values=None, edit_heads=None, key_scale=None, logit_scale=None):
    """Self-attention output `(B, T, D)` of decoder layer `layer` from its input `x`.

    Args:
        allowed: `(B, T, T)` bool mask, True = may attend.
        key_scale: `(B, T)` multiplier of each key vector (post-RoPE).
        logit_scale: `(B, T_q, T_kv)` multiplier of the pre-softmax logits.
        edit_values: `v (B, H_kv, T, d) -> v`, applied before attention.
        edit_heads: `(o (B, T, H, d), v (B, H_kv, T, d)) -> o`, applied before o_proj.
    """
    layer_mod = bb.decoder_layers[layer]
    attn = layer_mod.self_attn
    B, T, _ = x.shape
    h = layer_mod.input_layernorm(x)
    d = attn.head_dim
    q = attn.q_proj(h).view(B, T, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, -1, d).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, -1, d).transpose(1, 2)
    cos, sin = bb.family.language_model(bb.model).rotary_emb(h, torch.arange(T)[None].expand(B, -1))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if key_scale is not None:
        k = k * key_scale[:, None, :, None]
    if edit_values is not None:
        v = edit_values(v)
    rep = q.shape[1] // k.shape[1]
    weights = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / d**0.5)
    if logit_scale is not None:
        weights = weights * logit_scale[:, None]
    weights = weights.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    o = (weights @ v.repeat_interleave(rep, 1)).transpose(1, 2)  # (B, T, H, d)
    if edit_heads is not None:
        o = edit_heads(o, v)
    return attn.o_proj(o.reshape(B, T, -1))


def vsinks_with_planted_patch(bb, batch, plant):
    """V-sink and visual masks `(B, T)` of `batch` while `plant`, a forward hook on the family's
    ViT module, writes a massive value (1000) into dim 0 of the patches it chooses; V-sinks are
    read at dim 0 with a raw threshold of 50, so only planted patches can be V-sinks."""
    import dataclasses

    from lsg.scoring import decoder_hidden

    sinks = dataclasses.replace(bb.sinks, vit_dims=[0], tau_vit=50.0, normalisation="raw")
    handle = bb.family.vit_module(bb.model).register_forward_hook(plant)
    try:
        with torch.no_grad(), lsg.attach(bb, {}, sinks, record_sinks_upto=0) as run:
            decoder_hidden(bb, batch)
            return run.ctx.vsink, run.ctx.segments.vis
    finally:
        handle.remove()


def assert_eager_matches_sdpa(sdpa, eager, make_batch,
                              spec: str = "var@1-2+vaf@2+knockout@3+oracle@1:0.3"):
    """Under a stack with key-only gates (oracle) and gates that need the attention matrix (VAR,
    VAF, knockout), the same backbone loaded with SDPA and with eager attention gives the same
    answer loss, and eager generation through the KV cache equals full recompute.
    `make_batch(bb)` builds the teacher-forced batch for a backbone."""
    from lsg.specs import parse_stack
    from lsg.scoring import answer_loss

    losses = []
    for bb in (sdpa, eager):
        with torch.no_grad(), lsg.attach(bb, parse_stack(spec, bb).layers):
            losses.append(answer_loss(bb, make_batch(bb)))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert_cache_matches_recompute(eager, parse_stack(spec, eager).layers, new_tokens=3)


def assert_spec_generates_as_recompute(bb, spec: str, new_tokens: int = 4):
    """`assert_cache_matches_recompute` for a gate spec (`lsg@L` = a random LSG gate at layer L),
    with a key scale at layer 0 added so that the stack surely moves the logits (the helper
    asserts it; some gates leave a tiny random model unchanged)."""
    from lsg.specs import parse_stack
    from lsg.gates import KeyScaleGate, LSGGate

    if spec.startswith("lsg@"):
        torch.manual_seed(1)
        gate = LSGGate(bb.hidden_size, "vsink-lsink-ordinary")
        torch.nn.init.normal_(gate.fc2.weight, std=0.5)
        layers = {int(spec[4:]): [gate]}
    else:
        layers = parse_stack(spec, bb).layers
    layers = {**layers, 0: [*layers.get(0, []), KeyScaleGate([0.5, 2.0, 1.0], "vsink-lsink-ordinary")]}
    with torch.no_grad():
        assert_cache_matches_recompute(bb, layers, new_tokens=new_tokens)


def generate_and_recompute(bb, batch, gates, new_tokens: int):
    """Greedy generation of `batch` (left padded) through the KV cache with `gates` attached, and
    each of its steps recomputed from the whole sequence so far (no cache).

    The recompute passes labels on the generated positions, so they are `out` tokens exactly as
    in the cached decode steps (without labels every token would be prompt), and positions as
    the family builds them for a whole sequence.

    Returns:
        (generate's output, with `.logits` and `.sequences`; per step the recomputed next-token
        logits `(B, V)`).
    """
    width = batch["input_ids"].shape[1]
    recomputed = []
    with lsg.attach(bb, gates):
        gen = bb.model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                output_logits=True, return_dict_in_generate=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rest = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        for step in range(new_tokens):
            labels = ids.clone()
            labels[:, :width] = -100
            inputs = bb.family.finish_batch({**rest, "input_ids": ids, "attention_mask": mask}, bb.model)
            positions = bb.family.position_ids(inputs)
            recomputed.append(bb.model(**inputs, **({"position_ids": positions} if positions is not None else {}),
                                       labels=labels, use_cache=False).logits[:, -1])
            ids = torch.cat([ids, gen.sequences[:, width + step:width + step + 1]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return gen, recomputed


def assert_cache_matches_recompute(bb, gates, new_tokens=6):
    """Greedy decoding through the KV cache gives the same tokens and next-token logits as
    recomputing the whole sequence at every step (`generate_and_recompute`).
    Logits are compared because the tiny random model's argmax rarely moves.
    """
    images, questions, _ = samples(3)
    batch = bb.build_batch(images, questions, padding_side="left")
    width = batch["input_ids"].shape[1]
    gen, recomputed = generate_and_recompute(bb, batch, gates, new_tokens)
    for step, logits in enumerate(recomputed):
        torch.testing.assert_close(gen.logits[step], logits, atol=1e-5, rtol=1e-4)
        assert torch.equal(gen.sequences[:, width + step], logits.argmax(-1))  # the recompute's greedy token
    base = bb.model(**batch).logits[:, -1]
    assert (gen.logits[0] - base).abs().max() > 1e-4, "the gates must change the first answer token's logits"


def compare_twice(tmp_path, first, second, monkeypatch):
    """eval.py's baseline on a shapes data split with backbone `first`, then with `second` and the
    same answer store; returns the second run's rows, how many times it answered (0 = served from
    the store) and the split's questions."""
    import lsg.evaluation as evaluation
    from lsg.benchmarks.base import DataSplit
    from lsg.benchmarks.run import evaluate_benchmark

    split = DataSplit({"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 0, "n_val": 14, "n_test": 0})
    evaluate_benchmark(first, split, ["none"], tmp_path / "out", batch_size=7)
    calls = []
    answer = evaluation.choice_letters
    monkeypatch.setattr(evaluation, "choice_letters", lambda *a, **k: calls.append(1) or answer(*a, **k))
    report = evaluate_benchmark(second, split, ["none"], tmp_path / "out", batch_size=7)
    return report["rows"], len(calls), split.load()


ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_APPS = ("train", "eval")  # the design card's two commands; every other app is a console script


def app_command(app: str) -> list[str]:
    """How a user starts an app: `python train.py` / `python eval.py` at the repository root, or
    `python -m lsg.cli.<app>` (what the `lsg-<app>` console script runs)."""
    return [sys.executable, str(ROOT / f"{app}.py")] if app in TOP_LEVEL_APPS else [sys.executable, "-m", f"lsg.cli.{app}"]


def run_app(app: str, *overrides: str, cwd: Path, check: bool = True, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an app with Hydra `overrides` in `cwd`; with `check`, a non-zero exit fails the test
    with the end of its stderr."""
    result = subprocess.run([*app_command(app), *overrides], capture_output=True, text=True, cwd=cwd,
                            timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{app} {' '.join(overrides)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


# --------------------------------------------------------------------------- gate tests' helpers
def hand_segments(bb, batch):
    """(vis, prompt, real) `(B, T)` from the raw batch, independent of lsg.segments: prompt =
    real tokens without a label, vis = image placeholders."""
    real = batch["attention_mask"].bool()
    labels = batch.get("labels")
    prompt = real if labels is None else real & (labels == -100)
    return (batch["input_ids"] == bb.image_token_id) & real, prompt, real


def hand_sinks(bb, x, prompt, tau=None):
    """Prompt tokens with `phi_rms(x) >= tau` over the backbone's llm_dims (tau: the backbone's)."""
    cfg = bb.sinks
    phi = x[..., cfg.llm_dims].abs().amax(-1) / x.pow(2).mean(-1).sqrt()
    return (phi >= (cfg.tau_llm if tau is None else tau)) & prompt


def layer_input(bb, batch, layer):
    """Hidden state `(B, T, D)` entering `layer` in the unmodified backbone."""
    with torch.no_grad():
        out = bb.model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    return out.hidden_states[layer]


def sink_case(bb, batch, layer):
    """(vis, prompt, real, x, sinks): hand segments, the hidden state entering `layer` and
    its hand-flagged sinks (asserted non-empty, or the test would prove nothing)."""
    vis, prompt, real = hand_segments(bb, batch)
    x = layer_input(bb, batch, layer)
    sinks = hand_sinks(bb, x, prompt)
    assert sinks.any(), "the test batch needs at least one sink"
    return vis, prompt, real, x, sinks


@torch.no_grad()
def attention_outputs(bb, batch, gates, layers, with_hidden: bool = False):
    """Self-attention outputs `{layer: (B, T, D)}` of a forward with `gates` attached (labels
    passed, so answers are `out`); with `with_hidden`, also the hidden states entering each layer."""
    captured, handles = {}, []
    for layer in layers:
        def keep(module, args, output, layer=layer):
            captured[layer] = output[0]
        handles.append(bb.decoder_layers[layer].self_attn.register_forward_hook(keep))
    try:
        with lsg.attach(bb, gates) if gates else nullcontext():
            hidden = bb.model(**batch, output_hidden_states=with_hidden).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    return (captured, hidden) if with_hidden else captured


@torch.no_grad()
def logits_with(bb, batch, gates):
    with lsg.attach(bb, gates):
        return bb.model(**batch).logits
