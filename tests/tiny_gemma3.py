"""A tiny random Gemma 3 in the hub's exact format (`save_pretrained` of model and processor),
for loading as a user would: `load_backbone("gemma3", hf_id=<folder>)` or `model=gemma3 model.hf_id=<folder>`."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_families import save_checkpoint, word_tokenizer

GEMMA3_SPECIAL = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>"]
# Layers 0, 1 and 3 attend within a window of 8 tokens, layer 2 globally (Gemma 3 has 5 sliding per global).
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
SLIDING_WINDOW = 8  # shorter than the 16 soft tokens of an image and than every prompt
IMAGE_PX, PATCH_PX, SOFT_TOKENS = 32, 4, 16  # 8 x 8 patches, pooled 2 x 2 into 4 x 4 soft tokens


def save_tiny_gemma3(folder: Path, seed: int = 0, num_layers: int = 4) -> Path:
    """A Gemma 3 with a 2-layer SigLIP (32 px images, 4 px patches: an 8 x 8 grid the projector
    average-pools 2 x 2 into 16 soft tokens), a Gemma 3 decoder of hidden 64 (4 heads of 16, 2 KV
    heads, `query_pre_attn_scalar` 24 so the logit scale is not 1/sqrt(head_dim)) whose layers
    follow `LAYER_TYPES` (window `SLIDING_WINDOW`), and the hub's processor and chat template
    (with its leading `{{ bos_token }}`; the tokenizer adds <bos>, its eos is <eos> as the hub's)."""
    from tokenizers import processors
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from lsg.families.gemma3 import GEMMA3_TEMPLATE

    torch.manual_seed(seed)
    words = word_tokenizer(GEMMA3_SPECIAL, eos="<eos>")
    words.backend_tokenizer.post_processor = processors.TemplateProcessing(  # Gemma's tokenizer adds <bos>
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", words.convert_tokens_to_ids("<bos>"))])
    tokenizer = type(words)(tokenizer_object=words.backend_tokenizer, unk_token="<unk>", pad_token="<pad>",
                            bos_token="<bos>", eos_token="<eos>",
                            extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                 "image_token": "<image_soft_token>"})
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=IMAGE_PX, patch_size=PATCH_PX),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                         sliding_window=SLIDING_WINDOW, layer_types=(LAYER_TYPES * num_layers)[:num_layers],
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=[ids("<eos>"), ids("<end_of_turn>")], bos_token_id=tokenizer.bos_token_id),
        mm_tokens_per_image=SOFT_TOKENS, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"))
    model = Gemma3ForConditionalGeneration(config)
    for norm in (m for m in model.modules() if type(m).__name__ == "Gemma3RMSNorm"):
        torch.nn.init.normal_(norm.weight, std=0.3)  # random norms (zeros at init: 1 + w = 1 everywhere)
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)  # zeros at init
    hub_template = "{{ bos_token }}" + GEMMA3_TEMPLATE
    tokenizer.chat_template = hub_template
    processor = Gemma3Processor(Gemma3ImageProcessorPil(size={"height": IMAGE_PX, "width": IMAGE_PX}), tokenizer,
                                chat_template=hub_template, image_seq_length=SOFT_TOKENS)
    return save_checkpoint(folder, model, processor, tokenizer, eos_token_id=[ids("<eos>"), ids("<end_of_turn>")])
