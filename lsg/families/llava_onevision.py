"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP + Qwen2 with AnyRes tiling.

An image is a base crop (the whole image resized) plus a grid of sub-crops, each encoded by
the ViT; the sub-crop grid is stitched, unpadded to the image's aspect ratio, shrunk when it
exceeds `anyres_max_9`, and given an `image_newline` token at the end of every row. Every
one of these tokens (newlines included) carries the image token id.

V-sinks are read on every crop at the feature layer (SigLIP dim 1076, paper Appendix E) and
mapped to token positions by running the model's own packing (`pack_image_features`) on the
patch flags instead of the features, with -1 as the newline "feature": so the mapping follows
exactly the model's crop order, unpadding and newlines, and a newline is never a V-sink. Where
the grid is shrunk (bilinear), a token is a V-sink if its interpolated flag is at least 0.5.
"""

from __future__ import annotations

import numpy as np
import torch

from lsg.families.base import Family, register_family, require_outputs

NEWLINE_FLAG = -1.0  # what a newline token's "feature" is while mapping flags


def pil_processor_class():
    """`LlavaOnevisionProcessor` without its video processor (which needs torchvision): the
    library's own image-token counting and prompt expansion, with the PIL image processor."""
    from transformers import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    class PilOnevisionProcessor(LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, vision_aspect_ratio="anyres_max_9", **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.num_image_tokens = num_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.vision_aspect_ratio = vision_aspect_ratio
            self.image_token = getattr(tokenizer, "image_token", None) or "<image>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<video>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    return PilOnevisionProcessor


@register_family
class LlavaOnevisionFamily(Family):
    name = "llava-onevision"
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    image_inputs = ("pixel_values", "image_sizes")
    layout_inputs = ("image_sizes",)  # the crop grid of each image

    def load_processor(self, hf_id: str, model):
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            return super().load_processor(hf_id, model)
        from transformers import AutoTokenizer
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        tokenizer, config = AutoTokenizer.from_pretrained(hf_id), model.config
        side = config.vision_config.image_size // config.vision_config.patch_size  # patches per crop side
        return pil_processor_class()(
            LlavaOnevisionImageProcessorPil.from_pretrained(hf_id), tokenizer, chat_template=tokenizer.chat_template,
            num_image_tokens=side * side, vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio)

    def vit_module(self, model) -> torch.nn.Module:
        return model.model.vision_tower

    def vit_features(self, model, args: tuple, kwargs: dict, output) -> torch.Tensor:
        feats = output.hidden_states[model.config.vision_feature_layer]  # (crops, L, D)
        if model.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return feats.reshape(-1, feats.shape[-1])

    def layout_calls(self, model) -> list[tuple[torch.nn.Module, str]]:
        return [(model.model, "get_image_features")]  # generate() calls it with image_sizes before any forward

    def patch_side(self, model) -> int:
        """ViT patches per crop side."""
        return model.config.vision_config.image_size // model.config.vision_config.patch_size

    def crops(self, model, image_sizes) -> list[int]:
        """Per image of `image_sizes (N_images, 2)`, its crops (base + AnyRes sub-crops), as the model
        counts them (`image_size_to_num_patches`)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        config = model.config
        return [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                for size in image_sizes]

    def patches_per_image(self, model, batch: dict) -> list[int]:
        """Per sample, its crops (`crops`) x `side^2` patches."""
        return [n * self.patch_side(model) ** 2 for n in self.crops(model, batch["image_sizes"])]

    def patches_to_tokens(self, model, patch_flags: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        if inputs is None or inputs.get("image_sizes") is None:
            raise ValueError(f"Family '{self.name}' maps ViT patches to tokens with the batch's image_sizes; "
                             f"this call gave none (pass the batch's image_sizes, Family.layout_inputs).")
        flags = patch_flags.float().reshape(-1, self.patch_side(model) ** 2, 1)
        packed = self.pack(model, list(torch.split(flags, self.crops(model, inputs["image_sizes"]))),
                           inputs["image_sizes"])
        return torch.cat([p[:, 0] >= 0.5 for p in packed])

    def pack(self, model, crops: list[torch.Tensor], image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """The model's own `pack_image_features` run on per-crop values instead of features.

        Args:
            crops: per image, `(n_crops, side * side, 1)` values of its crops' patches.
            image_sizes: `(N_images, 2)` (height, width) of the original images.

        Returns:
            per image, `(N_visual_tokens, 1)`: the values in token order, `NEWLINE_FLAG` on newlines.
        """
        packed, _ = model.model.pack_image_features(crops, image_sizes,
                                                    image_newline=crops[0].new_full((1,), NEWLINE_FLAG),
                                                    vision_aspect_ratio=model.config.vision_aspect_ratio)
        return packed

    def token_grid(self, model, batch: dict) -> list[torch.Tensor]:
        """Panel 0: the base crop's `side x side` grid; panel 1: the stitched AnyRes sub-crop grid
        as packed (unpadded, shrunk, rows ended by a newline: -1). Read by running the model's own
        `pack_image_features` on a base-crop flag, as `patches_to_tokens` does."""
        side = self.patch_side(model)
        out = []
        for size, n_crops in zip(batch["image_sizes"], self.crops(model, batch["image_sizes"])):
            flags = torch.zeros(n_crops, side * side, 1)
            flags[0] = 1.0  # the base crop
            flag = self.pack(model, [flags], size[None])[0][:, 0]
            base, newline = flag > 0.5, flag < -0.5
            coords = torch.full((len(flag), 3), -1, dtype=torch.long)
            k = torch.arange(int(base.sum()))
            coords[base] = torch.stack([torch.zeros_like(k), k // side, k % side], 1)
            grid = ~base & ~newline
            row = torch.cumsum(newline.long(), 0) - newline.long()  # newlines before each token
            idx = torch.arange(len(flag))
            col = idx - torch.cummax(torch.where(newline | base, idx, -1), 0).values - 1  # since the row began
            coords[grid] = torch.stack([torch.ones_like(row[grid]), row[grid], col[grid]], 1)
            out.append(coords)
        return out

    def pixel_inputs(self, encoding: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`pixel_values (B, max crops, 3, H, W)` (each image's crops, zero-padded to the most
        crops) and `image_sizes (B, 2)`.

        Raises:
            ValueError: the processor gave no `pixel_values` or no `image_sizes`.
        """
        require_outputs(encoding, self.image_inputs, self.name)
        crops = [np.asarray(p) for p in encoding["pixel_values"]]  # per image: (n_crops, 3, H, W)
        most = max(c.shape[0] for c in crops)
        stacked = np.zeros((len(crops), most, *crops[0].shape[1:]), dtype=crops[0].dtype)
        for i, c in enumerate(crops):
            stacked[i, :c.shape[0]] = c  # the model keeps each image's own crops (from image_sizes)
        return {"pixel_values": torch.as_tensor(stacked).to(dtype),
                "image_sizes": torch.as_tensor(np.asarray(encoding["image_sizes"]))}
