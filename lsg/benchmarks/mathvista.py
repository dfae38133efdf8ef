"""MathVista (Lu et al. 2024), testmini: 1,000 visual maths questions, multiple choice and free
form. Hub: `AI4Math/MathVista`, split `testmini`.

Row schema: `pid`, `question`, `image` (a path string), `decoded_image` Image, `choices`
(list of str, None for free form), `unit`, `precision` (float, for float answers), `answer`
(str: the choice's text for multiple choice), `question_type` ("multi_choice"/"free_form"),
`answer_type` ("text"/"integer"/"float"/"list"), `metadata` {category, context, grade,
img_height, img_width, language, skills, source, split, task}, `query` (the official
zero-shot prompt with its hint). Sub-tasks: `metadata.task` (FQA, GPS, MWP, TQA, VQA).

Scored as lupantech/MathVista's `evaluation/extract_answer.py` (`extract_answer`) and
`evaluation/calculate_score.py` (`normalize_extracted_answer`, `safe_equal`): the official
rule-based extraction steps (`parsing.mathvista_extract`), then the official normaliser
(`parsing.mathvista_normalize`) and exact equality with the answer string. Where the official
pipeline asks GPT-4 to extract the answer, this project calls no LLM: a rule-based stand-in
for the GPT-4 extraction step (`parsing.mathvista_gpt4_stand_in`) takes its place, so scores
are comparable only with other rule-based scores (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Sequence

from lsg.benchmarks.base import Benchmark, check_lengths, register
from lsg.benchmarks.parsing import mathvista_extract, mathvista_normalize
from lsg.data.record import VQARecord
from lsg.evaluation import Result


@register
class MathVista(Benchmark):
    """MathVista testmini; every `Benchmark` option plus:

    Args:
        quick_extract: also apply the `The answer is "x".` rule before the GPT-4 step, as
            `extract_answer.py --quick_extract` does (off by default, as in the script).
    """

    name = "mathvista"
    image_column = "decoded_image"

    def __init__(self, *args, quick_extract: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.quick_extract = bool(quick_extract)

    def item(self, row: dict, index: int) -> VQARecord:
        choices = list(row["choices"]) if row.get("choices") else None
        return VQARecord(id=str(row["pid"]), question=self.wrap(row["query"]), answer=str(row["answer"]),
                    subtask=row["metadata"]["task"], options=tuple(choices or ()),
                    meta={"question_type": row["question_type"], "answer_type": row["answer_type"],
                          "precision": row.get("precision"), "choices": choices},
                    image_loader=self.image_loader(row))

    def score(self, items: Sequence[VQARecord], responses: Sequence[str]) -> Result:
        """Accuracy (%) overall and per question type; a question is right when the normalised
        extraction equals the answer string exactly (`calculate_score.py`, `safe_equal`); no
        prediction (None) is always wrong."""
        check_lengths(items, responses)
        parsed, correct = [], []
        for r, it in zip(responses, items):
            m = it.meta
            extraction = mathvista_extract(r, m["question_type"], m["answer_type"], m["choices"], self.quick_extract)
            value = mathvista_normalize(extraction, m["choices"], m["question_type"], m["answer_type"], m["precision"])
            parsed.append("" if value is None else value)
            correct.append(float(value is not None and value == it.answer))
        metrics = {"accuracy": 100.0 * sum(correct) / max(len(correct), 1)}
        for kind in sorted({it.meta["question_type"] for it in items}):
            hits = [c for c, it in zip(correct, items) if it.meta["question_type"] == kind]
            metrics[f"accuracy_{kind}"] = 100.0 * sum(hits) / len(hits)
        return Result(correct, parsed, [it.subtask for it in items], metrics)
