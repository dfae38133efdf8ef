"""Prefill and decode cost of every gate relative to the unmodified forward, in one process.

    python scripts/overhead.py                       # embedded backbone, all gates
    python scripts/overhead.py model=tiny-random batch=4
    python scripts/overhead.py model=llava-1.5-7b model.hf_id=/path/to/checkpoint 'specs=[none,var]' repeats=10

Takes the same `model=` config group as train.py and eval.py (conf/overhead.yaml); eval.py's
`overhead=true` times the prefill of the stacks it evaluates, on its benchmark's questions, with
the same interleaved timer (`lsg.timing`).

Every round (`repeats` of them, after `warmup` untimed rounds) times every spec once, in a seeded
shuffled order: one prefill forward of the batch, then one greedy generation of `new_tokens`
tokens (KV cache) whose decode steps are stamped by a logits processor, so prefill never leaks
into the decode time. A spec's ratio to `none` is paired by round: the geometric mean of its
per-round ratios with a 95% t interval on the log ratio (`lsg.timing.paired_ratio`); the column
`CI contains 1` names the ratios this run cannot tell from the baseline's cost. On CUDA, the peak
memory allocated (`torch.cuda.max_memory_allocated`) over each round's forward and generation too.
Prints a markdown table and writes it (`overhead.md`) and every round's timings (`overhead.json`)
under `out_dir` (Hydra's run folder by default).
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Mapping, Sequence

import hydra
import torch
from omegaconf import DictConfig
from transformers import LogitsProcessor, LogitsProcessorList

import lsg
from lsg.cli.common import load_backbone_of
from lsg.comparison import synchronize
from lsg.data import generate_scene_sample
from lsg.files import atomic_write_text, write_json
from lsg.specs import BASELINE, parse_stack
from lsg.timing import InterleavedTimings, paired_ratio, ratio_cell, time_interleaved

MIB = 2**20


class StepClock(LogitsProcessor):
    """Stamps `clock()` (device work waited for) each time generate() produces a token's logits."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.device, self.clock, self.stamps = device, clock, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.stamps.append(self.clock())
        return scores


def decode_seconds_per_token(stamps: Sequence[float]) -> float:
    """Mean seconds of one decode step from the logits stamps of one generation: the first stamp
    follows the prefill, so `(last - first) / (len - 1)`.

    Raises:
        ValueError: fewer than 2 stamps (`new_tokens` must be >= 2).
    """
    if len(stamps) < 2:
        raise ValueError(f"A decode time needs >= 2 generated tokens, got {len(stamps)}: set new_tokens >= 2.")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


@torch.no_grad()
def time_spec(bb: lsg.Backbone, batch: dict, layers: Mapping, new_tokens: int,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """One round of one spec: `layers` (`{layer: [gates]}`, empty = the unmodified backbone)
    attached, one timed prefill forward of `batch`, then one greedy generation of `new_tokens`.

    Returns:
        {"prefill_s": seconds of the forward, "decode_s": seconds per decode step
         (`decode_seconds_per_token`)}, plus "peak_mib": peak CUDA memory allocated over both
        (MiB) on a CUDA backbone.
    """
    cuda = bb.device.type == "cuda"
    with lsg.attach(bb, layers) if layers else nullcontext():
        if cuda:
            torch.cuda.reset_peak_memory_stats(bb.device)
        synchronize(bb.device)
        start = clock()
        bb.model(**batch)
        synchronize(bb.device)
        prefill_s = clock() - start
        step_clock = StepClock(bb.device, clock)
        bb.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          logits_processor=LogitsProcessorList([step_clock]))
        out = {"prefill_s": prefill_s, "decode_s": decode_seconds_per_token(step_clock.stamps)}
        if cuda:
            out["peak_mib"] = torch.cuda.max_memory_allocated(bb.device) / MIB
    return out


def prompt_batch(bb: lsg.Backbone, size: int) -> dict[str, torch.Tensor]:
    """`size` scene images with their first question (`lsg.data.generate_scene_sample`, test
    split), left padded as generate() wants, on the backbone's device."""
    samples = [generate_scene_sample("test", i) for i in range(size)]
    prompts = [s[1]["conversations"][0]["value"].replace("<image>\n", "", 1) for s in samples]
    return bb.on_device(bb.build_batch([s[0] for s in samples], prompts, padding_side="left"))


def spec_layers(spec: str, bb: lsg.Backbone) -> dict:
    """`{layer: [gates]}` of a spec; `lsg-fresh@<layers>` = an untrained LSG gate there (a trained
    gate costs the same)."""
    if spec.startswith("lsg-fresh"):
        stack = parse_stack(f"oracle{spec[len('lsg-fresh'):]}:1.0", bb)
        gate = lsg.gates.LSGGate(bb.hidden_size, bb.default_grouping)
        return {layer: [gate] for layer in stack.layers}
    return parse_stack(spec, bb).layers


def summarise(timings: InterleavedTimings, level: float) -> list[dict]:
    """Per spec (in `timings.runs` order): median ms over the rounds and the ratio to `BASELINE`
    paired by round (`paired_ratio`) of the prefill, the decode step and, when measured, the peak
    memory.

    Returns:
        rows {"spec", "prefill_ms", "decode_ms_per_token", ["peak_mib"], and per measure
        `prefill`/`decode`/`peak`: `paired_ratio`'s dict}.
    """
    measures = [("prefill", "prefill_s", 1000.0, "prefill_ms"), ("decode", "decode_s", 1000.0, "decode_ms_per_token")]
    if "peak_mib" in timings.runs[BASELINE][0]:
        measures.append(("peak", "peak_mib", 1.0, "peak_mib"))
    rows = []
    for spec in timings.runs:
        row = {"spec": spec}
        for name, key, scale, column in measures:
            values = timings.series(spec, key)
            row[column] = scale * statistics.median(values)
            row[name] = paired_ratio(timings.series(BASELINE, key), values, level)
        rows.append(row)
    return rows


def undistinguished(row: dict) -> str:
    """The `CI contains 1` cell: `baseline`, `n/a (1 round)`, the time ratios whose CI contains 1
    (`prefill`, `decode` or both), or `no`."""
    if row["spec"] == BASELINE:
        return "baseline"
    if row["prefill"]["contains_1"] is None:
        return "n/a (1 round)"
    return ", ".join(m for m in ("prefill", "decode") if row[m]["contains_1"]) or "no"


def table(rows: Sequence[dict], level: float) -> str:
    """The markdown table of `summarise`'s rows (peak memory columns when measured)."""
    peak = "peak" in rows[0]
    ci = f"x [{level:.0%} CI]"
    lines = [f"| gate | prefill ms | prefill {ci} | decode ms/token | decode {ci} | CI contains 1 |"
             + (f" peak MiB | peak {ci} |" if peak else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if peak else "")]
    for r in rows:
        lines.append(f"| {r['spec']} | {r['prefill_ms']:.1f} | {ratio_cell(r['prefill'])} | "
                     f"{r['decode_ms_per_token']:.2f} | {ratio_cell(r['decode'])} | {undistinguished(r)} |"
                     + (f" {r['peak_mib']:.0f} | {ratio_cell(r['peak'])} |" if peak else ""))
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="overhead")
def main(args: DictConfig) -> dict:
    bb = load_backbone_of(args, device=args.device)
    specs = [str(spec).format(mid=bb.num_layers // 3) for spec in args.specs]
    if BASELINE not in specs:  # every ratio is to the unmodified backbone timed in the same rounds
        specs.insert(0, BASELINE)
    if len(set(specs)) != len(specs):
        raise ValueError(f"specs names a gate twice: {specs}; give each spec once.")
    stacks = {spec: spec_layers(spec, bb) for spec in specs}
    batch = prompt_batch(bb, args.batch)
    timings = time_interleaved(lambda spec: time_spec(bb, batch, stacks[spec], args.new_tokens), specs,
                               args.repeats, args.warmup, args.seed)
    rows = summarise(timings, args.ci_level)
    header = (f"{bb.name} ({bb.fingerprint}, {bb.device}), batch {args.batch}, {batch['input_ids'].shape[1]} prompt "
              f"tokens, {args.new_tokens} new tokens; {args.repeats} timed rounds after {args.warmup} warm-up, each "
              f"spec once per round in a shuffled order (seed {args.seed}); ms = median over rounds; x = geometric "
              f"mean of the per-round ratios to none [{args.ci_level:.0%} t CI on the log ratio]; "
              f"torch threads {torch.get_num_threads()}")
    text = f"{header}\n\n{table(rows, args.ci_level)}\n"
    print(f"\n{text}")
    out_dir = Path(args.out_dir)
    report = {"backbone": bb.name, "fingerprint": bb.fingerprint, "device": str(bb.device), "batch": args.batch,
              "prompt_tokens": int(batch["input_ids"].shape[1]), "new_tokens": args.new_tokens,
              "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed, "ci_level": args.ci_level,
              "torch_threads": torch.get_num_threads(), "rows": rows, "order": timings.order, "runs": timings.runs}
    write_json(out_dir / "overhead.json", report, indent=1)
    atomic_write_text(out_dir / "overhead.md", text)
    print(f"Wrote {out_dir / 'overhead.json'}, {out_dir / 'overhead.md'}")
    return report


if __name__ == "__main__":
    main()
