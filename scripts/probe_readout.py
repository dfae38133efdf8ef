"""Can SmolLM2 + a LoRA learn to answer from a given visual-token representation?

    python scripts/probe_readout.py --tokens word-sum --subtask colour --minutes 10
    python scripts/probe_readout.py --tokens two-token --subtask colour --minutes 10
    python scripts/probe_readout.py --tokens text --subtask colour --minutes 10

An oracle probe of the embedded backbone's language side, with no vision tower: each
scene's visual tokens are built from its ground truth, so the only thing learned is the
read-out, a fresh LoRA on the LM's attention trained with `lsg.scoring.option_loss` on one
sub-task. It separates "the projector does not deliver the content" from "the LM cannot
read content delivered in this form".

--tokens:
  word-sum   one token per 16 px patch, E(colour) + E(shape) + E(size), E(" empty") for an
             empty patch: the target `scripts/train_embedded.py` stage A2 fits the projector to.
  two-token  two tokens per patch, E(colour) then E(shape) (zero, then E(" empty"), for an
             empty patch): the object reads as the phrase "red circle".
  quadrant   what the 8 px-patch tower (12x12 tokens, LLaVA's one token per patch) is fitted
             to emit: in each cell's 2x2 patches, E(colour) top left, E(shape) top right,
             E(size) bottom left, E(column digit) bottom right, so "red circle" is two
             adjacent tokens of the raster order (stage A2's `visual_targets`).
  text       no visual content (zero tokens); the scene's caption (`describe`) is written
             before the question instead.

Prints the training loss and the held-out accuracy (`--val` validation questions of the
sub-task) every `--eval-every` steps.
"""

from __future__ import annotations

import argparse
import time

import torch

from lsg import embedded
from lsg.backbones import Backbone
from lsg.data import SUBTASKS
from lsg.data.shapes import ShapesConfig, describe, patch_labels, render, sample_scene
from lsg.embedded.recipe import record_to_sample, scene_labels, subtask_index, visual_targets, word_tables
from lsg.scoring import LETTERS, option_loss, option_scores

TOKENS_PER_PATCH = {"word-sum": 1, "two-token": 2, "quadrant": 4, "text": 1}  # per 16 px grid cell


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", choices=sorted(TOKENS_PER_PATCH), required=True)
    p.add_argument("--subtask", choices=SUBTASKS, default="colour")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--val", type=int, default=100, help="validation questions of the sub-task per check")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def oracle_tokens(scenes, tables: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Visual tokens `(B, P * TOKENS_PER_PATCH[kind], D)` built from the scenes' patch labels
    (P = grid cells), in the raster order the LM reads them. `word-sum` and `quadrant` are
    `lsg.embedded.recipe.visual_targets` for 16 px and 8 px patches."""
    labels = scene_labels([patch_labels(s) for s in scenes])
    if kind == "word-sum":
        return visual_targets(labels, tables, 1)
    if kind == "quadrant":
        return visual_targets(labels, tables, 2)
    if kind == "two-token":
        return torch.stack([tables["colour"][labels["colour"]], tables["shape"][labels["shape"]]], 2).flatten(1, 2)
    return torch.zeros(*labels["colour"].shape, tables["zero"].shape[0])


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from peft import get_peft_model

    lm, tokenizer = embedded.load_smollm2()
    tower = embedded.VisionTowerConfig(patch_size=ShapesConfig().cell)  # one patch per cell; tokens multiplied below
    model, processor = embedded.assemble_llava(lm, tokenizer, tower)
    model.requires_grad_(False)
    tables = word_tables(model, tokenizer)
    patches = tower.num_patches
    # The processor writes num_patches + extra - 1 image tokens ("default" strategy drops CLS).
    processor.num_additional_image_tokens = 1 + patches * (TOKENS_PER_PATCH[args.tokens] - 1)
    current = {}
    model.model.multi_modal_projector.forward = lambda features: current["tokens"].to(features.dtype)
    model.model.language_model = get_peft_model(model.model.language_model, embedded.lora_config(
        {"r": args.lora_r, "alpha": args.lora_alpha, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    bb = Backbone("smol-llava", model, processor)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)

    def batch_of(split: str, indices, answers: bool):
        scenes = [sample_scene(split, i) for i in indices]
        current["tokens"] = oracle_tokens([s for s, _ in scenes], tables, args.tokens)
        samples = [record_to_sample(r) for _, r in scenes]
        prompts = [f"{describe(s)}\n{p}" if args.tokens == "text" else p for (s, _), (p, _, _) in zip(scenes, samples)]
        batch = bb.build_batch([render(s) for s, _ in scenes], prompts, [a for _, a, _ in samples] if answers else None)
        return batch, torch.tensor([n for _, _, n in samples]), torch.tensor([LETTERS.index(a) for _, a, _ in samples])

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        right = 0
        for start in range(0, args.val, 25):
            indices = [subtask_index(i, [args.subtask]) for i in range(start, min(args.val, start + 25))]
            batch, n, answer = batch_of("val", indices, False)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                scores = option_scores(bb, batch, int(n.max()))
            scores = scores.masked_fill(torch.arange(scores.shape[1])[None] >= n[:, None], float("-inf"))
            right += int((scores.argmax(1) == answer).sum())
        model.train()
        return right / args.val

    print(f"[probe] tokens={args.tokens} subtask={args.subtask} zero-shot accuracy {accuracy():.2f}", flush=True)
    t0, step, seen = time.time(), 0, 0
    while time.time() - t0 < args.minutes * 60:
        batch, n, answer = batch_of("train", [subtask_index(seen + b, [args.subtask]) for b in range(args.batch)], True)
        seen += args.batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = option_loss(bb, batch, n, answer)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            print(f"[probe] step {step} samples {seen} loss {loss.item():.3f} accuracy {accuracy():.2f} "
                  f"({seen / (time.time() - t0):.1f} samples/s)", flush=True)


if __name__ == "__main__":
    main()
