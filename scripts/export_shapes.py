"""Export a shapes split as a local `datasets` folder (what lmms-eval and `benchmark.hf_id=` read).

    python scripts/export_shapes.py --out data/shapes-hf --split val --n 350

Columns: id, question (with its options and the answer instruction), options, answer (letter),
subtask, image (PNG bytes). `python eval.py benchmark=shapes benchmark.hf_id=data/shapes-hf`
gives the same items as the generated split; lmms-eval reads it with the task files in
lsg/lmms_eval/tasks (`--include_path`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


from lsg.benchmarks.shapes import export_split


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/shapes-hf"))
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--n", type=int, default=350, help="questions (the split's first n)")
    p.add_argument("--root", default="data/shapes", help="where the generated split lives")
    args = p.parse_args(argv)
    out = export_split(args.out, args.split, args.n, args.root)
    print(f"Wrote {out} ({args.split}, {args.n} questions)")
    return out


if __name__ == "__main__":
    main()
