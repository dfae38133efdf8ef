"""Generate the synthetic shapes VQA benchmark (train/val/test) in LLaVA JSON format.

Usage (from the repo root):
    python data/make_shapes.py --out data/shapes --train 2000 --val 350 --test 700
"""
import argparse
import json
import time
from collections import Counter
from pathlib import Path


from lsg.data.shapes import SUBTASKS, ShapesConfig, generate_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/shapes"), help="output directory")
    p.add_argument("--train", type=int, default=2000, help="number of train samples")
    p.add_argument("--val", type=int, default=350, help="number of val samples")
    p.add_argument("--test", type=int, default=700, help="number of test samples")
    args = p.parse_args()

    cfg = ShapesConfig()
    for split in ("train", "val", "test"):
        n = getattr(args, split)
        t0 = time.time()
        path = generate_split(split, n, args.out, cfg)
        records = json.loads(path.read_text())
        counts = Counter(r["subtask"] for r in records)
        per_task = " ".join(f"{t}={counts[t]}" for t in SUBTASKS)
        print(f"{split}: {len(records)} samples -> {path} ({time.time() - t0:.1f}s) | {per_task}")


if __name__ == "__main__":
    main()
