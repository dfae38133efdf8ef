"""Answers of gate stacks to a benchmark's questions, scored by its official scorer: one pipeline,
one result type (docs/methods.md section 6).

    results = answer_stacks(backbone, benchmark, stacks, cache_dir=out_dir / "cache")   # {spec: Result}
    results["var"].acc_pct["overall"]                                                 # percent

- `choice` mode reads the option letters' logits at the last prompt token
  (`lsg.scoring.predicted_letters`) for every stack in one pass with prefix reuse: one ungated
  forward per batch gives the hidden state entering each stack's lowest gated layer, and every
  stack runs only its own layers from there (`choice_letters`).
- `generate` mode decodes greedily through the KV cache with the stack attached, left-padded
  batches (`generate_answers`; the gate state set at prefill stays in the cache, docs/methods.md
  section 3).
- Answers go through the answer store (`lsg.answers.AnswerCache`): a stack whose answers to these
  questions are stored is read, not answered again. The key covers the backbone, its processor,
  the questions and the benchmark's identity (`answer_cache`), so a cache never serves another
  model's, processor's or prompt's answers.
- Every answer list is scored by the benchmark's `score` (a data split is a benchmark too:
  `lsg.benchmarks.base.DataSplit`), giving a `Result`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import torch
from PIL import Image
from rich.progress import track

from lsg.answers import AnswerCache, answer_context, answers_of
from lsg.attach import attach
from lsg.backbones import Backbone
from lsg.data import VQARecord
from lsg.gates.base import Gate
from lsg.prefix import compute_prefixes, run_suffix
from lsg.scoring import predicted_letters

Layers = Mapping[int, "Gate | Sequence[Gate]"]


@dataclass
class Result:
    """One method's answers to a benchmark's questions, scored by the benchmark's official scorer.

    The first four fields are what a scorer gives (`Benchmark.score`); the rest say whose answers
    they are. Per-question lists are in benchmark order.

    Attributes:
        correct: per question, 1.0 if right else 0.0 (or the official partial score); what every
            paired CI resamples.
        parsed: per question, what the official parser read from the answer ("" = nothing).
        subtasks: per question, its sub-task.
        metrics: the benchmark's official headline numbers, in the benchmark's own units (e.g. MME
            perception total, POPE F1 in percent, OCRBench points out of 1000).
        spec: the gate stack's spec (`lsg.specs`; "none" = the unmodified backbone).
        ids: per question, its id.
        predictions: per question, the answer: an option letter (choice mode) or generated text.
        elapsed_s: wall seconds spent answering (0 when read from the answer store).
        cached: the answers were read from the answer store.
    """

    correct: list[float]
    parsed: list[str]
    subtasks: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    spec: str = ""
    ids: list[str] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    cached: bool = False

    @property
    def acc_pct(self) -> dict[str, float]:
        """Mean correctness in percent per sub-task (sorted) and over all questions (`overall`)."""
        return acc_pct(self.correct, self.subtasks)

    @property
    def counts(self) -> dict[str, int]:
        """Questions per sub-task (sorted) and in all (`overall`): the keys of `acc_pct`."""
        n = defaultdict(int)
        for t in self.subtasks:
            n[t] += 1
        return {**dict(sorted(n.items())), "overall": len(self.subtasks)}

    def summary(self) -> dict:
        """The figures without the per-question lists, JSON-ready."""
        return {"spec": self.spec, "acc_pct": self.acc_pct, "counts": self.counts, "metrics": dict(self.metrics),
                "elapsed_s": self.elapsed_s, "cached": self.cached}


class Questions(Protocol):
    """What the pipeline reads of a benchmark (`lsg.benchmarks.Benchmark`, which sits in a later
    layer): how to answer, the questions, the official scorer, the answer store's source."""

    mode: str  # "choice" | "generate"
    max_new_tokens: int

    def load(self) -> list[VQARecord]: ...

    def score(self, items: Sequence[VQARecord], responses: Sequence[str]) -> Result: ...

    def answer_source(self) -> dict: ...


def acc_pct(correct: Sequence[float], subtasks: Sequence[str]) -> dict[str, float]:
    """Mean of `correct` in percent per sub-task (sorted) and over all questions (`overall`); the
    one per-sub-task accuracy of the project."""
    groups = defaultdict(list)
    for c, t in zip(correct, subtasks):
        groups[t].append(float(c))
    out = {t: 100.0 * sum(v) / len(v) for t, v in sorted(groups.items())}
    out["overall"] = 100.0 * sum(map(float, correct)) / max(len(correct), 1)
    return out


def score_letters(records: Sequence[VQARecord], letters: Sequence[str]) -> Result:
    """Exact match of option letters with multiple-choice `records` (same order): the scorer of a
    data split and of `evaluate`. `metrics` holds `accuracy` (percent)."""
    correct = [float(p == r.answer_letter) for p, r in zip(letters, records)]
    return Result(correct, list(letters), [r.subtask for r in records],
                  {"accuracy": 100.0 * sum(correct) / max(len(correct), 1)})


def images_and_questions(records: Sequence[VQARecord]) -> tuple[list[Image.Image], list[str]]:
    """RGB images and questions of records, ready for `Backbone.build_batch`."""
    return [r.load_image() for r in records], [r.question for r in records]


def mc_records(records: Sequence[VQARecord]) -> list[VQARecord]:
    """Records scorable by option letter (options and a letter answer), in order."""
    return [r for r in records if r.options and r.answer_letter]


def check_choice(items: Sequence[VQARecord]) -> None:
    """Raise ValueError unless there are questions and each has options and a letter answer
    (what choice mode reads)."""
    if not items:
        raise ValueError("No multiple-choice record (with 'options' and a letter answer) to evaluate.")
    unreadable = [it.id for it in items if not (it.options and it.answer_letter)]
    if unreadable:
        raise ValueError(f"mode=choice needs options and a letter answer on every question; {len(unreadable)} "
                         f"have none (ids {unreadable[:5]}...). Use benchmark.mode=generate.")


def first_layer(stack: Layers | None) -> int | None:
    """The lowest gated layer of a stack, None for the baseline (no gate)."""
    return min(stack) if stack else None


def batches(n: int, batch_size: int, progress: str | None):
    """Start indices of the batches of `n` questions, behind a transient progress bar titled
    `progress` (None = no bar)."""
    starts = range(0, n, batch_size)
    return track(starts, description=progress, transient=True) if progress else starts


@torch.no_grad()
def choice_letters(backbone: Backbone, records: Sequence[VQARecord], stacks: Mapping[str, Layers | None],
                   batch_size: int = 32, progress: str | None = None,
                   timing: dict | None = None) -> dict[str, list[str]]:
    """Predicted option letter per record for every stack, in one pass with prefix reuse (`lsg.prefix`).

    Per batch, one ungated forward gives the hidden state entering each stack's lowest gated
    layer (and, for a stack that is None or {}, the baseline's final state); every stack then runs
    only its own layers from there and `lsg.scoring.predicted_letters` reads the letter. Answers
    equal one full forward per stack (`evaluate`) up to float rounding (tests/test_prefix.py).

    Args:
        records: multiple-choice records (`check_choice`).
        stacks: name -> `{layer: gate(s)}` (None or {} = the unmodified backbone).
        timing: if given, filled with seconds: `prefix` (the shared forwards) and one entry per
            stack (its suffixes).

    Raises:
        ValueError: no record, or one without options and a letter answer.
    """
    check_choice(records)
    starts = {name: first_layer(stack) for name, stack in stacks.items()}
    layers = sorted({l for l in starts.values() if l is not None})
    to_end = any(l is None for l in starts.values())
    letters: dict[str, list[str]] = {name: [] for name in stacks}
    seconds = dict.fromkeys(["prefix", *stacks], 0.0)
    for i in batches(len(records), batch_size, progress):
        chunk = records[i: i + batch_size]
        batch = backbone.on_device(backbone.build_batch(*images_and_questions(chunk)))
        n_options = [len(r.options) for r in chunk]
        start = time.perf_counter()
        prefixes, final = compute_prefixes(backbone, batch, layers, to_end=to_end)
        seconds["prefix"] += time.perf_counter() - start
        for name, stack in stacks.items():
            start = time.perf_counter()
            hidden = final if starts[name] is None else run_suffix(backbone, prefixes[starts[name]], stack)
            letters[name] += predicted_letters(backbone, batch, hidden, n_options)
            seconds[name] += time.perf_counter() - start
    if timing is not None:
        timing.update(seconds)
    return letters


@torch.no_grad()
def generate_answers(backbone: Backbone, records: Sequence[VQARecord], stack: Layers | None, max_new_tokens: int,
                     batch_size: int = 8, progress: str | None = None) -> list[str]:
    """Greedy answers (decoded text, special tokens dropped, stripped) of every record with
    `stack` attached, through the KV cache.

    Batches are left padded so every row's prompt ends at the same position and generation
    starts together; gates are identical under either padding (tests/test_gates.py).
    """
    out: list[str] = []
    with attach(backbone, stack) if stack else nullcontext():
        for i in batches(len(records), batch_size, progress):
            chunk = records[i:i + batch_size]
            batch = backbone.build_batch(*images_and_questions(chunk), padding_side="left")
            out += [text.strip() for text in backbone.generate(batch, max_new_tokens)]
    return out


@torch.no_grad()
def evaluate(backbone: Backbone, records: Sequence[VQARecord], gates: Layers | None = None, batch_size: int = 32,
             progress: str | None = None) -> Result:
    """Option-letter answers of the multiple-choice `records` with `gates` attached, one full
    forward per batch (the plain path `choice_letters` is checked against), scored by exact letter.

    Args:
        gates: `{layer: gate(s)}` to attach, or None for the unmodified backbone.

    Raises:
        ValueError: no record, or one without options and a letter answer.
    """
    check_choice(records)
    letters = []
    start = time.perf_counter()
    with attach(backbone, gates) if gates else nullcontext():
        for i in batches(len(records), batch_size, progress):
            chunk = records[i: i + batch_size]
            batch = backbone.on_device(backbone.build_batch(*images_and_questions(chunk)))
            letters += predicted_letters(backbone, batch, None, [len(r.options) for r in chunk])
    return replace(score_letters(records, letters), ids=[r.id for r in records], predictions=letters,
                   elapsed_s=time.perf_counter() - start)


def scored(benchmark: Questions, items: Sequence[VQARecord], predictions: Sequence[str], spec: str = "",
           elapsed_s: float = 0.0, cached: bool = False) -> Result:
    """`benchmark.score` of one method's answers to `items`, with whose answers they are."""
    result = benchmark.score(items, list(predictions))
    return replace(result, spec=spec, ids=[it.id for it in items], predictions=list(predictions),
                   elapsed_s=elapsed_s, cached=cached)


def answer_cache(backbone: Backbone, benchmark: Questions, items: Sequence[VQARecord],
                 folder: str | Path | None) -> AnswerCache:
    """The answer store of `benchmark`'s `items` under `folder` (None = no store), keyed by
    `lsg.answers.answer_context`: backbone, processor, questions and `benchmark.answer_source()`."""
    return AnswerCache(folder, answer_context(backbone, items, **benchmark.answer_source()))


def answer_stacks(backbone: Backbone, benchmark: Questions, stacks: Sequence,
                  items: Sequence[VQARecord] | None = None, cache_dir: str | Path | None = None,
                  batch_size: int = 8, progress: str | None = "answering") -> dict[str, Result]:
    """Every stack's answers to the benchmark's questions, scored by its official scorer.

    Stored answers are read from the answer store under `cache_dir` (`answer_cache`); the others
    are computed in the benchmark's mode (choice: every stack in one pass with prefix reuse,
    `choice_letters`; generate: one greedy pass per stack, `generate_answers`) and stored.

    Args:
        benchmark: a `lsg.benchmarks.Benchmark` (its `mode`, `max_new_tokens`, `score`,
            `answer_source`), e.g. `DataSplit` for a data config's split.
        stacks: `lsg.specs.GateStack`s (spec, layers, identity); the result keeps their order.
        items: the benchmark's questions (None = `benchmark.load()`).
        cache_dir: the answer store's folder; None = compute everything, store nothing.
        progress: description for progress bars (None = no bar).

    Returns:
        spec -> `Result` (`cached` when read from the store; `elapsed_s`: choice mode, each stack's
        own suffix seconds, the baseline's including the shared forwards; generate mode, its pass).

    Raises:
        ValueError: choice mode with no question, or one without options and a letter answer.
    """
    items = list(benchmark.load() if items is None else items)
    cache = answer_cache(backbone, benchmark, items, cache_dir)
    results: dict[str, Result] = {}
    for st in stacks:
        found = cache.get(st.identity, items)
        if found is not None:
            results[st.spec] = scored(benchmark, items, [a.prediction for a in found[0]], st.spec,
                                      found[1].get("elapsed_s", 0.0), cached=True)
    todo = [st for st in stacks if st.spec not in results]
    fresh: dict[str, tuple[list[str], float]] = {}
    if todo and benchmark.mode == "choice":
        timing = {}
        letters = choice_letters(backbone, items, {st.spec: st.layers for st in todo}, batch_size, timing=timing,
                                 progress=f"{progress}: {len(todo)} stacks in one pass" if progress else None)
        fresh = {st.spec: (letters[st.spec], timing[st.spec] + (timing["prefix"] if not st.layers else 0.0))
                 for st in todo}
    for st in todo if benchmark.mode != "choice" else []:
        start = time.perf_counter()
        texts = generate_answers(backbone, items, st.layers, benchmark.max_new_tokens, batch_size,
                                 progress=f"{progress}: {st.spec}" if progress else None)
        fresh[st.spec] = texts, time.perf_counter() - start
    for st in todo:
        predictions, elapsed_s = fresh[st.spec]
        results[st.spec] = result = scored(benchmark, items, predictions, st.spec, elapsed_s)
        cache.put(st.identity, answers_of(items, predictions, correct=result.correct), spec=st.spec,
                  elapsed_s=elapsed_s, acc_pct=result.acc_pct)
    return {st.spec: results[st.spec] for st in stacks}
