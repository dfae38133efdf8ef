"""Evaluate gate stacks on a benchmark: answers (cached), official scores, paired deltas.

    responses = answer(backbone, benchmark, items, stacks)   # {spec: [answer text per item]}
    report = evaluate_benchmark(backbone, benchmark, specs, out_dir)

`generate` mode decodes greedily through the KV cache with the stack attached (left-padded
batches; the gate state set at prefill stays in the cache, docs/methods.md section 3). `choice` mode
reads the option letters' logits at the last prompt token for every stack in one pass with
prefix reuse (`lsg.evaluation.evaluate_many`). Answers are cached per stack under
`out_dir/cache` through the answer store (`lsg.answers`), keyed by the backbone (weights
fingerprint, dtype, sinks, processor), the benchmark's identity (id, revision, split,
prompts, mode) and the stack's gates, so a cache never serves another model's, another
prompt format's or another gate's answers.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Mapping, Sequence

import torch
from rich.progress import track

from lsg.answers import AnswerCache, answer_context, answers_of
from lsg.attach import attach
from lsg.backbones import Backbone
from lsg.benchmarks.base import Benchmark, Score
from lsg.data import VQARecord
from lsg.evaluation import evaluate_many
from lsg.files import write_json
from lsg.gates.base import Gate
from lsg.specs import BASELINE, GateStack, parse_stacks
from lsg.stats import BOOTSTRAP_SAMPLES, CI_LEVEL, cell, paired_by_subtask


@torch.no_grad()
def generate_answers(backbone: Backbone, items: Sequence[VQARecord], stack: Mapping[int, Gate | Sequence[Gate]] | None,
                     max_new_tokens: int, batch_size: int = 8, progress: str | None = None) -> list[str]:
    """Greedy answers (decoded text, special tokens dropped) of every item with `stack` attached.

    Batches are left padded so every row's prompt ends at the same position and generation
    starts together; gates are identical under either padding (tests/test_gates.py).
    """
    out: list[str] = []
    batches = range(0, len(items), batch_size)
    with attach(backbone, stack) if stack else nullcontext():
        for i in track(batches, description=progress, transient=True) if progress else batches:
            chunk = items[i:i + batch_size]
            batch = backbone.build_batch([it.load_image() for it in chunk], [it.question for it in chunk],
                                         padding_side="left")
            out += [text.strip() for text in backbone.generate(batch, max_new_tokens)]
    return out


def choice_answers(backbone: Backbone, items: Sequence[VQARecord], stacks: Mapping[str, Mapping | None],
                   batch_size: int = 8, progress: str | None = None) -> dict[str, list[str]]:
    """Predicted option letter per item for every stack, in one pass with prefix reuse."""
    results = evaluate_many(backbone, list(items), stacks, batch_size, progress=progress)
    return {name: res.predictions for name, res in results.items()}


def benchmark_context(backbone: Backbone, benchmark: Benchmark, items: Sequence[VQARecord]) -> dict:
    """The answer-store context (`lsg.answers.answer_context`) of a benchmark's questions: the
    backbone and its processor, the questions, the benchmark's identity (id, revision, split,
    prompts, mode, budget) and a local copy's files. Computed once per evaluation."""
    return answer_context(backbone, items, benchmark=benchmark.identity(), data=benchmark.data_digest())


def answer(backbone: Backbone, benchmark: Benchmark, items: Sequence[VQARecord], stacks: Sequence[GateStack],
           cache_dir: Path | None, batch_size: int = 8, progress: bool = True) -> tuple[dict[str, list[str]], set[str]]:
    """Answers of every stack on `items`, read from the answer store when there, else computed
    and stored (`lsg.answers.AnswerCache` under `cache_dir`; None = no cache).

    Returns:
        (spec -> one answer string per item, the specs read from the cache).

    Raises:
        ValueError: `mode=choice` on questions without options.
    """
    cache = AnswerCache(cache_dir, benchmark_context(backbone, benchmark, items))
    responses, hits = {}, set()
    for st in stacks:
        found = cache.get(st.identity, items)
        if found is not None:
            responses[st.spec] = [a.prediction for a in found[0]]
            hits.add(st.spec)
    todo = [st for st in stacks if st.spec not in responses]
    if benchmark.mode == "choice" and todo:
        unreadable = [it.id for it in items if not (it.options and it.answer_letter)]
        if unreadable:
            raise ValueError(f"mode=choice needs options and a letter answer on every question; {len(unreadable)} "
                             f"have none (ids {unreadable[:5]}...). Use benchmark.mode=generate.")
        start = time.perf_counter()
        fresh = choice_answers(backbone, items, {st.spec: st.layers for st in todo}, batch_size,
                               progress=f"{benchmark.name}: {len(todo)} stacks in one pass" if progress else None)
        elapsed = (time.perf_counter() - start) / len(todo)
        for st in todo:
            responses[st.spec] = fresh[st.spec]
            cache.put(st.identity, answers_of(items, fresh[st.spec]), spec=st.spec, elapsed_s=elapsed)
    for st in todo if benchmark.mode == "generate" else []:
        start = time.perf_counter()
        responses[st.spec] = generate_answers(backbone, items, st.layers, benchmark.max_new_tokens, batch_size,
                                              progress=f"{benchmark.name}: {st.spec}" if progress else None)
        cache.put(st.identity, answers_of(items, responses[st.spec], correct=[None] * len(items)), spec=st.spec,
                  elapsed_s=time.perf_counter() - start)
    return responses, hits


def score_table(scores: Mapping[str, Score], baseline: str = BASELINE, samples: int = BOOTSTRAP_SAMPLES,
                level: float = CI_LEVEL) -> list[dict]:
    """One row per method: its official metrics, accuracy (%) per sub-task, and for the others
    the paired delta vs `baseline` per sub-task with its bootstrap CI and McNemar p
    (`lsg.stats.paired_by_subtask` over the same questions)."""
    base = scores[baseline]
    rows = []
    for name, sc in scores.items():
        row = {"method": name, "metrics": dict(sc.metrics), "accuracy": sc.by_subtask}
        if name != baseline:
            row["paired"] = paired_by_subtask([c >= 0.5 for c in base.correct], [c >= 0.5 for c in sc.correct],
                                              base.subtasks, samples, level)
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict], title: str = "") -> str:
    """The rows of `score_table` as two markdown tables: official metrics, then accuracy per
    sub-task with `+delta [low, high]` (`*` where the CI excludes zero)."""
    lines = [f"### {title}", ""] if title else []
    metric_names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    if metric_names:
        lines += ["| method | " + " | ".join(metric_names) + " |", "|---" * (len(metric_names) + 1) + "|"]
        lines += [f"| {r['method']} | " + " | ".join(f"{r['metrics'].get(m, float('nan')):.2f}" for m in metric_names)
                  + " |" for r in rows]
        lines.append("")
    tasks = list(rows[0]["accuracy"])
    lines += ["| sub-task | " + " | ".join(r["method"] for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for t in tasks:
        cells = [f"{r['accuracy'][t]:.1f}" + (f" ({cell(r['paired'][t])})" if "paired" in r else "") for r in rows]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_benchmark(backbone: Backbone, benchmark: Benchmark, specs: Sequence[str],
                       out_dir: Path, batch_size: int = 8, allow_layer_move: bool = False,
                       samples: int = BOOTSTRAP_SAMPLES, level: float = CI_LEVEL) -> dict:
    """Answer and score every gate spec (`lsg.comparison` syntax: a gate, a `+` stack, a
    `stack:<manifest>`, or `none`) on the benchmark; the baseline is always included.

    Writes `out_dir/results.json` (metrics, per-sub-task accuracy and paired deltas, and per
    item the answer, what was parsed and whether it was right) and `out_dir/results.md`.

    Returns:
        {"benchmark": identity, "rows": score_table rows, "items": per-item records}.
    """
    stacks = parse_stacks(specs, backbone, allow_layer_move=allow_layer_move)
    items = benchmark.load()
    responses, hits = answer(backbone, benchmark, items, stacks, Path(out_dir) / "cache", batch_size)
    scores = {st.spec: benchmark.score(items, responses[st.spec]) for st in stacks}
    rows = score_table(scores, BASELINE, samples, level)
    per_item = [{"id": it.id, "subtask": it.subtask, "answer": it.answer if isinstance(it.answer, (str, int, float))
                 else json.dumps(it.answer),
                 **{f"{st.spec}|response": responses[st.spec][i] for st in stacks},
                 **{f"{st.spec}|parsed": scores[st.spec].parsed[i] for st in stacks},
                 **{f"{st.spec}|correct": scores[st.spec].correct[i] for st in stacks}} for i, it in enumerate(items)]
    report = {"benchmark": benchmark.identity(), "backbone": backbone.name, "fingerprint": backbone.fingerprint,
              "rows": rows, "cached": sorted(hits), "items": per_item}
    out_dir = Path(out_dir)
    write_json(out_dir / "results.json", report, indent=1)
    (out_dir / "results.md").write_text(markdown(rows, f"{benchmark.name} ({benchmark.split}, {len(items)} "
                                                       f"questions, mode={benchmark.mode}) on {backbone.name}"))
    return report
