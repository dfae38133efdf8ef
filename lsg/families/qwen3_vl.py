"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2.5-VL's layout (native-resolution ViT, 2x2
patch merger, M-RoPE, here interleaved) plus DeepStack.

- Visual tokens: the `<|image_pad|>` run of each image, one token per 2x2 block of ViT patches
  (the `vis` segment: tokens carrying the image token id). The `<|vision_start|>` and
  `<|vision_end|>` markers around it carry other ids, so they are never visual tokens and never
  V-sinks.
- V-sink feature layer: the last ViT block's output (`visual(...).last_hidden_state`,
  `(N_patches, D_vit)`), which the merger reads; the image processor orders patches so that
  each visual token is 4 consecutive patches, and a token is a V-sink if any of its 4 patches is
  (as Qwen2-VL). The DeepStack features (block outputs of `deepstack_visual_indexes`, each
  through its own merger) are not read for V-sinks.
- DeepStack: after decoder layer i (i < len(deepstack_visual_indexes)), the language model adds
  DeepStack feature i to the hidden state at the visual positions. So the hidden state entering
  layer l (what sink values and a gate's `prepare` read, from a pre-hook on the layer) already
  holds the additions of layers < l. transformers' `output_hidden_states[l]` (l >= 1) is layer
  l-1's output *before* its addition, so it differs from layer l's input at the visual tokens
  for l <= number of DeepStack layers. `layer_additions` hands the additions to
  `lsg.prefix`, so a suffix run from layer l adds those of layers >= l as the model does.
- Positions: M-RoPE ids `(3, B, T)` that the model builds from `input_ids`, `image_grid_thw`,
  `mm_token_type_ids` and the mask (both paddings give real tokens the same positions).

Without torchvision the processor is `PilQwenProcessor` (the Qwen2-VL PIL image processor, which
is also the hub checkpoints' image processor class, with the tokenizer's prompt expansion).
"""

from __future__ import annotations

import torch

from lsg.families.base import register_family
from lsg.families.qwen2_vl import Qwen2VLFamily


@register_family
class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3-vl"
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"

    def layer_additions(self, model, language_kwargs: dict, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        """DeepStack: `{decoder layer i: (B, T, D)}` the language model adds to layer i's output,
        DeepStack feature i at the visual positions (`visual_pos_masks`) and zero elsewhere.

        Args:
            language_kwargs: the keyword arguments of the language model's call (Qwen3-VL's
                `Qwen3VLTextModel.forward`: `visual_pos_masks (B, T)`, `deepstack_visual_embeds`,
                a list of `(N_visual, D)`).
            hidden: `(B, T, D)` the language model's input embeddings (shape, dtype, device).

        Returns:
            empty without images (no DeepStack input in the call).
        """
        embeds, where = language_kwargs.get("deepstack_visual_embeds"), language_kwargs.get("visual_pos_masks")
        if embeds is None or where is None:
            return {}
        out = {}
        for layer, feats in enumerate(embeds):
            dense = torch.zeros_like(hidden)
            dense[where.to(hidden.device)] = feats.to(hidden.device, hidden.dtype)
            out[layer] = dense
        return out
