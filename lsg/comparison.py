"""Gate stacks beside the baseline on the same questions: paired rows, tables, the delta heatmap,
and the prefill overhead measured in the same run (docs/methods.md section 6).

Every delta is paired: the same questions answered with and without the stack
(`lsg.stats.paired_by_subtask`: percentile-bootstrap CI, McNemar p); tables mark with `*` a CI
that excludes zero. The answers themselves come from `lsg.evaluation.answer_stacks`.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lsg.attach import attach
from lsg.backbones import Backbone
from lsg.data import VQARecord
from lsg.evaluation import Result, images_and_questions
from lsg.specs import BASELINE, GateStack
from lsg.stats import BOOTSTRAP_SAMPLES, CI_LEVEL, paired_by_subtask
from lsg.timing import paired_ratio, time_interleaved


def paired_rows(results: Mapping[str, Result], baseline: str = BASELINE, samples: int = BOOTSTRAP_SAMPLES,
                level: float = CI_LEVEL) -> list[dict]:
    """One row per method, in `results` order: `method`, `metrics` (official, the benchmark's
    units), `acc_pct` and `counts` per sub-task and `overall`, `elapsed_s`, `cached`; every method
    but `baseline` also has `paired`: sub-task -> {delta, ci_low, ci_high (points), p, n,
    significant} against `baseline` on the same questions (right = official score >= 0.5).

    Raises:
        KeyError: `baseline` is not among `results`.
    """
    base = results[baseline]
    rows = []
    for name, res in results.items():
        row = {"method": name, "metrics": dict(res.metrics), "acc_pct": res.acc_pct, "counts": res.counts,
               "elapsed_s": res.elapsed_s, "cached": res.cached}
        if name != baseline:
            row["paired"] = paired_by_subtask([c >= 0.5 for c in base.correct], [c >= 0.5 for c in res.correct],
                                              base.subtasks, samples, level)
        rows.append(row)
    return rows


def delta_cell(row: dict, task: str) -> str:
    """`acc` for the baseline; `acc (+delta [low, high])` for another row, `*` when the CI excludes zero."""
    acc = f"{row['acc_pct'].get(task, float('nan')):.1f}"
    if "paired" not in row:
        return acc
    p = row["paired"][task]
    return f"{acc} ({p['delta']:+.1f} [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]{'*' if p['significant'] else ''})"


def tasks_of(rows: Sequence[dict]) -> list[str]:
    """The sub-tasks of the rows (sorted), then `overall`."""
    return list(rows[0]["acc_pct"])


def markdown(rows: Sequence[dict], title: str = "", level: float = CI_LEVEL) -> str:
    """`paired_rows` as markdown: the official metrics (method x metric), accuracy (%) per sub-task
    (sub-task x method, each cell with its paired delta and CI), then wall time, and prefill
    overhead where the rows carry it (`measure_overhead`)."""
    lines = [f"### {title}", ""] if title else []
    metric_names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    if metric_names:
        lines += ["| method | " + " | ".join(metric_names) + " |", "|---" * (len(metric_names) + 1) + "|"]
        lines += [f"| {r['method']} | " + " | ".join(f"{r['metrics'].get(m, float('nan')):.2f}" for m in metric_names)
                  + " |" for r in rows]
        lines.append("")
    lines += [f"Accuracy (%), paired delta vs {rows[0]['method']} in points [{level:.0%} bootstrap CI], "
              f"* = CI excludes 0.", "",
              "| sub-task | n | " + " | ".join(r["method"] for r in rows) + " |", "|---" * (len(rows) + 2) + "|"]
    lines += [f"| {t} | {rows[0]['counts'][t]} | " + " | ".join(delta_cell(r, t) for r in rows) + " |"
              for t in tasks_of(rows)]
    timed = "overhead" in rows[0]
    lines += ["", "| method | wall s |" + (" prefill ms/batch | overhead x |" if timed else ""),
              "|---|---|" + ("---|---|" if timed else "")]
    for r in rows:
        wall = "cached" if r["cached"] else f"{r['elapsed_s']:.1f}"
        lines.append(f"| {r['method']} | {wall} |"
                     + (f" {r['prefill_ms_per_batch']:.1f} | {r['overhead']:.2f} |" if timed else ""))
    return "\n".join(lines) + "\n"


def flat_rows(rows: Sequence[dict]) -> tuple[list[str], list[list]]:
    """`paired_rows` as one flat table (columns, values) for W&B: per sub-task `<t>` (accuracy %),
    `<t>_delta`, `<t>_ci_low`, `<t>_ci_high`, `<t>_p`; the official metrics; time and overhead."""
    flat = []
    for r in rows:
        row = {"method": r["method"], **r["acc_pct"]}
        for t, p in r.get("paired", {}).items():
            row.update({f"{t}_delta": p["delta"], f"{t}_ci_low": p["ci_low"], f"{t}_ci_high": p["ci_high"],
                        f"{t}_p": p["p"]})
        row.update({f"metric/{k}": v for k, v in r["metrics"].items()})
        row.update({k: r[k] for k in ("elapsed_s", "overhead", "prefill_ms_per_batch") if k in r})
        flat.append(row)
    columns = list(dict.fromkeys(k for r in flat for k in r))
    return columns, [[r.get(c) for c in columns] for r in flat]


def plot_deltas(rows: Sequence[dict], path: Path) -> Path | None:
    """Heatmap of the paired accuracy delta (points) vs the baseline: methods x sub-tasks. None
    (and no file) when there is no row but the baseline, e.g. `gates=[none]`."""
    gated = [r for r in rows if "paired" in r]
    if not gated:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = tasks_of(rows)
    data = [[r["paired"][t]["delta"] for t in cols] for r in gated]
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def print_comparison(baseline: Result, results: Mapping[str, Result], samples: int = BOOTSTRAP_SAMPLES,
                     level: float = CI_LEVEL) -> None:
    """Print accuracy (%) per sub-task (rows) and method (columns) as a rich table, each gated
    cell with its paired delta vs the baseline in points and its `level` bootstrap CI over
    `samples` resamples of the questions; `*` marks a CI that excludes zero."""
    from rich.console import Console
    from rich.table import Table

    rows = paired_rows({"baseline": baseline, **results}, "baseline", samples, level)
    table = Table(title=f"Validation accuracy (%), paired delta vs baseline in points [{level:.0%} bootstrap CI], "
                        f"* = CI excludes 0")
    table.add_column("sub-task")
    table.add_column("n", justify="right")
    for row in rows:
        table.add_column(row["method"], justify="right")
    for t in tasks_of(rows):
        table.add_row(t, str(baseline.counts[t]), *[delta_cell(r, t) for r in rows])
    Console().print(table)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously), so wall-clock timings
    measure the work, not its launch; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(backbone: Backbone, batches: Sequence[dict], stack: GateStack | None, repeats: int = 1) -> float:
    """Seconds per prefill forward over `batches` (mean of `repeats` passes, after one warm-up)."""
    with attach(backbone, stack.layers) if stack and stack.layers else nullcontext():
        backbone.family.multimodal_model(backbone.model)(**batches[0])  # warm-up on the path that is timed
        synchronize(backbone.device)
        start = time.perf_counter()
        for _ in range(repeats):
            for batch in batches:
                backbone.family.multimodal_model(backbone.model)(**batch)
        synchronize(backbone.device)
        return (time.perf_counter() - start) / (repeats * len(batches))


def measure_overhead(backbone: Backbone, items: Sequence[VQARecord], stacks: Sequence[GateStack], batch_size: int,
                     timing_batches: int = 4, repeats: int = 2, level: float = CI_LEVEL) -> dict[str, dict[str, float]]:
    """Prefill time per batch with each stack and its ratio to the unmodified backbone's, both
    measured in this run on the same first `timing_batches` batches of `items`: `repeats` rounds,
    each timing the baseline and every stack once in a shuffled order (`lsg.timing.time_interleaved`;
    `time_forward` warms each one up), the ratio paired by round (`lsg.timing.paired_ratio`).

    Returns:
        spec -> {"prefill_ms_per_batch": median ms over the rounds, "overhead": geometric mean of
        the per-round ratios (1.0 for the baseline), "overhead_ci_low", "overhead_ci_high": its
        `level` t interval (None with one round)}.
    """
    n = min(timing_batches, max(1, len(items) // batch_size))
    batches = [backbone.on_device(backbone.build_batch(*images_and_questions(items[i * batch_size:(i + 1) * batch_size])))
               for i in range(n)]
    timed = {BASELINE: None, **{st.spec: st for st in stacks if st.layers}}
    timings = time_interleaved(lambda spec: {"s": time_forward(backbone, batches, timed[spec], 1)}, list(timed),
                               repeats, warmup=0)  # time_forward warms up after attaching
    out = {}
    for st in stacks:
        seconds = timings.series(st.spec if st.layers else BASELINE, "s")
        ratio = paired_ratio(timings.series(BASELINE, "s"), seconds, level)
        out[st.spec] = {"prefill_ms_per_batch": 1000 * statistics.median(seconds), "overhead": ratio["ratio"],
                        "overhead_ci_low": ratio["ci_low"], "overhead_ci_high": ratio["ci_high"]}
    return out
