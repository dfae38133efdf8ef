"""The embedded default backbone `smol-llava` (SmolLM2-135M-Instruct + a small CLIP tower).

- `lsg.embedded.backbone`: assembling and loading it (everything re-exported here, so
  `from lsg import embedded; embedded.load_embedded()` keeps working);
- `lsg.embedded.recipe`: how its vision side was trained (sample formats, stage targets
  and losses), driven by `scripts/train_embedded.py`; imported on its own (it needs
  `lsg.backbones`, which imports this package);
- `lsg/embedded/weights/`: the committed vision tower, projector and LoRA read-out
  and stage C's end-of-turn output row
  (`EMBEDDED_DIR`), package data so a non-editable install finds them.
"""

from lsg.embedded.backbone import (
    CHATML_TEMPLATE,
    CONVERTED_DIRNAME,
    EMBEDDED_DIR,
    GGUF_TENSOR_NAMES,
    HEAD_FILE,
    IMAGE_TOKEN,
    SMOLLM2_GGUF,
    SMOLLM2_GGUF_SHA256,
    SMOLLM2_PACKAGE,
    SMOLLM2_TOKENIZER_DIGEST,
    SMOLLM2_WEIGHTS_DIGEST,
    TOKENIZER_PROBE,
    WEIGHTS_DIR,
    VisionTowerConfig,
    _unpermute_rope,
    assemble_llava,
    build_processor,
    cache_dir,
    fetch_smollm2_gguf,
    fingerprint,
    gguf_to_hf,
    load_embedded,
    load_smollm2,
    lora_config,
    merge_lora,
    save_embedded,
    save_head,
    sha256_of,
    smollm2_hf_dir,
    tokenizer_digest,
    untie_output_rows,
    vision_state_dict,
    weights_digest,
)

__all__ = [
    "CHATML_TEMPLATE", "CONVERTED_DIRNAME", "EMBEDDED_DIR", "GGUF_TENSOR_NAMES", "HEAD_FILE", "IMAGE_TOKEN",
    "SMOLLM2_GGUF", "SMOLLM2_GGUF_SHA256", "SMOLLM2_PACKAGE", "SMOLLM2_TOKENIZER_DIGEST", "SMOLLM2_WEIGHTS_DIGEST",
    "TOKENIZER_PROBE", "WEIGHTS_DIR", "VisionTowerConfig", "assemble_llava", "build_processor", "cache_dir",
    "fetch_smollm2_gguf", "fingerprint", "gguf_to_hf", "load_embedded", "load_smollm2", "lora_config", "merge_lora",
    "save_embedded", "save_head", "sha256_of", "smollm2_hf_dir", "tokenizer_digest", "untie_output_rows", "vision_state_dict", "weights_digest",
]
