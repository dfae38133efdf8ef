"""What the family tests share: tiny random checkpoints of each family's real transformers
classes, written in the hub's exact format (`save_pretrained` of model and processor, a tokenizer
built offline), for loading through the user path `load_backbone(<family config>, hf_id=<folder>)`;
the sink setup and gate specs they run; the checks every family runs on its backbone (padding,
prefix / suffix, the analysis against eager attention, a gate checkpoint's backbone); and the entry
points run as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lsg
from lsg.backbones import TINY_VOCAB

# Sink dims and thresholds of the tiny widths (random weights: low enough to flag some tokens).
SINKS = {"vit_dims": [0, 1], "llm_dims": [0, 1], "tau_vit": 1.5, "tau_llm": 1.2, "normalisation": "rms",
         "lsink_scope": "layer"}
# Every kind of gate; `oracle@2:0.3/0.5/0.9` is the 3-group (V-sink / L-sink / ordinary) oracle.
SPECS = ["var", "vaf@1-2", "spear@2", "outro", "oracle@2:0.3", "oracle@2:0.3/0.5/0.9", "knockout@1", "mean-v@3",
         "zero-v@2", "var@2-3+oracle@1:0.2"]
# The same sinks as Hydra overrides of a `model=` group.
SINK_OVERRIDES = ["model.dtype=float32", "model.sinks.vit_dims=[0,1]", "model.sinks.llm_dims=[0,1]",
                  "model.sinks.tau_vit=1.5", "model.sinks.tau_llm=1.2"]

QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]


def word_tokenizer(special: list[str], eos: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary plus `special` tokens."""
    words = ["<pad>", "<unk>", *special, *TINY_VOCAB]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token=eos)
    fast.add_special_tokens({"additional_special_tokens": special})
    return fast


def save_checkpoint(folder: Path, model, processor, tokenizer, eos_token_id=None) -> Path:
    """`folder` holding `model` and `processor` as `save_pretrained` writes them, the model's
    generation config padding with the tokenizer's pad token and stopping at `eos_token_id` (the
    tokenizer's eos by default)."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def qwen_processor(tokenizer, image_size: int, patch_size: int = 8, merge_size: int = 2):
    """The Qwen2-VL / Qwen3-VL images-only processor (`PilQwenProcessor`, ChatML) resizing every
    image to `image_size` x `image_size` px, `patch_size` px patches merged `merge_size` x `merge_size`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lsg.families.qwen2_vl import CHATML_TEMPLATE, PilQwenProcessor

    pixels = image_size * image_size
    return PilQwenProcessor(
        Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=patch_size, merge_size=merge_size,
                                 temporal_patch_size=2), tokenizer, CHATML_TEMPLATE)


def save_tiny_qwen2_vl(folder: Path, seed: int = 0, num_layers: int = 4, image_size: int = 32,
                       version: str = "2") -> Path:
    """A Qwen2-VL (`version="2"`) or Qwen2.5-VL (`"2.5"`) with 4 decoder layers (hidden 64, M-RoPE
    sections 2/3/3), a 2-block ViT with 8 px patches and the 2x2 merger; images resized to
    `image_size` px. Qwen2.5-VL's ViT attends within 32 px windows (2x2 merged tokens) in block 0
    and globally in block 1, so with 64 px images its window order differs from image order."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(QWEN_SPECIAL, eos="<|im_end|>")
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if version == "2":
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    else:
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=32,
                      fullatt_block_indexes=[1])
    config = config_class(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"))
    return save_checkpoint(folder, model_class(config), qwen_processor(tokenizer, image_size), tokenizer)


ONEVISION_TEMPLATE = (  # Qwen2's chat format with LLaVA's "<image>" placeholder
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_onevision(folder: Path, seed: int = 0, num_layers: int = 4) -> Path:
    """A LLaVA-OneVision with a 2-layer SigLIP (32 px crops, 8 px patches: 16 tokens per crop), a
    4-layer Qwen2 decoder, AnyRes grid pinpoints 32x32 ... 64x64 (so a wide image has a base crop
    and two sub-crops, unpadded to its aspect ratio, with a newline per row)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from lsg.families.llava_onevision import pil_processor_class

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>")
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints,
                                                      do_pad=True)
    tokenizer.chat_template = ONEVISION_TEMPLATE
    processor = pil_processor_class()(image_processor, tokenizer, chat_template=ONEVISION_TEMPLATE,
                                      num_image_tokens=16, vision_feature_select_strategy="full")
    return save_checkpoint(folder, model, processor, tokenizer)


def real(hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """`(N_real, D)` hidden states of the real (unpadded) tokens of `(B, T, D)`."""
    return hidden[batch["attention_mask"].bool()]


def decoder_inputs(bb, batch, plant=None) -> torch.Tensor:
    """`(B, T, D)` input embeddings of the decoder (the model's own placement of every image
    feature among the text's), with `plant` as a forward hook on the ViT if given."""
    seen = {}
    lm = bb.family.language_model(bb.model)
    handles = [lm.register_forward_pre_hook(lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True)]
    if plant is not None:
        handles.append(bb.family.vit_module(bb.model).register_forward_hook(plant))
    try:
        with torch.no_grad():
            bb.model(**bb.model_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
    return seen["embeds"]


def load_tiny(model: str, folder: Path, **kwargs):
    """The tiny checkpoint in `folder` loaded through the user path with the `model` config, in
    float32 with the tiny `SINKS` (`kwargs`: e.g. `attn_implementation="eager"`)."""
    return lsg.load_backbone(model, hf_id=str(folder), dtype="float32", sinks=SINKS, **kwargs)


def assert_padding_invariant(bb, make_batch, spec: str = "oracle@2:0.3/0.5/0.9+var@1", check=None) -> None:
    """Under the gate stack `spec`, the answer loss of the left-padded batch equals that of the
    right-padded one (`make_batch(side)` builds them; `check(batch)`, if given, asserts on each
    before the forward)."""
    from lsg.scoring import answer_loss
    from lsg.specs import parse_stack

    stack = parse_stack(spec, bb)
    losses = {}
    for side in ("left", "right"):
        batch = make_batch(side)
        if check is not None:
            check(batch)
        with torch.no_grad(), lsg.attach(bb, stack.layers):
            losses[side] = answer_loss(bb, batch)
    torch.testing.assert_close(losses["left"], losses["right"], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def assert_suffix_matches_full_forward(bb, batch, spec):
    """The decoder's last hidden state of the real tokens of `batch` run as a suffix from the
    prefix at the stack's first layer (`compute_prefixes` + `run_suffix`) equals the whole forward
    with the stack attached. `spec`: a gate spec, or a `{layer: [gates]}` stack.

    Returns:
        (the stack `{layer: [gates]}`, the prefix, the whole gated forward's hidden state).
    """
    from lsg.prefix import compute_prefixes, run_suffix
    from lsg.scoring import decoder_hidden
    from lsg.specs import parse_stack

    layers = parse_stack(spec, bb).layers if isinstance(spec, str) else spec
    with lsg.attach(bb, layers):
        plain = decoder_hidden(bb, batch)
    start = min(layers)
    prefix = compute_prefixes(bb, batch, [start])[0][start]
    torch.testing.assert_close(real(run_suffix(bb, prefix, layers), batch), real(plain, batch), atol=2e-5, rtol=1e-4)
    return layers, prefix, plain


@torch.no_grad()
def assert_cached_suffix_matches_full_forward(bb, layers, batch, other, keys, disk_dir=None):
    """The per-sample prefix cache at the stack's first layer, filled from `batch` (sample keys
    "a", "b", ...) and read back for `other` (the samples `keys` of it, in another batch width
    and padding side), serves every one of them from the cache, and the suffix run from it equals
    the whole forward of `other` with the stack attached. With `disk_dir`, the entries are
    flushed to shards there and read back by a new cache.

    Returns:
        the reassembled prefix of `other`.
    """
    from lsg.prefix import PrefixCache, run_suffix
    from lsg.scoring import decoder_hidden

    start = min(layers)
    cache = PrefixCache(bb, start, disk_dir=disk_dir)
    cache.prefix(batch, [chr(ord("a") + i) for i in range(batch["input_ids"].shape[0])])
    cache.flush()
    cache = PrefixCache(bb, start, disk_dir=disk_dir) if disk_dir else cache
    cached = cache.prefix(other, keys)
    assert cache.stats()["hits"] == len(keys)
    with lsg.attach(bb, layers):
        plain_other = decoder_hidden(bb, other)
    torch.testing.assert_close(real(run_suffix(bb, cached, layers), other), real(plain_other, other),
                               atol=2e-5, rtol=1e-4)
    return cached


def assert_maps_match_eager(bb, eager, questions, vit: bool = False, visual_mass: bool = False):
    """`lsg.analysis.data.observe` on `bb` (SDPA, inside `attach`; every layer and group, the last
    prompt token, batches of 2) against transformers' eager `output_attentions=True` weights of the
    same checkpoint loaded with eager attention (`eager`): each question's maps equal the last
    prompt row over the visual tokens; with `visual_mass`, the attention mass of the visual groups
    (V-sink, L-sink, ordinary) equals that row's sum over the visual tokens, head-averaged.

    With `vit`, `observe` also reads the ViT profile, and the eager forward keeps the family's
    `vit_features` of the batch (for `assert_vit_profile_matches`).

    Returns:
        (observations, the eager batch, its `Segments`, the ViT features `(N_patches, D)` or None).
    """
    from lsg.analysis.data import available_groups, observe
    from lsg.segments import Segments

    layers = list(range(bb.num_layers))
    groups = available_groups(bb)
    obs = observe(bb, questions, None, layers, groups, "last", batch_size=2, vit=vit)
    batch = eager.build_batch([r.load_image() for r in questions], [r.question for r in questions])
    feats, handle = [], None
    if vit:
        handle = eager.family.vit_module(eager.model).register_forward_hook(lambda m, a, k, out: feats.append(
            eager.family.vit_features(eager.model, a, k, out)), with_kwargs=True)
    try:
        with torch.no_grad():
            attn = torch.stack(eager.model(**eager.model_inputs(batch), output_attentions=True).attentions)
    finally:
        if handle is not None:
            handle.remove()
    seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], bb.image_token_id)
    vis_groups = [groups.index(g) for g in ("vsink", "lsink", "ordinary") if g in groups]
    for b, o in enumerate(obs):
        rows = attn[:, b, :, seg.last_prompt[b]]  # (L, H, T)
        np.testing.assert_allclose(np.stack([o.maps[l] for l in layers]), rows[:, :, seg.vis[b]].numpy(),
                                   atol=2e-5, rtol=1e-4)
        if visual_mass:
            np.testing.assert_allclose(np.nansum(o.attn_mass[:, vis_groups], 1),
                                       rows.mean(1)[:, seg.vis[b]].sum(-1).numpy(), atol=2e-5)
    return obs, batch, seg, (feats[0] if vit else None)


def assert_vit_profile_matches(obs, per_image_feats) -> None:
    """Each observation's ViT profile (mean |x| of its image's V-sink patches, then of the others;
    NaN where a set is empty) equals that of its image's ViT features `(N_i, D)` split by hand,
    V-sinks flagged with the tiny `SINKS`."""
    for o, x in zip(obs, per_image_feats):
        sink = x[:, SINKS["vit_dims"]].abs().amax(-1) / x.pow(2).mean(-1).sqrt() >= SINKS["tau_vit"]
        hand = [x[sel].abs().mean(0) if sel.any() else torch.full((x.shape[1],), torch.nan) for sel in (sink, ~sink)]
        np.testing.assert_allclose(o.vit_abs_x, torch.stack(hand).numpy(), rtol=1e-5, atol=1e-6)


def assert_gate_refused_by(bb, other, tmp_path: Path, match: str) -> None:
    """An LSG gate checkpoint saved for `bb` (its name, fingerprint and sinks, layer 2) is refused
    when loaded as a gate spec for `other`, a backbone of another family, with an error matching
    `match` (the checkpoint's backbone)."""
    from lsg.gates import LSGGate
    from lsg.specs import parse_stack

    gate = LSGGate(bb.hidden_size, "vsink-lsink-ordinary")
    gate.save(tmp_path / "g.safetensors", backbone=bb.name, backbone_fingerprint=bb.fingerprint, layer=2,
              sinks=bb.sinks.to_dict())
    with pytest.raises(ValueError, match=match):
        parse_stack(f"lsg:{tmp_path / 'g.safetensors'}", other)


def check_user_commands(tmp_path: Path, folder: Path, model: str) -> None:
    """train (a 3-group LSG gate at layer 2), eval with every gate on a data split with the
    overhead column, eval on the shapes benchmark by option letters and by KV-cache generation,
    overhead, calibrate: each as a user runs it (`tests.hand.run_app`), in `tmp_path`, on the
    checkpoint in `folder` loaded through the `model` config with the tiny sinks."""
    from tests.hand import run_app

    model_args = [f"model={model}", *SINK_OVERRIDES, f"model.hf_id={folder}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    app = lambda name, *overrides: run_app(name, *model_args, *overrides, cwd=tmp_path)  # noqa: E731
    data = [f"data.root={tmp_path / 'shapes'}", "data.n_val=14"]
    shapes = [f"benchmark.root={tmp_path / 'shapes'}", "benchmark.n=14"]
    export = tmp_path / "ck" / "lsg-L2.safetensors"
    app("train", "logger=none", "layer=2", "gate.grouping=vsink-lsink-ordinary", *data, "data.n_train=16",
        f"run_dir={tmp_path / 'run'}", f"export_path={export}", "batch_size=4", "effective_batch_size=8", "epochs=1",
        "export_epoch=1")
    assert json.loads(export.with_suffix(".json").read_text())["backbone"] == model
    gates = ["var", "vaf@1-2", "spear@2", "outro", "oracle@2:0.3", "knockout@1", "mean-v@3", "zero-v@2", f"lsg:{export}"]
    result = app("eval", "logger=none", *shapes, "benchmark.mode=choice", f"out_dir={tmp_path / 'compare'}",
                 "batch_size=7", "overhead=true", "timing_batches=1", "timing_repeats=1", "bootstrap_samples=100",
                 f"gates=[{','.join(gates)}]")
    assert "overhead x" in (tmp_path / "compare" / "results.md").read_text() and "lsg:" in result.stdout
    rows = json.loads((tmp_path / "compare" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", *gates]
    result = app("overhead", "batch=2", "new_tokens=2", "repeats=1", "specs=[none,var,oracle@1:0.3]")
    assert "| var |" in result.stdout and "| oracle@1:0.3 |" in result.stdout
    out = tmp_path / "evaluate-generate"
    app("eval", "logger=none", *shapes, "benchmark.mode=generate", "benchmark.max_new_tokens=2", f"out_dir={out}",
        "gates=[var,oracle@2:0.3]", "batch_size=7", "bootstrap_samples=100")
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "var", "oracle@2:0.3"]
    assert "sinks:" in app("calibrate", *data, "n_samples=4").stdout
