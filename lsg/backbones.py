"""Backbones: a Hugging Face LVLM with its processor and its family adapter, behind one object.

A model config (`conf/model/<name>.yaml`, the same file Hydra's `model=` uses) names what builds
the model and which family adapter knows its layout:

- `builder: hub` loads a hub-format checkpoint (`hf_id:` a hub id or a `save_pretrained`
  folder) of a registered `family:` (`lsg.families.supported_families()`: `llava`,
  `llava-next`, `llava-onevision`, `qwen2-vl`, `qwen2.5-vl`, `qwen3-vl`, `internvl`, `gemma3`,
  `idefics3`, `smolvlm`), e.g. `llava-1.5-7b`, `internvl3`, `gemma3`;
- `builder: embedded` is the embedded default (`smol-llava`: SmolLM2-135M-Instruct + a small
  CLIP tower, see `lsg.embedded`);
- `builder: tiny` is a tiny random LLaVA built in-process in about a second, for unit tests.

So a new config for a known family and builder (say `conf/model/llava-1.5-7b-local.yaml`) loads
by its name with no code change: `load_backbone("llava-1.5-7b-local")`. Every key of a model
config is either read by the loader (`LOADER_KEYS`) or an argument of its builder; any other key
is refused, naming the known ones. What differs between model families (where layers and the
vision tower live, how ViT patches map to visual tokens, which processor outputs the model
needs) is in `lsg.families`.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.utils.checkpoint
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from lsg import embedded
from lsg.configs import config_path, known_configs, load_config
from lsg.files import FINGERPRINT_HEX_DIGITS, sha256_json, write_json
from lsg.families import Family, get_family
from lsg.segments import IGNORE_INDEX
from lsg.sinks import SinkConfig



def _pass_through(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


def _checkpointed(forward: Callable, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextmanager
def _replaced_forwards(modules: Sequence[torch.nn.Module], make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Each module's `forward` replaced on the instance by `make(its current forward)` within the
    block; an instance-level `forward` found there (accelerate's) is put back on exit."""
    saved = [vars(module).get("forward") for module in modules]
    try:
        for module in modules:
            module.forward = make(module.forward)
        yield
    finally:
        for module, old in zip(modules, saved):
            if old is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = old


@dataclass
class Backbone:
    """A loaded LVLM: HF model + processor + what the project needs to know about it.

    Attributes:
        name: the model config's name, written into every checkpoint's metadata.
        model: the family's transformers model (frozen by the caller when training gates).
        processor: the matching processor.
        system_prompt: system turn used by `build_batch` (None = the template's default).
        padding_side: "left" or "right"; segments and gates are identical under both.
        sinks: how sinks are found on this backbone.
        fingerprint: identifies the weights; written into and checked against gate checkpoints.
        family: the family adapter (`lsg.families`).
        config: the model config it was loaded from, overrides applied (`sinks` as a plain
            dict); gate configs resolve `${model.*}` against it.
    """

    name: str
    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    system_prompt: str | None = None
    padding_side: str = "right"
    sinks: SinkConfig = field(default_factory=SinkConfig)
    fingerprint: str = ""
    family: Family = field(default_factory=lambda: get_family("llava"))
    config: dict = field(default_factory=dict)

    @property
    def default_grouping(self) -> str:
        """The LSG token grouping when none is asked for (`grouping: auto`): "vsink-rest" (the
        paper's) when V-sinks are configured (`sinks.vit_dims` and `sinks.tau_vit`), else
        "lsink-rest" (a key of `lsg.context.GROUPINGS`)."""
        return "vsink-rest" if self.sinks.has_vsinks else "lsink-rest"

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The entries of `batch` this backbone's model reads (`Family.model_inputs`), without
        metadata such as `records`, and without entries that are None."""
        return {k: batch[k] for k in self.family.model_inputs if batch.get(k) is not None}

    @property
    def num_layers(self) -> int:
        return self.family.text_config(self.model).num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.family.text_config(self.model).hidden_size

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id(self.model)

    @property
    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        """The decoder layers, wherever the family keeps them."""
        return self.family.decoder_layers(self.model)

    @contextmanager
    def skip_decoder_layers(self, layers: Sequence[int]) -> Iterator[None]:
        """Within the block, decoder `layers` return their input hidden state unchanged (their
        `forward` is replaced on the instance; hooks still fire), so the language model's own
        forward runs only the others: `lsg.prefix` skips the frozen layers below a cached hidden
        state, or the layers above the last one it needs. A `forward` found on the instance
        (accelerate's device-moving one under `device_map`) is put back on exit."""
        with _replaced_forwards([self.decoder_layers[l] for l in layers], lambda forward: _pass_through):
            yield

    @contextmanager
    def layer_inputs(self, layers: Sequence[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
        """Within the block, the yielded dict holds `{layer: (B, T, D)}`, the hidden state entering
        each of decoder `layers` (default: all) in the last forward (pre-hooks, removed on exit):
        what sink values and a gate's `prepare` read. transformers' `output_hidden_states[l]` is
        layer l-1's output, which lacks what the language model adds between layers (Qwen3-VL's
        DeepStack features). Only the asked layers' states are kept alive."""
        entering: dict[int, torch.Tensor] = {}

        def keep(layer: int):
            def hook(module, args, kwargs):
                entering[layer] = args[0] if args else kwargs["hidden_states"]
            return hook

        layers = range(self.num_layers) if layers is None else layers
        handles = [self.decoder_layers[l].register_forward_pre_hook(keep(l), with_kwargs=True) for l in layers]
        try:
            yield entering
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def checkpoint_decoder_layers(self, layers: Sequence[int]) -> Iterator[None]:
        """Activation checkpointing of decoder `layers` within the block: under autograd their
        forward keeps only its inputs and is run again in backward (`torch.utils.checkpoint`,
        non-reentrant), so training a gate at layer l holds the activations of one suffix layer
        at a time instead of all of them (issue 19; docs/large-models.md). Hooks stay outside the
        recomputed forward (they fire once). The recompute runs when `backward` is called, after
        an `attach` block has exited: checkpoint only layers without gates (`lsg.prefix.run_suffix`
        checkpoints the layers above the highest gated one). Without grad it is a plain forward."""
        with _replaced_forwards([self.decoder_layers[l] for l in layers],
                                lambda forward: functools.partial(_checkpointed, forward)):
            yield

    def processor_digest(self) -> str:
        """sha256 of what turns a question into tokens and pixels: the chat template, the system
        prompt, the tokenizer's vocabulary size and the image processor's settings (answer and
        prefix caches are keyed by it)."""
        image_processor = getattr(self.processor, "image_processor", None)
        settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else repr(image_processor)
        return sha256_json({"template": getattr(self.processor, "chat_template", None),
                            "system_prompt": self.system_prompt, "vocab": len(self.tokenizer),
                            "image_processor": settings})

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's tensors moved to the backbone's device (other entries unchanged)."""
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def check_layer(self, layer: int) -> int:
        """Return `layer` if it is a valid 0-based decoder layer, else raise ValueError."""
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(
                f"layer={layer!r} is out of range for backbone '{self.name}', which has "
                f"{self.num_layers} decoder layers: use 0..{self.num_layers - 1}."
            )
        return layer

    def _messages(self, prompt: str, turns: Sequence[tuple[str, str]] = ()) -> list[dict]:
        """Chat messages: system (if any), the user turn with the image, then `turns` as
        (assistant answer, next user question) pairs."""
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
        for answer, question in turns:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        return messages

    def prompt_text(self, prompt: str) -> str:
        """Chat-formatted prompt with the image first and the generation prompt appended."""
        return self.processor.apply_chat_template(self._messages(prompt), add_generation_prompt=True, tokenize=False)

    def followup_text(self, prompt: str, history: Sequence[tuple[str, str]], answer: str, question: str) -> str:
        """The template's text between the end of `answer` (+ end-of-turn token) and the start
        of the next answer, when the user then asks `question`: what a multi-turn conversation
        adds after each answer (end of turn, the user turn, the assistant header).

        `history` are the earlier (answer, question) pairs after the first `prompt`.

        Raises:
            ValueError: the chat template does not render the conversation as a prefix of its
                continuation, so turns cannot be tokenised one at a time.
        """
        eot = self.tokenizer.eos_token or ""
        before = self.processor.apply_chat_template(self._messages(prompt, list(history) + [(answer, "")])[:-1],
                                                    tokenize=False)
        after = self.processor.apply_chat_template(self._messages(prompt, list(history) + [(answer, question)]),
                                                   add_generation_prompt=True, tokenize=False)
        end = before.rfind(answer + eot)
        if end < 0 or after[:end + len(answer + eot)] != before[:end + len(answer + eot)]:
            raise ValueError(f"Backbone '{self.name}': its chat template does not end an assistant turn with "
                             f"the answer followed by {eot!r}, or renders earlier turns differently once a "
                             f"question follows; multi-turn records need a template that only appends.")
        return after[end + len(answer + eot):]

    def build_batch(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        answers: Sequence[str] | None = None,
        padding_side: str | None = None,
        followups: Sequence[Sequence[tuple[str, str]]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch of (image, prompt[, answer]) into model inputs.

        Args:
            images: B PIL images, one per prompt.
            prompts: B user questions without the `<image>` tag (the template places it).
            answers: optional B answers; appended after the prompt with the end-of-turn
                token, and the only positions with labels.
            padding_side: overrides `self.padding_side`.
            followups: optional, per sample, the later (question, answer) turns of a multi-turn
                conversation (needs `answers`). Each is appended in the chat template's format
                and every answer (+ end-of-turn token) carries labels; the gate still reads the
                first question's last token (the position before the first label).

        Returns:
            dict with `input_ids (B, T)`, `attention_mask (B, T)`, `pixel_values (B, 3, H, W)`
            and, with answers, `labels (B, T)` equal to `input_ids` on answer tokens and
            -100 elsewhere.

        Raises:
            ValueError: lengths differ or a batch is empty.
        """
        if len(images) != len(prompts) or (answers is not None and len(answers) != len(prompts)) or not prompts:
            raise ValueError(
                f"build_batch needs one image and one prompt per sample (and one answer if given); "
                f"got {len(images)} images, {len(prompts)} prompts, {None if answers is None else len(answers)} answers."
            )
        side = padding_side or self.padding_side
        texts = [self.prompt_text(p) for p in prompts]
        enc = self.processor(images=list(images), text=texts, return_tensors=None, padding=False)
        prompt_ids = enc["input_ids"]
        if followups is not None and (answers is None or len(followups) != len(prompts)):
            raise ValueError("build_batch: followups need answers and one list of turns per sample.")
        eot = self.tokenizer.eos_token or ""
        tokens = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        pieces = []  # per sample: [(token ids, carries labels)]
        for b, p in enumerate(prompt_ids):
            parts = [(list(p), False)]
            if answers is not None:
                parts.append((tokens(answers[b] + eot), True))
                history: list[tuple[str, str]] = []
                previous = answers[b]
                for question, reply in (followups[b] if followups is not None else ()):
                    parts.append((tokens(self.followup_text(prompts[b], history, previous, question)), False))
                    parts.append((tokens(reply + eot), True))
                    history.append((previous, question))
                    previous = reply
            pieces.append(parts)
        width = max(sum(len(ids) for ids, _ in parts) for parts in pieces)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(pieces), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(pieces), width), dtype=torch.long)
        labels = torch.full((len(pieces), width), IGNORE_INDEX, dtype=torch.long)
        for b, parts in enumerate(pieces):
            n = sum(len(ids) for ids, _ in parts)
            at = width - n if side == "left" else 0
            attention_mask[b, at : at + n] = 1
            for ids, labelled in parts:
                input_ids[b, at : at + len(ids)] = torch.tensor(ids, dtype=torch.long)
                if labelled:
                    labels[b, at : at + len(ids)] = torch.tensor(ids, dtype=torch.long)
                at += len(ids)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 **self.family.pixel_inputs(enc, self.model.dtype)}
        if answers is not None:
            batch["labels"] = labels
        return self.family.finish_batch(batch, self.model)

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int = 16, **kwargs) -> list[str]:
        """Greedy generation through the KV cache; returns the decoded new text per sample."""
        batch = self.on_device({k: v for k, v in batch.items() if k != "labels"})
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        new = out[:, batch["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


# --------------------------------------------------------------------------- builders


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
HEX64 = re.compile(r"[0-9a-f]{64}")


def _file_sha256(path: Path) -> str:
    """sha256 of a weight file. The hub cache stores files as blobs named by their sha256
    (snapshots link to them), so those cost nothing; other files are hashed once and
    remembered in `<cache>/fingerprints.json` by path, size and modification time."""
    blob = path.resolve()
    if path.is_symlink() and blob.parent.name == "blobs" and HEX64.fullmatch(blob.name):
        return blob.name
    memo_path = embedded.cache_dir() / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):  # absent, or torn by a crash: hash again
        memo = {}
    stat = blob.stat()
    key = f"{blob}:{stat.st_size}:{stat.st_mtime_ns}"
    if key not in memo:
        memo[key] = embedded.sha256_of(blob)
        write_json(memo_path, memo, indent=1)  # atomic, per-process temporary name: DDP ranks may write at once
    return memo[key]


def weights_fingerprint(folder: str | Path) -> str:
    """Short sha256 naming the weights in a `save_pretrained` / hub snapshot folder: over every
    weight file's name and content hash (`_file_sha256`). A local copy of a hub model gets the
    fingerprint of the hub model; a fine-tune with the same name does not.

    Raises:
        FileNotFoundError: the folder holds no weight file.
    """
    folder = Path(folder)
    files = sorted(f for f in folder.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"No weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}.")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{_file_sha256(f)}\n".encode())
    return digest.hexdigest()[:FINGERPRINT_HEX_DIGITS]


def local_weights_dir(hf_id: str) -> Path:
    """The folder `from_pretrained(hf_id)` read: `hf_id` itself if it is a folder, else its
    snapshot in the hub cache (after loading, so nothing is downloaded here)."""
    if Path(hf_id).is_dir():
        return Path(hf_id)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(hf_id, local_files_only=True))


@dataclass(frozen=True)
class Builder:
    """What builds a model from a model config's arguments.

    Attributes:
        name: the key a model config's `builder:` names.
        build: `(**arguments) -> (model, processor, fingerprint of the weights)`.
        families: the families it can build (None = any registered family).
    """

    name: str
    build: Callable[..., tuple]
    families: tuple[str, ...] | None = None

    def arguments(self) -> list[str]:
        """The config keys `build` takes, in its signature's order."""
        return [p.name for p in inspect.signature(self.build).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def required(self) -> list[str]:
        """The arguments without a default."""
        return [p.name for p in inspect.signature(self.build).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty]


BUILDERS: dict[str, Builder] = {}  # `builder:` key -> Builder, filled by `register_builder`


def register_builder(name: str, families: Sequence[str] | None = None) -> Callable:
    """Decorator: make a build function available to model configs as `builder: <name>`."""
    def register(build: Callable[..., tuple]) -> Callable[..., tuple]:
        BUILDERS[name] = Builder(name, build, None if families is None else tuple(families))
        return build
    return register


@register_builder("hub")
def _build_hub(hf_id: str, family: str = "llava", dtype: str = "bfloat16", attn_implementation: str = "sdpa",
               chat_template: str = "hub", device_map: str | None = None) -> tuple:
    """A hub-format checkpoint of `family`, checked against it before any weight is read
    (`Family.check_checkpoint`); `chat_template` other than "hub" replaces the processor's
    template with the family's named one (e.g. LLaVA-1.5's own conversation format)."""
    fam = get_family(family)
    model, processor = fam.load(hf_id, dtype, attn_implementation,
                                **({"device_map": device_map} if device_map else {}))
    if chat_template != "hub":
        if chat_template not in fam.templates:
            raise ValueError(f"chat_template={chat_template!r} is not one of family '{family}': use hub or "
                             f"{', '.join(fam.templates) or '(none)'}.")
        processor.chat_template = fam.templates[chat_template]
    return model, processor, weights_fingerprint(local_weights_dir(hf_id))


@register_builder("embedded", families=("llava",))
def _build_smol_llava(dtype: str = "float32", attn_implementation: str = "sdpa") -> tuple:
    """The embedded default (`lsg.embedded`): SmolLM2-135M-Instruct with its small CLIP tower."""
    model, processor = embedded.load_embedded(dtype=getattr(torch, dtype))
    model.set_attn_implementation(attn_implementation)
    return model, processor, embedded.fingerprint()


TINY_VOCAB = (
    "<pad> <|im_start|> <|im_end|> <unk> <image> system user assistant \n ( ) . ? : , A B C D E F "
    "Yes No How many objects are in the image is there a which what colour shape closer to of "
    "left right above below camera red green blue yellow purple orange white black circle square "
    "triangle diamond 1 2 3 4 5 6 Options Answer with option's letter from given choices directly"
).split(" ")


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in-process (no download) for the tiny random backbone."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(dict.fromkeys(TINY_VOCAB))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>", "<|im_start|>", "<|im_end|>"]})
    return fast


@register_builder("tiny", families=("llava",))
def _build_tiny_random(
    num_layers: int = 4, hidden_size: int = 64, image_size: int = 32, patch_size: int = 8,
    attn_implementation: str = "sdpa", seed: int = 0, dtype: str = "float32",
) -> tuple:
    """A random LLaVA of `num_layers` decoder layers of width `hidden_size`, a 2-layer CLIP tower
    on `image_size` px images cut into `patch_size` px patches ((image_size / patch_size)^2
    visual tokens), weights drawn from `seed`."""
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    vision = CLIPVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    model = LlavaForConditionalGeneration(config).to(getattr(torch, dtype))
    model.set_attn_implementation(attn_implementation)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
        chat_template=embedded.CHATML_TEMPLATE, num_additional_image_tokens=1,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor, embedded.weights_digest(model.state_dict())


# Keys of a model config the loader reads itself (or that another part of the project reads from
# the `model=` group); every other key must be an argument of the config's builder.
LOADER_KEYS = {
    "name": "the backbone's name, written into checkpoints",
    "builder": f"what builds the model: {', '.join(sorted(BUILDERS))}",
    "family": "the family adapter in lsg/families/ (default llava)",
    "sinks": "sink dims and thresholds (lsg.sinks.SinkConfig)",
    "system_prompt": "the system turn (null = the chat template's default)",
    "padding_side": "left or right",
    "device": "auto, cpu, cuda or cuda:N",
    "activation_checkpointing": "a training setting (train.yaml reads it from the model group)",
}
# Keys model configs used to carry, and where their setting lives now (added to the error).
RETIRED_KEYS = {"lsg_grouping": "the LSG gate's grouping is gate.grouping; its default, auto, follows the "
                                "backbone's sinks (Backbone.default_grouping)"}


def check_model_config(cfg: dict) -> Builder:
    """The builder of a model config, after checking every key is known.

    Raises:
        ValueError: no name or builder, an unknown builder or family, a family the builder cannot
            build, a key neither the loader nor the builder reads (the message names it, the known
            keys and how to fix it), or a builder argument without a default that is missing.
    """
    name = cfg.get("name")
    if not name:
        raise ValueError("A model config needs a `name:` (the backbone's name, written into checkpoints).")
    if cfg.get("builder") not in BUILDERS:
        raise ValueError(f"Model config '{name}' has builder={cfg.get('builder')!r}: give `builder:` one of "
                         f"{', '.join(sorted(BUILDERS))} (hub: a hub-format checkpoint named by hf_id).")
    builder = BUILDERS[cfg["builder"]]
    family = get_family(cfg.get("family", "llava"))
    if builder.families is not None and family.name not in builder.families:
        raise ValueError(f"Model config '{name}': builder '{builder.name}' builds family "
                         f"{' or '.join(builder.families)}, not '{family.name}'.")
    known = sorted(set(LOADER_KEYS) | set(builder.arguments()))
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"Unknown key(s) in model config '{name}' (builder '{builder.name}'): {', '.join(unknown)}. "
                         f"Known keys: {', '.join(known)}. Fix the spelling in conf/model/{name}.yaml or in the "
                         f"override (model.<key>=... on the command line, <key>=... in load_backbone)."
                         + "".join(f" {k}: {RETIRED_KEYS[k]}." for k in unknown if k in RETIRED_KEYS))
    missing = [k for k in builder.required() if cfg.get(k) is None]
    if missing:
        raise ValueError(f"Model config '{name}' (builder '{builder.name}') needs {', '.join(missing)}.")
    return builder


def backbone_config(name: str) -> dict:
    """The `conf/model/<name>.yaml` of a shipped (or user-added) backbone, as a plain dict.

    Raises:
        ValueError: no such config; the message lists the known ones.
    """
    if not config_path("model", name).exists():
        raise ValueError(f"Unknown backbone '{name}'. Known backbones: {', '.join(known_configs('model'))} "
                         f"(conf/model/<name>.yaml).")
    return load_config("model", name)


def resolve_device(spec: str | None = "auto") -> torch.device:
    """"auto" -> the first CUDA GPU if there is one, else the CPU; otherwise `torch.device(spec)`.

    Raises:
        ValueError: an unknown device, or a CUDA device on a machine without one.
    """
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise ValueError(f"device={spec!r} is not a device: use auto, cpu, cuda or cuda:N ({error}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} but torch sees no CUDA GPU here: use device=auto or device=cpu.")
    return device


def backbone_from_config(model_cfg: dict, **overrides) -> Backbone:
    """Load a backbone from a model config (a `model=` group as a dict), `overrides` (e.g.
    `device=`) winning over its values; in eval mode with every parameter frozen.

    A config without `builder:` is completed from the config file of its `name`
    (`conf/model/<name>.yaml`), so `{"name": "tiny-random", "num_layers": 2}` works; a config
    with one needs no file, so a new name for a known builder and family loads as it is.
    `model_cfg` is not modified. `Backbone.fingerprint` is derived from the weights themselves
    (`weights_fingerprint`), never from the name or hub id.

    Raises:
        ValueError: see `check_model_config`; an unknown name without a builder, a bad padding
            side, sinks setting or device.
    """
    cfg = {**model_cfg, **overrides}
    if "builder" not in cfg:
        if not config_path("model", str(cfg.get("name"))).exists():
            raise ValueError(f"Model config '{cfg.get('name')}' has no `builder:` and there is no "
                             f"conf/model/{cfg.get('name')}.yaml to complete it from: give `builder:` one of "
                             f"{', '.join(sorted(BUILDERS))} (and `family:`).")
        cfg = {**backbone_config(cfg["name"]), **cfg}
    builder = check_model_config(cfg)
    sinks = cfg.get("sinks") or {}
    if not isinstance(sinks, SinkConfig):
        unknown = sorted(set(sinks) - set(SinkConfig().to_dict()))
        if unknown:
            raise ValueError(f"Unknown key(s) in model config '{cfg['name']}' sinks: {', '.join(unknown)}. Known "
                             f"keys: {', '.join(SinkConfig().to_dict())}.")
        sinks = SinkConfig(**sinks)
    cfg["sinks"] = sinks.to_dict()
    padding_side = cfg.get("padding_side", "right")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    device = resolve_device(cfg.get("device", "cpu"))
    model, processor, fingerprint = builder.build(**{k: cfg[k] for k in builder.arguments() if k in cfg})
    model.eval().requires_grad_(False)
    if not cfg.get("device_map"):  # with a device map, accelerate has placed the layers already
        model.to(device)
    return Backbone(name=cfg["name"], model=model, processor=processor, system_prompt=cfg.get("system_prompt"),
                    padding_side=padding_side, sinks=sinks, fingerprint=fingerprint,
                    family=get_family(cfg.get("family", "llava")), config=cfg)


def load_backbone(name: str, **overrides) -> Backbone:
    """Load the backbone of `conf/model/<name>.yaml` (shipped, or added there by the user), in
    eval mode with every parameter frozen.

    Keyword arguments override the file's values (e.g. `attn_implementation="eager"`,
    `padding_side="left"`, `sinks={...}`, `device="auto"`, `hf_id=<folder>`).

    Raises:
        ValueError: unknown name (the message lists the known ones), an unknown key (say
            `dtyp="bfloat16"`: the message names the known ones), bad padding side or device.
    """
    return backbone_from_config(backbone_config(name), **overrides)
