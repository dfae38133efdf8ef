"""How well does the embedded backbone see? Caption grounding of `smol-llava`.

    python scripts/probe_captions.py                      # the committed weights, 40 images
    LSG_EMBEDDED_DIR=DIR python scripts/probe_captions.py # weights from a scripts/train_embedded.py --out DIR

Generates a greedy caption for the first `--images` validation scenes with the stage-B
caption instruction and scores it against the scene (no option letters involved, so this
separates seeing from multiple-choice answering):

- count: the caption starts with the right "N object(s)";
- colour-shape precision / recall: "<colour> <shape>" pairs named vs the scene's objects.
  Chance precision is about mean objects / 32 pairs (~0.11 for 1-6 objects).
"""

from __future__ import annotations

import argparse
import re

import torch

import lsg
from lsg.data.shapes import CAPTION_PROMPT, COLOUR_NAMES, SHAPES, describe, render, sample_scene

PAIR = re.compile(r"\b(%s) (%s)\b" % ("|".join(COLOUR_NAMES), "|".join(SHAPES)))
COUNT = re.compile(r"\s*(\d+) objects?\b")


def score(caption: str, scene) -> tuple[bool, set, set]:
    """(count right, colour-shape pairs named, pairs in the scene) for one caption."""
    m = COUNT.match(caption)
    named = set(PAIR.findall(caption))
    return m is not None and int(m.group(1)) == len(scene.objects), named, {(o.colour, o.shape) for o in scene.objects}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=60, help="a 6-object caption is ~55 tokens")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    bb = lsg.load_backbone("smol-llava", dtype=args.dtype)
    scenes = [sample_scene("val", i)[0] for i in range(args.images)]
    right, tp, fp, fn = 0, 0, 0, 0
    for start in range(0, len(scenes), args.batch_size):
        chunk = scenes[start:start + args.batch_size]
        batch = bb.build_batch([render(s) for s in chunk], [CAPTION_PROMPT] * len(chunk))
        with torch.no_grad():
            captions = bb.generate(batch, args.max_new_tokens)
        for scene, caption in zip(chunk, captions):
            ok, named, true = score(caption, scene)
            right += ok
            tp, fp, fn = tp + len(named & true), fp + len(named - true), fn + len(true - named)
            if start == 0 and scene is chunk[0]:
                print(f"generated: {caption.strip()}\nreference: {describe(scene)}")
    n = len(scenes)
    print(f"{n} images: count right {right / n:.2f}, colour-shape precision {tp / max(1, tp + fp):.2f}, "
          f"recall {tp / max(1, tp + fn):.2f}")


if __name__ == "__main__":
    main()
