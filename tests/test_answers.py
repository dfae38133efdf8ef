"""The answer store (`lsg.answers`): one cache key for every caller, processor included."""

from __future__ import annotations

import pytest

import lsg
from tests.hand import compare_twice


def test_eval_cache_never_serves_the_answers_of_another_system_prompt(tmp_path, tiny, monkeypatch):
    """Same weights, same data, another system prompt: the prompts the model reads differ, so
    the cached answers of the first prompt must not be served (the stale-cache bug of issue 18)."""
    from lsg.evaluation import evaluate

    other = lsg.load_backbone("tiny-random", system_prompt="Answer with one letter only .")
    assert other.fingerprint == tiny.fingerprint and other.system_prompt != tiny.system_prompt
    rows, evaluated, records = compare_twice(tmp_path, tiny, other, monkeypatch)
    assert evaluated == 1, "another system prompt must be evaluated, not read from the cache"
    assert rows[0]["acc_pct"]["overall"] == pytest.approx(evaluate(other, records, batch_size=7).acc_pct["overall"])
    assert len(list((tmp_path / "out" / "cache").glob("*.json"))) == 2


def test_eval_cache_never_serves_the_answers_of_another_chat_template(tmp_path, tiny, monkeypatch):
    other = lsg.load_backbone("tiny-random")
    other.processor.chat_template = other.processor.chat_template.replace("assistant", "Assistant")
    assert other.processor.chat_template != tiny.processor.chat_template
    _, evaluated, _ = compare_twice(tmp_path, tiny, other, monkeypatch)
    assert evaluated == 1, "another chat template must be evaluated, not read from the cache"


def test_eval_cache_is_reused_for_the_same_backbone_and_prompt(tmp_path, tiny, monkeypatch):
    """The control: an identical setup is served from the cache (the key is not random)."""
    same = lsg.load_backbone("tiny-random")
    _, evaluated, _ = compare_twice(tmp_path, tiny, same, monkeypatch)
    assert evaluated == 0


def test_a_ckpt_spec_loads_any_trained_gate_and_lsg_is_its_alias(tmp_path, tiny):
    """`ckpt:<path>` names a trained gate of any kind (LoRA here); `lsg:<path>` is the same spec,
    with the same cache identity; a trainable gate named without a checkpoint is refused."""
    import torch

    from lsg.gates import LoRAGate
    from lsg.specs import parse_stack

    torch.manual_seed(0)
    lora = LoRAGate.build(tiny, rank=2)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_()
    path = lora.save(tmp_path / "lora-L1.safetensors", backbone=tiny.name, backbone_fingerprint=tiny.fingerprint,
                     layer=1, sinks=tiny.sinks.to_dict())
    by_ckpt, by_lsg = parse_stack(f"ckpt:{path}", tiny), parse_stack(f"lsg:{path}", tiny)
    assert list(by_ckpt.layers) == [1] and isinstance(by_ckpt.layers[1][0], LoRAGate)
    assert by_ckpt.identity == by_lsg.identity and by_ckpt.identity["spec"][0]["gate"] == "lora"
    state = by_ckpt.layers[1][0].state_dict()
    assert all(torch.equal(state[k], v) for k, v in lora.state_dict().items())
    with pytest.raises(ValueError, match="give the trained gate's checkpoint, e.g. ckpt:"):
        parse_stack("lora@1", tiny)
    with pytest.raises(ValueError, match="takes no ':' argument"):
        parse_stack("var@1:0.5", tiny)


def test_answer_files_of_the_earlier_format_are_read_but_never_trusted(tmp_path):
    """A `val-epoch*.json` written before the answer store (`answer` for the gold letter, no
    question) still summarizes, and answers_for asks for those questions again."""
    import json

    from lsg.answers import answers_for, read_answers
    from lsg.data import VQARecord

    (tmp_path / "val-epoch1.json").write_text(json.dumps({"epoch": 1, "answers": {
        "q0": {"subtask": "count", "answer": "A", "prediction": "B", "baseline": "A", "ratios": [0.5, 0.5]}}}))
    info, stored = read_answers(tmp_path / "val-epoch1.json")
    assert info == {"epoch": 1} and stored["q0"].gold == "A" and stored["q0"].baseline == "A"
    record = VQARecord(id="q0", question="How many?", answer="A", subtask="count", options=("1", "2"),
                       answer_letter="A")
    assert answers_for([record], stored) is None
