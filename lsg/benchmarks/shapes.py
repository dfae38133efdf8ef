"""The offline benchmark: the synthetic `shapes` splits (lsg.data.shapes), seven sub-tasks of
CV-Bench / MMStar / POPE kinds, multiple choice with letter answers.

`hf_id: null` generates the split on first use (as `data=shapes` does); a folder written by
`export_split` (a `datasets` folder, the layout lmms-eval reads) is read through the same
`datasets` path as the hub benchmarks. Both give the same items.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from lsg.benchmarks.base import Benchmark, check_lengths, register
from lsg.benchmarks.parsing import extract_letter
from lsg.data.record import VQARecord
from lsg.evaluation import Result

SIZES = {"train": "n_train", "val": "n_val", "test": "n_test"}


@register
class Shapes(Benchmark):
    """Shapes: option-letter accuracy per sub-task (`mode: choice` reads the letters' logits,
    the project's default reading; `mode: generate` parses the letter from generated text
    with the MMStar rules)."""

    name = "shapes"
    multiple_choice = True

    def __init__(self, hf_id: str | None = None, root: str = "data/shapes", n: int = 350, split: str = "val",
                 **cfg):
        super().__init__(hf_id=hf_id or "", split=split, **cfg)
        self.root, self.n = root, int(n)

    def identity(self) -> dict:
        return {**super().identity(), "n": self.n if not self.hf_id else None,
                "root": str(Path(self.root).resolve()) if not self.hf_id else None}

    def load(self) -> list[VQARecord]:
        if self.hf_id:
            return super().load()
        from lsg.datamodule import load_records

        records = load_records({"name": "shapes", "root": self.root, f"n_{self.split}": self.n}, self.split)
        records = records if self.limit is None else records[:int(self.limit)]
        return [replace(r, question=self.wrap(r.question)) for r in records]

    def item(self, row: dict, index: int) -> VQARecord:
        return VQARecord(id=row["id"], question=self.wrap(row["question"]), answer=row["answer"], subtask=row["subtask"],
                    options=tuple(row["options"]), answer_letter=row["answer"], image_loader=self.image_loader(row))

    def score(self, items: Sequence[VQARecord], responses: Sequence[str]) -> Result:
        """Accuracy per sub-task; a response is right when its parsed letter is the answer's."""
        check_lengths(items, responses)
        parsed = [extract_letter(r, len(it.options)) for it, r in zip(items, responses)]
        correct = [float(p == it.answer_letter) for p, it in zip(parsed, items)]
        subtasks = [it.subtask for it in items]
        return Result(correct, parsed, subtasks, {"accuracy": 100.0 * sum(correct) / max(len(correct), 1)})


def export_split(out_dir: str | Path, split: str = "val", n: int = 350, root: str = "data/shapes") -> Path:
    """Write a shapes split as a `datasets` folder (`Dataset.save_to_disk`): columns `id`,
    `question` (with options and the answer instruction), `options` (list of str), `answer`
    (letter), `subtask` and `image` (an `Image()` feature holding the PNG bytes).

    This is what an lmms-eval task or `benchmark=shapes benchmark.hf_id=<dir>` reads.
    Returns the folder.
    """
    import datasets

    from lsg.datamodule import load_records

    records = load_records({"name": "shapes", "root": root, f"n_{split}": n}, split)
    features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "options": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.Value("string"), "subtask": datasets.Value("string"),
                                  "image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"id": [r.id for r in records], "question": [r.question for r in records],
                                     "options": [list(r.options) for r in records],
                                     "answer": [r.answer for r in records], "subtask": [r.subtask for r in records],
                                     "image": [{"bytes": Path(r.image_path).read_bytes(), "path": None}
                                               for r in records]}, features=features)
    out_dir = Path(out_dir)
    datasets.DatasetDict({split: ds}).save_to_disk(str(out_dir))
    return out_dir
