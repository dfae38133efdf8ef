"""The answer store: every evaluation's per-question answers, one cache key, atomic files.

The answer pipeline (`lsg.evaluation.answer_stacks`: eval.py, oracle, stack, train.py's closing
comparison) and training's validation keep their answers here, in one format:

    {<info: spec, elapsed_s, epoch, ...>, "answers": {<question id>: <Answer fields>}}

- `Answer` is the per-question record: id, sub-task, question, gold answer, prediction,
  whether it was right, and the gate ratios where the gate has them (LSG, docs/methods.md section 3).
- `answer_context` + `answer_key` are the one cache key builder. The key covers everything
  that changes an answer besides the gate stack: the backbone (name, weights fingerprint,
  dtype, sinks), the processor (chat template, system prompt, vocabulary, image settings),
  the questions themselves (ids, texts, gold answers) and the caller's source (data config
  and split, or a benchmark's identity and files). So a cache never serves another model's,
  another prompt format's or another split's answers.
- `AnswerCache` keeps one file per (stack, context) under a folder; files are written
  atomically (`lsg.files`), so an interrupted run resumes from the stacks it finished.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from lsg.backbones import Backbone
from lsg.data import VQARecord
from lsg.files import sha256_json, write_json

KEY_HEX_DIGITS = 20  # hex digits of a cache key: 80 bits, no collision among a project's stacks


@dataclass
class Answer:
    """One question's answer by one method.

    Attributes:
        id: the question's id (unique within its split or benchmark).
        subtask: the question's sub-task.
        question: the question text the model read (after the chat template's user turn).
        gold: the reference answer (the option letter for multiple choice).
        prediction: the method's answer (an option letter, or generated text).
        correct: whether `prediction` is right: the official score (1.0 / 0.0, or partial) where the
            pipeline stored it, a bool in training's validation files, None when not scored.
        ratios: the gate's group ratios for this question (LSG), else None.
        baseline: the unmodified backbone's prediction (validation files), else None.
    """

    id: str
    subtask: str
    question: str
    gold: Any
    prediction: str
    correct: float | bool | None = None
    ratios: list[float] | None = None
    baseline: str | None = None

    def to_dict(self) -> dict:
        """The fields but `id` (the key of the answers mapping), JSON-ready."""
        d = asdict(self)
        d.pop("id")
        return d

    @classmethod
    def from_dict(cls, id: str, data: dict) -> "Answer":
        """The answer stored as `to_dict` wrote it. Files of the earlier format (`answer` for the
        gold letter, no question) are read with an empty question, which `answers_for` never
        matches, so their questions are answered again instead of trusted."""
        names = {f.name for f in fields(cls)}
        data = {"gold": data.get("answer"), "question": "", **data}
        return cls(id=id, **{k: v for k, v in data.items() if k in names})


def gold_of(record: VQARecord) -> Any:
    """The reference a prediction is compared with: the option letter of a multiple-choice
    record, else its answer."""
    return record.answer_letter if record.answer_letter else record.answer


def answers_of(records: Sequence[VQARecord], predictions: Sequence[str], **per_question: Sequence) -> list[Answer]:
    """`Answer`s of `records` (same order) with their predictions; `correct` is the exact match
    with the gold letter for multiple-choice records (None otherwise). `per_question` adds
    other fields per record (e.g. `ratios=`, `baseline=`)."""
    out = []
    for i, (r, p) in enumerate(zip(records, predictions)):
        extra = {k: v[i] for k, v in per_question.items()}
        out.append(Answer(r.id, r.subtask, r.question, gold_of(r), p,
                          extra.pop("correct", p == r.answer_letter if r.answer_letter else None), **extra))
    return out


def questions_digest(records: Sequence[VQARecord]) -> str:
    """sha256 over the questions in order: ids, texts and reference answers."""
    return sha256_json([(r.id, r.question, r.answer) for r in records])


def answer_context(backbone: Backbone, records: Sequence[VQARecord], **source) -> dict:
    """Everything but the gate stack that identifies a method's answers to `records`.

    Computed once per evaluation (it reads the processor). `source` names where the questions
    come from (`Benchmark.answer_source`): `data=<data config>, split=...` for a data split,
    `benchmark=<identity>, data=<files digest>` for a benchmark."""
    return {"backbone": backbone.name, "fingerprint": backbone.fingerprint, "dtype": str(backbone.model.dtype),
            "sinks": backbone.sinks.to_dict(), "processor": backbone.processor_digest(),
            "questions": questions_digest(records), "source": source}


def answer_key(stack_identity: Any, context: dict) -> str:
    """Cache key (`KEY_HEX_DIGITS` hex digits) of one stack's answers in one `answer_context`;
    `stack_identity` is the stack's gate configs, checkpoint digests and layers
    (`lsg.specs.GateStack.identity`)."""
    return sha256_json({"stack": stack_identity, **context})[:KEY_HEX_DIGITS]


def write_answers(path: str | Path, answers: Sequence[Answer], **info) -> Path:
    """Write answers (and `info`: spec, elapsed_s, epoch...) to `path`, atomically."""
    return write_json(path, {**info, "answers": {a.id: a.to_dict() for a in answers}})


def read_answers(path: str | Path) -> tuple[dict, dict[str, Answer]] | None:
    """`(info, {id: Answer})` of a file written by `write_answers`, or None when absent."""
    import json

    path = Path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    answers = data.pop("answers")
    return data, {k: Answer.from_dict(k, v) for k, v in answers.items()}


def answers_for(records: Sequence[VQARecord], stored: dict[str, Answer]) -> list[Answer] | None:
    """The stored answers of `records`, in their order, or None when one is missing or was
    given to another question text or gold answer under the same id."""
    out = []
    for r in records:
        a = stored.get(r.id)
        if a is None or a.question != r.question or a.gold != gold_of(r):
            return None
        out.append(a)
    return out


class AnswerCache:
    """One file of answers per stack under `folder`, keyed by `answer_key(identity, context)`.

    Args:
        folder: where the files live (e.g. `<out_dir>/cache`); None = no caching.
        context: from `answer_context` for this evaluation's backbone, questions and source.
    """

    def __init__(self, folder: str | Path | None, context: dict):
        self.folder = Path(folder) if folder is not None else None
        self.context = context

    def key(self, stack_identity: Any) -> str:
        return answer_key(stack_identity, self.context)

    def path(self, stack_identity: Any) -> Path:
        return self.folder / f"{self.key(stack_identity)}.json"

    def get(self, stack_identity: Any, records: Sequence[VQARecord]) -> tuple[list[Answer], dict] | None:
        """`(answers in record order, info)` of a cached stack, or None (not cached, or cached
        for other questions)."""
        if self.folder is None:
            return None
        found = read_answers(self.path(stack_identity))
        if found is None:
            return None
        info, stored = found
        answers = answers_for(records, stored)
        return None if answers is None else (answers, info)

    def put(self, stack_identity: Any, answers: Sequence[Answer], **info) -> Path | None:
        """Store a stack's answers (with `info`, e.g. `spec=`, `elapsed_s=`)."""
        if self.folder is None:
            return None
        return write_answers(self.path(stack_identity), answers, **info)
