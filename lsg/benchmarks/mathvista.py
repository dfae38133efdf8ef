"""MathVista (Lu et al. 2024), testmini: 1,000 visual maths questions, multiple choice and free
form. Hub: `AI4Math/MathVista`, split `testmini`.

Row schema: `pid`, `question`, `image` (a path string), `decoded_image` Image, `choices`
(list of str, None for free form), `unit`, `precision` (float, for float answers), `answer`
(str: the choice's text for multiple choice), `question_type` ("multi_choice"/"free_form"),
`answer_type` ("text"/"integer"/"float"/"list"), `metadata` {category, context, grade,
img_height, img_width, language, skills, source, split, task}, `query` (the official
zero-shot prompt with its hint). Sub-tasks: `metadata.task` (FQA, GPS, MWP, TQA, VQA).

The official pipeline extracts the answer with GPT-4 when its rules do not; this project
uses rules only (`parsing.mathvista_extract`, said in the README), then the official
normaliser and exact string match (`safe_equal`).
"""

from __future__ import annotations

from typing import Sequence

from lsg.benchmarks.base import Benchmark, Item, Score, check_lengths, register
from lsg.benchmarks.parsing import mathvista_extract, mathvista_normalize


@register
class MathVista(Benchmark):
    name = "mathvista"
    image_column = "decoded_image"

    def item(self, row: dict, index: int) -> Item:
        choices = list(row["choices"]) if row.get("choices") else None
        return Item(id=str(row["pid"]), prompt=self.wrap(row["query"]), answer=str(row["answer"]),
                    subtask=row["metadata"]["task"], options=tuple(choices or ()),
                    meta={"question_type": row["question_type"], "answer_type": row["answer_type"],
                          "precision": row.get("precision"), "choices": choices},
                    image_loader=self.image_loader(row))

    def score(self, items: Sequence[Item], responses: Sequence[str]) -> Score:
        """Accuracy (%) overall and per question type; a question is right when the normalised
        extraction equals the answer string."""
        check_lengths(items, responses)
        parsed, correct = [], []
        for r, it in zip(responses, items):
            m = it.meta
            extraction = mathvista_extract(r, m["question_type"], m["answer_type"], m["choices"])
            value = mathvista_normalize(extraction, m["choices"], m["question_type"], m["answer_type"], m["precision"])
            parsed.append("" if value is None else value)
            correct.append(float(value is not None and str(value).strip() == it.answer.strip()))
        metrics = {"accuracy": 100.0 * sum(correct) / max(len(correct), 1)}
        for kind in sorted({it.meta["question_type"] for it in items}):
            hits = [c for c, it in zip(correct, items) if it.meta["question_type"] == kind]
            metrics[f"accuracy_{kind}"] = 100.0 * sum(hits) / len(hits)
        return Score(correct, parsed, [it.subtask for it in items], metrics)
