"""`VQARecord`: one question about one image, the record every reader, benchmark and evaluation shares.

Training data (LLaVA-format JSON, the synthetic shapes, Cambrian-10K) and benchmark questions
(MMStar, CV-Bench, ...) are both `VQARecord`s: a benchmark's loader fills `question` with the
benchmark's question wrapped in its official pre/post prompt, keeps its own reference answer in
`answer` (a letter, "yes", a list...) and reads its image lazily through `image_loader`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image


@dataclass(frozen=True)
class VQARecord:
    """One question.

    Attributes:
        id: unique within its split or benchmark.
        question: the text sent after the image (the chat template wraps it); for a LLaVA JSON
            record, the first human turn without the `<image>` tag.
        answer: the reference answer: the gpt turn (stripped), or a benchmark's own answer field.
        subtask: the record's sub-task (category), "all" when it has none.
        options: option texts of a multiple-choice question (A, B, ... in order), else ().
        answer_letter: the correct option's letter for multiple choice, else None.
        turns: later (question, answer) pairs of a multi-turn conversation.
        image_path: the image file, or None when `image_loader` reads it.
        meta: benchmark-specific fields a scorer needs (e.g. MME's image id).
        image_loader: zero-argument callable returning the PIL image (a 9,000-question
            benchmark keeps undecoded bytes, never every decoded image).
    """

    id: str
    question: str
    answer: Any
    subtask: str = "all"
    options: tuple[str, ...] = ()
    answer_letter: str | None = None
    turns: tuple[tuple[str, str], ...] = ()
    image_path: Path | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    image_loader: Callable[[], Image.Image] | None = field(default=None, compare=False, hash=False, repr=False)

    def load_image(self) -> Image.Image:
        """The record's image as RGB.

        Raises:
            ValueError: the record has neither an image path nor a loader.
        """
        if self.image_loader is not None:
            return self.image_loader().convert("RGB")
        if self.image_path is None:
            raise ValueError(f"Record {self.id!r} has no image (neither image_path nor image_loader).")
        with Image.open(self.image_path) as im:
            return im.convert("RGB")

