"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP ViT, a projector, a LLaMA-family decoder.

One image is one fixed grid of ViT patches; the projector reads hidden state
`vision_feature_layer` of the ViT (-2 for LLaVA-1.5) without its CLS token
(`vision_feature_select_strategy: default`), so patch k is visual token k. The embedded
`smol-llava` and the test backbone `tiny-random` are built on the same classes.
"""

from __future__ import annotations

import numpy as np
import torch

from lsg.families.base import Family, register_family

# LLaVA-1.5's own conversation template (`conv_vicuna_v1` in haotian-liu/LLaVA): the system
# prompt, then "USER: <image>\n{question} ASSISTANT: {answer}</s>" per turn. The hub
# checkpoints' chat template has no system prompt; `chat_template: hub` keeps it.
LLAVA_15_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TEMPLATES = {"llava-1.5": LLAVA_15_TEMPLATE}


@register_family
class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    templates = TEMPLATES

    def load_processor(self, hf_id: str, model):
        from transformers import LlavaProcessor

        return LlavaProcessor.from_pretrained(hf_id)

    def vit_module(self, model) -> torch.nn.Module:
        return model.model.vision_tower

    def vit_features(self, model, args: tuple, kwargs: dict, output) -> torch.Tensor:
        feats = output.hidden_states[model.config.vision_feature_layer]
        if model.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # the CLS token is not projected
        return feats.reshape(-1, feats.shape[-1])

    def pixel_inputs(self, encoding: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.as_tensor(np.stack(encoding["pixel_values"])).to(dtype)}
