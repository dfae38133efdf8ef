"""Activation checkpointing of the frozen suffix (issue 19, item 1): the layers above a gate are
recomputed in backward, and the gate trains exactly as on the plain path."""

from __future__ import annotations

import pytest
import torch

from lsg.gates import LSGGate
from lsg.prefix import compute_prefixes, run_suffix
from lsg.scoring import answer_loss
from tests.conftest import samples

LAYER = 1


def two_adam_steps(backbone, checkpoint_above: bool) -> tuple[LSGGate, int]:
    """An LSG gate at `LAYER` after two Adam steps on two batches, and how many times the last
    decoder layer ran (a recompute in backward runs it again)."""
    torch.manual_seed(0)
    gate = LSGGate(backbone.hidden_size, "vsink-lsink-ordinary")
    optimizer = torch.optim.Adam(gate.parameters(), lr=1e-2)
    calls = []  # calls of the last layer's class forward: the checkpointed function, recomputes included
    last = backbone.decoder_layers[-1]
    original = type(last).forward

    def counting(self, *args, **kwargs):
        if self is last:
            calls.append(1)
        return original(self, *args, **kwargs)

    type(last).forward = counting
    try:
        for offset in (0, 4):
            images, questions, answers = samples(4, "train", offset)
            batch = backbone.build_batch(images, questions, answers)
            prefix = compute_prefixes(backbone, batch, [LAYER])[0][LAYER]
            hidden = run_suffix(backbone, prefix, {LAYER: gate}, checkpoint_above=checkpoint_above)
            loss = answer_loss(backbone, batch, hidden)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        type(last).forward = original
    return gate, len(calls)


def test_checkpointed_suffix_trains_the_same_gate_as_the_plain_path(tiny):
    plain, plain_calls = two_adam_steps(tiny, checkpoint_above=False)
    checkpointed, checkpointed_calls = two_adam_steps(tiny, checkpoint_above=True)
    # Two batches: the plain path runs the last layer twice (one forward each); the checkpointed
    # path twice more (the recompute in each backward), so checkpointing really happened.
    assert (plain_calls, checkpointed_calls) == (2, 4)
    assert not torch.equal(plain.fc2.weight, torch.zeros_like(plain.fc2.weight)), "the gate trained"
    for (key, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=key)


def test_a_checkpointed_backward_leaves_the_decoder_layers_as_they_were(tiny):
    """After a checkpointed forward and backward, no layer keeps a replaced `forward` and a plain
    run gives the output it gave before (the recompute wrappers are removed on exit)."""
    images, questions, answers = samples(2)
    batch = tiny.build_batch(images, questions, answers)
    prefix = compute_prefixes(tiny, batch, [LAYER])[0][LAYER]
    gate = LSGGate(tiny.hidden_size, "vsink-lsink-ordinary")
    before = {id(layer): dict(vars(layer)).get("forward") for layer in tiny.decoder_layers}
    with torch.no_grad():
        plain = run_suffix(tiny, prefix, {LAYER: gate})
    loss = answer_loss(tiny, batch, run_suffix(tiny, prefix, {LAYER: gate}, checkpoint_above=True))
    loss.backward()
    assert gate.fc2.weight.grad is not None
    assert {id(layer): dict(vars(layer)).get("forward") for layer in tiny.decoder_layers} == before
    with torch.no_grad():
        torch.testing.assert_close(run_suffix(tiny, prefix, {LAYER: gate}), plain, atol=0, rtol=0)


@pytest.mark.parametrize("model,expected", [("llava-1.5-7b", True), ("qwen2-vl", True), ("smol-llava", False)])
def test_training_takes_activation_checkpointing_from_the_model_config(model, expected):
    """train.yaml's `activation_checkpointing` follows the `model=` group (hub backbones on, the
    embedded one off), and a command-line value wins."""
    from hydra import compose, initialize_config_dir

    from lsg.configs import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        assert compose("train", [f"model={model}"]).activation_checkpointing is expected
        assert compose("train", [f"model={model}", "activation_checkpointing=false"]).activation_checkpointing is False


def test_an_eager_backbone_trains_without_checkpointing_and_says_so(tiny_eager):
    """The recompute runs after attach has restored the backbone's own attention; only SDPA
    recomputes the same graph, so an eager backbone keeps its activations (and warns) instead
    of failing in backward."""
    images, questions, answers = samples(2)
    batch = tiny_eager.build_batch(images, questions, answers)
    prefix = compute_prefixes(tiny_eager, batch, [LAYER])[0][LAYER]
    grads = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        gate = LSGGate(tiny_eager.hidden_size, "vsink-lsink-ordinary")
        with torch.no_grad():
            gate.fc2.weight.normal_()
        if checkpoint:
            with pytest.warns(UserWarning, match="activation_checkpointing needs attn_implementation in"):
                hidden = run_suffix(tiny_eager, prefix, {LAYER: gate}, checkpoint_above=True)
        else:
            hidden = run_suffix(tiny_eager, prefix, {LAYER: gate})
        answer_loss(tiny_eager, batch, hidden).backward()
        grads.append(gate.fc2.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)
