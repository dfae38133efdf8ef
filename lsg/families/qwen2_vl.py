"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): a native-resolution ViT whose 2x2 patch merger
feeds a Qwen2 decoder with multimodal RoPE.

- An image becomes `<|vision_start|>` + `<|image_pad|>` x (t h w / 4) + `<|vision_end|>`; the
  `<|image_pad|>` run is the image's visual tokens (docs/methods.md section 1 `vis`).
- The ViT hidden state the merger reads is the last block's output (`visual(...).last_hidden_state`,
  `(N_patches, D)`); the image processor orders patches so that each merged token is 4
  consecutive patches. A merged token is a V-sink if any of its four patches is.
- Positions are M-RoPE ids `(3, B, T)` (temporal, height, width) that the model builds from
  `input_ids`, `image_grid_thw`, `mm_token_type_ids` and the attention mask, so left and right
  padding give the same positions to real tokens. Key scaling commutes with M-RoPE as with
  RoPE: each position's key is rotated by a fixed orthogonal map, which a scalar passes through.

Its processor needs torchvision for videos; without it (this project's CPU install has no
torchvision build for its torch) `PilQwenProcessor` does the same image-side work with
transformers' PIL image processor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lsg.families.base import Family, register_family, require_outputs

CHATML_TEMPLATE = (  # Qwen2-VL's chat format, one image per conversation
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_TOKEN = "<|image_pad|>"
IMAGE_TYPE = 1  # mm_token_type_ids: 0 text, 1 image, 2 video


class PilQwenProcessor:
    """Qwen2-VL processing without torchvision: transformers' PIL image processor, the tokenizer,
    and the expansion of each `<|image_pad|>` into one token per merged patch group.

    Same interface as the processors `Backbone` uses: `apply_chat_template`, `__call__`,
    `.tokenizer`, `save_pretrained` / `from_pretrained`.
    """

    def __init__(self, image_processor, tokenizer, chat_template: str = CHATML_TEMPLATE):
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False,
                            **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, images, text, return_tensors=None, padding=False, **kwargs) -> dict[str, Any]:
        vision = self.image_processor(images=list(images), return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = self.image_processor.merge_size ** 2
        texts, k = [], 0
        for t in text:
            parts = t.split(IMAGE_TOKEN)
            expanded = parts[0]
            for part in parts[1:]:
                expanded += IMAGE_TOKEN * int(grid[k].prod() // merge) + part
                k += 1
            texts.append(expanded)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "pixel_values": vision["pixel_values"], "image_grid_thw": grid}

    def save_pretrained(self, folder: str | Path) -> None:
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (Path(folder) / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template}))

    @classmethod
    def from_pretrained(cls, folder: str) -> "PilQwenProcessor":
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        template = None
        path = Path(folder) / "chat_template.json"
        if path.exists():
            template = json.loads(path.read_text())["chat_template"]
        elif (Path(folder) / "chat_template.jinja").exists():
            template = (Path(folder) / "chat_template.jinja").read_text()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(Qwen2VLImageProcessorPil.from_pretrained(folder), tokenizer,
                   template or tokenizer.chat_template or CHATML_TEMPLATE)


@register_family
class Qwen2VLFamily(Family):
    name = "qwen2-vl"
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    image_inputs = ("pixel_values", "image_grid_thw", "mm_token_type_ids")

    def load_processor(self, hf_id: str, model):
        from transformers.utils import is_torchvision_available

        return super().load_processor(hf_id, model) if is_torchvision_available() else \
            PilQwenProcessor.from_pretrained(hf_id)

    def vit_module(self, model) -> torch.nn.Module:
        return model.model.visual

    def vit_features(self, model, args: tuple, kwargs: dict, output) -> torch.Tensor:
        return output.last_hidden_state  # (N_patches, D): the merger's input, 4 patches per visual token

    def patches_per_image(self, model, batch: dict) -> list[int]:
        """Per sample, `t x h x w` patches of its `image_grid_thw`."""
        return batch["image_grid_thw"].prod(-1).tolist()

    def patches_to_tokens(self, model, patch_flags: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        merge = model.config.vision_config.spatial_merge_size ** 2
        return patch_flags.reshape(-1, merge).any(-1)

    def token_grid(self, model, batch: dict) -> list[torch.Tensor]:
        """Merged tokens in raster order over the `(h / m, w / m)` grid of `image_grid_thw`
        (m = spatial_merge_size; panel = temporal index, 0 for an image)."""
        m = model.config.vision_config.spatial_merge_size
        out = []
        for t, h, w in batch["image_grid_thw"].tolist():
            rows, cols = h // m, w // m
            k = torch.arange(t * rows * cols)
            out.append(torch.stack([k // (rows * cols), k % (rows * cols) // cols, k % cols], 1))
        return out

    def pixel_inputs(self, encoding: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`pixel_values (N_patches, C * temporal_patch * patch^2)` and `image_grid_thw (N_images, 3)`.

        Raises:
            ValueError: the processor did not return both (the message names the missing ones).
        """
        require_outputs(encoding, ("pixel_values", "image_grid_thw"), self.name)
        return {"pixel_values": torch.as_tensor(encoding["pixel_values"]).to(dtype),
                "image_grid_thw": torch.as_tensor(encoding["image_grid_thw"])}

    def position_ids(self, batch: dict[str, torch.Tensor]) -> None:
        return None  # M-RoPE ids come from input_ids, image_grid_thw, mm_token_type_ids and the mask

    def finish_batch(self, batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id(model)).int() * IMAGE_TYPE
        return batch


@register_family
class Qwen25VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: Qwen2-VL's layout with windowed ViT attention. The ViT runs on patch groups
    (one group = one merged token) permuted by window (`window_index`), and the merged tokens
    are put back in image order after the merger; V-sink features are put back the same way."""

    name = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"

    def vit_features(self, model, args: tuple, kwargs: dict, output) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        visual = self.vit_module(model)
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                                  visual.patch_size)
        feats = output.last_hidden_state  # (N_patches, D) in window order, merge-unit groups contiguous
        groups = feats.reshape(-1, visual.spatial_merge_unit, feats.shape[-1])
        return groups[torch.argsort(window_index.to(feats.device))].reshape(feats.shape)
