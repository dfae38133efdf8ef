"""MMStar (Chen et al. 2024): 1,500 vision-indispensable multiple-choice questions, six
categories of 250 (coarse perception, fine-grained perception, instance reasoning, logical
reasoning, math, science & technology). Hub: `Lin-Chen/MMStar`, split `val`.

Row schema: `index` int64, `question` str with the options inline ("...\\nOptions: A: x, B: y,
C: z, D: w"), `image` Image, `answer` a bare letter "A".."D", `category` str, `l2_category` str,
`meta_info` {source, split, image_path}. Scored by MMStar's official evaluator (MMStar
`eval/vlmeval/evaluate/mmstar.py`): the letter at the start of the answer
(`parsing.extract_letter`); the score is the accuracy over all questions. Only older lmms-eval
releases read the letter the same way (`exact_match` in `lmms_eval/tasks/mmstar/utils.py`);
later ones changed that function.
"""

from __future__ import annotations

import re
from typing import Sequence

from lsg.benchmarks.base import Benchmark, check_lengths, register
from lsg.benchmarks.parsing import extract_letter
from lsg.data.record import VQARecord
from lsg.evaluation import Result

OPTION = re.compile(r"(?:^|, )([A-Z]): ")


def inline_options(question: str) -> tuple[str, ...]:
    """The option texts of an MMStar question ("...\\nOptions: A: x, B: y"), in letter order;
    () if it has none."""
    _, sep, tail = question.rpartition("Options: ")
    if not sep:
        return ()
    parts = OPTION.split(tail.strip())  # ["", "A", "x", "B", "y", ...]
    letters, texts = parts[1::2], parts[2::2]
    return tuple(t.strip() for t in texts) if letters == [chr(65 + k) for k in range(len(letters))] else ()


@register
class MMStar(Benchmark):
    name = "mmstar"
    multiple_choice = True

    def item(self, row: dict, index: int) -> VQARecord:
        return VQARecord(id=str(row["index"]), question=self.wrap(row["question"]), answer=row["answer"],
                    subtask=row["category"], options=inline_options(row["question"]),
                    answer_letter=row["answer"].strip().upper(), meta={"l2_category": row["l2_category"]},
                    image_loader=self.image_loader(row))

    def score(self, items: Sequence[VQARecord], responses: Sequence[str]) -> Result:
        """Accuracy (%) over all questions (the official final score) and per category."""
        check_lengths(items, responses)
        parsed = [extract_letter(r) for r in responses]
        correct = [float(p != "" and p == it.answer_letter) for p, it in zip(parsed, items)]
        return Result(correct, parsed, [it.subtask for it in items],
                     {"accuracy": 100.0 * sum(correct) / max(len(correct), 1)})
