"""What every benchmark shares: a loader of questions (`lsg.data.VQARecord`), a scorer (giving a
`lsg.evaluation.Result`), a registry; and `DataSplit`, a data config's split as a benchmark.

A benchmark is one module in `lsg/benchmarks/` plus one config file in `conf/benchmark/`:
its class says where the data lives (a pinned hub dataset id and revision, or a local
folder in the same format), how a dataset row becomes a `VQARecord` (image, prompt, reference
answer, sub-task) and how model answers are scored by the benchmark's official protocol.
`lsg.evaluation.answer_stacks` answers and scores gate stacks on any of them, `lsg.benchmarks.run`
writes eval.py's report (docs/methods.md section 6).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from PIL import Image

from lsg.benchmarks.parsing import extract_letter
from lsg.data.record import VQARecord
from lsg.evaluation import Result, mc_records, score_letters

MODES = ("generate", "choice")  # free-form generation then parsing | argmax of the option letters' logits




def decode_image(value: Any) -> Image.Image:
    """A PIL image from what a `datasets` row holds: a decoded `PIL.Image`, a
    `{"bytes": ..., "path": ...}` dict (an undecoded `Image()` feature) or a file path.

    Raises:
        ValueError: none of these.
    """
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    if isinstance(value, (str, Path)):
        return Image.open(value)
    raise ValueError(f"Cannot read an image from {type(value).__name__}: expected a PIL image, an image "
                     f"feature's {{'bytes', 'path'}} or a file path.")


class Benchmark:
    """A benchmark: where its data lives, how rows become `VQARecord`s, how answers are scored.

    Subclasses set the class attributes and implement `item` and `score`. The constructor
    takes the `conf/benchmark/<name>.yaml` values.

    Args:
        hf_id: hub dataset id, or a local folder in the hub repo's layout (parquet files,
            as `load_dataset` reads them) or one written by `Dataset.save_to_disk`.
        revision: the dataset repo's commit the figures were made with (ignored for a folder).
        config: the dataset's config (subset) name, or None.
        split: the split evaluated.
        mode: "generate" (greedy generation, parsed by the official rules) or "choice"
            (argmax of the option letters' logits; multiple-choice benchmarks only).
        max_new_tokens: generation budget per answer (tokens).
        pre_prompt / post_prompt: text placed before / after the benchmark's question.
        limit: evaluate only the first `limit` items (None = all).
    """

    name: ClassVar[str] = ""
    image_column: ClassVar[str] = "image"
    multiple_choice: ClassVar[bool] = False

    def __init__(self, hf_id: str, revision: str | None = None, config: str | None = None, split: str = "test",
                 mode: str = "generate", max_new_tokens: int = 16, pre_prompt: str = "", post_prompt: str = "",
                 limit: int | None = None, **unknown):
        if unknown:
            raise ValueError(f"Unknown option(s) for benchmark '{self.name}': {', '.join(sorted(unknown))}.")
        if mode not in MODES:
            raise ValueError(f"benchmark.mode={mode!r}: use one of {', '.join(MODES)}.")
        if mode == "choice" and not self.multiple_choice:
            raise ValueError(f"benchmark '{self.name}' is not multiple choice: mode=choice reads option letters; "
                             f"use mode=generate.")
        self.hf_id, self.revision, self.config, self.split = hf_id, revision, config, split
        self.mode, self.max_new_tokens, self.limit = mode, int(max_new_tokens), limit
        self.pre_prompt, self.post_prompt = pre_prompt or "", post_prompt or ""

    def identity(self) -> dict:
        """What identifies this benchmark's questions and prompts (for result caches)."""
        return {"benchmark": self.name, "hf_id": self.hf_id, "revision": self.revision, "config": self.config,
                "split": self.split, "mode": self.mode, "max_new_tokens": self.max_new_tokens,
                "pre_prompt": self.pre_prompt, "post_prompt": self.post_prompt, "limit": self.limit}

    def answer_source(self) -> dict:
        """Where the questions come from, for the answer store's key (`lsg.answers.answer_context`):
        the benchmark's identity and a local copy's files."""
        return {"benchmark": self.identity(), "data": self.data_digest()}

    def data_digest(self) -> str | None:
        """For a local copy (`hf_id` a folder): sha256 over its files' names, sizes and modification
        times, so edited data never hits an old cache entry. None for a pinned hub revision."""
        import hashlib

        path = Path(self.hf_id).expanduser() if self.hf_id else None
        if path is None or not path.exists():
            return None
        files = sorted(p for p in path.rglob("*") if p.is_file())
        blob = "\n".join(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        return hashlib.sha256(blob.encode()).hexdigest()

    def dataset(self):
        """The split as a `datasets.Dataset` (images left undecoded until an item asks).

        Raises:
            FileNotFoundError: `hf_id` looks like a local path that does not exist.
        """
        import datasets

        path = Path(self.hf_id).expanduser()
        if path.exists():
            if any((path / name).exists() for name in ("dataset_dict.json", "state.json")):  # save_to_disk
                ds = datasets.load_from_disk(str(path))
                ds = ds[self.split] if isinstance(ds, datasets.DatasetDict) else ds
            else:
                ds = datasets.load_dataset(str(path), self.config, split=self.split)
        elif self.hf_id.startswith((".", "/", "~")):
            raise FileNotFoundError(f"benchmark.hf_id={self.hf_id!r} is not a folder: give a hub dataset id or "
                                    f"a local copy in the hub's layout.")
        else:
            ds = datasets.load_dataset(self.hf_id, self.config, split=self.split, revision=self.revision)
        if self.image_column in ds.column_names:
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        return ds

    def load(self) -> list[VQARecord]:
        """Every item of the split (the first `limit` if set), in dataset order."""
        ds = self.dataset()
        n = len(ds) if self.limit is None else min(int(self.limit), len(ds))
        rows = ds.select(range(n)) if n < len(ds) else ds
        return [self.item(row, index) for index, row in enumerate(rows)]

    def image_loader(self, row: dict) -> Callable[[], Image.Image]:
        """A lazy reader of the row's image (the undecoded bytes are kept, not the pixels)."""
        value = row[self.image_column]
        return lambda: decode_image(value)

    def wrap(self, question: str) -> str:
        """The question with the configured pre/post prompt."""
        return f"{self.pre_prompt}{question}{self.post_prompt}"

    def item(self, row: dict, index: int) -> VQARecord:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, items: Sequence[VQARecord], responses: Sequence[str]) -> Result:  # pragma: no cover - abstract
        """The official scores of one answer per item: `Result(correct, parsed, subtasks, metrics)`."""
        raise NotImplementedError


class DataSplit(Benchmark):
    """A split of a data config (`conf/data/*.yaml`: shapes, a LLaVA JSON) as a benchmark: its
    multiple-choice questions, answered by the option letters' logits (mode choice) and scored by
    exact letter (`lsg.evaluation.score_letters`; a generated answer's letter is read by the MMStar
    rule, `parsing.extract_letter`). Not registered: oracle, stack and train.py build it from their
    `data=` group.

    Args:
        data: the data config (plain dict), as `lsg.datamodule.load_records` reads it.
        split: "train", "val" or "test".
        limit: only the first `limit` multiple-choice questions (None = all).
    """

    name = "data"
    multiple_choice = True

    def __init__(self, data: dict, split: str = "val", limit: int | None = None, mode: str = "choice",
                 max_new_tokens: int = 8):
        super().__init__(hf_id="", split=split, mode=mode, max_new_tokens=max_new_tokens, limit=limit)
        self.data = dict(data)

    def identity(self) -> dict:
        return {"benchmark": self.name, "data": self.data, "split": self.split, "mode": self.mode,
                "limit": self.limit}

    def answer_source(self) -> dict:
        return {"data": self.data, "split": self.split}  # the key every data-split answer was stored under

    def load(self) -> list[VQARecord]:
        """The split's multiple-choice questions (options and a letter answer), in file order;
        possibly none (e.g. Cambrian's free-form answers)."""
        from lsg.datamodule import load_records

        records = mc_records(load_records(self.data, self.split))
        return records[:int(self.limit)] if self.limit else records

    def score(self, items: Sequence[VQARecord], responses: Sequence[str]) -> Result:
        check_lengths(items, responses)
        return score_letters(items, [extract_letter(r, len(it.options)) for it, r in zip(items, responses)])


REGISTRY: dict[str, type[Benchmark]] = {}


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: make a benchmark available by its `name`."""
    REGISTRY[cls.name] = cls
    return cls


def get_benchmark(name: str, **cfg) -> Benchmark:
    """Build a registered benchmark from its config values.

    Raises:
        ValueError: unknown name (the message lists the known ones) or a bad option.
    """
    if name not in REGISTRY:
        raise ValueError(f"Unknown benchmark {name!r}. Known benchmarks: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[name](**cfg)


def check_lengths(items: Sequence[VQARecord], responses: Sequence[str]) -> None:
    """Raise ValueError unless there is exactly one response per item."""
    if len(items) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(items)} items: score one response per item.")
