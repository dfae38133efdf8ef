"""InternVL 2.5 / 3 in transformers' format (`InternVLForConditionalGeneration`, the `-hf` hub
checkpoints): an InternViT, a pixel-shuffle projector and a Qwen2 decoder (InternVL3-8B: Qwen2.5-7B).

- An image is cut into tiles of the ViT's input size (a grid chosen for its aspect ratio among
  1..`max_patches` tiles, row by row) plus, when there are several, a thumbnail of the whole image
  as the last tile. Each tile is encoded alone; the projector reads hidden state
  `vision_feature_layer` (-1: the last) without the CLS token, pixel-shuffles each tile's
  `side x side` patch grid by `downsample_ratio` (0.5: every 2x2 block of patches becomes one
  token, `side / 2` tokens a side) and projects each token alone.
- The prompt holds `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`. The visual
  tokens (the `vis` segment, `lsg.segments`) are the `<IMG_CONTEXT>` tokens only, tile after tile
  (thumbnail last); `<img>` and `</img>` are text (`sys` before, `user` after) and never V-sinks.
- V-sinks: a merged token is a V-sink if any of its merged patches is (as Qwen2-VL's 2x2 merger).
  The map runs the model's own `pixel_shuffle` on the patch flags, so it follows the model's
  order exactly.

Its processor needs torchvision for videos; without it `PilInternVLProcessor` does the same
image-side work with transformers' PIL image processor (images only).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lsg.families.base import Family, register_family, require_outputs

FLAG_SET = 0.5  # a 0/1 patch flag carried as a float is set iff above this


def pil_processor_class():
    """`InternVLProcessor` without its video processor (which needs torchvision): the library's
    own tile counting and prompt expansion, with the PIL image processor."""
    import re

    from transformers import InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    class PilInternVLProcessor(InternVLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                     **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.image_seq_length = image_seq_length
            self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token, self.video_token = tokenizer.context_image_token, tokenizer.video_token
            self.image_token_id = tokenizer.context_image_token_id
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")

    return PilInternVLProcessor


@register_family
class InternVLFamily(Family):
    name = "internvl"
    model_types = ("internvl",)
    model_class = "InternVLForConditionalGeneration"
    image_inputs = ("pixel_values",)  # (N_tiles, 3, H, W): every image's tiles, image after image

    def load_processor(self, hf_id: str, model):
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            return super().load_processor(hf_id, model)
        import json
        from pathlib import Path

        from transformers import AutoTokenizer
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            GotOcr2ImageProcessorPil,
        )

        tokenizer = AutoTokenizer.from_pretrained(hf_id)
        config = Path(hf_id) / "processor_config.json"  # a folder's; for a hub id, the model's (the same there)
        seq = json.loads(config.read_text()).get("image_seq_length") if config.exists() else None
        return pil_processor_class()(GotOcr2ImageProcessorPil.from_pretrained(hf_id), tokenizer,
                                     image_seq_length=seq or model.config.image_seq_length,
                                     chat_template=tokenizer.chat_template)

    def vit_module(self, model) -> torch.nn.Module:
        return model.model.vision_tower

    def vit_features(self, model, args: tuple, kwargs: dict, output) -> torch.Tensor:
        """`(N_tiles * side^2, D_vit)`: the hidden state `get_image_features` reads (the last
        one for `vision_feature_layer: -1`), without the CLS token, tile after tile, each tile's
        patches in raster order.

        Raises:
            ValueError: a list of feature layers (concatenated features), which this map does not cover.
        """
        layer = model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: family '{self.name}' reads one ViT layer (an int).")
        feats = output.last_hidden_state if layer == -1 else output.hidden_states[layer]
        if model.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return feats.reshape(-1, feats.shape[-1])

    def patches_to_tokens(self, model, patch_flags: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """`(N_tiles * (side * r)^2,)` token flags from `(N_tiles * side^2,)` patch flags through
        the model's own `pixel_shuffle` (r = `downsample_ratio`): a token is a V-sink if any of
        the `1 / r^2` patches merged into it is."""
        side = self.patch_side(model)
        flags = patch_flags.float().reshape(-1, side, side, 1)
        merged = model.model.pixel_shuffle(flags, scale_factor=model.config.downsample_ratio)  # (tiles, s, s, 1/r^2)
        return (merged.reshape(-1, merged.shape[-1]) > FLAG_SET).any(-1)

    def patch_side(self, model) -> int:
        """ViT patches per tile side."""
        vision = model.config.vision_config
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        return size // patch

    def tokens_per_tile(self, model) -> int:
        """Visual tokens per tile: `(side x downsample_ratio)^2`."""
        return int(self.patch_side(model) * model.config.downsample_ratio) ** 2

    def patches_per_image(self, model, batch: dict) -> list[int]:
        """Per sample, its tiles (its visual tokens / `tokens_per_tile`) x `side^2` patches: images
        of one batch have different numbers of tiles, all in one `pixel_values`."""
        tiles = (batch["input_ids"] == self.image_token_id(model)).sum(1) // self.tokens_per_tile(model)
        return (tiles * self.patch_side(model) ** 2).tolist()

    def token_grid(self, model, batch: dict) -> list[torch.Tensor]:
        """One panel per tile, `s x s` tokens in raster order (s = side x `downsample_ratio`).
        Panel 0 is the whole image: the thumbnail (the last tile) when there are several tiles,
        else the single tile; panels 1.. are the tiles in the processor's order (row by row over
        the tile grid, whose shape the batch does not record).

        Raises:
            ValueError: a sample's visual tokens are not a whole number of tiles.
        """
        per_tile = self.tokens_per_tile(model)
        s = math.isqrt(per_tile)
        out = []
        for n in (batch["input_ids"] == self.image_token_id(model)).sum(1).tolist():
            if n % per_tile:
                raise ValueError(f"{n} visual tokens are not whole tiles of {per_tile} tokens (family "
                                 f"'{self.name}'): the processor's image_seq_length must match the model's ViT.")
            tiles = n // per_tile
            k = torch.arange(n)
            tile = k // per_tile
            panel = torch.where(tile == tiles - 1, 0, tile + 1) if tiles > 1 else torch.zeros_like(k)
            out.append(torch.stack([panel, k % per_tile // s, k % s], 1))
        return out

    def pixel_inputs(self, encoding: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`pixel_values (N_tiles, 3, H, W)`: the tiles of every image of the batch, in order.

        Raises:
            ValueError: the processor gave no `pixel_values`.
        """
        require_outputs(encoding, self.image_inputs, self.name)
        return {"pixel_values": torch.as_tensor(np.stack(encoding["pixel_values"])).to(dtype)}
