"""POPE (Li et al. 2023): object-hallucination yes/no questions on COCO val2014 images, three
negative-sampling settings (random, popular, adversarial) of 3,000 balanced questions.
Hub: `lmms-lab/POPE`, config `default`, split `test` (9,000 rows).

Row schema: `id`, `question_id`, `question`, `answer` "yes"/"no", `image_source`, `image`
Image, `category` (the setting). Scored by POPE's official scorer (AoiDragon/POPE
`evaluate.py`): the answer is "no" when its first sentence holds the word "no" / "No" / "not",
else "yes" (`parsing.pope_yes_no`); accuracy, precision, recall and F1 with "yes" as the
positive class, and the yes-ratio of the predictions, per setting.
"""

from __future__ import annotations

from typing import Sequence

from lsg.benchmarks.base import Benchmark, check_lengths, register
from lsg.benchmarks.parsing import pope_yes_no
from lsg.data.record import VQARecord
from lsg.evaluation import Result


def binary_metrics(predicted: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """POPE's metrics (%), "yes" positive: accuracy, precision, recall, F1, yes_ratio (share of
    "yes" predictions). A metric whose denominator is zero is 0."""
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predicted, truth))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predicted, truth))
    tn = sum(p == "no" and t == "no" for p, t in zip(predicted, truth))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predicted, truth))
    n = max(len(truth), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100.0 * (tp + tn) / n, "precision": 100.0 * precision, "recall": 100.0 * recall,
            "f1": 100.0 * f1, "yes_ratio": 100.0 * sum(p == "yes" for p in predicted) / n}


@register
class POPE(Benchmark):
    name = "pope"

    def item(self, row: dict, index: int) -> VQARecord:
        return VQARecord(id=str(row["id"]), question=self.wrap(row["question"]), answer=row["answer"].strip().lower(),
                    subtask=row["category"], image_loader=self.image_loader(row))

    def score(self, items: Sequence[VQARecord], responses: Sequence[str]) -> Result:
        """Per setting and over all: `<setting>/<metric>` and `<metric>` (%)."""
        check_lengths(items, responses)
        parsed = [pope_yes_no(r) for r in responses]
        truth = [it.answer for it in items]
        metrics = {}
        for setting in sorted({it.subtask for it in items}):
            keep = [i for i, it in enumerate(items) if it.subtask == setting]
            metrics.update({f"{setting}/{k}": v for k, v in
                            binary_metrics([parsed[i] for i in keep], [truth[i] for i in keep]).items()})
        metrics.update(binary_metrics(parsed, truth))
        correct = [float(p == t) for p, t in zip(parsed, truth)]
        return Result(correct, parsed, [it.subtask for it in items], metrics)
