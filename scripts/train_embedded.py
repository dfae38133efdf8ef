"""Train the vision side of the embedded backbone `smol-llava` and commit its weights.

    python scripts/train_embedded.py                      # the recipe (README: the committed weights' flags)
    python scripts/train_embedded.py --stage-b-minutes 5  # a shorter run
    python scripts/train_embedded.py --patch-size 8 --lr-stage-a 3e-4  # one word per visual token
    python scripts/train_embedded.py --continue-stage-b --fresh-lora ...  # a new LoRA on a saved tower
    python scripts/train_embedded.py --stage-c-only       # stage C (end of turn) on the saved weights

The command line of `lsg.embedded.recipe` (its docstring: stages A, A2 and B), run from a
source checkout with the package installed (`pip install -e .`). `--continue-stage-b` goes on
from saved weights, so stage B can be a curriculum of runs (e.g. one sub-task, then several,
then all: README).

Writes `{vision,lora}.safetensors` and `embedded.json` (recipe, steps, per-sub-task validation
accuracy) into `--out` (default `lsg.embedded.EMBEDDED_DIR`: the package's `weights/` folder,
the committed ones), and saves them every `--save-every` steps so an interrupted run keeps
its progress.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lsg import embedded
from lsg.backbones import Backbone
from lsg.data import SUBTASKS
from lsg.data.shapes import CAPTION_PROMPT, describe, render, sample_scene
from lsg.embedded.recipe import (
    autocast,
    dialogue_batch,
    dialogue_loss,
    evaluate,
    open_answer_sample,
    recipe_history,
    record_to_sample,
    scene_dialogues,
    stage_a,
    stage_a2,
    stage_b_loss,
    stage_c,
    subtask_index,
)

VAL_ROOT = Path(__file__).resolve().parents[1] / "data" / "shapes"  # the shapes data config's `root`, from the checkout


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=embedded.EMBEDDED_DIR)
    p.add_argument("--patch-size", type=int, choices=[8, 16], default=embedded.VisionTowerConfig().patch_size,
                   help="ViT patch in px: 16 = one patch per grid cell, its words summed into one visual "
                        "token (the first weights, README history); 8 = 2x2 patches per cell, one word per "
                        "visual token (`visual_targets`; the committed weights, README for their commands)")
    p.add_argument("--stage-a-steps", type=int, default=1500)
    p.add_argument("--stage-a-batch", type=int, default=64)
    p.add_argument("--lr-stage-a", type=float, default=1e-3)
    p.add_argument("--stage-a2-steps", type=int, default=300)
    p.add_argument("--lr-stage-a2", type=float, default=3e-3)
    p.add_argument("--a2-loss", choices=["balanced", "mean"], default="balanced",
                   help="stage-A2 squared error: occupied and empty cells weighted equally, or a plain mean "
                        "over patches (the first, 16 px weights)")
    p.add_argument("--stage-b-minutes", type=float, default=40.0, help="wall-clock budget of stage B")
    p.add_argument("--stage-b-steps", type=int, default=0,
                   help="stop stage B after this many optimizer steps of this run, if the minutes last that "
                        "long (0 = the minutes alone decide): makes a run repeatable on another machine")
    p.add_argument("--stage-b-batch", type=int, default=16)
    p.add_argument("--lr-projector", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=3e-4)
    p.add_argument("--lr-vit", type=float, default=1e-4)
    p.add_argument("--unfreeze-vit-after", type=int, default=100)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--open-answer-fraction", type=float, default=0.0,
                   help="share of stage-B samples asked in LLaVA-1.5's short-answer format (question plus "
                        "OPEN_ANSWER_SUFFIX, answered with the option's text) instead of multiple choice")
    p.add_argument("--caption-fraction", type=float, default=0.0,
                   help="share of stage-B samples that are captions (CAPTION_PROMPT -> lsg.data.shapes.describe), "
                        "LLaVA stage-1's dense alignment signal: every caption token is supervised")
    p.add_argument("--mc-loss", choices=["next-token", "options"], default="next-token",
                   help="loss on multiple-choice samples: next-token cross-entropy on the answer letter over the "
                        "whole vocabulary, or lsg.scoring.option_loss (cross-entropy over the options' letters only)")
    p.add_argument("--multi-question", action="store_true",
                   help="each multiple-choice sample is one image with every question its scene can pose, as one "
                        "multi-turn conversation (LLaVA-1.5's instruction data format): several answers per forward")
    p.add_argument("--subtasks", nargs="+", choices=SUBTASKS, default=list(SUBTASKS),
                   help="train on these sub-tasks' questions only (a curriculum or a diagnosis); "
                        "validation always covers all of them")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max global gradient norm (0 = no clipping)")
    p.add_argument("--val-samples", type=int, default=350)
    p.add_argument("--eval-every", type=int, default=0, help="steps between quick validation checks (0 = off)")
    p.add_argument("--eval-every-samples", type=int, default=140, help="validation samples per quick check")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--continue-stage-b", action="store_true",
                   help="start from the saved vision/projector/LoRA weights in --out and train stage B further")
    p.add_argument("--fresh-lora", action="store_true",
                   help="with --continue-stage-b: keep the saved vision tower and projector but start "
                        "a new LoRA (B = 0, so the LM starts unmodified) instead of loading lora.safetensors")
    p.add_argument("--reuse-stage-a", action="store_true",
                   help="load the stage-A tower saved by an earlier run instead of retraining it")
    p.add_argument("--stage-c-scenes", type=int, default=400,
                   help="stage C (end of turn): multi-question conversations whose answer tokens fit the "
                        "end-of-turn token's output row after stage B (0 = skip stage C)")
    p.add_argument("--stage-c-batch", type=int, default=8, help="conversations per forward in stage C")
    p.add_argument("--stage-c-steps", type=int, default=500, help="full-batch Adam steps of stage C's fit")
    p.add_argument("--lr-stage-c", type=float, default=1e-2)
    p.add_argument("--stage-c-only", action="store_true",
                   help="run stage C alone on the saved weights in --out (vision, projector and LoRA kept as "
                        "they are) and add its end-of-turn row (head.safetensors) to them")
    p.add_argument("--threads", type=int, default=0, help="torch threads for stage B (0 = torch default)")
    p.add_argument("--threads-stage-a", type=int, default=0, help="torch threads for stage A (0 = torch default)")
    p.add_argument("--autocast", choices=["bfloat16", "none"], default="bfloat16",
                   help="mixed precision for the forward (bf16 matmuls are ~7x faster on CPUs with AMX)")
    args = p.parse_args(argv)
    for flag in ("open_answer_fraction", "caption_fraction"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            p.error(f"--{flag.replace('_', '-')} is a share of the stage-B batch in [0, 1], got {getattr(args, flag)}")
    if args.open_answer_fraction + args.caption_fraction > 1.0:
        p.error(f"--open-answer-fraction + --caption-fraction = {args.open_answer_fraction + args.caption_fraction} "
                "exceeds 1; the rest of each batch is multiple choice, so keep their sum <= 1")
    if args.stage_b_steps < 0:
        p.error(f"--stage-b-steps must be >= 0 (0 = the minutes alone decide), got {args.stage_b_steps}")
    if args.stage_c_only and (args.continue_stage_b or args.stage_c_scenes <= 0):
        p.error("--stage-c-only runs stage C alone on saved weights: drop --continue-stage-b and give "
                "--stage-c-scenes > 0")
    if args.fresh_lora and not args.continue_stage_b:
        p.error("--fresh-lora only applies with --continue-stage-b (a run from scratch always starts a new LoRA)")
    return args


def stream_start(history: list[dict], stage_b_samples: int) -> int:
    """First unread position of the training-scene stream: past the scenes the first run's stages
    A and A2 used (its recipe) and every stage-B scene read since."""
    first = history[0]
    return (first["stage_a_steps"] + first["stage_a2_steps"]) * first["stage_a_batch"] + stage_b_samples


def recipe_of(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def end_of_turn(bb: Backbone, start: int, args, record: dict) -> None:
    """Stage C on `bb` from stream position `start`: writes head.safetensors and adds the
    stage's record (and with `--stage-c-only` this command's recipe) to embedded.json."""
    row, report = stage_c(bb, start, args)
    eot = torch.tensor([bb.tokenizer.eos_token_id])
    embedded.save_head(args.out, eot, row[None])
    record = {**record, "head": {"tokens": [bb.tokenizer.eos_token], "file": embedded.HEAD_FILE}, "stage_c": report}
    if args.stage_c_only:
        record["recipes"] = recipe_history(record) + [recipe_of(args)]
    (args.out / "embedded.json").write_text(json.dumps(record, indent=2))


def main():
    args = parse_args()
    if args.stage_c_only:
        if args.threads:
            torch.set_num_threads(args.threads)
        previous = json.loads((args.out / "embedded.json").read_text())
        (args.out / embedded.HEAD_FILE).unlink(missing_ok=True)  # stage C starts from the tied row
        model, processor = embedded.load_embedded(args.out)
        model.requires_grad_(False).eval()
        start = stream_start(recipe_history(previous), previous.get("stage_b_samples", 0))
        end_of_turn(Backbone("smol-llava", model, processor), start, args, previous)
        return
    if args.threads_stage_a:
        torch.set_num_threads(args.threads_stage_a)
    vision = embedded.VisionTowerConfig(patch_size=args.patch_size)
    lm, tokenizer = embedded.load_smollm2()
    model, processor = embedded.assemble_llava(lm, tokenizer, vision)
    model.requires_grad_(False)
    previous = json.loads((args.out / "embedded.json").read_text()) if args.continue_stage_b else {}
    history = recipe_history(previous)
    stage_a_path = args.out / "stage_a_vision.safetensors"
    if args.continue_stage_b:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(args.out / "vision.safetensors"), strict=False)
        acc_a = previous.get("stage_a_patch_colour_acc", float("nan"))
        print(f"[stage B] continuing from {args.out} after {previous.get('stage_b_steps')} steps", flush=True)
    elif args.reuse_stage_a and stage_a_path.exists():
        from safetensors.torch import load_file

        model.model.vision_tower.load_state_dict(load_file(stage_a_path))
        acc_a = float("nan")
        print(f"[stage A] reused {stage_a_path}", flush=True)
    else:
        acc_a = stage_a(model, processor, args)
        from safetensors.torch import save_file

        args.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.model.vision_tower.state_dict().items()}, stage_a_path)

    if args.continue_stage_b:
        cos_a2 = previous.get("stage_a2_cosine", float("nan"))
    else:
        cos_a2 = stage_a2(model, processor, tokenizer, args) if args.stage_a2_steps else float("nan")
    from peft import get_peft_model, get_peft_model_state_dict

    if args.threads:
        torch.set_num_threads(args.threads)

    lora = {"r": args.lora_r, "alpha": args.lora_alpha, "target_modules": args.lora_targets}
    peft_lm = get_peft_model(model.model.language_model, embedded.lora_config(lora))
    if args.continue_stage_b and not args.fresh_lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(peft_lm, load_file(args.out / "lora.safetensors"))
    model.model.language_model = peft_lm
    bb = Backbone("smol-llava", model, processor)
    projector = model.model.multi_modal_projector.requires_grad_(True)
    lora_params = [p for p in peft_lm.parameters() if p.requires_grad]
    vit_params = list(model.model.vision_tower.parameters())
    opt = torch.optim.Adam([
        {"params": projector.parameters(), "lr": args.lr_projector},
        {"params": lora_params, "lr": args.lr_lora},
        {"params": vit_params, "lr": args.lr_vit},
    ])

    def save(step: int, metrics: dict | None = None):
        # Save a merged-free copy: peft state for the LoRA, plain weights for the vision side.
        recipe = recipe_of(args)
        (args.out / embedded.HEAD_FILE).unlink(missing_ok=True)  # its end-of-turn row was fitted to other weights
        # Every command that shaped these weights, oldest first (a continuation appends to its start's).
        extra = {"recipe": recipe, "recipes": history + [recipe],
                 "stage_a_patch_colour_acc": acc_a, "stage_a2_cosine": cos_a2, "stage_b_steps": step0 + step, "stage_b_samples": seen0 + seen,
                 "val_accuracy": metrics}
        embedded.save_embedded(model, args.out, vision, lora, get_peft_model_state_dict(peft_lm), extra)

    model.train()
    t0, step, seen = time.time(), 0, 0
    step0 = previous.get("stage_b_steps", 0)
    # Records written before "stage_b_samples" existed: steps x the batch they were trained with.
    seen0 = previous.get("stage_b_samples", step0 * previous.get("recipe", {}).get("stage_b_batch", 0))
    # Fresh samples for stage B: past the scenes the first run's stages A and A2 used (its recipe,
    # when continuing), then past every stage-B scene read so far.
    offset = stream_start(history or [vars(args)], seen0)
    while time.time() - t0 < args.stage_b_minutes * 60 and not (args.stage_b_steps and step >= args.stage_b_steps):
        if step0 + step == args.unfreeze_vit_after or (step == 0 and step0 > args.unfreeze_vit_after):
            model.model.vision_tower.requires_grad_(True).train()
        if args.multi_question:
            rng = random.Random(f"stage-b/{offset + seen}")
            dialogues, read = scene_dialogues(offset + seen, args.stage_b_batch, args.subtasks)
            seen += read  # stream position: every scene read, trained on or not
            for _, records in dialogues:
                rng.shuffle(records)  # no fixed sub-task order to lean on
            batch, turns = dialogue_batch(bb, [render(scene) for scene, _ in dialogues], [r for _, r in dialogues])
            with autocast(args.autocast):
                loss = dialogue_loss(bb, batch, turns, args.mc_loss)
        else:
            scenes = [sample_scene("train", subtask_index(offset + seen + b, args.subtasks))
                      for b in range(args.stage_b_batch)]
            seen += len(scenes)
            n_caption = round(args.caption_fraction * len(scenes))
            n_open = n_caption + round(args.open_answer_fraction * len(scenes))
            prompts = [(CAPTION_PROMPT, describe(scene)) if b < n_caption
                       else open_answer_sample(record) if b < n_open else record_to_sample(record)[:2]
                       for b, (scene, record) in enumerate(scenes)]
            batch = bb.build_batch([render(scene) for scene, _ in scenes], [p[0] for p in prompts],
                                   [p[1] for p in prompts])
            with autocast(args.autocast):
                loss = stage_b_loss(bb, batch, [record for _, record in scenes], n_open, args.mc_loss)
        opt.zero_grad()
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.clip_grad)
        opt.step()
        step += 1
        if step % 25 == 0:
            print(f"[stage B] step {step} samples {seen} loss {loss.item():.3f} "
                  f"({seen / (time.time() - t0):.1f} samples/s)", flush=True)
        if step % args.save_every == 0:
            save(step)
        if args.eval_every and step % args.eval_every == 0:
            model.eval()
            with autocast(args.autocast):
                quick = evaluate(bb, args.eval_every_samples, VAL_ROOT)
            model.train()
            print(f"[quick val] step {step} samples {seen} " + json.dumps({k: round(v, 2) for k, v in quick.items()})
                  + f" overall {np.mean(list(quick.values())):.3f}", flush=True)
    if args.stage_b_steps and step < args.stage_b_steps:
        warnings.warn(f"stage B ran out of --stage-b-minutes {args.stage_b_minutes} after {step} of "
                      f"--stage-b-steps {args.stage_b_steps} steps; continue with --continue-stage-b "
                      f"--stage-b-steps {args.stage_b_steps - step}, or give more minutes", stacklevel=1)
    model.eval()
    with autocast(args.autocast):
        metrics = evaluate(bb, args.val_samples, VAL_ROOT)
    print("[val] " + json.dumps({k: round(v, 3) for k, v in metrics.items()}), flush=True)
    save(step, metrics)
    if args.stage_c_scenes:
        (args.out / embedded.HEAD_FILE).unlink(missing_ok=True)  # a row fitted to an earlier LoRA
        end_of_turn(bb, offset + seen, args, json.loads((args.out / "embedded.json").read_text()))


if __name__ == "__main__":
    main()
