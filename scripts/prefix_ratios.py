"""Measure what prefix reuse saves, as ratios of wall time in one run (issue: prefix reuse).

    python scripts/prefix_ratios.py                       # smol-llava, 1 batch of 8 per measurement
    python scripts/prefix_ratios.py --batches 2 --batch-size 16 --out docs/prefix-ratios.json

Four measurements, each against the plain path on the same batches:
1. training sweep over all layers: one shared ungated forward + every gate's suffix forward
   and backward, vs one full gated forward and backward per layer (separate runs);
2. evaluating those gates: one shared forward (which also gives the baseline's answers) +
   every suffix, vs a full forward per gate;
3. the oracle grid at one layer (11 alphas): the same, vs 11 full forwards;
4. one-layer training at `--layer`: epoch 2 (prefix served by the cache) vs epoch 1.
Each line also prints the arithmetic limit from counting decoder layers (backward of a
frozen layer counted as one forward), s_l = (L - l) / L.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lsg
from lsg.attach import attach
from lsg.comparison import synchronize
from lsg.data import generate_split, load_llava_json
from lsg.evaluation import images_and_questions
from lsg.gates import KeyScaleGate
from lsg.prefix import compute_prefixes, run_suffix
from lsg.scoring import answer_loss, decoder_hidden, option_scores
from lsg.training import GateTrainingModule, build_gate

ALPHAS = [i / 10 for i in range(11)]


def clock(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smol-llava")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--layer", type=int, default=10, help="layer of the oracle grid and the one-layer run")
    ap.add_argument("--data-root", default="data/shapes")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    backbone = lsg.load_backbone(args.model)
    dev, L = backbone.device, backbone.num_layers
    gate_cfg = {"name": "lsg", "grouping": backbone.default_grouping, "gain": 1.0, "width": 64,
                "activation": "gelu"}
    gates = {l: build_gate(gate_cfg, backbone, 0) for l in range(L)}
    n = args.batch_size * args.batches
    records = load_llava_json(generate_split("train", max(n, 640), Path(args.data_root)), check_images=False)[:n]
    chunks = [records[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
    train = [backbone.on_device(backbone.build_batch(*images_and_questions(c), [r.answer for r in c])) for c in chunks]
    evals = [backbone.on_device(backbone.build_batch(*images_and_questions(c))) for c in chunks]
    s = [(L - l) / L for l in range(L)]
    rows = []

    def report(name, shared, separate, limit):
        rows.append({"measurement": name, "shared_s": shared, "separate_s": separate, "ratio": shared / separate,
                     "limit": limit})
        print(f"{name}: {shared:.1f} s vs {separate:.1f} s = {shared / separate:.2f}x (limit {limit:.2f}x)", flush=True)

    # 1. training sweep over all layers
    def separate_training():
        for batch in train:
            for l, g in gates.items():
                with attach(backbone, {l: g}):
                    answer_loss(backbone, batch).backward()

    def shared_training():
        for batch in train:
            prefixes, _ = compute_prefixes(backbone, batch, range(L))
            for l, g in gates.items():
                answer_loss(backbone, batch, run_suffix(backbone, prefixes[l], {l: g})).backward()

    report(f"training sweep, {L} layers", clock(shared_training, dev), clock(separate_training, dev),
           (1 + 2 * sum(s)) / (L + sum(s)))

    # 2. evaluating the sweep's gates; 3. the oracle grid at one layer
    def separate_eval(stacks):
        def run():
            with torch.no_grad():
                for batch in evals:
                    for stack in stacks:
                        with attach(backbone, stack):
                            option_scores(backbone, batch, 4, decoder_hidden(backbone, batch))
        return run

    def shared_eval(stacks):
        def run():
            with torch.no_grad():
                for batch in evals:
                    starts = sorted({min(st) for st in stacks})
                    prefixes, final = compute_prefixes(backbone, batch, starts, to_end=True)
                    option_scores(backbone, batch, 4, final)  # the baseline comes with the shared pass
                    for stack in stacks:
                        option_scores(backbone, batch, 4, run_suffix(backbone, prefixes[min(stack)], stack))
        return run

    sweep_stacks = [{l: g} for l, g in gates.items()]
    report(f"evaluating {L} gates", clock(shared_eval(sweep_stacks), dev),
           clock(separate_eval(sweep_stacks), dev), (1 + sum(s)) / L)
    grouping = gate_cfg["grouping"]
    grid = [{args.layer: KeyScaleGate.oracle(a, grouping)} for a in ALPHAS]
    report(f"oracle grid at layer {args.layer}, {len(ALPHAS)} alphas", clock(shared_eval(grid), dev),
           clock(separate_eval(grid), dev), (1 + len(ALPHAS) * s[args.layer]) / len(ALPHAS))

    # 4. one-layer training: epoch 1 fills the prefix cache, epoch 2 reads it
    module = GateTrainingModule(backbone, {args.layer: gates[args.layer]}, identity={}, lr=1e-3,
                                effective_batch_size=args.batch_size, batch_size=args.batch_size)

    def epoch():
        for batch, chunk in zip(train, chunks):
            for _, loss, _ in module.layer_losses({**batch, "records": chunk}):
                loss.backward()

    first, second = clock(epoch, dev), clock(epoch, dev)
    report(f"one-layer training at layer {args.layer}, epoch 2 vs epoch 1", second, first,
           2 * s[args.layer] / (1 + s[args.layer]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "batch_size": args.batch_size,
                                              "batches": args.batches, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
