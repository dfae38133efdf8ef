"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, LLaVA-1.6): a CLIP ViT + a LLaMA-family
decoder (Mistral-7B for `llava-hf/llava-v1.6-mistral-7b-hf`) with AnyRes tiling.

An image is a base crop (the whole image resized) plus a grid of sub-crops chosen among
`image_grid_pinpoints`, each encoded by the ViT; the projector reads hidden state
`vision_feature_layer` (-2) without the CLS token (`vision_feature_select_strategy: default`).
The sub-crop grid is stitched, unpadded to the image's aspect ratio and given an
`image_newline` token at the end of every row (no `anyres_max` shrinking, unlike OneVision).

Visual tokens (the `vis` segment, `lsg.segments`) are every token carrying the image token id:
the base crop's patches, the stitched sub-crop patches and the newline tokens. V-sinks are read
on every crop at the feature layer (CLIP-ViT-L/14-336 dim 650) and mapped to token positions by
running the model's own `pack_image_features` on the patch flags, with -1 as the newline
"feature", exactly as `LlavaOnevisionFamily` does: the map follows the model's crop order and
unpadding, and a newline is never a V-sink.

Its processor has no video processor, so `AutoProcessor` loads it without torchvision (then with
transformers' PIL image processor).
"""

from __future__ import annotations

import torch

from lsg.families.base import Family, register_family
from lsg.families.llava_onevision import NEWLINE_FLAG, LlavaOnevisionFamily


@register_family
class LlavaNextFamily(LlavaOnevisionFamily):
    """OneVision's AnyRes layout, packed by LLaVA-NeXT's `pack_image_features` (which takes the
    feature-selection strategy instead of OneVision's `vision_aspect_ratio`)."""

    name = "llava-next"
    model_types = ("llava_next",)
    model_class = "LlavaNextForConditionalGeneration"

    def load_processor(self, hf_id: str, model):
        return Family.load_processor(self, hf_id, model)  # AutoProcessor: no video processor to replace

    def pack(self, model, crops: list[torch.Tensor], image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """`LlavaOnevisionFamily.pack` through LLaVA-NeXT's `pack_image_features`: per image,
        `(N_visual_tokens, 1)` values in token order, `NEWLINE_FLAG` on newlines."""
        packed, _ = model.model.pack_image_features(
            crops, image_sizes, vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            image_newline=crops[0].new_full((1,), NEWLINE_FLAG))
        return packed
