"""LVLM families (`lsg.families.base.Family`), registered by name: one module per family."""
from lsg.families.base import Family, read_config, supported_families
from lsg.families.llava import LlavaFamily
from lsg.families.llava_onevision import LlavaOnevisionFamily
from lsg.families.qwen2_vl import Qwen2VLFamily, Qwen25VLFamily

FAMILIES: dict[str, Family] = {f.name: f for f in (LlavaFamily(), LlavaOnevisionFamily(), Qwen2VLFamily(), Qwen25VLFamily())}


def get_family(name: str) -> Family:
    """The registered family `name`.

    Raises:
        ValueError: unknown name; the message lists the supported families.
    """
    if name not in FAMILIES:
        raise ValueError(f"Unknown backbone family {name!r}. Supported families: {', '.join(sorted(FAMILIES))}.")
    return FAMILIES[name]


def family_for_model_type(model_type: str | None) -> Family | None:
    """The family whose checkpoints have this `config.json` `model_type`, or None."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


__all__ = ["FAMILIES", "Family", "LlavaFamily", "LlavaOnevisionFamily", "Qwen2VLFamily", "Qwen25VLFamily", "family_for_model_type", "get_family", "read_config",
           "supported_families"]
