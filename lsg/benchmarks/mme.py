"""MME (Fu et al. 2023): yes/no questions in pairs (one "Yes", one "No" per image) over 10
perception and 4 cognition sub-tasks. Hub: `lmms-lab/MME`, split `test` (2,374 rows).

Row schema: `question_id` (the image's path, shared by its two questions), `image` Image,
`question` (ends with "Please answer yes or no."), `answer` "Yes"/"No", `category`. Scored by
MME's official `calculation.py`: the answer read from its first four characters
(`parsing.mme_yes_no`, "other" is wrong); per sub-task, accuracy x 100 + accuracy+ x 100
(accuracy+ = share of images with both questions right; at most 200); perception = the sum
over its 10 sub-tasks (at most 2,000), cognition over its 4 (at most 800).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from lsg.benchmarks.base import Benchmark, check_lengths, register
from lsg.benchmarks.parsing import mme_yes_no
from lsg.data.record import VQARecord
from lsg.evaluation import Result

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


@register
class MME(Benchmark):
    name = "mme"

    def item(self, row: dict, index: int) -> VQARecord:
        return VQARecord(id=f"{row['question_id']}#{index}", question=self.wrap(row["question"]),
                    answer=row["answer"].strip().lower(), subtask=row["category"],
                    meta={"image_id": row["question_id"]}, image_loader=self.image_loader(row))

    def score(self, items: Sequence[VQARecord], responses: Sequence[str]) -> Result:
        """Metrics: `<sub-task>` score (0-200) each, `perception` and `cognition` totals, and
        `accuracy` / `accuracy_plus` (%) over all questions / images.

        Raises:
            ValueError: a sub-task outside MME's 14 (the message names it).
        """
        check_lengths(items, responses)
        parsed = [mme_yes_no(r) for r in responses]
        correct = [float(p == it.answer) for p, it in zip(parsed, items)]
        per_task: dict[str, list[float]] = defaultdict(list)
        per_image: dict[tuple[str, str], list[float]] = defaultdict(list)
        for c, it in zip(correct, items):
            per_task[it.subtask].append(c)
            per_image[(it.subtask, it.meta["image_id"])].append(c)
        unknown = sorted(set(per_task) - set(PERCEPTION) - set(COGNITION))
        if unknown:
            raise ValueError(f"MME sub-task(s) {unknown} are neither perception {PERCEPTION} nor cognition {COGNITION}.")
        metrics = {}
        for task, hits in per_task.items():
            images = [v for (t, _), v in per_image.items() if t == task]
            plus = sum(all(v) for v in images) / len(images)
            metrics[task] = 100.0 * sum(hits) / len(hits) + 100.0 * plus
        metrics["perception"] = sum(metrics.get(t, 0.0) for t in PERCEPTION)
        metrics["cognition"] = sum(metrics.get(t, 0.0) for t in COGNITION)
        metrics["accuracy"] = 100.0 * sum(correct) / max(len(correct), 1)
        metrics["accuracy_plus"] = 100.0 * sum(all(v) for v in per_image.values()) / max(len(per_image), 1)
        return Result(correct, parsed, [it.subtask for it in items], metrics)
