"""How well the embedded backbone answers in its chat format: the per-question check behind
`scripts/embedded_health.py` (docs/embedded-backbone.md, "End of turn").

An instruct LVLM answers a multiple-choice question with the option's letter and then ends its
assistant turn. Three readings of that, per question, with the backbone unmodified:

- `letter_loss`: next-token cross-entropy (nats, over the whole vocabulary) of the gold letter
  at the last prompt token;
- `eot_loss`: cross-entropy of the end-of-turn token (the tokenizer's `eos_token`) at the gold
  letter, teacher-forced (the label `build_batch` puts after every answer);
- `greedy`: the first `GREEDY_TOKENS` greedy tokens; `ends_turn` where they are one capital
  letter then the end-of-turn token, `option_turn` where that letter is also one of the
  question's options (a 2-option question answered "D" ends its turn but names no option);

plus the option-letter argmax (`lsg.scoring.predicted_letters`, the project's accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from lsg.backbones import Backbone
from lsg.data.record import VQARecord
from lsg.evaluation import acc_pct, batches, check_choice, images_and_questions
from lsg.scoring import LETTERS, answer_token_losses, decoder_hidden, option_letter_ids, predicted_letters
from lsg.segments import IGNORE_INDEX

GREEDY_TOKENS = 2  # the letter and the end-of-turn token that should follow it


@dataclass
class Health:
    """Per-question readings of `check` (lists in record order) and their summary.

    Attributes:
        subtasks: each record's sub-task.
        letter_loss: nats, gold letter at the last prompt token.
        eot_loss: nats, end-of-turn token after the gold letter.
        correct: 1.0 where the option-letter argmax is the gold letter.
        ends_turn: True where greedy decoding gives one capital letter, then end of turn.
        option_turn: True where that letter is one of the record's options too.
        greedy: the first `GREEDY_TOKENS` greedy tokens, decoded with special tokens kept.
    """

    subtasks: list[str] = field(default_factory=list)
    letter_loss: list[float] = field(default_factory=list)
    eot_loss: list[float] = field(default_factory=list)
    correct: list[float] = field(default_factory=list)
    ends_turn: list[bool] = field(default_factory=list)
    option_turn: list[bool] = field(default_factory=list)
    greedy: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Means over questions: `eot_loss` and `letter_loss` (nats), `ends_turn_pct`,
        `option_turn_pct` and `acc_pct` (percent; accuracy per sub-task and "overall", as
        `lsg.evaluation.acc_pct`)."""
        return {"questions": len(self.subtasks),
                "eot_loss": float(np.mean(self.eot_loss)), "letter_loss": float(np.mean(self.letter_loss)),
                "ends_turn_pct": 100.0 * float(np.mean(self.ends_turn)),
                "option_turn_pct": 100.0 * float(np.mean(self.option_turn)),
                "acc_pct": acc_pct(self.correct, self.subtasks)}


@torch.no_grad()
def check(backbone: Backbone, records: Sequence[VQARecord], batch_size: int = 16,
          progress: str | None = None) -> Health:
    """The readings of the module docstring on multiple-choice `records`, backbone unmodified.

    Raises:
        ValueError: no record, a record without options and a letter answer, or a tokenizer
            without an end-of-turn (`eos_token`) token.
    """
    check_choice(records)
    tok = backbone.tokenizer
    if tok.eos_token_id is None:
        raise ValueError(f"Backbone '{backbone.name}': its tokenizer has no eos_token, the end-of-turn token "
                         "this check reads; set one in the processor's tokenizer.")
    eot = tok.eos_token_id
    capitals = option_letter_ids(backbone, len(LETTERS)).tolist()
    out = Health()
    for i in batches(len(records), batch_size, progress):
        chunk = records[i:i + batch_size]
        images, questions = images_and_questions(chunk)
        golds = [r.answer_letter for r in chunk]
        batch = backbone.on_device(backbone.build_batch(images, questions, golds))
        hidden = decoder_hidden(backbone, batch)
        losses, _ = answer_token_losses(backbone, batch, hidden)  # row-major over labelled tokens
        ends = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).cumsum(0)  # each row: its letter token(s), then end of turn
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        out.letter_loss += losses[starts].tolist()
        out.eot_loss += losses[ends - 1].tolist()
        predicted = predicted_letters(backbone, batch, hidden, [len(r.options) for r in chunk])
        out.correct += [float(p == g) for p, g in zip(predicted, golds)]
        out.subtasks += [r.subtask for r in chunk]
        prompt = backbone.on_device(backbone.build_batch(images, questions, padding_side="left"))
        new = backbone.model.generate(**prompt, max_new_tokens=GREEDY_TOKENS, do_sample=False)[:, prompt["input_ids"].shape[1]:]
        for r, row in zip(chunk, new.tolist()):
            ends = len(row) == GREEDY_TOKENS and row[0] in capitals and row[1] == eot
            out.ends_turn.append(ends)
            out.option_turn.append(ends and row[0] in capitals[:len(r.options)])
            out.greedy.append(tok.decode(row, skip_special_tokens=False))
    return out
