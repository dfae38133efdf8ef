"""Prefix reuse equals the plain path: every gate, both sink scopes, both paddings, the cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lsg
from lsg.specs import parse_stack
from lsg.gates import LSGGate
from lsg.prefix import PrefixCache, compute_prefixes, run_suffix
from lsg.scoring import answer_loss, decoder_hidden
from tests.conftest import samples

SPECS = ["var", "vaf@1-2", "spear@2", "outro", "oracle@2:0.3", "oracle@0:0.8", "oracle@1:0.3/0.5/0.9", "knockout@1",
         "mean-v@3", "zero-v@2", "var@2-3+oracle@1:0.2"]


def random_lsg(hidden_size, seed=1):
    torch.manual_seed(seed)
    gate = LSGGate(hidden_size, "vsink-lsink-ordinary")
    torch.nn.init.normal_(gate.fc2.weight, std=0.5)
    return gate


def real(hidden, batch):
    return hidden[batch["attention_mask"].bool()]


@pytest.mark.parametrize("scope", ["layer", "upto"])
@pytest.mark.parametrize("spec", SPECS)
def test_suffix_from_prefix_equals_full_gated_forward(tiny, batch, spec, scope):
    sinks = dataclasses.replace(tiny.sinks, lsink_scope=scope)
    stack = parse_stack(spec, tiny)
    start = min(stack.layers)
    with torch.no_grad():
        with lsg.attach(tiny, stack.layers, sinks):
            plain = decoder_hidden(tiny, batch)
        prefixes, _ = compute_prefixes(tiny, batch, [start, 3], sinks)
        suffix = run_suffix(tiny, prefixes[start], stack.layers)
    torch.testing.assert_close(real(suffix, batch), real(plain, batch), atol=2e-5, rtol=1e-4)
    assert (real(suffix, batch) - real(plain, batch)).abs().max() < 2e-5


def test_lsg_gate_sees_the_same_ratios_and_gradients_from_the_prefix(tiny, batch):
    sinks = dataclasses.replace(tiny.sinks, lsink_scope="upto")
    gate = random_lsg(tiny.hidden_size)
    with lsg.attach(tiny, {2: gate}, sinks) as run:
        plain_loss = answer_loss(tiny, batch)
        plain_ratios = run.ctx.gate_state[(2, 0)][0].detach()
    plain_grads = torch.autograd.grad(plain_loss, list(gate.parameters()))
    prefix = compute_prefixes(tiny, batch, [2], sinks)[0][2]
    state = {}
    loss = answer_loss(tiny, batch, run_suffix(tiny, prefix, {2: gate}, state))
    grads = torch.autograd.grad(loss, list(gate.parameters()))
    torch.testing.assert_close(state[(2, 0)][0].detach(), plain_ratios)
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=1e-5)
    for g, p in zip(grads, plain_grads):
        torch.testing.assert_close(g, p, atol=1e-6, rtol=1e-4)


def test_baseline_from_the_prefix_pass_equals_the_plain_backbone(tiny, batch):
    with torch.no_grad():
        plain = decoder_hidden(tiny, batch)
        prefixes, final = compute_prefixes(tiny, batch, [1, 2], to_end=True)
        ungated = run_suffix(tiny, prefixes[1])
    torch.testing.assert_close(real(final, batch), real(plain, batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(real(ungated, batch), real(plain, batch), atol=2e-5, rtol=1e-4)
    assert compute_prefixes(tiny, batch, [2])[1] is None  # layers above 2 skipped


def test_a_gate_below_the_prefix_is_refused(tiny, batch):
    prefix = compute_prefixes(tiny, batch, [2])[0][2]
    with pytest.raises(ValueError, match="below the prefix's layer 2"):
        run_suffix(tiny, prefix, {1: random_lsg(tiny.hidden_size)})
    other = dataclasses.replace(tiny.sinks, tau_llm=9.0)
    with pytest.raises(ValueError, match="other sinks"):
        with lsg.attach(tiny, {}, other, start_layer=prefix.layer, context=prefix.context()):
            pass


@pytest.mark.parametrize("side", ["right", "left"])
def test_prefix_cache_reassembles_samples_into_other_batches(tiny, side):
    images, questions, answers = samples(6)
    questions = [q + " ?" * i for i, q in enumerate(questions)]
    ids = [f"s{i}" for i in range(6)]
    cache = PrefixCache(tiny, 2)
    first = tiny.build_batch(images[:4], questions[:4], answers[:4], padding_side=side)
    cache.prefix(first, ids[:4])
    assert cache.stats()["misses"] == 4 and cache.stats()["samples"] == 4
    order = [3, 1, 0]  # another composition, width and order: served from the store
    batch = tiny.build_batch([images[i] for i in order], [questions[i] for i in order], [answers[i] for i in order],
                             padding_side=side)
    gate = random_lsg(tiny.hidden_size)
    cached = cache.prefix(batch, [ids[i] for i in order])
    assert cache.stats()["hits"] == 3
    with torch.no_grad():
        fresh = compute_prefixes(tiny, batch, [2])[0][2]
        torch.testing.assert_close(real(cached.hidden, batch), real(fresh.hidden, batch), atol=2e-5, rtol=1e-4)
        for l in fresh.sink_phi:
            torch.testing.assert_close(real(cached.sink_phi[l], batch), real(fresh.sink_phi[l], batch),
                                       atol=1e-4, rtol=1e-4)
        assert torch.equal(cached.vsink, fresh.vsink)
        with lsg.attach(tiny, {2: gate}):
            plain = decoder_hidden(tiny, batch)
        torch.testing.assert_close(real(run_suffix(tiny, cached, {2: gate}), batch), real(plain, batch),
                                   atol=3e-5, rtol=1e-4)


def test_prefix_cache_budget_falls_back_to_recomputing(tiny, batch):
    ids = ["a", "b", "c", "d"]
    cache = PrefixCache(tiny, 1, budget_mb=0)
    cache.prefix(batch, ids)
    again = cache.prefix(batch, ids)
    assert cache.stats() == {"hits": 0, "misses": 8, "stored_mb": 0.0, "samples": 0, "budget_reached": True}
    torch.testing.assert_close(again.hidden, compute_prefixes(tiny, batch, [1])[0][1].hidden)


def test_prefix_cache_recomputes_a_key_whose_tokens_changed(tiny, batch):
    cache = PrefixCache(tiny, 1)
    cache.prefix(batch, ["a", "b", "c", "d"])
    swapped = cache.prefix(batch, ["b", "a", "c", "d"])  # rows a and b differ: not served from the store
    assert cache.stats()["misses"] == 8
    torch.testing.assert_close(swapped.hidden, compute_prefixes(tiny, batch, [1])[0][1].hidden)


def test_choice_letters_of_many_stacks_in_one_pass_equal_separate_evaluations(tiny):
    from lsg.data import generate_split, load_llava_json
    from lsg.evaluation import choice_letters, evaluate

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as root:
        records = load_llava_json(generate_split("val", 14, Path(root)), check_images=False)
        specs = ["none", "var", "oracle@2:0.3", "oracle@2:0.9", "oracle@2:0.9/0.2/1.0", "spear@2+oracle@3:0.1",
                 "outro"]
        stacks = {s: parse_stack(s, tiny).layers for s in specs}
        stacks["lsg@1"] = {1: random_lsg(tiny.hidden_size)}
        timing = {}
        many = choice_letters(tiny, records, stacks, batch_size=5, timing=timing)
        for name, stack in stacks.items():
            alone = evaluate(tiny, records, stack or None, batch_size=4)
            assert many[name] == alone.predictions, name
        assert set(timing) == {"prefix", *stacks}


def test_a_disk_prefix_cache_serves_what_the_host_cache_serves_and_survives_a_restart(tiny, batch, tmp_path):
    """`prefix_cache: disk` (issue 19): memory-mapped safetensors shards give the host cache's
    prefixes; a new cache on the same folder (a resumed run) serves them without computing, and a
    cache of another setup (other sinks) does not read them."""
    ids = ["a", "b", "c", "d"]
    host, disk = PrefixCache(tiny, 2), PrefixCache(tiny, 2, disk_dir=tmp_path / "pc")
    for cache in (host, disk):
        cache.prefix(batch, ids)
    disk.flush()
    assert list((tmp_path / "pc" / "rank0").glob("shard-*.safetensors"))  # one folder per DDP rank
    assert (tmp_path / "pc" / "rank0" / "index.json").exists()
    resumed = PrefixCache(tiny, 2, disk_dir=tmp_path / "pc")
    order = [2, 0, 3]
    sub = {k: v[order] if torch.is_tensor(v) and v.dim() and v.shape[0] == 4 else v for k, v in batch.items()}
    from_host, from_disk = host.prefix(sub, [ids[i] for i in order]), resumed.prefix(sub, [ids[i] for i in order])
    assert resumed.stats()["hits"] == 3 and resumed.stats()["misses"] == 0
    assert torch.equal(from_disk.hidden, from_host.hidden) and torch.equal(from_disk.vsink, from_host.vsink)
    assert all(torch.equal(from_disk.sink_phi[l], from_host.sink_phi[l]) for l in from_host.sink_phi)
    other = PrefixCache(tiny, 2, sinks=dataclasses.replace(tiny.sinks, tau_llm=9.0), disk_dir=tmp_path / "pc")
    other.prefix(sub, [ids[i] for i in order])
    assert other.stats()["hits"] == 0, "a cache of other sinks must not serve these prefixes"


@pytest.mark.slow
def test_train_py_with_a_disk_prefix_cache_trains_the_host_caches_gate(tmp_path):
    import subprocess
    import sys

    from lsg.gates import Gate

    gates = {}
    for kind in ("host", "disk"):
        args = [sys.executable, "-m", "lsg.cli.train", "model=tiny-random", "logger=none", "layer=2", "epochs=2",
                f"data.root={tmp_path / 'shapes'}", "data.n_train=16", "data.n_val=7", "batch_size=4",
                "effective_batch_size=8", f"prefix_cache={kind}", f"run_dir={tmp_path / kind}",
                f"export_path={tmp_path / 'ck' / f'{kind}.safetensors'}", f"hydra.run.dir={tmp_path / 'hydra'}",
                "trainer.enable_progress_bar=false"]
        result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        gates[kind] = Gate.load(tmp_path / kind / "gate-epoch2.safetensors")
    assert list((tmp_path / "disk" / "prefix-cache").glob("rank0/shard-*.safetensors"))
    assert not (tmp_path / "host" / "prefix-cache").exists()
    for (key, a), b in zip(gates["host"].state_dict().items(), gates["disk"].state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=key)
