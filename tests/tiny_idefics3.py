"""Tiny random Idefics3 and SmolVLM checkpoints in the hub's format, from transformers' own classes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, pre_tokenizers

from tests.tiny_families import save_checkpoint, word_tokenizer

# The chat format of the hub checkpoints (Idefics3-8B-Llama3 starts with <|begin_of_text|>,
# SmolVLM2 with <|im_start|>): "User:<image>question<end_of_utterance>\nAssistant: answer...".
CHAT_TEMPLATE = (
    "{bos}{{% for message in messages %}}{{{{message['role'] | capitalize}}}}"
    "{{% if message['content'][0]['type'] == 'image' %}}{{{{':'}}}}{{% else %}}{{{{': '}}}}{{% endif %}}"
    "{{% for line in message['content'] %}}{{% if line['type'] == 'text' %}}{{{{line['text']}}}}"
    "{{% elif line['type'] == 'image' %}}{{{{ '<image>' }}}}{{% endif %}}{{% endfor %}}<end_of_utterance>\n"
    "{{% endfor %}}{{% if add_generation_prompt %}}{{{{ 'Assistant:' }}}}{{% endif %}}"
)
VARIANTS = {"idefics3": "<|begin_of_text|>", "smolvlm": "<|im_start|>"}  # family -> the template's first token
IMAGE_PX, TILE_PX, PATCH_PX, SCALE = 64, 32, 4, 2  # longest edge, sub-image side, ViT patch, pixel-shuffle factor
ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def save_tiny_idefics3(folder: Path, seed: int = 0, num_layers: int = 4, family: str = "idefics3") -> Path:
    """An Idefics3 (`family="idefics3"`) or SmolVLM (`"smolvlm"`) with a 2-layer ViT on 32 px tiles
    of 4 px patches (8 x 8 patches), the 2x pixel-shuffle connector (16 tokens per tile), and a
    4-layer Llama decoder (hidden 64). Images are resized to a 64 px longest edge and cut into
    32 px sub-images, so a square image is 2 x 2 sub-images + the global image (5 tiles, 80
    visual tokens) and a 2:1 one 1 x 2 + the global image. SmolVLM's processor is written as the
    hub writes it (`SmolVLMProcessor` with a video processor); this machine has no torchvision or
    num2words to build one, so the images-only `PilSmolVLMProcessor` is built and saved instead."""
    import transformers

    torch.manual_seed(seed)
    bos = VARIANTS[family]
    special = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", bos, *ROW_COL]
    tokenizer = word_tokenizer(special, eos="<end_of_utterance>")
    # keep "\n" as a token (the processor ends each row of sub-images with one), drop other whitespace
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated"),
         pre_tokenizers.Punctuation()])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=TILE_PX, patch_size=PATCH_PX)
    processor_kwargs = dict(size={"longest_edge": IMAGE_PX}, max_image_size={"longest_edge": TILE_PX},
                            do_image_splitting=True)
    image_seq_len = (TILE_PX // PATCH_PX // SCALE) ** 2
    tokenizer.chat_template = CHAT_TEMPLATE.format(bos=bos)
    if family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        config = transformers.Idefics3Config(text_config=text, vision_config=vision, image_token_id=image_id,
                                             scale_factor=SCALE)
        model = transformers.Idefics3ForConditionalGeneration(config)
        processor = transformers.Idefics3Processor(Idefics3ImageProcessorPil(**processor_kwargs), tokenizer,
                                                   image_seq_len=image_seq_len, chat_template=tokenizer.chat_template)
    else:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        from lsg.families.idefics3 import smolvlm_processor_class

        config = transformers.SmolVLMConfig(text_config=text, vision_config=vision, image_token_id=image_id,
                                            scale_factor=SCALE)
        model = transformers.SmolVLMForConditionalGeneration(config)
        processor = smolvlm_processor_class()(SmolVLMImageProcessorPil(**processor_kwargs), tokenizer,
                                              image_seq_len=image_seq_len, chat_template=tokenizer.chat_template)
    save_checkpoint(folder, model, processor, tokenizer)
    if family == "smolvlm":  # the hub's processor_config.json: SmolVLMProcessor, with its video processor
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        path = Path(folder) / "processor_config.json"
        saved = json.loads(path.read_text())
        saved.update(processor_class="SmolVLMProcessor", video_processor=SmolVLMVideoProcessor().to_dict())
        path.write_text(json.dumps(saved, indent=2))
    return Path(folder)
