"""The build recipe of the embedded backbone's vision side (`smol-llava`), as functions.

`scripts/train_embedded.py` is its command line (every flag below is one of its flags, and
`args` is its `parse_args` namespace); the weights it built ship in `lsg/embedded/weights/`.
Two stages on the synthetic `shapes` train split, SmolLM2 weights frozen throughout:

A. The CLIP ViT alone (`stage_a`), on the generator's own labels read from its feature
   layer: each patch learns its grid cell's colour, shape, size, row and column and its
   place in the cell, plus the object count from the mean token. Fast (no LM), and it gives
   the tower features worth aligning.
A2. The projector alone (`stage_a2`), regressed (ViT frozen, no LM forward) onto word
   embeddings of each patch's content (`visual_targets`). With 16 px patches (`--patch-size
   16`, one per grid cell) a token is `E(" red") + E(" circle") + E(" large")` for an object
   and `E(" empty")` otherwise. With 8 px patches (`--patch-size 8`, 2x2 per cell) each token
   carries one word: E(colour) top left, E(shape) top right, E(size) bottom left, the
   column digit bottom right, so the raster order reads "red circle" as two adjacent
   tokens, the form `scripts/probe_readout.py` found SmolLM2 + LoRA can learn to read
   (it never learned the summed form within 5,760 questions).
B. LLaVA stage-1 style alignment through the frozen LM (the loop in `scripts/train_embedded.py`,
   its samples and losses here: `record_to_sample`, `open_answer_sample`, `dialogue_batch`,
   `stage_b_loss`, `dialogue_loss`): projector at `--lr-projector` from the start, a LoRA
   adapter on the LM's attention at `--lr-lora`, and the ViT unfrozen after
   `--unfreeze-vit-after` steps at `--lr-vit`. Loss: next-token loss on the answer letter only
   (`--mc-loss options`: over the options' letters). Constant learning rates.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lsg.backbones import Backbone
from lsg.segments import IGNORE_INDEX
from lsg.data import SUBTASKS, generate_scene_sample, generate_split, load_llava_json
from lsg.data.shapes import ShapesConfig, render, scene_questions
from lsg.evaluation import evaluate as lsg_evaluate
from lsg.scoring import LETTERS, answer_loss, decoder_hidden, option_cross_entropy, option_loss

VAL_SPLIT_SIZE = 350  # the shapes data config's `n_val`: reuse train.py's split instead of rewriting it


def autocast(kind: str):
    """CPU autocast for `--autocast`: "bfloat16" (or another torch dtype name), "none" = off."""
    enabled = kind != "none"
    return torch.autocast("cpu", dtype=getattr(torch, kind if enabled else "bfloat16"), enabled=enabled)


def cell_to_patch(values: torch.Tensor, grid: int, factor: int) -> torch.Tensor:
    """Per-cell values `(B, grid*grid, ...)` (row-major cells) to per-patch values
    `(B, (grid*factor)**2, ...)` (row-major patches): each cell's value is copied to its
    `factor x factor` ViT patches."""
    b, rest = values.shape[0], values.shape[2:]
    cells = values.reshape(b, grid, 1, grid, 1, *rest)
    return cells.expand(b, grid, factor, grid, factor, *rest).reshape(b, (grid * factor) ** 2, *rest)


def quadrant_ids(grid: int, factor: int) -> torch.Tensor:
    """`(P,)` place of every patch inside its cell, `dy * factor + dx` (0 = top left), row-major."""
    side = torch.arange(grid * factor) % factor
    return (side.view(-1, 1) * factor + side.view(1, -1)).flatten()


def scene_labels(samples_labels: list[dict]) -> dict[str, torch.Tensor]:
    """Stack `patch_labels` dicts into `(B, cells)` long tensors, plus "column": the cell's
    column + 1 where an object sits, 0 where the cell is empty."""
    out = {k: torch.as_tensor(np.stack([lab[k] for lab in samples_labels])).long() for k in ("colour", "shape", "size")}
    grid = int(round(out["colour"].shape[1] ** 0.5))
    out["column"] = (torch.arange(grid * grid) % grid + 1) * (out["colour"] > 0)
    return out


WORD_SLOTS = ("colour", "shape", "size", "column")  # word per place in a 2x2 cell: `quadrant_ids` 0..3


def patches_per_cell(tower_config) -> int:
    """ViT patches per side of one `shapes` grid cell: 1 for 16 px patches, 2 for 8 px."""
    return tower_config.image_size // tower_config.patch_size // ShapesConfig().grid


def visual_targets(labels: dict[str, torch.Tensor], tables: dict[str, torch.Tensor], factor: int) -> torch.Tensor:
    """Stage-A2 targets `(B, P, D)`: the LM input embeddings each ViT patch's visual token
    should carry, for a tower whose patches split every grid cell `factor x factor`.

    With `factor = 1` (one 16 px patch per cell) the cell's words are summed into one token,
    E(colour) + E(shape) + E(size) (the `word-sum` form). With `factor = 2` (8 px patches)
    each of the cell's four patches carries one word, so the raster order reads like text:
    E(colour) top left, E(shape) top right ("red circle" as two adjacent tokens), E(size)
    bottom left and E(column digit) bottom right; an empty cell is E(" empty") top right
    and zero elsewhere. `labels` comes from `scene_labels`, `tables` from `word_tables`.

    Raises:
        ValueError: `factor` is not 1 or 2.
    """
    words = {k: tables[k][labels[k]] for k in WORD_SLOTS}  # (B, cells, D) each
    if factor == 1:
        return words["colour"] + words["shape"] + words["size"]
    if factor != 2:
        raise ValueError(f"visual_targets supports 1 or 2 patches per cell side, got {factor}; "
                         "choose the tower's patch_size as the cell size or half of it")
    b, cells, d = words["colour"].shape
    slot = quadrant_ids(int(round(cells ** 0.5)), factor)  # (P,): patches of one slot visit the cells row-major
    out = words["colour"].new_zeros(b, cells * factor * factor, d)
    for k, name in enumerate(WORD_SLOTS):
        out[:, slot == k] = words[name]
    return out


def slot_accuracy(tokens: torch.Tensor, labels: dict[str, torch.Tensor], tables: dict[str, torch.Tensor],
                  factor: int) -> dict[str, float]:
    """How readable projected visual tokens `(B, P, D)` are: for each word slot of
    `visual_targets` with `factor = 2` (colour, shape, size, column), the share of
    occupied cells whose token is nearest (cosine) to the right word of that slot's table.
    Chance is 1 / (number of words): 1/8, 1/4, 1/2, 1/6."""
    if factor != 2:
        raise ValueError(f"slot_accuracy reads the one-word-per-patch form (factor 2), got factor {factor}")
    slot = quadrant_ids(int(round(labels["colour"].shape[1] ** 0.5)), factor)  # as in `visual_targets`
    occupied = labels["colour"] > 0
    out = {}
    for k, name in enumerate(WORD_SLOTS):
        words = tables[name][1:]  # label 0 is the empty cell
        sims = F.cosine_similarity(tokens[:, slot == k][occupied][:, None], words[None], dim=-1)
        out[name] = (sims.argmax(1) + 1 == labels[name][occupied]).float().mean().item()
    return out


def stage_a(model, processor, args) -> float:
    """Pretrain the ViT on per-patch labels of the patch's grid cell (colour, shape, size,
    row, column), the patch's place inside its cell, and the object count from the mean
    token; returns the final colour accuracy on patches of occupied cells (empty cells are
    ~90% of patches and would hide a tower that misses objects)."""
    tower = model.model.vision_tower
    d = tower.config.hidden_size
    grid = ShapesConfig().grid
    factor = patches_per_cell(tower.config)
    heads = nn.ModuleDict({
        "colour": nn.Linear(d, 9), "shape": nn.Linear(d, 5), "size": nn.Linear(d, 3),
        "row": nn.Linear(d, grid), "col": nn.Linear(d, grid), "count": nn.Linear(d, 7),
        "quadrant": nn.Linear(d, factor * factor),
    })
    cell_ids = cell_to_patch(torch.arange(grid * grid)[None], grid, factor)[0]  # (P,)
    fixed = {"row": cell_ids // grid, "col": cell_ids % grid, "quadrant": quadrant_ids(grid, factor)}
    tower.train().requires_grad_(True)
    opt = torch.optim.Adam(list(tower.parameters()) + list(heads.parameters()), lr=args.lr_stage_a)
    layer = model.config.vision_feature_layer
    t0, acc = time.time(), 0.0
    for step in range(args.stage_a_steps):
        samples = [generate_scene_sample("train", step * args.stage_a_batch + b) for b in range(args.stage_a_batch)]
        pixels = torch.as_tensor(np.stack(processor.image_processor([s[0] for s in samples])["pixel_values"]))
        with autocast(args.autocast):
            feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]  # (B, P, d)
        feats = feats.float()
        labels = scene_labels([s[2] for s in samples])
        loss = 0.0
        for key in ("colour", "shape", "size"):
            target = cell_to_patch(labels[key], grid, factor)
            logits = heads[key](feats)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), target.flatten())
            if key == "colour":  # on occupied cells only: empty ones are ~90% of patches
                acc = (logits.argmax(-1) == target)[target > 0].float().mean().item()
        for key, target in fixed.items():
            loss = loss + F.cross_entropy(heads[key](feats).flatten(0, 1), target.repeat(len(samples)))
        count = torch.tensor([int(s[2]["count"]) for s in samples])
        loss = loss + F.cross_entropy(heads["count"](feats.mean(1)), count)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.stage_a_steps - 1:
            rate = (step + 1) * args.stage_a_batch / (time.time() - t0)
            print(f"[stage A] step {step} loss {loss.item():.3f} occupied-patch colour acc {acc:.3f} ({rate:.0f} samples/s)",
                  flush=True)
    tower.eval().requires_grad_(False)
    return acc


def word_tables(model, tokenizer) -> dict[str, torch.Tensor]:
    """Stage-A2 target tables: row = cell label id (0 = empty, see `patch_labels` and
    `scene_labels`), value = the summed LM input embeddings of the label's words,
    `(n_labels, D)`. An empty cell is zero for colour, size and column and E(" empty") for
    shape; "column" holds the digits "1".."6" (grid column + 1); "zero" is the `(D,)` zero vector."""
    from lsg.data import COLOUR_NAMES, SHAPES, SIZES

    emb = model.model.language_model.get_input_embeddings().weight.detach().float()

    def embed(text: str) -> torch.Tensor:
        return emb[tokenizer(text, add_special_tokens=False)["input_ids"]].sum(0)

    zero = torch.zeros_like(emb[0])
    # Words with a leading space, as inside a sentence; digits without: " 1" is two tokens
    # in SmolLM2's vocabulary, "1" is one.
    return {"colour": torch.stack([zero] + [embed(" " + c) for c in COLOUR_NAMES]),
            "shape": torch.stack([embed(" empty")] + [embed(" " + s) for s in SHAPES]),
            "size": torch.stack([zero] + [embed(" " + s) for s in SIZES]),
            "column": torch.stack([zero] + [embed(str(c + 1)) for c in range(ShapesConfig().grid)]),
            "zero": zero}


def stage_a2(model, processor, tokenizer, args) -> float:
    """Fit the projector to `visual_targets` (word embeddings of each patch's content);
    returns the final cosine similarity between projected tokens and their targets on the
    patches of occupied cells (the content the LM must read).

    `--a2-loss balanced` averages the squared error over occupied-cell patches and over
    empty-cell patches separately and adds the two: a scene has 1-6 objects in 36 cells,
    so a plain mean (`--a2-loss mean`) is dominated by empty cells, and with 8 px patches
    it left the occupied tokens near the mean word embedding (cosine 0.43-0.60 to their
    targets, nearest colour word right for 11% of tokens, chance 12.5%).
    """
    tables = word_tables(model, tokenizer)
    factor = patches_per_cell(model.model.vision_tower.config)
    projector = model.model.multi_modal_projector.requires_grad_(True).train()
    tower = model.model.vision_tower
    opt = torch.optim.Adam(projector.parameters(), lr=args.lr_stage_a2)
    layer = model.config.vision_feature_layer
    offset = args.stage_a_steps * args.stage_a_batch
    cos = 0.0
    for step in range(args.stage_a2_steps):
        samples = [generate_scene_sample("train", offset + step * args.stage_a_batch + b)
                   for b in range(args.stage_a_batch)]
        pixels = torch.as_tensor(np.stack(processor.image_processor([s[0] for s in samples])["pixel_values"]))
        with torch.no_grad(), autocast(args.autocast):
            feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        labels = scene_labels([s[2] for s in samples])
        target = visual_targets(labels, tables, factor)  # (B, P, D)
        occupied = cell_to_patch(labels["colour"] > 0, ShapesConfig().grid, factor)  # (B, P)
        pred = projector(feats.float())
        if args.a2_loss == "balanced":
            loss = F.mse_loss(pred[occupied], target[occupied]) + F.mse_loss(pred[~occupied], target[~occupied])
        else:
            loss = F.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        words = occupied & (target.norm(dim=-1) > 0)
        cos = F.cosine_similarity(pred[words], target[words], dim=-1).mean().item()
        if step % 50 == 0 or step == args.stage_a2_steps - 1:
            print(f"[stage A2] step {step} mse {loss.item():.5f} occupied-cell cosine {cos:.3f}", flush=True)
    if factor == 2:
        print("[stage A2] nearest-word accuracy on occupied cells (last batch): "
              + json.dumps({k: round(v, 3) for k, v in slot_accuracy(pred.detach(), labels, tables, factor).items()}),
              flush=True)
    projector.eval()
    return cos


# LLaVA-1.5's prompt for short-answer VQA data (its instruction-tuning mix).
OPEN_ANSWER_SUFFIX = "Answer the question using a single word or phrase."


def recipe_history(previous: dict) -> list[dict]:
    """The recipes (`vars(args)` of each run) that shaped the weights an `embedded.json` describes,
    oldest first: its `recipes`, or for a file written before histories were kept its single
    `recipe`, or [] for a run from scratch (`previous` = {})."""
    return previous.get("recipes") or ([previous["recipe"]] if "recipe" in previous else [])


MAX_SKIPPED_SCENES = 100  # per requested scene: `scene_dialogues` gives up after n * this many reads


def scene_dialogues(start: int, n: int, subtasks: list[str]) -> tuple[list[tuple], int]:
    """The first n scenes from `start` on in the multi-question stream (`scene_questions`) that
    pose at least one of `subtasks`, each with its records restricted to them, and how many
    stream positions were read to find them (> n only when a scene poses none of them, which
    needs "count", posed by every scene, to be left out).

    Raises ValueError if n * MAX_SKIPPED_SCENES scenes are read without finding n."""
    dialogues, i = [], start
    while len(dialogues) < n:
        if i - start >= n * MAX_SKIPPED_SCENES:
            raise ValueError(f"no scene from {start} to {i} poses any of {subtasks}; choose other --subtasks")
        scene, records = scene_questions("train", i)
        i += 1
        records = [r for r in records if r["subtask"] in subtasks]
        if records:
            dialogues.append((scene, records))
    return dialogues, i - start


def subtask_index(n: int, subtasks: list[str]) -> int:
    """Index of the n-th `sample_scene` sample whose sub-task is in `subtasks` (sample i asks
    SUBTASKS[i % 7]); with every sub-task it is n itself."""
    allowed = [k for k, t in enumerate(SUBTASKS) if t in subtasks]
    return len(SUBTASKS) * (n // len(allowed)) + allowed[n % len(allowed)]


def record_to_sample(record: dict) -> tuple[str, str, int]:
    prompt = record["conversations"][0]["value"].replace("<image>\n", "", 1)
    return prompt, record["conversations"][1]["value"], len(record["options"])


def open_answer_sample(record: dict) -> tuple[str, str]:
    """The record's question in short-answer form: (prompt, the correct option's text)."""
    prompt, letter, _ = record_to_sample(record)
    question = prompt.partition("\n")[0]
    return f"{question}\n{OPEN_ANSWER_SUFFIX}", record["options"][LETTERS.index(letter)]


def stage_b_loss(bb: Backbone, batch: dict, records: list[dict], n_free: int, mc_loss: str) -> torch.Tensor:
    """Stage-B loss of a batch whose first `n_free` rows are captions or short answers
    (next-token loss) and whose other rows are multiple choice (`mc_loss`)."""
    if mc_loss == "next-token" or n_free == len(records):
        return answer_loss(bb, batch)
    hidden = decoder_hidden(bb, batch)
    mc = [record_to_sample(r) for r in records[n_free:]]
    loss = option_loss(bb, {k: v[n_free:] for k, v in batch.items()},
                       torch.tensor([k for _, _, k in mc]), torch.tensor([LETTERS.index(a) for _, a, _ in mc]),
                       hidden[n_free:]) * len(mc)
    if n_free:
        loss = loss + answer_loss(bb, {k: v[:n_free] for k, v in batch.items()}, hidden[:n_free]) * n_free
    return loss / len(records)


def dialogue_batch(bb: Backbone, images: list, dialogues: list[list[dict]]) -> tuple[dict, list[tuple[int, int, int, int]]]:
    """Multi-turn multiple-choice conversations, one image each, as model inputs.

    Returns the batch (labels on every answer letter and its end-of-turn token) and one
    `(row, position, n_options, answer_index)` per question, where `position` is the
    token that predicts that answer's letter. Turns follow the backbone's ChatML template.
    """
    tok, eot = bb.tokenizer, bb.tokenizer.eos_token
    enc = bb.processor(images=list(images), text=[bb.prompt_text(record_to_sample(d[0])[0]) for d in dialogues],
                       return_tensors=None, padding=False)
    seqs, label_seqs, turns = [], [], []
    for b, (ids, dialogue) in enumerate(zip(enc["input_ids"], dialogues)):
        ids, labels = list(ids), [IGNORE_INDEX] * len(ids)
        for t, record in enumerate(dialogue):
            prompt, letter, k = record_to_sample(record)
            if t:
                turn = tok(f"\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
                ids += turn["input_ids"]
                labels += [IGNORE_INDEX] * len(turn["input_ids"])
            turns.append((b, len(ids) - 1, k, LETTERS.index(letter)))
            answer = tok(letter + eot, add_special_tokens=False)["input_ids"]
            ids += answer
            labels += answer
        seqs.append(ids)
        label_seqs.append(labels)
    width = max(map(len, seqs))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = {"input_ids": torch.full((len(seqs), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(seqs), width), dtype=torch.long),
             "labels": torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long),
             "pixel_values": torch.as_tensor(np.stack(enc["pixel_values"])).to(bb.model.dtype)}
    for b, (ids, labels) in enumerate(zip(seqs, label_seqs)):  # right padding: positions stay as recorded
        batch["input_ids"][b, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][b, : len(ids)] = 1
        batch["labels"][b, : len(ids)] = torch.tensor(labels)
    return batch, turns


def dialogue_loss(bb: Backbone, batch: dict, turns: list[tuple[int, int, int, int]], mc_loss: str) -> torch.Tensor:
    """Mean loss per answered question of a `dialogue_batch` (see `stage_b_loss`)."""
    if mc_loss == "next-token":
        return answer_loss(bb, batch)
    rows, pos, k, answer = (torch.tensor(c) for c in zip(*turns))
    return option_cross_entropy(bb, decoder_hidden(bb, batch)[rows, pos], k, answer)


def evaluate(bb: Backbone, n: int, root: Path) -> dict[str, float]:
    """Per-sub-task accuracy on the first n validation questions (`lsg.evaluation.evaluate`,
    option-letter argmax), read from the split `train.py` uses under `root` (written on first use)."""
    records = load_llava_json(generate_split("val", max(n, VAL_SPLIT_SIZE), root), check_images=False)
    return {t: a / 100 for t, a in lsg_evaluate(bb, records[:n]).acc_pct.items() if t != "overall"}


# --------------------------------------------------------------------------- stage C: end of turn


def turn_features(bb: Backbone, batch: dict, eot_id: int) -> dict[str, torch.Tensor]:
    """What stage C needs of one labelled batch, with the backbone frozen: for every position
    that predicts an answer token (the letters and end-of-turn tokens `dialogue_batch` labels),
    its final hidden state `hidden (N, D)`, its target id `target (N,)`, the log-sum-exp of the
    logits of every token but the end-of-turn one `lse_other (N,)` and the target's own logit
    `target_logit (N,)` (unused where the target is the end-of-turn token). Only the
    end-of-turn logit depends on the row stage C fits, so these fix the loss of every row."""
    with torch.no_grad():
        hidden = decoder_hidden(bb, batch).float()
        where = batch["labels"][:, 1:] != IGNORE_INDEX
        hidden, target = hidden[:, :-1][where], batch["labels"][:, 1:][where]
        logits = bb.model.lm_head(hidden.to(bb.model.dtype)).float()
        target_logit = logits.gather(1, target[:, None])[:, 0]
        logits[:, eot_id] = float("-inf")
        return {"hidden": hidden, "target": target, "lse_other": logits.logsumexp(-1), "target_logit": target_logit}


def turn_losses(row: torch.Tensor, features: dict[str, torch.Tensor], eot_id: int) -> torch.Tensor:
    """Next-token cross-entropy `(N,)` (nats) of every answer token of `turn_features` when the
    end-of-turn token's output embedding is `row (D,)` and every other logit is unchanged."""
    eot_logit = features["hidden"] @ row
    own = torch.where(features["target"] == eot_id, eot_logit, features["target_logit"])
    return torch.logaddexp(eot_logit, features["lse_other"]) - own


def fit_turn_row(row: torch.Tensor, features: dict[str, torch.Tensor], eot_id: int, steps: int,
                 lr: float) -> tuple[torch.Tensor, list[float]]:
    """Stage C's fit: the end-of-turn output row `(D,)` that minimises the mean next-token loss
    of the answer tokens in `features` (full batch, Adam at `lr` for `steps` steps, from `row`).
    Returns the row and the loss every `STAGE_C_LOG_EVERY` steps."""
    row = row.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([row], lr=lr)
    trace = []
    for step in range(steps):
        loss = turn_losses(row, features, eot_id).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % STAGE_C_LOG_EVERY == 0 or step == steps - 1:
            trace.append(loss.item())
    return row.detach(), trace


STAGE_C_LOG_EVERY = 50


def kind_means(losses: torch.Tensor, target: torch.Tensor, eot_id: int) -> dict[str, float]:
    """Mean loss (nats) of the end-of-turn tokens and of the answer text (the letters)."""
    eot = target == eot_id
    return {"end_of_turn": losses[eot].mean().item(), "answer_text": losses[~eot].mean().item()}


def stage_c(bb: Backbone, start: int, args) -> tuple[torch.Tensor, dict]:
    """Stage C: the end-of-turn token's output embedding, untied from its input embedding and
    fitted alone (every other weight frozen) so that the backbone ends its assistant turn after
    an answer letter. The prompt is read exactly as before (input embeddings unchanged) and
    the option letters' logits are untouched, so option-letter accuracy is bit for bit the
    same; only the end-of-turn logit moves (docs/embedded-backbone.md, "End of turn").

    Trains on `args.stage_c_scenes` multi-question conversations (`scene_dialogues`, every
    question a scene poses, all sub-tasks) from stream position `start`, next-token loss on
    every answer token (letter and end of turn), as LLaVA's instruction tuning labels them.

    Returns:
        the fitted row `(D,)` (float32) and a record: scenes, answer tokens, loss per kind
        before and after, the loss trace.
    """
    eot_id = bb.tokenizer.eos_token_id
    rng = random.Random(f"stage-c/{start}")
    dialogues, read = scene_dialogues(start, args.stage_c_scenes, list(SUBTASKS))
    parts, t0 = [], time.time()
    for i in range(0, len(dialogues), args.stage_c_batch):
        chunk = dialogues[i:i + args.stage_c_batch]
        for _, records in chunk:
            rng.shuffle(records)
        batch, _ = dialogue_batch(bb, [render(scene) for scene, _ in chunk], [r for _, r in chunk])
        with autocast(args.autocast):
            parts.append(turn_features(bb, batch, eot_id))
        print(f"[stage C] features of {i + len(chunk)} / {len(dialogues)} scenes "
              f"({(i + len(chunk)) / (time.time() - t0):.1f} scenes/s)", flush=True)
    features = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    start_row = bb.model.lm_head.weight[eot_id].detach().float()
    before = kind_means(turn_losses(start_row, features, eot_id), features["target"], eot_id)
    row, trace = fit_turn_row(start_row, features, eot_id, args.stage_c_steps, args.lr_stage_c)
    after = kind_means(turn_losses(row, features, eot_id), features["target"], eot_id)
    print(f"[stage C] {len(dialogues)} scenes, {len(features['target'])} answer tokens: "
          f"loss per kind {json.dumps({k: round(v, 3) for k, v in before.items()})} -> "
          f"{json.dumps({k: round(v, 3) for k, v in after.items()})}", flush=True)
    return row, {"scenes": len(dialogues), "stream_start": start, "stream_read": read,
                 "answer_tokens": int(len(features["target"])), "loss_before": before, "loss_after": after,
                 "loss_trace": [round(v, 4) for v in trace]}
