"""Check that the embedded backbone answers in its chat format: letter, then end of turn.

    python scripts/embedded_health.py                  # the 350 shapes validation questions
    python scripts/embedded_health.py --questions 70   # a quicker look
    LSG_EMBEDDED_DIR=DIR python scripts/embedded_health.py   # weights being built in DIR

Prints, on the shapes validation split `train.py` uses (`lsg.embedded.health.check`): the mean
end-of-turn loss after the gold letter (target < 0.5 nats), the share of questions whose greedy
answer is one capital letter then end of turn (target >= 95 %) and the share where that letter is
also one of the question's options, the gold letter's loss, and the
option-letter accuracy per sub-task beside the committed reference (`--reference`, target: every
sub-task within 2 points). Exits 1 when a target is missed (docs/embedded-backbone.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from lsg.backbones import load_backbone
from lsg.data import generate_split, load_llava_json
from lsg.embedded.health import check

ROOT = Path(__file__).resolve().parents[1]
VAL_QUESTIONS = 350  # the shapes data config's n_val (50 per sub-task)
EOT_LOSS_MAX = 0.5  # nats: the target for the end-of-turn token after the gold letter
ENDS_TURN_MIN = 95.0  # percent of questions whose greedy answer is letter + end of turn
ACC_TOLERANCE = 2.0  # points per sub-task against the reference (one answer of 50)
# Per-sub-task accuracy (percent) of the embedded weights before the end-of-turn stage
# (`python train.py layer=10`'s baseline row, float32; docs/results.md).
REFERENCE = {"colour": 60.0, "count": 76.0, "depth": 74.0, "distance": 52.0, "existence": 82.0,
             "relation": 26.0, "shape": 42.0, "overall": 58.9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=VAL_QUESTIONS, help="first N validation questions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--root", type=Path, default=ROOT / "data" / "shapes", help="the shapes split's folder")
    p.add_argument("--reference", type=json.loads, default=REFERENCE,
                   help="per-sub-task accuracy (percent) to stay within --tolerance of, as JSON")
    p.add_argument("--tolerance", type=float, default=ACC_TOLERANCE)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = load_backbone("smol-llava")
    records = load_llava_json(generate_split("val", max(args.questions, VAL_QUESTIONS), args.root),
                              check_images=False)[:args.questions]
    health = check(bb, records, args.batch_size, progress="health")
    s = health.summary()
    print(f"embedded backbone {bb.fingerprint}: {s['questions']} validation questions")
    print(f"  end-of-turn loss after the gold letter  {s['eot_loss']:.3f} nats   (target < {EOT_LOSS_MAX})")
    print(f"  greedy = letter + end of turn           {s['ends_turn_pct']:.1f} %   (target >= {ENDS_TURN_MIN})")
    print(f"    ... and the letter is an option      {s['option_turn_pct']:.1f} %")
    print(f"  gold letter loss (whole vocabulary)     {s['letter_loss']:.3f} nats")
    print("  most common greedy starts: " + ", ".join(f"{g!r} x{n}" for g, n in Counter(health.greedy).most_common(5)))
    ok = s["eot_loss"] < EOT_LOSS_MAX and s["ends_turn_pct"] >= ENDS_TURN_MIN
    print(f"  {'sub-task':<10} {'acc %':>6} {'reference':>9} {'delta':>6}")
    for task, acc in s["acc_pct"].items():
        ref = args.reference.get(task)
        within = ref is None or abs(acc - ref) <= args.tolerance or args.questions < VAL_QUESTIONS
        ok &= within or task == "overall"
        delta = "" if ref is None else f"{acc - ref:+6.1f}"
        print(f"  {task:<10} {acc:6.1f} {'' if ref is None else f'{ref:9.1f}'} {delta}{'' if within else '  <- off'}")
    if args.json:
        args.json.write_text(json.dumps({**s, "fingerprint": bb.fingerprint}, indent=2))
    print("targets met" if ok else "targets missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
