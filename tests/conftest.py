"""Shared fixtures: the tiny random backbone and a small batch of synthetic samples."""

from __future__ import annotations

import os

# The test models are tiny: one thread is faster than several, and keeps the suite from
# fighting a background job for cores. Subprocesses (train.py) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

import lsg

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from lsg.data import generate_scene_sample

PROMPTS_PER_BATCH = 4


def samples(n: int = PROMPTS_PER_BATCH, split: str = "val", offset: int = 0):
    """(images, questions, answers) of the first n shapes samples of a split."""
    out = [generate_scene_sample(split, offset + i) for i in range(n)]
    images = [o[0] for o in out]
    questions = [o[1]["conversations"][0]["value"].replace("<image>\n", "", 1) for o in out]
    answers = [o[1]["conversations"][1]["value"] for o in out]
    return images, questions, answers


@pytest.fixture(scope="session")
def tiny():
    torch.manual_seed(0)
    return lsg.load_backbone("tiny-random")


@pytest.fixture(scope="session")
def tiny_eager():
    return lsg.load_backbone("tiny-random", attn_implementation="eager")


@pytest.fixture(scope="session")
def batch(tiny):
    """A right-padded teacher-forced batch (labels on answers) of 4 samples."""
    images, questions, answers = samples()
    # Vary the prompt lengths so padding really happens.
    questions = [q + " ?" * i for i, q in enumerate(questions)]
    return tiny.build_batch(images, questions, answers, padding_side="right")


def save_tiny_hub_checkpoint(folder, seed: int = 0):
    """The tiny random LLaVA written in the hub's exact format (`save_pretrained` of the model
    and its processor), loadable as `load_backbone("llava-1.5-7b", hf_id=folder)`."""
    from lsg.backbones import _build_tiny_random

    model, processor, _ = _build_tiny_random(seed=seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hub_dir(tmp_path_factory):
    return save_tiny_hub_checkpoint(tmp_path_factory.mktemp("tiny-hub"))
