"""Joint comparison of gates and gate stacks on one evaluation split (docs/methods.md section 6).

Gate specs (`lsg.specs`) name the stacks; every stack's answers go through the answer store
(`lsg.answers`): cached ones are read, the others are computed together in one pass with
prefix reuse (`lsg.evaluation.evaluate_many`) and stored.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Sequence

import torch

from lsg.answers import AnswerCache, answer_context, answers_of
from lsg.attach import attach
from lsg.backbones import Backbone
from lsg.data import VQARecord
from lsg.evaluation import (BOOTSTRAP_SAMPLES, CI_LEVEL, EvalResult, comparison_rows, delta_cell, evaluate_many,
                            images_and_questions, mc_records)
from lsg.specs import BASELINE, GateStack, parse_stacks


def split_context(backbone: Backbone, records: Sequence[VQARecord], data_cfg: dict, split: str) -> dict:
    """The answer-store context of a data split (`lsg.answers.answer_context`): backbone,
    processor, questions, data config and split."""
    return answer_context(backbone, records, data=data_cfg, split=split)


def cached_evaluate_many(stacks: Sequence[GateStack], backbone: Backbone, records: Sequence[VQARecord],
                         cache: AnswerCache, batch_size: int,
                         progress: str | None = "evaluating") -> tuple[dict[str, EvalResult], set[str]]:
    """Answers of every stack: cached ones read from `cache`, the others computed together
    in one pass with prefix reuse (`lsg.evaluation.evaluate_many`) and stored.

    Returns:
        (spec -> result, the specs that were read from the cache).
    """
    results, hits = {}, set()
    todo = {}
    for stack in stacks:
        found = cache.get(stack.identity, records)
        if found is not None:
            answers, info = found
            results[stack.spec] = EvalResult.from_predictions(records, [a.prediction for a in answers],
                                                              info.get("elapsed_s", 0.0))
            hits.add(stack.spec)
        else:
            todo[stack.spec] = stack
    if todo:
        fresh = evaluate_many(backbone, records, {spec: st.layers for spec, st in todo.items()}, batch_size,
                              progress=f"{progress} ({len(todo)} in one pass)" if progress else None)
        for spec, stack in todo.items():
            cache.put(stack.identity, answers_of(records, fresh[spec].predictions), spec=spec,
                      elapsed_s=fresh[spec].elapsed_s, accuracy=fresh[spec].accuracy)
            results[spec] = fresh[spec]
    return results, hits


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously), so wall-clock timings
    measure the work, not its launch; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(backbone: Backbone, batches: Sequence[dict], stack: GateStack | None, repeats: int = 1) -> float:
    """Seconds per prefill forward over `batches` (mean of `repeats` passes, after one warm-up)."""
    from contextlib import nullcontext

    with attach(backbone, stack.layers) if stack and stack.layers else nullcontext():
        backbone.family.multimodal_model(backbone.model)(**batches[0])  # warm-up on the path that is timed
        synchronize(backbone.device)
        start = time.perf_counter()
        for _ in range(repeats):
            for batch in batches:
                backbone.family.multimodal_model(backbone.model)(**batch)
        synchronize(backbone.device)
        return (time.perf_counter() - start) / (repeats * len(batches))


def columns(rows: list[dict]) -> list[str]:
    """Every key of the rows, in first-seen order (gated rows add CI and p columns)."""
    return list(dict.fromkeys(k for r in rows for k in r))


def write_table(rows: list[dict], tasks: list[str], out_dir: Path) -> tuple[Path, Path]:
    """Write `comparison.csv` and `comparison.md` (accuracy %, paired delta in points with its
    bootstrap CI, `*` where the CI excludes zero; the CSV also holds McNemar p per cell)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "comparison.csv", out_dir / "comparison.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)
    cols = tasks + ["overall"]
    lines = ["| gate | " + " | ".join(cols) + " | wall s | overhead x |", "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        cells = [delta_cell(r, t) for t in cols]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['elapsed_s']:.1f} | {r['overhead']:.2f} |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_deltas(rows: list[dict], tasks: list[str], path: Path) -> Path | None:
    """Heatmap of accuracy delta (points) vs baseline: gates x sub-tasks. None (and no file)
    when there is no gated row, e.g. `gates=[none]`."""
    if not any(r["method"] != "baseline" for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = tasks + ["overall"]
    gated = [r for r in rows if r["method"] != "baseline"]
    data = [[r[f"{t}_delta"] for t in cols] for r in gated]
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 3, 0.5 * len(gated) + 1.8))
    vmax = max(1.0, max((abs(v) for row in data for v in row), default=1.0))
    im = ax.imshow(data, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(gated)), [r["method"] if len(r["method"]) < 40 else r["method"][:37] + "..."
                                      for r in gated])
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy delta vs baseline (points)")
    ax.set_title("Gate effect per sub-task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(backbone: Backbone, specs: Sequence[str], records: Sequence[VQARecord], data_cfg: dict, split: str,
            out_dir: Path, batch_size: int = 32, timing_batches: int = 4, timing_repeats: int = 2,
            allow_layer_move: bool = False, bootstrap_samples: int = BOOTSTRAP_SAMPLES,
            ci_level: float = CI_LEVEL) -> tuple[list[dict], list[str]]:
    """Evaluate every spec on the same records; returns table rows and sub-task names.

    Stacks not yet cached are evaluated together in one pass that computes the frozen
    prefix once per batch (`lsg.evaluation.evaluate_many`); each stack's answers are cached
    per (stack, split) under `out_dir/cache`, so a re-run reuses them.
    Overhead is measured in this run: prefill time per batch with the stack / without.
    """
    records = mc_records(records)
    stacks = parse_stacks(specs, backbone, allow_layer_move)  # the baseline row first
    cache = AnswerCache(out_dir / "cache", split_context(backbone, records, data_cfg, split))
    results, hits = cached_evaluate_many(stacks, backbone, records, cache, batch_size)
    results = {stack.spec: results[stack.spec] for stack in stacks}  # table rows in the order asked
    for stack in stacks:
        res = results[stack.spec]
        print(f"{stack.spec}: overall {100 * res.overall:.1f}%"
              f" ({'cached' if stack.spec in hits else f'{res.elapsed_s:.1f} s'})", flush=True)
    timing = [backbone.on_device(backbone.build_batch(*images_and_questions(records[i * batch_size:(i + 1) * batch_size])))
              for i in range(min(timing_batches, max(1, len(records) // batch_size)))]
    base_s = time_forward(backbone, timing, None, timing_repeats)
    baseline = results.pop(BASELINE)
    rows = comparison_rows(baseline, results, bootstrap_samples, ci_level)
    for row, stack in zip(rows, stacks):
        row["overhead"] = 1.0 if stack.spec == BASELINE else time_forward(backbone, timing, stack, timing_repeats) / base_s
        row["prefill_ms_per_batch"] = 1000 * base_s * row["overhead"]
    return rows, sorted(baseline.counts)
