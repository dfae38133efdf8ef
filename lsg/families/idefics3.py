"""Idefics3 (`Idefics3ForConditionalGeneration`) and SmolVLM (`SmolVLMForConditionalGeneration`): a
SigLIP-style ViT, a pixel-shuffle connector, a Llama-family decoder at `model.model.text_model`.

An image is resized (longest edge `size`), cut into `rows x cols` sub-images of the ViT's size
(`max_image_size`) in raster order, followed by the whole image resized to one sub-image (the
global image); each of these tiles is encoded by the ViT on its own. The processor writes the
image as

    <fake_token_around_image><row_1_col_1><image> x n ... <fake_token_around_image><row_1_col_C><image> x n \\n
    ...
    \\n<fake_token_around_image><global-img><image> x n <fake_token_around_image>

(a small image, not split, is the global part alone). Only the `<image>` tokens carry the image
token id: they are the visual tokens (the `vis` segment), `n = (side / s)^2` per tile in the
tiles' order, `side` ViT patches per tile side, `s` the connector's `scale_factor`. The marker
tokens between them (`<fake_token_around_image>`, `<row_i_col_j>`, `<global-img>` and the
newlines) are text: never V-sinks, and part of `sys` (`lsg.segments.ImageTokenId` names them,
so the image's several runs of `<image>` tokens count as one image).

V-sinks are read on the ViT output the connector reads (`vision_model(...).last_hidden_state`,
post-layernorm, one `(side^2, D)` block per tile) and mapped by running the connector's own
`pixel_shuffle` on the patch flags: a merged token concatenates an `s x s` block of patches and
is a V-sink if any of them is (as Qwen2-VL's merger).

SmolVLM's processor needs torchvision (its video processor) and num2words (video prompts);
without them `PilSmolVLMProcessor` does the image-side work with transformers' PIL image processor
(`smolvlm_processor_class`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lsg.families.base import Family, register_family, require_outputs
from lsg.segments import ImageTokenId

# The processor's marker tokens (transformers' Idefics3Processor / SmolVLMProcessor).
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
MAX_GRID_SIDE = 6  # the processors name sub-images <row_1_col_1> .. <row_6_col_6>
NEWLINES = ("\n", "\n\n")  # ends a row of sub-images; "\n\n" precedes the global image
MARKERS_ATTR = "_lsg_image_markers"  # attribute of a loaded model holding its `ImageMarkers`
PANEL_GLOBAL, PANEL_SUBIMAGES = 0, 1  # token_grid panels: the whole image, the stitched sub-images


def row_col_token(row: int, col: int) -> str:
    """The processor's marker of sub-image (row, col), 1-based."""
    return f"<row_{row}_col_{col}>"


@dataclass(frozen=True)
class ImageMarkers:
    """Token ids of the marker tokens of one image's span, from the checkpoint's tokenizer.

    Attributes:
        sub_images: id of `<row_i_col_j>` -> (i, j), 1-based.
        global_image: id of `<global-img>`.
        all: every marker id (`<fake_token_around_image>`, the row/column markers,
            `<global-img>`, the newline tokens), what may sit between the image's runs.
    """

    sub_images: dict[int, tuple[int, int]]
    global_image: int
    all: frozenset[int]

    @classmethod
    def of(cls, tokenizer) -> "ImageMarkers":
        """The markers as `tokenizer` encodes them (tokens it does not know are left out).

        Raises:
            ValueError: the tokenizer lacks `<image>`, `<fake_token_around_image>` or `<global-img>`.
        """
        vocab = tokenizer.get_vocab()
        missing = [t for t in ("<image>", FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN) if t not in vocab]
        if missing:
            raise ValueError(f"The tokenizer has no {', '.join(missing)} token: an Idefics3 / SmolVLM checkpoint's "
                             f"tokenizer writes images with <fake_token_around_image>, <row_i_col_j>, <global-img> "
                             f"and <image>.")
        sub_images = {vocab[row_col_token(i, j)]: (i, j) for i in range(1, MAX_GRID_SIDE + 1)
                      for j in range(1, MAX_GRID_SIDE + 1) if row_col_token(i, j) in vocab}
        newlines = {i for text in NEWLINES for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
        return cls(sub_images, vocab[GLOBAL_IMAGE_TOKEN],
                   frozenset({vocab[FAKE_IMAGE_TOKEN], vocab[GLOBAL_IMAGE_TOKEN], *sub_images, *newlines}))


def smolvlm_processor_class(with_videos: bool = False):
    """`SmolVLMProcessor` reading a flat list of images as one list per prompt, split by the
    prompts' `<image>` counts (as `Idefics3Processor` reads it; `SmolVLMProcessor` itself takes a
    flat list as one sample's images, and `Backbone.build_batch` passes one image per prompt).

    Args:
        with_videos: keep the video processor (needs torchvision and num2words); without it the
            processor is images only, with transformers' PIL image processor.
    """
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class SmolVLMBatchProcessor(SmolVLMProcessor):
        def prepare_inputs_layout(self, images=None, text=None, videos=None, **kwargs):
            if isinstance(images, (list, tuple)) and isinstance(text, (list, tuple)) and \
                    not any(isinstance(image, (list, tuple)) for image in images):
                counts = [t.count(self.image_token) for t in text]
                if sum(counts) == len(images):
                    it = iter(images)
                    images = [[next(it) for _ in range(n)] for n in counts]
            return super().prepare_inputs_layout(images=images, text=text, videos=videos, **kwargs)

    if with_videos:
        return SmolVLMBatchProcessor

    class PilSmolVLMProcessor(SmolVLMBatchProcessor):
        def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None,
                     **kwargs):
            self.fake_image_token = getattr(tokenizer, "fake_image_token", FAKE_IMAGE_TOKEN)
            self.image_token = getattr(tokenizer, "image_token", "<image>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
            self.global_image_token = getattr(tokenizer, "global_image_token", GLOBAL_IMAGE_TOKEN)
            self.image_seq_len = image_seq_len
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs) -> str:
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    return PilSmolVLMProcessor


@register_family
class Idefics3Family(Family):
    """Idefics3 (`HuggingFaceM4/Idefics3-8B-Llama3`: SigLIP-SO400M + Llama-3.1-8B)."""

    name = "idefics3"
    model_types = ("idefics3",)
    model_class = "Idefics3ForConditionalGeneration"
    # pixel_values: (B, tiles, 3, H, W), all-zero tiles pad a sample with fewer tiles (the model
    # drops them); pixel_attention_mask: (B, tiles, H, W) bool, True on real pixels.
    image_inputs = ("pixel_values", "pixel_attention_mask")

    # ---- loading -------------------------------------------------------------------------
    def load(self, hf_id: str, dtype: str, attn_implementation: str, **load_kwargs):
        """`Family.load`, and the tokenizer's image marker ids kept on the model (`MARKERS_ATTR`),
        which `image_token_id` and `token_grid` read."""
        model, processor = super().load(hf_id, dtype, attn_implementation, **load_kwargs)
        setattr(model, MARKERS_ATTR, ImageMarkers.of(processor.tokenizer))
        return model, processor

    def load_processor(self, hf_id: str, model):
        """The checkpoint's `Idefics3Processor` (images only; transformers picks its PIL image
        processor where torchvision is missing)."""
        from transformers import Idefics3Processor

        return Idefics3Processor.from_pretrained(hf_id)

    def markers(self, model) -> ImageMarkers:
        """The model's `ImageMarkers` (kept by `load`).

        Raises:
            ValueError: the model was not loaded through the family (`Family.load`).
        """
        markers = vars(model).get(MARKERS_ATTR)
        if markers is None:
            raise ValueError(f"This {type(model).__name__} was not loaded through family '{self.name}' "
                             f"(lsg.load_backbone), so its image marker tokens are unknown: load it with "
                             f"lsg.load_backbone('<model config>', hf_id=...).")
        return markers

    # ---- where things live ---------------------------------------------------------------
    def language_model(self, model) -> torch.nn.Module:
        return model.model.text_model

    def image_token_id(self, model) -> ImageTokenId:
        """`<image>`'s id, naming the marker tokens that separate its runs within one image."""
        return ImageTokenId(model.config.image_token_id, self.markers(model).all)

    # ---- vision: V-sinks -----------------------------------------------------------------
    def vit_module(self, model) -> torch.nn.Module:
        return model.model.vision_model

    def vit_features(self, model, args: tuple, kwargs: dict, output) -> torch.Tensor:
        """`(tiles x side^2, D_vit)`: the post-layernorm ViT output the connector reads, real tiles
        in the processor's order (each sample's sub-images in raster order, then its global image)."""
        feats = output.last_hidden_state  # (tiles, side^2, D)
        return feats.reshape(-1, feats.shape[-1])

    def patches_per_image(self, model, batch: dict) -> list[int]:
        """Per sample, its tiles (its visual tokens / `(side / s)^2` per tile) x `side^2` patches:
        samples of one batch have different numbers of tiles (all-zero tiles pad `pixel_values`)."""
        vision = model.config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2
        tokens_per_tile = per_tile // model.config.scale_factor ** 2
        tiles = (batch["input_ids"] == int(model.config.image_token_id)).sum(1) // tokens_per_tile
        return (tiles * per_tile).tolist()

    def patches_to_tokens(self, model, patch_flags: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """`(tiles x (side / s)^2,)` flags from `(tiles x side^2,)`: the connector's own
        `pixel_shuffle` run on the flags; a merged token is a V-sink if any of its `s x s` patches is."""
        connector = model.model.connector
        vision = model.config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2
        flags = patch_flags.float().reshape(-1, per_tile, 1)
        return (connector.pixel_shuffle(flags, connector.scale_factor) > 0).any(-1).flatten()

    def token_grid(self, model, batch: dict) -> list[torch.Tensor]:
        """Panel 0: the global image's `n x n` grid; panel 1: the sub-images stitched as the image
        was cut (`rows n x cols n`, sub-image (i, j) read from its `<row_i_col_j>` marker), `n = side / s`.
        A run of `<image>` tokens is the tile named by the marker just before it.

        Raises:
            ValueError: a run of image tokens is not one tile long, or follows no tile marker.
        """
        config, markers = model.config, self.markers(model)
        n = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
        image_id = int(config.image_token_id)
        mask = batch.get("attention_mask")
        out = []
        for b, ids in enumerate(batch["input_ids"]):
            vis = ids == image_id
            if mask is not None:
                vis &= mask[b].bool()
            pos = vis.nonzero().flatten()
            starts = pos[torch.cat([pos.new_ones(1, dtype=torch.bool), pos[1:] != pos[:-1] + 1])]
            k = torch.arange(n * n)
            cells = []
            for start in starts.tolist():
                marker = int(ids[start - 1]) if start else -1
                length = int(vis[start:start + n * n].sum())
                if length != n * n or (start + n * n < len(ids) and vis[start + n * n]):
                    raise ValueError(f"A run of image tokens at position {start} is not one tile of {n * n} tokens.")
                if marker in markers.sub_images:
                    i, j = markers.sub_images[marker]
                    panel, top, left = PANEL_SUBIMAGES, (i - 1) * n, (j - 1) * n
                elif marker == markers.global_image:
                    panel, top, left = PANEL_GLOBAL, 0, 0
                else:
                    raise ValueError(f"The image tokens at position {start} follow token id {marker}, not a "
                                     f"<row_i_col_j> or <global-img> marker.")
                cells.append(torch.stack([torch.full_like(k, panel), top + k // n, left + k % n], 1))
            out.append(torch.cat(cells) if cells else torch.zeros(0, 3, dtype=torch.long))
        return out

    # ---- batches -------------------------------------------------------------------------
    def pixel_inputs(self, encoding: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`pixel_values (B, tiles, 3, H, W)` and `pixel_attention_mask (B, tiles, H, W)`.

        Raises:
            ValueError: the processor gave no `pixel_attention_mask` (its image processor runs with
                `do_pad: false`, leaving tiles of different shapes) or no `pixel_values`.
        """
        require_outputs(encoding, self.image_inputs, self.name)
        return {"pixel_values": torch.as_tensor(np.asarray(encoding["pixel_values"])).to(dtype),
                "pixel_attention_mask": torch.as_tensor(np.asarray(encoding["pixel_attention_mask"])).bool()}


@register_family
class SmolVLMFamily(Idefics3Family):
    """SmolVLM / SmolVLM2 (`HuggingFaceTB/SmolVLM2-2.2B-Instruct`: SigLIP + SmolLM2-1.7B): Idefics3's
    layout; its processor also handles videos (torchvision, num2words)."""

    name = "smolvlm"
    model_types = ("smolvlm",)
    model_class = "SmolVLMForConditionalGeneration"

    def load_processor(self, hf_id: str, model):
        """The checkpoint's `SmolVLMProcessor` taking one image per prompt from a flat list; without
        torchvision or num2words, its images-only PIL variant (`smolvlm_processor_class`)."""
        from transformers.utils import is_num2words_available, is_torchvision_available

        return smolvlm_processor_class(is_torchvision_available() and is_num2words_available()).from_pretrained(hf_id)
