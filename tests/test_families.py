"""Backbone families: a checkpoint is checked against its family before any weight is read, and
LLaVA-1.5 gets its own conversation template and system prompt."""

from __future__ import annotations

import json

import pytest

import lsg
from lsg.families import FAMILIES, get_family
from lsg.families.llava import LLAVA_15_SYSTEM, LLAVA_15_TEMPLATE


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "idefics3"])
def test_a_checkpoint_of_another_family_is_refused_before_any_weight_is_read(tmp_path, model_type):
    # config.json only: loading any weight would fail with another error than the one asserted.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["X"]}))
    with pytest.raises(ValueError, match=f"model_type='{model_type}'.*family 'llava'.*Supported families: "):
        lsg.load_backbone("llava-1.5-7b", hf_id=str(tmp_path))


def test_unknown_family_names_the_supported_ones():
    with pytest.raises(ValueError, match="Supported families: " + ", ".join(sorted(FAMILIES))):
        get_family("made-up-vlm")


def test_llava_15_template_is_the_conversation_format_with_its_system_prompt(tiny_hub_dir):
    bb = lsg.load_backbone("llava-1.5-7b", hf_id=str(tiny_hub_dir), dtype="float32")
    assert bb.processor.chat_template == LLAVA_15_TEMPLATE and bb.system_prompt == LLAVA_15_SYSTEM
    # conv_vicuna_v1: system, " USER: <image>\n{q} ASSISTANT:"; an answer ends with "</s>".
    assert bb.prompt_text("What is it?") == f"{LLAVA_15_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    two_turns = bb.processor.apply_chat_template(bb._messages("Q1", [("A1", "Q2")]), add_generation_prompt=True,
                                                 tokenize=False)
    assert two_turns == f"{LLAVA_15_SYSTEM} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    hub = lsg.load_backbone("llava-1.5-7b", hf_id=str(tiny_hub_dir), dtype="float32", chat_template="hub",
                            system_prompt=None)
    assert hub.processor.chat_template != LLAVA_15_TEMPLATE
    with pytest.raises(ValueError, match="chat_template='vicuna' is not one of family 'llava': use hub or llava-1.5"):
        lsg.load_backbone("llava-1.5-7b", hf_id=str(tiny_hub_dir), chat_template="vicuna")


def test_prefix_reuse_puts_back_a_layer_forward_it_found(tiny):
    """accelerate's device_map installs its own `forward` on each layer; skipping layers for a
    prefix must restore it, not drop it."""
    layer = tiny.decoder_layers[3]
    mine = layer.forward
    layer.forward = mine  # an instance-level forward, as accelerate's hooks install
    try:
        with tiny.skip_decoder_layers([3]):
            assert layer.forward is not mine
        assert vars(layer)["forward"] is mine
    finally:
        vars(layer).pop("forward", None)


def test_a_device_map_load_gives_the_same_model(tiny_hub_dir):
    """`model.device_map=auto` (accelerate's placement, for 13B over several GPUs) loads the same
    weights; on this CPU-only machine the map puts every layer on the CPU."""
    import torch

    from tests.conftest import samples

    plain = lsg.load_backbone("llava-1.5-7b", hf_id=str(tiny_hub_dir), dtype="float32")
    mapped = lsg.load_backbone("llava-1.5-7b", hf_id=str(tiny_hub_dir), dtype="float32", device_map="auto")
    images, questions, _ = samples(2)
    batch = plain.build_batch(images, questions)
    with torch.no_grad():
        torch.testing.assert_close(mapped.model(**batch).logits, plain.model(**batch).logits)


@pytest.mark.slow
def test_llava_hub_checkpoint_runs_every_command_as_a_user_runs_them(tiny_hub_dir, tmp_path):
    """`model=llava-1.5-7b model.hf_id=<tiny hub-format LLaVA>` (sink dims of the tiny width):
    train, compare with every gate, evaluate, calibrate; generation and padding as the others."""
    from tests.hand import assert_spec_generates_as_recompute
    from tests.tiny_families import SINKS, SPECS, check_user_commands

    check_user_commands(tmp_path, tiny_hub_dir, "llava-1.5-7b")
    bb = lsg.load_backbone("llava-1.5-7b", hf_id=str(tiny_hub_dir), dtype="float32", sinks=SINKS)
    for spec in SPECS + ["lsg@2"]:
        assert_spec_generates_as_recompute(bb, spec)


def test_backbone_from_config_takes_the_groups_name_and_overrides_without_changing_it():
    cfg = {"name": "tiny-random", "num_layers": 2, "padding_side": "left"}
    bb = lsg.backbone_from_config(cfg, padding_side="right")
    assert (bb.name, bb.num_layers, bb.padding_side) == ("tiny-random", 2, "right")
    assert cfg == {"name": "tiny-random", "num_layers": 2, "padding_side": "left"}
