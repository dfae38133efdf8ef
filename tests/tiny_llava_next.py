"""A tiny random LLaVA-NeXT (`LlavaNextForConditionalGeneration`) in the hub's exact format, for
loading through the user path `load_backbone("llava-next", hf_id=<folder>)`."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_families import save_checkpoint, word_tokenizer

# llava-hf/llava-v1.6-mistral-7b-hf's conversation format: "[INST] <image>\n{question} [/INST]",
# the answer after a space, ended by "</s>".
MISTRAL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}\n"
    "{% elif message['role'] == 'user' %}[INST] "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} [/INST]"
    "{% else %} {{ message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}"
)
PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # (height, width): every image gets a base crop + 2 or 4 sub-crops


def save_tiny_llava_next(folder: Path, seed: int = 0, num_layers: int = 4) -> Path:
    """A LLaVA-NeXT with a 2-layer CLIP ViT (32 px crops, 8 px patches: 16 patches + CLS per crop,
    read at layer -2 without the CLS as the hub's), a `num_layers`-layer Mistral decoder (hidden
    64) and AnyRes pinpoints 32x64, 64x32, 64x64: a square image gets a base crop and 2x2
    sub-crops, a 2:1 image a base crop and 1x2 sub-crops, each stitched row ended by an
    `image_newline` token."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(["<image>", "[INST]", "[/INST]", "<s>", "</s>"], eos="</s>")
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, sliding_window=None, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=16)
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=PINPOINTS, do_pad=True)
    tokenizer.chat_template = MISTRAL_TEMPLATE
    processor = LlavaNextProcessor(image_processor, tokenizer, patch_size=8, vision_feature_select_strategy="default",
                                   chat_template=MISTRAL_TEMPLATE, num_additional_image_tokens=1)
    return save_checkpoint(folder, model, processor, tokenizer)
