"""Multiple-choice evaluation of a backbone with or without gates (SPEC section 6)."""

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
from lsg.scoring import LETTERS, option_scores


@dataclass
class EvalResult:
    """Accuracy per sub-task (fractions in [0, 1]), counts and wall time in seconds."""

    accuracy: dict[str, float]
    counts: dict[str, int]
    predictions: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def overall(self) -> float:
        n = sum(self.counts.values())
        return sum(self.accuracy[t] * self.counts[t] for t in self.counts) / max(n, 1)

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "overall": self.overall, "counts": self.counts,
                "elapsed_s": self.elapsed_s}


def images_and_questions(records: Sequence[VQARecord]) -> tuple[list[Image.Image], list[str]]:
    """RGB images and questions of records, ready for `Backbone.build_batch`."""
    images = []
    for r in records:
        with Image.open(r.image_path) as im:
            images.append(im.convert("RGB"))
    return images, [r.question for r in records]


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
    correct, total, predictions = defaultdict(int), defaultdict(int), []
    batches = range(0, len(records), batch_size)
    start = time.perf_counter()
    with attach(backbone, gates) if gates else nullcontext():
        for i in track(batches, description=progress, transient=True) if progress else batches:
            chunk = records[i : i + batch_size]
            batch = backbone.build_batch(*images_and_questions(chunk))
            batch = backbone.on_device(batch)
            scores = option_scores(backbone, batch, max(len(r.options) for r in chunk))
            for row, r in zip(scores, chunk):
                pred = LETTERS[int(row[: len(r.options)].argmax())]
                predictions.append(pred)
                total[r.subtask] += 1
                correct[r.subtask] += int(pred == r.answer_letter)
    elapsed = time.perf_counter() - start
    return EvalResult({t: correct[t] / total[t] for t in total}, dict(total), predictions, elapsed)


def comparison_rows(baseline: EvalResult, results: Mapping[str, EvalResult]) -> list[dict]:
    """One row per method: accuracy and delta vs baseline (points) per sub-task and overall."""
    tasks = sorted(baseline.counts)
    rows = []
    for name, res in {"baseline": baseline, **results}.items():
        row = {"method": name}
        for t in tasks + ["overall"]:
            acc = res.overall if t == "overall" else res.accuracy.get(t, float("nan"))
            base = baseline.overall if t == "overall" else baseline.accuracy[t]
            row[t] = 100 * acc
            row[f"{t}_delta"] = 100 * (acc - base)
        row["elapsed_s"] = res.elapsed_s
        rows.append(row)
    return rows


def print_comparison(baseline: EvalResult, results: Mapping[str, EvalResult]) -> None:
    """Print accuracy (%) per sub-task (rows) and method (columns), with the delta vs the
    baseline in points, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    rows = comparison_rows(baseline, results)
    table = Table(title="Validation accuracy (%), delta vs baseline in points")
    table.add_column("sub-task")
    table.add_column("n", justify="right")
    for row in rows:
        table.add_column(row["method"], justify="right")
    for t in sorted(baseline.counts) + ["overall"]:
        n = sum(baseline.counts.values()) if t == "overall" else baseline.counts[t]
        cells = [f"{r[t]:.1f}" if r["method"] == "baseline" else f"{r[t]:.1f} ({r[t + '_delta']:+.1f})" for r in rows]
        table.add_row(t, str(n), *cells)
    Console().print(table)
