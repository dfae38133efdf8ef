"""Multiple-choice evaluation of a backbone with or without gates (docs/methods.md section 6)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from PIL import Image
from rich.progress import track

from lsg.attach import attach
from lsg.backbones import Backbone
from lsg.data import VQARecord
from lsg.gates.base import Gate
from lsg.prefix import compute_prefixes, run_suffix
from lsg.scoring import LETTERS, option_scores


from lsg.stats import BOOTSTRAP_SAMPLES, CI_LEVEL, paired_delta  # noqa: F401  (re-exported)


@dataclass
class EvalResult:
    """Accuracy per sub-task (fractions in [0, 1]), counts and wall time in seconds, and per
    question (in record order) the predicted letter, whether it was right and its sub-task."""

    accuracy: dict[str, float]
    counts: dict[str, int]
    predictions: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    correct: list[bool] = field(default_factory=list)
    subtasks: list[str] = field(default_factory=list)

    @property
    def overall(self) -> float:
        n = sum(self.counts.values())
        return sum(self.accuracy[t] * self.counts[t] for t in self.counts) / max(n, 1)

    @classmethod
    def from_predictions(cls, records: Sequence[VQARecord], predictions: Sequence[str],
                         elapsed_s: float = 0.0) -> "EvalResult":
        """Score predicted letters against multiple-choice `records` (same order): per-question
        correctness and sub-task, per-sub-task accuracy and counts."""
        correct = [p == r.answer_letter for p, r in zip(predictions, records)]
        total, hits = defaultdict(int), defaultdict(int)
        for ok, r in zip(correct, records):
            total[r.subtask] += 1
            hits[r.subtask] += int(ok)
        return cls({t: hits[t] / total[t] for t in total}, dict(total), list(predictions), elapsed_s, correct,
                   [r.subtask for r in records])

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "overall": self.overall, "counts": self.counts,
                "elapsed_s": self.elapsed_s}


def images_and_questions(records: Sequence[VQARecord]) -> tuple[list[Image.Image], list[str]]:
    """RGB images and questions of records (`VQARecord`s or benchmark `Item`s), ready for
    `Backbone.build_batch`."""
    return [r.load_image() for r in records], [r.question for r in records]


def mc_records(records: Sequence[VQARecord]) -> list[VQARecord]:
    """Records scorable by option letter; raises ValueError if there are none."""
    usable = [r for r in records if r.options and r.answer_letter]
    if not usable:
        raise ValueError("No multiple-choice record (with 'options' and a letter answer) to evaluate.")
    return usable


@torch.no_grad()
def evaluate(
    backbone: Backbone,
    records: Sequence[VQARecord],
    gates: Mapping[int, Gate | Sequence[Gate]] | None = None,
    batch_size: int = 32,
    progress: str | None = None,
) -> EvalResult:
    """Accuracy per sub-task: argmax of the option-letter logits at the last prompt token.

    Args:
        backbone: the loaded backbone.
        records: multiple-choice records (options + letter answer); others are skipped.
        gates: `{layer: gate(s)}` to attach, or None for the unmodified backbone.
        batch_size: samples per forward.
        progress: description for a progress bar (None = no bar).

    Raises:
        ValueError: no multiple-choice record.
    """
    records = mc_records(records)
    predictions = []
    batches = range(0, len(records), batch_size)
    start = time.perf_counter()
    with attach(backbone, gates) if gates else nullcontext():
        for i in track(batches, description=progress, transient=True) if progress else batches:
            chunk = records[i : i + batch_size]
            batch = backbone.build_batch(*images_and_questions(chunk))
            batch = backbone.on_device(batch)
            scores = option_scores(backbone, batch, max(len(r.options) for r in chunk))
            predictions += [LETTERS[int(row[: len(r.options)].argmax())] for row, r in zip(scores, chunk)]
    return EvalResult.from_predictions(records, predictions, time.perf_counter() - start)


def predicted_letters(backbone: Backbone, batch: dict, hidden: torch.Tensor, records: Sequence[VQARecord]) -> list[str]:
    """Predicted option letter per record from final hidden states `(B, T, D)` of `batch`
    (argmax of the option-letter logits at the last prompt token, `option_scores`)."""
    scores = option_scores(backbone, batch, max(len(r.options) for r in records), hidden)
    return [LETTERS[int(row[: len(r.options)].argmax())] for row, r in zip(scores, records)]


def first_layer(stack: Mapping[int, Gate | Sequence[Gate]] | None) -> int | None:
    """The lowest gated layer of a stack, None for the baseline (no gate)."""
    return min(stack) if stack else None


@torch.no_grad()
def evaluate_many(
    backbone: Backbone,
    records: Sequence[VQARecord],
    stacks: Mapping[str, Mapping[int, Gate | Sequence[Gate]] | None],
    batch_size: int = 32,
    progress: str | None = None,
    timing: dict | None = None,
) -> dict[str, EvalResult]:
    """`evaluate` for many stacks in one pass over the records, with prefix reuse (`lsg.prefix`).

    Per batch, one ungated forward gives the hidden state entering each stack's lowest gated
    layer (and, when a stack is empty or None, the baseline's answers); every stack then runs
    only its own layers from there. Answers equal separate `evaluate` calls up to float
    rounding (tests/test_prefix.py); the work drops from one full forward per stack to one
    plus the stacks' suffixes.

    Args:
        stacks: name -> `{layer: gate(s)}` (None or {} = the unmodified backbone).
        timing: if given, filled with seconds: `prefix` (the shared forwards) and one entry
            per stack (its suffixes); each result's `elapsed_s` is its own suffix time, the
            baseline's is the shared forward's.

    Raises:
        ValueError: no multiple-choice record.
    """
    records = mc_records(records)
    starts = {name: first_layer(stack) for name, stack in stacks.items()}
    layers = sorted({l for l in starts.values() if l is not None})
    to_end = any(l is None for l in starts.values())
    predictions: dict[str, list[str]] = {name: [] for name in stacks}
    seconds = dict.fromkeys(["prefix", *stacks], 0.0)
    batches = range(0, len(records), batch_size)
    for i in track(batches, description=progress, transient=True) if progress else batches:
        chunk = records[i : i + batch_size]
        batch = backbone.on_device(backbone.build_batch(*images_and_questions(chunk)))
        start = time.perf_counter()
        prefixes, final = compute_prefixes(backbone, batch, layers, to_end=to_end)
        seconds["prefix"] += time.perf_counter() - start
        for name, stack in stacks.items():
            start = time.perf_counter()
            hidden = final if starts[name] is None else run_suffix(backbone, prefixes[starts[name]], stack)
            predictions[name] += predicted_letters(backbone, batch, hidden, chunk)
            seconds[name] += time.perf_counter() - start
    if timing is not None:
        timing.update(seconds)
    return {name: EvalResult.from_predictions(records, predictions[name],
                                              seconds[name] + (seconds["prefix"] if starts[name] is None else 0.0))
            for name in stacks}


def comparison_rows(baseline: EvalResult, results: Mapping[str, EvalResult], samples: int = BOOTSTRAP_SAMPLES,
                    level: float = CI_LEVEL) -> list[dict]:
    """One row per method: accuracy (%) per sub-task and overall, and for gated methods the
    paired delta vs the baseline in points (`<task>_delta`), its CI (`<task>_ci_low`,
    `<task>_ci_high`) and McNemar p (`<task>_p`), from `paired_delta` on the same questions."""
    tasks = sorted(baseline.counts)
    rows = []
    for name, res in {"baseline": baseline, **results}.items():
        row = {"method": name}
        for t in tasks + ["overall"]:
            acc = res.overall if t == "overall" else res.accuracy.get(t, float("nan"))
            base = baseline.overall if t == "overall" else baseline.accuracy[t]
            row[t] = 100 * acc
            row[f"{t}_delta"] = 100 * (acc - base)
            if name != "baseline" and res.correct and baseline.correct:
                keep = [t == "overall" or s == t for s in baseline.subtasks]
                pick = lambda hits: [h for h, k in zip(hits, keep) if k]  # noqa: E731
                _, row[f"{t}_ci_low"], row[f"{t}_ci_high"], row[f"{t}_p"] = paired_delta(
                    pick(baseline.correct), pick(res.correct), samples, level)
        row["elapsed_s"] = res.elapsed_s
        rows.append(row)
    return rows


def delta_cell(row: dict, task: str) -> str:
    """`acc (+delta [low, high])` for a gated row, `*` when the CI excludes zero; `acc` for the baseline."""
    if row["method"] == "baseline" or f"{task}_ci_low" not in row:
        return f"{row[task]:.1f}" if row["method"] == "baseline" else f"{row[task]:.1f} ({row[task + '_delta']:+.1f})"
    low, high = row[f"{task}_ci_low"], row[f"{task}_ci_high"]
    mark = "*" if low > 0 or high < 0 else ""
    return f"{row[task]:.1f} ({row[task + '_delta']:+.1f} [{low:+.1f}, {high:+.1f}]{mark})"


def print_comparison(baseline: EvalResult, results: Mapping[str, EvalResult], samples: int = BOOTSTRAP_SAMPLES,
                     level: float = CI_LEVEL) -> None:
    """Print accuracy (%) per sub-task (rows) and method (columns) as a rich table, each gated
    cell with its paired delta vs the baseline in points and its `level` bootstrap CI over
    `samples` resamples of the questions (`paired_delta`); `*` marks a CI that excludes zero."""
    from rich.console import Console
    from rich.table import Table

    rows = comparison_rows(baseline, results, samples, level)
    table = Table(title=f"Validation accuracy (%), paired delta vs baseline in points [{level:.0%} bootstrap CI], "
                        f"* = CI excludes 0")
    table.add_column("sub-task")
    table.add_column("n", justify="right")
    for row in rows:
        table.add_column(row["method"], justify="right")
    for t in sorted(baseline.counts) + ["overall"]:
        n = sum(baseline.counts.values()) if t == "overall" else baseline.counts[t]
        table.add_row(t, str(n), *[delta_cell(r, t) for r in rows])
    Console().print(table)
