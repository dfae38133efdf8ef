"""eval.py's work: answer and score gate stacks on a benchmark, then write the report.

    report = evaluate_benchmark(backbone, benchmark, ["var", "lsg:ckpt.safetensors+var"], out_dir)

Answers come from the one pipeline (`lsg.evaluation.answer_stacks`, cached per stack under
`out_dir/cache`); the tables from `lsg.comparison` (official metrics, accuracy per sub-task with
paired deltas and CIs, optionally the prefill overhead measured in this run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from lsg.backbones import Backbone
from lsg.benchmarks.base import Benchmark
from lsg.comparison import markdown, measure_overhead, paired_rows, plot_deltas
from lsg.evaluation import answer_stacks
from lsg.files import write_json
from lsg.specs import BASELINE, parse_stacks
from lsg.stats import BOOTSTRAP_SAMPLES, CI_LEVEL


def evaluate_benchmark(backbone: Backbone, benchmark: Benchmark, specs: Sequence[str], out_dir: Path,
                       batch_size: int = 8, allow_layer_move: bool = False, samples: int = BOOTSTRAP_SAMPLES,
                       level: float = CI_LEVEL, overhead: bool = False, timing_batches: int = 4,
                       timing_repeats: int = 2) -> dict:
    """Answer and score every gate spec (`lsg.specs`: a gate, a `+` stack, a `stack:<manifest>`,
    or `none`) on the benchmark; the baseline is always included, first.

    Writes under `out_dir`: `results.json` (the report below), `results.md` (`lsg.comparison.markdown`)
    and `deltas.png` (paired delta per method and sub-task; not written for the baseline alone).

    Args:
        overhead: also time a prefill per batch with each stack and without (`measure_overhead`,
            `timing_batches` batches, `timing_repeats` rounds, each timing every stack once in a
            shuffled order; ratios paired by round with a `level` CI).

    Returns:
        {"benchmark": identity, "backbone", "fingerprint", "rows": `paired_rows` (+ overhead),
         "cached": specs read from the answer store, "items": per question its id, sub-task,
         answer and per spec `<spec>|response`, `<spec>|parsed`, `<spec>|correct`, "files": paths}.

    Raises:
        ValueError: a bad spec, or choice mode on questions without options.
    """
    out_dir = Path(out_dir)
    stacks = parse_stacks(specs, backbone, allow_layer_move=allow_layer_move)
    items = benchmark.load()
    results = answer_stacks(backbone, benchmark, stacks, items, out_dir / "cache", batch_size,
                            progress=benchmark.name)
    rows = paired_rows(results, BASELINE, samples, level)
    if overhead:
        timing = measure_overhead(backbone, items, stacks, batch_size, timing_batches, timing_repeats, level)
        for row in rows:
            row.update(timing[row["method"]])
    per_item = [{"id": it.id, "subtask": it.subtask, "answer": it.answer if isinstance(it.answer, (str, int, float))
                 else json.dumps(it.answer),
                 **{f"{spec}|response": res.predictions[i] for spec, res in results.items()},
                 **{f"{spec}|parsed": res.parsed[i] for spec, res in results.items()},
                 **{f"{spec}|correct": res.correct[i] for spec, res in results.items()}} for i, it in enumerate(items)]
    files = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    report = {"benchmark": benchmark.identity(), "backbone": backbone.name, "fingerprint": backbone.fingerprint,
              "rows": rows, "cached": [s for s, r in results.items() if r.cached], "items": per_item}
    write_json(files["json"], report, indent=1)
    files["md"].write_text(markdown(rows, f"{benchmark.name} ({benchmark.split}, {len(items)} questions, "
                                          f"mode={benchmark.mode}) on {backbone.name}", level))
    files["png"] = plot_deltas(rows, out_dir / "deltas.png")
    return {**report, "files": files}
