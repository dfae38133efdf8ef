"""The answer store (`lsg.answers`): one cache key for every caller, processor included."""

from __future__ import annotations

import pytest

import lsg
from tests.hand import compare_twice


def test_compare_cache_never_serves_the_answers_of_another_system_prompt(tmp_path, tiny, monkeypatch):
    """Same weights, same data, another system prompt: the prompts the model reads differ, so
    the cached answers of the first prompt must not be served (the stale-cache bug of issue 18)."""
    from lsg.evaluation import evaluate

    other = lsg.load_backbone("tiny-random", system_prompt="Answer with one letter only .")
    assert other.fingerprint == tiny.fingerprint and other.system_prompt != tiny.system_prompt
    rows, evaluated, records = compare_twice(tmp_path, tiny, other, monkeypatch)
    assert evaluated == 1, "another system prompt must be evaluated, not read from the cache"
    assert rows[0]["overall"] == pytest.approx(100 * evaluate(other, records, batch_size=7).overall)
    assert len(list((tmp_path / "out" / "cache").glob("*.json"))) == 2


def test_compare_cache_never_serves_the_answers_of_another_chat_template(tmp_path, tiny, monkeypatch):
    other = lsg.load_backbone("tiny-random")
    other.processor.chat_template = other.processor.chat_template.replace("assistant", "Assistant")
    assert other.processor.chat_template != tiny.processor.chat_template
    _, evaluated, _ = compare_twice(tmp_path, tiny, other, monkeypatch)
    assert evaluated == 1, "another chat template must be evaluated, not read from the cache"


def test_compare_cache_is_reused_for_the_same_backbone_and_prompt(tmp_path, tiny, monkeypatch):
    """The control: an identical setup is served from the cache (the key is not random)."""
    same = lsg.load_backbone("tiny-random")
    _, evaluated, _ = compare_twice(tmp_path, tiny, same, monkeypatch)
    assert evaluated == 0
