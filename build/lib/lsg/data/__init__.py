"""Datasets: the synthetic shapes VQA benchmark and the generic LLaVA-JSON reader."""
from lsg.data.llava_json import load_llava_json
from lsg.data.record import VQARecord
from lsg.data.shapes import (
    COLOUR_NAMES,
    COLOURS,
    SHAPES,
    SIZES,
    SUBTASKS,
    Scene,
    SceneObject,
    ShapesConfig,
    format_prompt,
    generate_scene_sample,
    generate_split,
    make_scene,
    patch_labels,
    render,
    sample_scene,
)

__all__ = [
    "COLOUR_NAMES", "COLOURS", "SHAPES", "SIZES", "SUBTASKS", "Scene", "SceneObject", "ShapesConfig",
    "VQARecord", "format_prompt", "generate_scene_sample", "generate_split", "load_llava_json",
    "make_scene", "patch_labels", "render", "sample_scene",
]
