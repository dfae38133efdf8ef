"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP ViT, an average-pooling projector and a
Gemma 3 decoder whose sliding-window layers sit beside global ones.

- **Image span.** An image becomes `\\n\\n<start_of_image>` + `<image_soft_token>` x
  `mm_tokens_per_image` (256) + `<end_of_image>\\n\\n`. The visual tokens (the `vis` segment,
  `lsg.segments`) are the soft tokens, which carry `config.image_token_id`; the begin/end-of-image
  markers are text (in `sys` and `user`) and never V-sinks. One image per prompt: pan & scan
  (`do_pan_and_scan`) adds crops as more images and is refused (`pixel_inputs`).
- **V-sinks.** The projector reads the ViT's `last_hidden_state` (after SigLIP's post-layernorm),
  `(images, P*P, D)` in raster order over each image's `P x P` patch grid (P = 64 for 896 px images
  of 14 px patches), and average-pools `k x k` blocks into an `s x s` grid of soft tokens in raster
  order (s = sqrt(mm_tokens_per_image) = 16, k = P / s = 4). A soft token is a V-sink if any of its
  `k x k` patches is: a massive activation of one patch dominates the block's mean (divided by
  k^2 = 16 it is still tens of times the others), as a Qwen2-VL merged token is a V-sink if any of
  its patches is. The map runs the projector's own `avg_pool` on the patch flags.
- **Masks.** Soft tokens of one image attend to each other both ways (the model builds its masks
  from `token_type_ids`, 1 on soft tokens): global layers `causal OR image block`, sliding layers
  `(causal OR image block) AND i - j < sliding_window` (query i sees keys at most
  `sliding_window - 1` back; a soft token sees every later soft token of its image).
  `finish_batch` derives `token_type_ids` from `input_ids`, so they follow any padding; `generate`
  passes them at prefill and marks decoded tokens as text. The `lsg` attention path receives the
  masks transformers builds (its mask function is `sdpa_mask`), for SDPA rows and explicit rows.
- **Prefix reuse.** The language model alone would build causal masks only, so
  `decoder_attention_mask` gives `lsg.prefix.run_suffix` the model's own per-layer-type masks.
- **KV cache.** transformers keeps only the last `sliding_window - 1` keys of a sliding layer in
  the cache; gates index keys by absolute position (`lsg.context.LayerView`), so inside an
  `lsg.attach` block `generate` gets a cache that keeps every position, for every family with
  sliding-window layers (`lsg.attach`; the window is still applied by the mask). Outside `attach`
  the model's own cache is used.
- **Scales.** Token embeddings are multiplied by sqrt(hidden_size) inside `embed_tokens` (hidden
  states, prefixes and sink values see the scaled ones); attention logits are scaled by
  `query_pre_attn_scalar ** -0.5`, which the model passes to the attention function (the `lsg`
  path uses the scaling it is given). Keys are RMS-normed (`k_norm`) before RoPE; key-scaling
  gates scale the rotated keys the attention function receives. Gemma 3 passes no attention
  soft-capping.
- **Positions.** 1-D RoPE (one base per layer type), counted over real tokens (`Family.position_ids`).
- **FlashAttention** is not supported by Gemma 3 itself (`_supports_flash_attn = False`: it would
  drop the bidirectional image block); `load` refuses it: use `sdpa` or `eager`.
"""

from __future__ import annotations

import numpy as np
import torch

from lsg.families.base import Family, register_family, require_outputs

# Gemma 3's chat format (the hub template of google/gemma-3-*-it) without its leading
# `{{ bos_token }}`: `Backbone.build_batch` tokenises the rendered prompt with the tokenizer's
# special tokens, which add Gemma's <bos> once (with the hub template it would come twice).
# A system turn is prepended to the first user turn, as the hub template does.
GEMMA3_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
TEMPLATES = {"gemma3": GEMMA3_TEMPLATE}
END_OF_TURN = "<end_of_turn>"  # what closes every Gemma 3 chat turn (the hub tokenizer's eos is <eos>)
IMAGE_TYPE = 1  # token_type_ids: 0 text, 1 image soft token
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")  # refused: Gemma 3 does not support them


def processor_class():
    """`Gemma3Processor` that takes one image per prompt as a flat list (what `Backbone.build_batch`
    passes); transformers' own reads a flat list as all the images of one prompt."""
    from PIL import Image
    from transformers import Gemma3Processor

    class OneImagePerPromptGemma3Processor(Gemma3Processor):
        def __call__(self, images=None, text=None, **kwargs):
            if (isinstance(images, (list, tuple)) and isinstance(text, (list, tuple)) and len(images) == len(text)
                    and all(isinstance(image, Image.Image) for image in images)):
                images = [[image] for image in images]
            return super().__call__(images=images, text=text, **kwargs)

    return OneImagePerPromptGemma3Processor


@register_family
class Gemma3Family(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    model_class = "Gemma3ForConditionalGeneration"
    templates = TEMPLATES
    # token_type_ids: 1 on soft tokens, what the model builds the bidirectional image block from.
    image_inputs = ("pixel_values", "token_type_ids")

    def load(self, hf_id: str, dtype: str, attn_implementation: str, **load_kwargs):
        """`(model, processor)` as `Family.load`.

        Raises:
            ValueError: another family's checkpoint, or a FlashAttention implementation (Gemma 3
                does not support it), both before any weight is read.
        """
        if attn_implementation in FLASH_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={attn_implementation!r}: Gemma 3 does not support FlashAttention "
                             f"(transformers: it would drop the bidirectional mask over image tokens). Use sdpa or "
                             f"eager (model.attn_implementation=sdpa).")
        return super().load(hf_id, dtype, attn_implementation, **load_kwargs)

    def load_processor(self, hf_id: str, model):
        """The checkpoint's processor (one image per prompt, `processor_class`; no torchvision
        needed), its tokenizer's end of turn set to `<end_of_turn>` when it knows that token:
        `Backbone.build_batch` closes every answer with `tokenizer.eos_token`, and Gemma 3 closes a
        turn with `<end_of_turn>` (its hub tokenizer's eos is `<eos>`)."""
        processor = processor_class().from_pretrained(hf_id)
        tokenizer = processor.tokenizer
        if tokenizer.eos_token != END_OF_TURN and END_OF_TURN in tokenizer.get_vocab():
            tokenizer.eos_token = END_OF_TURN
        return processor

    def vit_module(self, model) -> torch.nn.Module:
        return model.model.vision_tower

    def vit_features(self, model, args: tuple, kwargs: dict, output) -> torch.Tensor:
        """`(N_images * P*P, D_vit)`: the ViT output the projector pools, each image's patches in
        raster order over its `P x P` grid (`patches_to_tokens` pools them as the projector does)."""
        feats = output.last_hidden_state
        return feats.reshape(-1, feats.shape[-1])

    def patches_to_tokens(self, model, patch_flags: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """`(N_images * s*s,)` V-sink flags of the soft tokens from `(N_images * P*P,)` patch flags: the
        projector's own `avg_pool` run on the flags, a token flagged when the mean of its `k x k`
        patches is above 0 (any patch flagged; module docstring)."""
        projector = model.model.multi_modal_projector
        side = projector.patches_per_image
        flags = patch_flags.float().reshape(-1, 1, side, side)  # row i // P, column i % P, as the projector reshapes
        return (projector.avg_pool(flags).flatten(1) > 0).flatten()

    def token_grid(self, model, batch: dict) -> list[torch.Tensor]:
        """Soft tokens in raster order over the `s x s` pooled grid (panel 0, s =
        sqrt(mm_tokens_per_image)); every soft token is an image cell.

        Raises:
            ValueError: a sample's soft-token count is not one image's (`mm_tokens_per_image`).
        """
        side = model.model.multi_modal_projector.tokens_per_side
        for n in (batch["input_ids"] == self.image_token_id(model)).sum(1).tolist():
            if n != side * side:
                raise ValueError(f"{n} image soft tokens in a sample; Gemma 3 gives {side * side} per image and lsg "
                                 f"reads one image per prompt.")
        return super().token_grid(model, batch)  # one square grid, raster order

    def pixel_inputs(self, encoding: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`pixel_values (B, 3, H, W)`, one image per prompt (`token_type_ids` come from
        `finish_batch`).

        Raises:
            ValueError: the processor gave no `pixel_values`, or more images than prompts (pan &
                scan crops).
        """
        require_outputs(encoding, ("pixel_values",), self.name)
        pixels = np.stack([np.asarray(p) for p in encoding["pixel_values"]])
        if len(pixels) != len(encoding["input_ids"]):
            raise ValueError(f"The processor gave {len(pixels)} images for {len(encoding['input_ids'])} prompts: "
                             f"Gemma 3's pan & scan adds crops as more images, and lsg reads one image per prompt. "
                             f"Set do_pan_and_scan to false in the checkpoint's preprocessor_config.json.")
        return {"pixel_values": torch.as_tensor(pixels).to(dtype)}

    def finish_batch(self, batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
        """`token_type_ids (B, T)`: 1 on soft tokens, 0 elsewhere (padding included), from `input_ids`."""
        batch["token_type_ids"] = (batch["input_ids"] == self.image_token_id(model)).long() * IMAGE_TYPE
        return batch

    def decoder_attention_mask(self, model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                               position_ids: torch.Tensor | None, vis: torch.Tensor):
        """The model's own `{layer type: (B, 1, T, T) mask}` (image block OR causal, AND the window
        on sliding layers), built by transformers' `create_masks_for_vision_model` from the visual
        tokens `vis (B, T)` as `Gemma3Model.forward` builds it from `token_type_ids`."""
        from transformers.models.gemma3.modeling_gemma3 import (create_masks_for_vision_model,
                                                                get_block_sequence_ids_for_mask)

        blocks = get_block_sequence_ids_for_mask(vis.long() * IMAGE_TYPE, device=inputs_embeds.device)
        return create_masks_for_vision_model(config=model.config.get_text_config(), inputs_embeds=inputs_embeds,
                                             attention_mask=attention_mask, cache=None, position_ids=position_ids,
                                             block_sequence_ids=blocks)
