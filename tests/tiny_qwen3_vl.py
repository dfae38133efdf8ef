"""A tiny random Qwen3-VL checkpoint in the hub's exact format (`save_pretrained` of the real
`Qwen3VLForConditionalGeneration` and of its processor, a tokenizer built offline), loadable as a
user loads one: `lsg.load_backbone("qwen3-vl", hf_id=<folder>)` or `model=qwen3-vl model.hf_id=<folder>`."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_families import QWEN_SPECIAL, qwen_processor, save_checkpoint, word_tokenizer

# ViT blocks whose outputs DeepStack adds into decoder layers 0, 1 (block i -> decoder layer i).
DEEPSTACK_VISUAL_INDEXES = [0, 1]
PATCH_PX = 8  # ViT patch side
MERGE = 2  # spatial_merge_size: a visual token is a 2x2 block of patches


def save_tiny_qwen3_vl(folder: Path, seed: int = 0, num_layers: int = 4, image_size: int = 48) -> Path:
    """A Qwen3-VL with `num_layers` decoder layers (hidden 64, 4 heads of 16, 2 KV heads, interleaved
    M-RoPE sections 2/3/3), a 3-block ViT (8 px patches, the 2x2 merger) whose blocks 0 and 1 feed
    DeepStack into decoder layers 0 and 1, and images resized to `image_size` px (48 px: 6x6
    patches, 3x3 visual tokens).

    Returns:
        `folder`, holding config.json, the weights, the image processor, tokenizer and chat template.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(QWEN_SPECIAL, eos="<|im_end|>")
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH_PX,
                  spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=DEEPSTACK_VISUAL_INDEXES)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"))
    return save_checkpoint(folder, Qwen3VLForConditionalGeneration(config),
                           qwen_processor(tokenizer, image_size, PATCH_PX, MERGE), tokenizer)
