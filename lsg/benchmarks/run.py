"""Evaluate gate stacks on a benchmark: answers (cached), official scores, paired deltas.

    responses = answer(backbone, benchmark, items, stacks)   # {spec: [answer text per item]}
    report = evaluate_benchmark(backbone, benchmark, specs, out_dir)

`generate` mode decodes greedily through the KV cache with the stack attached (left-padded
batches; the gate state set at prefill stays in the cache, SPEC section 3). `choice` mode
reads the option letters' logits at the last prompt token for every stack in one pass with
prefix reuse (`lsg.evaluation.evaluate_many`). Answers are cached per stack under
`out_dir/cache`, keyed by the weights fingerprint, dtype and sinks of the backbone, the
benchmark's identity (id, revision, split, prompts, mode) and the stack's gates, so a cache
never serves another model's or another gate's answers.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Mapping, Sequence

import torch
from rich.progress import track

from lsg.attach import attach
from lsg.backbones import Backbone
from lsg.benchmarks.base import Benchmark, Item, Score
from lsg.gates.base import Gate
from lsg.stats import BOOTSTRAP_SAMPLES, CI_LEVEL, paired_by_subtask


@torch.no_grad()
def generate_answers(backbone: Backbone, items: Sequence[Item], stack: Mapping[int, Gate | Sequence[Gate]] | None,
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
            batch = backbone.build_batch([it.load_image() for it in chunk], [it.prompt for it in chunk],
                                         padding_side="left")
            out += [text.strip() for text in backbone.generate(batch, max_new_tokens)]
    return out


def choice_answers(backbone: Backbone, items: Sequence[Item], stacks: Mapping[str, Mapping | None],
                   batch_size: int = 8, progress: str | None = None) -> dict[str, list[str]]:
    """Predicted option letter per item for every stack, in one pass with prefix reuse."""
    from lsg.evaluation import evaluate_many

    results = evaluate_many(backbone, list(items), stacks, batch_size, progress=progress)
    return {name: res.predictions for name, res in results.items()}


def processor_digest(backbone: Backbone) -> str:
    """sha256 of what turns a question into tokens and pixels: the chat template, the system
    prompt, the tokenizer's vocabulary size and the image processor's settings."""
    image_processor = getattr(backbone.processor, "image_processor", None)
    settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else repr(image_processor)
    blob = json.dumps({"template": getattr(backbone.processor, "chat_template", None),
                       "system_prompt": backbone.system_prompt, "vocab": len(backbone.tokenizer),
                       "image_processor": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def answers_context(backbone: Backbone, benchmark: Benchmark, items: Sequence[Item]) -> dict:
    """Everything but the stack that identifies cached answers: the backbone (name, weights
    fingerprint, dtype, sinks, processor: chat template and image settings), the benchmark's
    identity, a local copy's files, and the items' ids and prompts (so a changed `limit` or
    prompt never hits). Computed once per evaluation: it reads the processor and the data files."""
    questions = hashlib.sha256(json.dumps([(it.id, it.prompt) for it in items]).encode()).hexdigest()
    return {"backbone": backbone.name, "fingerprint": backbone.fingerprint, "dtype": str(backbone.model.dtype),
            "sinks": backbone.sinks.to_dict(), "processor": processor_digest(backbone),
            "benchmark": benchmark.identity(), "data": benchmark.data_digest(), "questions": questions}


def answers_key(stack_identity: dict, backbone: Backbone, benchmark: Benchmark, items: Sequence[Item],
                context: dict | None = None) -> str:
    """Cache key of one stack's answers on one benchmark: the stack's identity (gate configs,
    checkpoint digests, layers) and `answers_context` (given, or computed here)."""
    context = answers_context(backbone, benchmark, items) if context is None else context
    blob = json.dumps({"stack": stack_identity, **context}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _read(path: Path, n: int) -> list[str] | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data["responses"] if len(data.get("responses", [])) == n else None


def _write(path: Path, spec: str, responses: list[str], elapsed_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"spec": spec, "elapsed_s": elapsed_s, "responses": responses}))
    tmp.replace(path)


def answer(backbone: Backbone, benchmark: Benchmark, items: Sequence[Item], stacks: Sequence, cache_dir: Path | None,
           batch_size: int = 8, progress: bool = True) -> tuple[dict[str, list[str]], set[str]]:
    """Answers of every stack (`lsg.comparison.GateStack`s) on `items`, read from the cache
    when there, else computed and cached.

    Returns:
        (spec -> one answer string per item, the specs read from the cache).
    """
    context = answers_context(backbone, benchmark, items)
    keys = {st.spec: answers_key(st.identity, backbone, benchmark, items, context) for st in stacks}
    responses, hits = {}, set()
    for st in stacks:
        cached = _read(Path(cache_dir) / f"{keys[st.spec]}.json", len(items)) if cache_dir else None
        if cached is not None:
            responses[st.spec] = cached
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
            if cache_dir:
                _write(Path(cache_dir) / f"{keys[st.spec]}.json", st.spec, fresh[st.spec], elapsed)
    for st in todo if benchmark.mode == "generate" else []:
        start = time.perf_counter()
        responses[st.spec] = generate_answers(backbone, items, st.layers, benchmark.max_new_tokens, batch_size,
                                              progress=f"{benchmark.name}: {st.spec}" if progress else None)
        if cache_dir:
            _write(Path(cache_dir) / f"{keys[st.spec]}.json", st.spec, responses[st.spec],
                   time.perf_counter() - start)
    return responses, hits


def score_table(scores: Mapping[str, Score], baseline: str = "none", samples: int = BOOTSTRAP_SAMPLES,
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
    from lsg.stats import cell

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


def evaluate_benchmark(backbone: Backbone, backbone_cfg: dict, benchmark: Benchmark, specs: Sequence[str],
                       out_dir: Path, batch_size: int = 8, allow_layer_move: bool = False,
                       samples: int = BOOTSTRAP_SAMPLES, level: float = CI_LEVEL) -> dict:
    """Answer and score every gate spec (`lsg.comparison` syntax: a gate, a `+` stack, a
    `stack:<manifest>`, or `none`) on the benchmark; the baseline is always included.

    Writes `out_dir/results.json` (metrics, per-sub-task accuracy and paired deltas, and per
    item the answer, what was parsed and whether it was right) and `out_dir/results.md`.

    Returns:
        {"benchmark": identity, "rows": score_table rows, "items": per-item records}.
    """
    from lsg.comparison import GateStack, parse_stack

    stacks = [parse_stack(s, backbone, backbone_cfg, allow_layer_move) for s in specs]
    if not any(st.spec == "none" for st in stacks):
        stacks.insert(0, GateStack("none", {}, {"spec": "none"}))
    stacks.sort(key=lambda st: st.spec != "none")
    items = benchmark.load()
    responses, hits = answer(backbone, benchmark, items, stacks, Path(out_dir) / "cache", batch_size)
    scores = {st.spec: benchmark.score(items, responses[st.spec]) for st in stacks}
    rows = score_table(scores, "none", samples, level)
    per_item = [{"id": it.id, "subtask": it.subtask, "answer": it.answer if isinstance(it.answer, (str, int, float))
                 else json.dumps(it.answer),
                 **{f"{st.spec}|response": responses[st.spec][i] for st in stacks},
                 **{f"{st.spec}|parsed": scores[st.spec].parsed[i] for st in stacks},
                 **{f"{st.spec}|correct": scores[st.spec].correct[i] for st in stacks}} for i, it in enumerate(items)]
    report = {"benchmark": benchmark.identity(), "backbone": backbone.name, "fingerprint": backbone.fingerprint,
              "rows": rows, "cached": sorted(hits), "items": per_item}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(rows, f"{benchmark.name} ({benchmark.split}, {len(items)} "
                                                       f"questions, mode={benchmark.mode}) on {backbone.name}"))
    return report
