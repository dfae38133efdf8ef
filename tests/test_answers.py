"""The answer store (`lsg.answers`): one cache key for every caller, processor included."""

from __future__ import annotations

import pytest

import lsg
from lsg.backbones import backbone_config
from lsg.comparison import compare
from lsg.datamodule import load_records


def _compare_twice(tmp_path, first, second, monkeypatch):
    """compare.py's baseline on `first`, then on `second` with the same cache folder; returns
    the second run's rows and how many times it evaluated (0 = served from the cache)."""
    import lsg.comparison as comparison
    from lsg.evaluation import evaluate_many

    cfg = backbone_config("tiny-random")
    data = {"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 0, "n_val": 14, "n_test": 0}
    records = load_records(data, "val")
    compare(first, cfg, ["none"], records, data, "val", tmp_path / "out", batch_size=7, timing_batches=1,
            timing_repeats=1)
    calls = []
    monkeypatch.setattr(comparison, "evaluate_many", lambda *a, **k: calls.append(1) or evaluate_many(*a, **k))
    rows, _ = compare(second, cfg, ["none"], records, data, "val", tmp_path / "out", batch_size=7,
                      timing_batches=1, timing_repeats=1)
    return rows, len(calls), records


def test_compare_cache_never_serves_the_answers_of_another_system_prompt(tmp_path, tiny, monkeypatch):
    """Same weights, same data, another system prompt: the prompts the model reads differ, so
    the cached answers of the first prompt must not be served (the stale-cache bug of issue 18)."""
    from lsg.evaluation import evaluate

    other = lsg.load_backbone("tiny-random", system_prompt="Answer with one letter only .")
    assert other.fingerprint == tiny.fingerprint and other.system_prompt != tiny.system_prompt
    rows, evaluated, records = _compare_twice(tmp_path, tiny, other, monkeypatch)
    assert evaluated == 1, "another system prompt must be evaluated, not read from the cache"
    assert rows[0]["overall"] == pytest.approx(100 * evaluate(other, records, batch_size=7).overall)
    assert len(list((tmp_path / "out" / "cache").glob("*.json"))) == 2


def test_compare_cache_never_serves_the_answers_of_another_chat_template(tmp_path, tiny, monkeypatch):
    other = lsg.load_backbone("tiny-random")
    other.processor.chat_template = other.processor.chat_template.replace("assistant", "Assistant")
    assert other.processor.chat_template != tiny.processor.chat_template
    _, evaluated, _ = _compare_twice(tmp_path, tiny, other, monkeypatch)
    assert evaluated == 1, "another chat template must be evaluated, not read from the cache"


def test_compare_cache_is_reused_for_the_same_backbone_and_prompt(tmp_path, tiny, monkeypatch):
    """The control: an identical setup is served from the cache (the key is not random)."""
    same = lsg.load_backbone("tiny-random")
    _, evaluated, _ = _compare_twice(tmp_path, tiny, same, monkeypatch)
    assert evaluated == 0
