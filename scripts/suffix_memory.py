"""Activation memory of the frozen suffix, with and without activation checkpointing (issue 19).

    python scripts/suffix_memory.py                      # LLaVA-1.5-7B dims, 4 decoder layers, batch 1
    python scripts/suffix_memory.py --batch 2 --out runs/suffix-memory.json

Builds a LLaVA with LLaVA-1.5-7B's real dimensions (LLaMA-2-7B decoder layers: hidden 4096, 32
heads, MLP 11008, vocabulary 32064; CLIP ViT-L/14-336: hidden 1024, 16 heads, 336 px, 14 px
patches, so 576 visual tokens) truncated to `--layers` decoder layers (and `--vision-layers` ViT
layers: the ViT runs once, without grad, in the prefix, so its depth does not enter the suffix's
memory), random weights, written in the hub's format (`save_pretrained`) and loaded as
`model=llava-1.5-7b model.hf_id=<folder>` is. It trains the step of an LSG gate (forward with the
answer loss, backward) at decoder layer 0 and at layer `--layers - 2`, both paths in one run:

- **held for backward**: the bytes of the tensors autograd keeps between forward and backward
  (`torch.autograd.graph.saved_tensors_hooks`, each storage once, the frozen weights excluded),
  plus, when checkpointing, the inputs each checkpointed layer keeps for its recompute. This is
  the activation memory; the peak during backward adds one layer's recompute.
- the difference between the two gate layers, divided by the layers between them, is the memory
  per decoder layer above the gate, the figure docs/large-models.md extrapolates to 32 layers.

Measured in float32 on the CPU (bf16 activations on a GPU take half); timings are ratios in one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import lsg
import lsg.backbones as backbones
from lsg.data import generate_scene_sample
from lsg.gates import LSGGate
from lsg.prefix import compute_prefixes, run_suffix
from lsg.scoring import answer_loss

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14,
                  projection_dim=768)
MIB = 2 ** 20


def save_real_dims_llava(folder: Path, layers: int, vision_layers: int) -> Path:
    """A random LLaVA-1.5-7B-dims checkpoint with `layers` decoder layers, in the hub format (bf16 on disk)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = backbones._tiny_tokenizer()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_L_336, num_hidden_layers=vision_layers),
        text_config=LlamaConfig(**LLAMA2_7B, num_hidden_layers=layers, pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(336 // 14) ** 2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        chat_template=lsg.embedded.CHATML_TEMPLATE, num_additional_image_tokens=1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class Held:
    """Storages autograd saves for backward (weights excluded), each counted once."""

    def __init__(self, model: torch.nn.Module):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def add(self, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.weights:
            self.storages[ptr] = t.untyped_storage().nbytes()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / MIB


def train_step(bb, batch, prefix, layer: int, checkpoint: bool) -> tuple[float, float]:
    """(MiB held for backward, seconds of forward + backward) of one gate step at `layer`."""
    gate = LSGGate(bb.hidden_size)
    held = Held(bb.model)
    inner = backbones._checkpointed

    def recording(forward, *args, **kwargs):  # a checkpointed layer keeps its inputs for the recompute
        if torch.is_grad_enabled():
            for value in [*args, *kwargs.values()]:
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor):
                        held.add(t)
        return inner(forward, *args, **kwargs)

    backbones._checkpointed = recording
    try:
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(held.pack, lambda t: t):
            hidden = run_suffix(bb, prefix, {layer: gate}, checkpoint_above=checkpoint)
            loss = answer_loss(bb, batch, hidden)
        loss.backward()
        return held.mib, time.perf_counter() - start
    finally:
        backbones._checkpointed = inner


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (2-4: LLaVA-1.5-7B has 32)")
    ap.add_argument("--vision-layers", type=int, default=2, help="ViT layers (CLIP-L/14-336 has 24)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.layers < 3:
        raise SystemExit("--layers must be at least 3: two gate layers with at least one layer between them.")
    torch.set_grad_enabled(True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = save_real_dims_llava(Path(tmp), args.layers, args.vision_layers)
        bb = lsg.load_backbone("llava-1.5-7b", hf_id=str(folder), dtype="float32", chat_template="hub",
                               system_prompt=None, padding_side="right")
        build_s = time.perf_counter() - t0
        samples = [generate_scene_sample("val", i) for i in range(args.batch)]
        batch = bb.on_device(bb.build_batch([s[0] for s in samples], [s[1]["conversations"][0]["value"]
                                                                       .replace("<image>\n", "") for s in samples],
                                            [s[1]["conversations"][1]["value"] for s in samples]))
        tokens = int(batch["attention_mask"].sum(1).float().mean())
        low, high = 0, args.layers - 2  # gate layers: args.layers - 1 and 1 layers above them
        rows = {}
        for checkpoint in (False, True):
            for layer in (low, high):
                prefix = compute_prefixes(bb, batch, [layer])[0][layer]
                rows[(checkpoint, layer)] = train_step(bb, batch, prefix, layer, checkpoint)
    between = high - low
    per_layer = {c: (rows[(c, low)][0] - rows[(c, high)][0]) / between for c in (False, True)}
    result = {"dims": "LLaVA-1.5-7B (LLaMA-2-7B decoder, CLIP-L/14-336)", "decoder_layers": args.layers,
              "batch": args.batch, "tokens_per_sample": tokens, "dtype": "float32", "build_s": build_s,
              "held_mib": {f"{'checkpointed' if c else 'plain'}@L{l}": v[0] for (c, l), v in rows.items()},
              "step_s": {f"{'checkpointed' if c else 'plain'}@L{l}": v[1] for (c, l), v in rows.items()},
              "per_suffix_layer_mib": {"plain": per_layer[False], "checkpointed": per_layer[True]}}
    print(f"LLaVA-1.5-7B dims, {args.layers} decoder layers, batch {args.batch}, {tokens} tokens per sample, float32, "
          f"CPU; memory autograd holds for backward (weights excluded)")
    print("| path | gate at L0: held MiB | gate at L{0}: held MiB | per layer above the gate, MiB | step s (L0) |"
          .format(high))
    print("|---|---|---|---|---|")
    for c in (False, True):
        name = "checkpointed" if c else "plain"
        print(f"| {name} | {rows[(c, low)][0]:.1f} | {rows[(c, high)][0]:.1f} | {per_layer[c]:.1f} | "
              f"{rows[(c, low)][1]:.2f} |")
    print(f"per suffix layer: checkpointed / plain = {per_layer[True] / per_layer[False]:.3f}; "
          f"step time checkpointed / plain = {rows[(True, low)][1] / rows[(False, low)][1]:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
