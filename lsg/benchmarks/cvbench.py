"""CV-Bench (Tong et al. 2024, Cambrian-1): 2,638 vision-centric multiple-choice questions;
2D: Count and Relation (ADE20K, COCO), 3D: Depth and Distance (Omni3D). Hub:
`nyu-visionx/CV-Bench`, config `default` (both), `2D` or `3D`, split `test`.

Row schema: `idx` int64, `type` "2D"/"3D", `task`, `image` Image, `question`, `choices` list of
str, `answer` "(C)", `prompt` (question + "Select from the following choices." + "(A) ..."
lines), `filename`, `source` "ADE20K"/"COCO"/"Omni3D", `source_dataset`, `source_filename`,
`target_class`, `target_size`, `bbox`. Scored as the dataset card defines: accuracy per
source, 2D = mean(ADE20K, COCO), 3D = Omni3D, combined = mean(2D, 3D).

Per question, `parser: official` (the default) gives the verdict of the authors' scorer for
the question's source (cambrian-mllm/cambrian `eval/eval/{ade,coco,omni}/*_test.py`,
`parsing.cvbench_official`): ADE20K and COCO take the option letter only, Omni3D its own rule.
`parser: lenient` is this project's own reader instead (`parsing.cvbench_lenient_letter`: an
exact option text also counts); it is no official rule.
"""

from __future__ import annotations

from statistics import mean
from typing import Sequence

from lsg.benchmarks.base import Benchmark, check_lengths, register
from lsg.benchmarks.parsing import (
    CVBENCH_PARSERS,
    cvbench_lenient_letter,
    cvbench_official,
)
from lsg.data.record import VQARecord
from lsg.evaluation import Result


@register
class CVBench(Benchmark):
    """CV-Bench; every `Benchmark` option plus:

    Args:
        parser: "official" (Cambrian's per-source scorers, the default) or "lenient" (this
            project's reader: option letter or exact option text, any source). Only the scores
            depend on it; cached answers are reused.
    """

    name = "cvbench"
    multiple_choice = True

    def __init__(self, *args, parser: str = "official", **kwargs):
        super().__init__(*args, **kwargs)
        if parser not in CVBENCH_PARSERS:
            raise ValueError(f"benchmark.parser={parser!r}: use one of {', '.join(CVBENCH_PARSERS)}.")
        self.parser = parser

    def item(self, row: dict, index: int) -> VQARecord:
        letter = row["answer"].strip().strip("()").upper()
        return VQARecord(id=str(row["idx"]), question=self.wrap(row["prompt"]), answer=row["answer"], subtask=row["task"],
                    options=tuple(row["choices"]), answer_letter=letter,
                    meta={"source": row["source"], "type": row["type"]}, image_loader=self.image_loader(row))

    def verdict(self, response: str, item: VQARecord) -> tuple[str, bool]:
        """(what the configured parser read, whether the answer is right) for one question."""
        if self.parser == "official":
            return cvbench_official(response, item.meta["source"], item.options, item.answer_letter)
        letter = cvbench_lenient_letter(response, item.options)
        return letter, letter != "" and letter == item.answer_letter

    def score(self, items: Sequence[VQARecord], responses: Sequence[str]) -> Result:
        """Per-question correctness; metrics (%): accuracy per source, 2D, 3D, and the combined
        score (sources absent from `items`, e.g. with `limit`, are left out of the means)."""
        check_lengths(items, responses)
        verdicts = [self.verdict(r, it) for r, it in zip(responses, items)]
        parsed = [p for p, _ in verdicts]
        correct = [float(right) for _, right in verdicts]
        by_source: dict[str, list[float]] = {}
        for c, it in zip(correct, items):
            by_source.setdefault(it.meta["source"], []).append(c)
        acc = {s: 100.0 * mean(v) for s, v in sorted(by_source.items())}
        metrics = {f"accuracy_{s}": a for s, a in acc.items()}
        two_d = [acc[s] for s in ("ADE20K", "COCO") if s in acc]
        if two_d:
            metrics["accuracy_2d"] = mean(two_d)
        if "Omni3D" in acc:
            metrics["accuracy_3d"] = acc["Omni3D"]
        parts = [metrics[k] for k in ("accuracy_2d", "accuracy_3d") if k in metrics]
        metrics["combined"] = mean(parts) if parts else float("nan")
        return Result(correct, parsed, [it.subtask for it in items], metrics)
