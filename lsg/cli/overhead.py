"""Prefill and decode overhead of every gate vs the unmodified SDPA forward, in one process.

    python scripts/overhead.py                       # embedded backbone, all gates
    python scripts/overhead.py model=tiny-random batch=4
    python scripts/overhead.py model=llava-1.5-7b model.hf_id=/path/to/checkpoint 'specs=[none,var]'

Takes the same `model=` config group as train.py and eval.py (conf/overhead.yaml); eval.py's
`overhead=true` times the prefill of the stacks it evaluates, on its benchmark's questions.
Prints a markdown table: ms per prefill forward and per decode step (KV cache), and
their ratios to the unmodified backbone. Prefill: median over `repeats` forwards. Decode:
median over every decode step of `repeats` greedy generations, each step timed by a logits
processor that stamps the clock once per generated token (so prefill noise never leaks in).
"""

from __future__ import annotations

import statistics
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import LogitsProcessor, LogitsProcessorList

import lsg
from lsg.comparison import synchronize
from lsg.data import generate_scene_sample
from lsg.specs import parse_stack


class StepClock(LogitsProcessor):
    """Stamps the (synchronised) clock each time generate() produces a token's logits."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def decode_step_time(bb: lsg.Backbone, batch: dict, new_tokens: int, repeats: int) -> float:
    """Median wall seconds of one decode step (KV cache) over `repeats` generations."""
    steps = []
    for _ in range(repeats):
        clock = StepClock(bb.device)
        bb.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          logits_processor=LogitsProcessorList([clock]))
        steps += [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return statistics.median(steps)


def median_time(fn, repeats: int, device: torch.device) -> float:
    """Median wall seconds of `fn()` over `repeats` runs (CUDA work waited for)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="overhead")
def main(args: DictConfig) -> None:
    cfg = OmegaConf.to_container(args.model, resolve=True)
    bb = lsg.backbone_from_config(cfg, device=args.device)
    mid = bb.num_layers // 3
    samples = [generate_scene_sample("test", i) for i in range(args.batch)]
    prompts = [s[1]["conversations"][0]["value"].replace("<image>\n", "", 1) for s in samples]
    batch = bb.on_device(bb.build_batch([s[0] for s in samples], prompts, padding_side="left"))
    with torch.no_grad():  # process-wide warm-up (allocator, kernels, generation path) so the first row is not cold
        bb.model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    rows = []
    for spec in list(args.specs):
        spec = spec.format(mid=mid)
        if spec.startswith("lsg-fresh"):  # an untrained LSG gate: same cost as a trained one
            stack = parse_stack(f"oracle{spec[len('lsg-fresh'):]}:1.0", bb)
            gate = lsg.gates.LSGGate(bb.hidden_size, bb.default_grouping)
            stack.layers = {layer: [gate] for layer in stack.layers}
        else:
            stack = parse_stack(spec, bb)
        with torch.no_grad(), lsg.attach(bb, stack.layers) if stack.layers else torch.no_grad():
            bb.model(**batch)  # warm-up
            prefill = median_time(lambda: bb.model(**batch), args.repeats, bb.device)
            decode = decode_step_time(bb, batch, args.new_tokens, args.repeats)
        rows.append((spec, prefill, decode))
        print(f"{spec}: prefill {1000 * prefill:.1f} ms, decode {1000 * decode:.2f} ms/token", flush=True)
    base_prefill, base_decode = rows[0][1], rows[0][2]
    print(f"\n{bb.name} ({bb.fingerprint}, {bb.device}), batch {args.batch}, {batch['input_ids'].shape[1]} prompt tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}, torch threads {torch.get_num_threads()}\n")
    print("| gate | prefill ms | prefill x | decode ms/token | decode x |\n|---|---|---|---|---|")
    for spec, prefill, decode in rows:
        print(f"| {spec} | {1000 * prefill:.1f} | {prefill / base_prefill:.2f} | {1000 * decode:.2f} | "
              f"{decode / base_decode:.2f} |")


if __name__ == "__main__":
    main()
