"""What differs between LVLM families, behind one small interface (peft's per-model mappings and
TransformerLens's per-architecture configs are the pattern).

A `Family` knows, for its transformers classes:
- how to load a hub-format checkpoint, after checking its `config.json` names this family
  (so a mismatched checkpoint is refused before any weight is read);
- where the decoder layers and the vision tower live;
- which ViT hidden state feeds the projector, and how its patches map to visual tokens;
- which processor outputs the model needs (`image_inputs`), which of the multimodal model's call
  arguments its patch -> token map reads (`layout_inputs`), and the image token id(s).

`attach`, segments, sinks, gates, training and scoring call these methods and never test for
a model class. A family registers itself with `@register_family`; every module in
`lsg/families/` is imported by the package, so a new family is one new module (plus its
`conf/model/<name>.yaml`), with no list to keep in step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

# Batch entries every family's model reads besides its `image_inputs` (labels only when training).
TEXT_INPUTS = ("input_ids", "attention_mask", "labels")


class Family:
    """One LVLM family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # `model_type` values of config.json this family reads
    model_class: ClassVar[str] = ""  # the transformers class its checkpoints load into
    templates: ClassVar[dict[str, str]] = {}  # chat templates selectable by `chat_template: <name>`
    # Batch entries besides `TEXT_INPUTS` that the model's forward reads: what `pixel_inputs`
    # and `finish_batch` add to a batch (and nothing else does).
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # Call arguments of the multimodal model (or of a `layout_calls` method) that
    # `patches_to_tokens` reads; `attach` keeps only these from a prefill call.
    layout_inputs: ClassVar[tuple[str, ...]] = ()

    @property
    def model_inputs(self) -> tuple[str, ...]:
        """Every batch entry this family's model reads (`TEXT_INPUTS` + `image_inputs`)."""
        return TEXT_INPUTS + self.image_inputs

    # ---- loading -------------------------------------------------------------------------
    def check_checkpoint(self, hf_id: str) -> dict:
        """The checkpoint's `config.json` as a dict, after checking its `model_type` is one of
        this family's. Reads only that file (no weight).

        Raises:
            ValueError: another family's checkpoint; the message names the family to use.
        """
        config = read_config(hf_id)
        model_type = config.get("model_type")
        if model_type not in self.model_types:
            other = family_for_model_type(model_type)
            hint = (f"use a model config of family '{other.name}'" if other else
                    "this architecture is not supported")
            raise ValueError(f"{hf_id}: config.json has model_type={model_type!r}, but this backbone's family "
                             f"'{self.name}' reads {list(self.model_types)}: {hint}. Supported families: "
                             f"{', '.join(supported_families())}.")
        return config

    def load(self, hf_id: str, dtype: str, attn_implementation: str, **load_kwargs) -> tuple[Any, Any]:
        """`(model, processor)` from a hub id or a `save_pretrained` folder, after
        `check_checkpoint`; `load_kwargs` go to `from_pretrained` (e.g. `device_map="auto"` to
        spread a 13B model over the GPUs).

        Raises:
            ValueError: the checkpoint belongs to another family (before any weight is read).
        """
        import transformers

        self.check_checkpoint(hf_id)
        model = getattr(transformers, self.model_class).from_pretrained(
            hf_id, dtype=getattr(torch, dtype), attn_implementation=attn_implementation, **load_kwargs)
        return model, self.load_processor(hf_id, model)

    def load_processor(self, hf_id: str, model) -> Any:
        """The checkpoint's processor (`AutoProcessor` by default)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(hf_id)

    # ---- where things live ---------------------------------------------------------------
    def multimodal_model(self, model) -> torch.nn.Module:
        """The module whose forward receives `input_ids`, `attention_mask` and the KV cache
        (the gate context is built in a pre-hook on it)."""
        return model.model

    def language_model(self, model) -> torch.nn.Module:
        """The decoder stack (its `layers`, its attention implementation)."""
        return model.model.language_model

    def decoder_layers(self, model) -> Sequence[torch.nn.Module]:
        return self.language_model(model).layers

    def text_config(self, model):
        return model.config.text_config

    def image_token_id(self, model) -> int:
        return model.config.image_token_id

    def layer_additions(self, model, language_kwargs: dict, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        """What the language model adds to decoder layers' outputs besides the layers themselves
        (Qwen3-VL's DeepStack), as `{layer: (B, T, D)}`, read from the keyword arguments of its
        call; `hidden` `(B, T, D)` is its input embeddings. `lsg.prefix.run_suffix` adds those of
        the layers it runs. Default: nothing."""
        return {}

    def decoder_attention_mask(self, model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                               position_ids: torch.Tensor | None, vis: torch.Tensor):
        """The `attention_mask` argument of the language model when it runs on its own from cached
        hidden states `inputs_embeds (B, T, D)` (`lsg.prefix.run_suffix`), with the padding mask
        `attention_mask (B, T)` and the visual tokens `vis (B, T)`. Default: the padding mask, from
        which the language model builds the same causal masks as in the full forward. A family
        whose multimodal model builds other masks (Gemma 3's bidirectional image block) builds
        them here."""
        return attention_mask

    # ---- vision: V-sinks -----------------------------------------------------------------
    def vit_module(self, model) -> torch.nn.Module:
        """The module whose forward output holds the ViT features the projector reads."""
        raise NotImplementedError

    def vit_features(self, model, args: tuple, kwargs: dict, output) -> torch.Tensor:
        """`(N_patches, D_vit)` features of every image patch the projector reads, over the
        batch, in visual-token order (`patches_to_tokens` groups consecutive patches), from a
        forward hook on `vit_module` (its positional and keyword inputs and its output)."""
        raise NotImplementedError

    def patches_per_image(self, model, batch: dict) -> list[int] | None:
        """ViT patches (rows of `vit_features`) of each image of `batch` (its model inputs), in
        order (`lsg.analysis` splits the ViT features per image with it); None by default: every
        image has the same number of patches (LLaVA-1.5's one crop), and the analysis splits equally."""
        return None

    def layout_calls(self, model) -> list[tuple[torch.nn.Module, str]]:
        """`(module, method name)` whose call arguments `patches_to_tokens` needs and that may run
        before the forward that builds the context (`generate` encodes images first). `attach`
        records their arguments; none by default."""
        return []

    def patches_to_tokens(self, model, patch_flags: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """`(N_visual_tokens,)` V-sink flags of the visual tokens from `(N_patches,)` patch
        flags (identity when one patch is one token). `inputs`: the call arguments named in
        `layout_inputs` (e.g. `image_sizes`), for families whose layout depends on them."""
        return patch_flags

    def token_grid(self, model, batch: dict) -> list[torch.Tensor]:
        """Where each visual token lies on its image, for attention maps (`lsg.analysis`).

        Args:
            batch: the model inputs of a batch (`Backbone.build_batch`): `input_ids (B, T)` and
                the family's `image_inputs`.

        Returns:
            per sample, `(N_visual_tokens, 3)` long `(panel, row, col)` of its visual tokens in
            token order; -1 everywhere for a token that is not an image cell (OneVision's
            newlines). Panel 0 is the whole image; families with more views number them on.
            Default (LLaVA-1.5): one square grid, token k at `(0, k // side, k % side)`.

        Raises:
            ValueError: a sample's visual tokens do not form a square grid.
        """
        out = []
        for n in (batch["input_ids"] == self.image_token_id(model)).sum(1).tolist():
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"{n} visual tokens do not form a square grid; family '{self.name}' needs its own "
                                 f"token_grid.")
            k = torch.arange(n)
            out.append(torch.stack([torch.zeros_like(k), k // side, k % side], 1))
        return out

    # ---- batches -------------------------------------------------------------------------
    def pixel_inputs(self, encoding: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The processor outputs the model needs besides `input_ids`, as batched tensors (keys
        among `image_inputs`)."""
        raise NotImplementedError

    def position_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Position ids of a whole (prompt + generated) sequence as `generate` gives them, for a
        forward that recomputes it; None when the model builds them from the batch itself.
        Default (1-D RoPE): counted over real tokens, so left padding does not shift them."""
        return (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)

    def finish_batch(self, batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
        """Inputs derived from the padded `input_ids` (e.g. Qwen2-VL's `mm_token_type_ids`; keys
        among `image_inputs`)."""
        return batch


def require_outputs(encoding: dict, keys: Sequence[str], family: str) -> None:
    """Check that a processor's output `encoding` holds every one of `keys` (what family `family`'s
    `pixel_inputs` reads).

    Raises:
        ValueError: some are missing; the message names them, the keys the processor gave and
            how to fix it.
    """
    missing = [k for k in keys if encoding.get(k) is None]
    if missing:
        raise ValueError(f"The processor's output lacks {missing} (it gave {sorted(encoding)}), which family "
                         f"'{family}' needs: load the checkpoint's own processor (a save_pretrained folder with "
                         f"its processor / preprocessor config) or one that returns {list(keys)}.")


def read_config(hf_id: str) -> dict:
    """`config.json` of a local folder or of a hub snapshot in the local cache.

    Raises:
        FileNotFoundError: neither is there.
    """
    folder = Path(hf_id)
    if folder.is_dir():
        path = folder / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{hf_id} has no config.json: give a save_pretrained / hub snapshot folder.")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(hf_id, "config.json")).read_text())


FAMILIES: dict[str, Family] = {}  # name -> the family's adapter, filled by `register_family`


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family available by its `name` (one instance serves every backbone).

    Raises:
        ValueError: no name, or another class already registered under it.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`: set the name a model config's `family:` uses.")
    if cls.name in FAMILIES and type(FAMILIES[cls.name]) is not cls:
        raise ValueError(f"Family name {cls.name!r} is taken by {type(FAMILIES[cls.name]).__name__}.")
    FAMILIES[cls.name] = cls()
    return cls


def get_family(name: str) -> Family:
    """The registered family `name`.

    Raises:
        ValueError: unknown name; the message lists the supported families.
    """
    if name not in FAMILIES:
        raise ValueError(f"Unknown backbone family {name!r}. Supported families: {', '.join(supported_families())}. "
                         f"A new family is a module in lsg/families/ with a @register_family class "
                         f"(docs/extending.md).")
    return FAMILIES[name]


def family_for_model_type(model_type: str | None) -> Family | None:
    """The family whose checkpoints have this `config.json` `model_type`, or None."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def supported_families() -> list[str]:
    return sorted(FAMILIES)
