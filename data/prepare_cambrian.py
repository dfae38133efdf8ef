"""Draw the paper's training set: a stratified sample of Cambrian-7M, equal across six
categories (OCR, general VQA, counting, code, math, science), written as LLaVA JSON.

    python data/prepare_cambrian.py --jsonl /data/Cambrian-10M/jsons/Cambrian7M_withsystemprompt.jsonl \\
        --image-folder /data/Cambrian-10M --out data/cambrian10k
    python data/prepare_cambrian.py --jsonl nyu-visionx/Cambrian-10M \\
        --data-files jsons/Cambrian7M_withsystemprompt.jsonl --image-folder /data/Cambrian-10M

Writes `train.json` (10,000 records: 1,667 or 1,666 per category) and `val.json` (a disjoint
350, drawn the same way) with image paths relative to `--image-folder`, plus `meta.json`
(counts per category, candidates, skips, the seed). Then:

    python train.py layer=10 data=llava-json data.train_json=data/cambrian10k/train.json \\
        data.val_json=data/cambrian10k/val.json data.image_folder=/data/Cambrian-10M

Every turn of a multi-turn record is kept (training puts the loss on every answer). How
categories map to Cambrian's sources: lsg/data/cambrian.py and docs/cambrian.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from lsg.data.cambrian import (CATEGORIES, quotas, read_jsonl, split_sample, stratified_sample,
                               to_llava)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jsonl", required=True, help="Cambrian-7M jsonl path, or a hub dataset id (with --data-files)")
    p.add_argument("--data-files", default="jsons/Cambrian7M_withsystemprompt.jsonl",
                   help="the jsonl inside a hub dataset (ignored for a local path)")
    p.add_argument("--image-folder", default=None,
                   help="where Cambrian's image tarballs were extracted; records whose image is missing are skipped")
    p.add_argument("--out", type=Path, default=Path("data/cambrian10k"), help="output folder")
    p.add_argument("--n", type=int, default=10_000, help="training records (the paper: 10K)")
    p.add_argument("--n-val", type=int, default=350, help="validation records, disjoint from training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--categories", default=",".join(CATEGORIES), help="comma-separated subset of " + ",".join(CATEGORIES))
    args = p.parse_args(argv)

    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        p.error(f"unknown categories {unknown}; known: {', '.join(CATEGORIES)}")
    if args.image_folder is None:
        print("warning: no --image-folder, so image files are not checked", file=sys.stderr)
    train_q, val_q = quotas(args.n, categories), quotas(args.n_val, categories)
    start = time.perf_counter()
    sample, stats = stratified_sample(read_jsonl(args.jsonl, args.data_files),
                                      {c: train_q[c] + val_q[c] for c in categories}, args.image_folder, args.seed,
                                      check_images=args.image_folder is not None)
    train, val = split_sample(sample, val_q, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        tmp = args.out / f"{name}.json.tmp"
        tmp.write_text(json.dumps(to_llava(part), indent=1))
        tmp.replace(args.out / f"{name}.json")
    meta = {"source": args.jsonl, "data_files": args.data_files, "image_folder": args.image_folder, "seed": args.seed,
            "train": {c: len(train[c]) for c in categories}, "val": {c: len(val[c]) for c in categories},
            "stats": dict(stats), "elapsed_s": round(time.perf_counter() - start, 1)}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta, indent=1))
    return meta


if __name__ == "__main__":
    main()
