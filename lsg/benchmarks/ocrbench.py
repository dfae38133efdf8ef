"""OCRBench (Liu et al. 2024): 1,000 OCR questions in 10 types. Hub: `echo840/OCRBench`,
split `test`.

Row schema: `dataset` (source, e.g. "IIIT5K", "HME100k"), `question`, `question_type`,
`answer` a list of acceptable strings, `image` Image. Scored by the official
`OCRBench/example.py`: a hit when a reference is a substring of the answer
(`parsing.ocrbench_hit`); the score is the number of hits, out of 1,000 on the full set,
reported as Text Recognition (the six recognition types, of 300), Scene Text-centric VQA
(200), Doc-oriented VQA (200), Key Information Extraction (200) and Handwritten
Mathematical Expression Recognition (100).
"""

from __future__ import annotations

from typing import Sequence

from lsg.benchmarks.base import Benchmark, check_lengths, register
from lsg.benchmarks.parsing import ocrbench_hit
from lsg.data.record import VQARecord
from lsg.evaluation import Result

RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
               "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
GROUPS = {"Text Recognition": RECOGNITION, "Scene Text-centric VQA": ("Scene Text-centric VQA",),
          "Doc-oriented VQA": ("Doc-oriented VQA",), "Key Information Extraction": ("Key Information Extraction",),
          "Handwritten Mathematical Expression Recognition": ("Handwritten Mathematical Expression Recognition",)}


@register
class OCRBench(Benchmark):
    name = "ocrbench"

    def item(self, row: dict, index: int) -> VQARecord:
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        return VQARecord(id=str(index), question=self.wrap(row["question"]), answer=[str(a) for a in answers],
                    subtask=row["question_type"], meta={"dataset": row["dataset"]}, image_loader=self.image_loader(row))

    def score(self, items: Sequence[VQARecord], responses: Sequence[str]) -> Result:
        """Metrics in points (hits): each group of `GROUPS` and `final_score` (their sum; out of
        1,000 on the full set, out of `len(items)` otherwise)."""
        check_lengths(items, responses)
        correct = [float(ocrbench_hit(r, it.answer, it.meta["dataset"])) for r, it in zip(responses, items)]
        metrics = {group: sum(c for c, it in zip(correct, items) if it.subtask in types)
                   for group, types in GROUPS.items()}
        metrics["final_score"] = sum(correct)
        return Result(correct, ["hit" if c else "" for c in correct], [it.subtask for it in items], metrics)
