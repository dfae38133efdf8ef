"""A tiny random InternVL (`InternVLForConditionalGeneration`) in the hub's `-hf` format, for
loading through the user path `load_backbone("internvl3", hf_id=<folder>)`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from tests.tiny_families import save_checkpoint, word_tokenizer

# OpenGVLab/InternVL3-*-hf's chat format: ChatML, an image as "<IMG_CONTEXT>\n" (the processor
# expands it into <img> + one <IMG_CONTEXT> per token of every tile + </img>).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The tokenizer attributes InternVLProcessor reads (the hub tokenizer's named special tokens).
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}


def save_tiny_internvl(folder: Path, seed: int = 0, num_layers: int = 4, max_tiles: int = 4) -> Path:
    """An InternVL with a 2-layer InternViT (32 px tiles, 8 px patches: 4x4 patches + CLS, pixel
    shuffle 0.5: 2x2 = 4 tokens a tile) and a `num_layers`-layer Qwen2 decoder (hidden 64).
    Images are cut into 1..`max_tiles` tiles plus a thumbnail: a square image into 2x2 tiles +
    thumbnail (20 tokens), a 96x60 one into 2x1 tiles + thumbnail (12 tokens)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    from lsg.families.internvl import pil_processor_class

    torch.manual_seed(seed)
    words = word_tokenizer([*NAMED_TOKENS.values(), "<|im_start|>", "<|im_end|>"], eos="<|im_end|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words.backend_tokenizer, unk_token="<unk>",
                                        pad_token="<pad>", eos_token="<|im_end|>", extra_special_tokens=NAMED_TOKENS)
    tokenizer.chat_template = INTERNVL_TEMPLATE
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[32, 32], patch_size=[8, 8]),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False),
        image_token_id=tokenizer.context_image_token_id, image_seq_length=4, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    model = InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                               max_patches=max_tiles)
    processor = pil_processor_class()(image_processor, tokenizer, image_seq_length=4, chat_template=INTERNVL_TEMPLATE)
    save_checkpoint(folder, model, processor, tokenizer)
    # the hub's processor class (what AutoProcessor loads where torchvision is installed)
    path = Path(folder) / "processor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "processor_class": "InternVLProcessor"}, indent=2))
    return Path(folder)
