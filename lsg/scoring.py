"""Losses and multiple-choice scoring that compute logits only where they are needed.

The LM head of a 7B LLaVA maps 4096 -> 32K; on a 600-token sequence that is the
largest tensor of the forward. Training needs logits only at positions that predict
an answer token, and multiple-choice evaluation only at the last prompt token, so
both run the decoder without its head and project just those rows (docs/methods.md section 3,
"next-token loss on answer tokens"; section 6, "score the option letter").
"""

from __future__ import annotations

import string

from typing import Sequence

import torch
import torch.nn.functional as F

from lsg.backbones import Backbone
from lsg.context import run_state
from lsg.segments import IGNORE_INDEX, last_prompt_positions

LETTERS = string.ascii_uppercase


def decoder_hidden(backbone: Backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states `(B, T, D)` of the LLM (after its final norm), no LM head.

    Inside `lsg.attach`, the batch's labels are put on the block's run state for the context
    this forward builds, so teacher-forced answers are `out` tokens and never move the last
    prompt token."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    run = run_state(backbone.model)
    if run is not None:
        run.labels = batch.get("labels")
    return backbone.family.multimodal_model(backbone.model)(**inputs, use_cache=False).last_hidden_state


def answer_token_losses(backbone: Backbone, batch: dict[str, torch.Tensor],
                        hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of every answer token: `(losses (N,) nats, targets (N,) token ids)`,
    in row-major order of the labelled positions.

    Position t predicts token t+1, so the hidden state at t is projected only where
    `labels[:, t+1] != -100`. `hidden` (from `decoder_hidden`) avoids a second forward.

    Raises:
        ValueError: the batch has no labels or no answer token.
    """
    labels = batch.get("labels")
    if labels is None or not (labels != IGNORE_INDEX).any():
        raise ValueError("answer_loss needs `labels` with at least one answer token (build_batch(..., answers=...)).")
    hidden = decoder_hidden(backbone, batch) if hidden is None else hidden
    target = labels[:, 1:]
    where = target != IGNORE_INDEX
    logits = backbone.model.lm_head(hidden[:, :-1][where])  # (N_answer, V)
    return F.cross_entropy(logits.float(), target[where], reduction="none"), target[where]


def answer_loss(backbone: Backbone, batch: dict[str, torch.Tensor], hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens only (scalar, nats/token;
    `answer_token_losses`).

    Raises:
        ValueError: the batch has no labels or no answer token.
    """
    return answer_token_losses(backbone, batch, hidden)[0].mean()


LOSS_KINDS = ("text", "eot")  # the kinds of answer token `loss_by_kind` separates


def loss_by_kind(losses: torch.Tensor, targets: torch.Tensor, end_of_turn_id: int | None
                 ) -> dict[str, tuple[torch.Tensor, int]]:
    """The answer-token loss split by kind of token: `"eot"`, the end-of-turn token that closes
    every assistant turn (`build_batch` labels it after each answer), and `"text"`, the answer's
    own tokens. For each kind present: (mean loss in nats, a 0-d tensor; its token count). The
    total `answer_loss` is the count-weighted mean of the two.

    Args:
        losses, targets: `(N,)` from `answer_token_losses`.
        end_of_turn_id: the tokenizer's end-of-turn (`eos_token`) id; None = every token is text.
    """
    eot = targets == end_of_turn_id if end_of_turn_id is not None else torch.zeros_like(targets, dtype=torch.bool)
    out = {}
    for kind, mask in zip(LOSS_KINDS, (~eot, eot)):
        n = int(mask.sum())
        if n:
            out[kind] = (losses[mask].mean(), n)
    return out


def option_loss(backbone: Backbone, batch: dict[str, torch.Tensor], n_options: torch.Tensor,
                answer_index: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Multiple-choice classification loss (scalar, nats): cross-entropy over the option
    letters' logits at the last prompt token, the closed set `option_scores` reads (docs/methods.md
    section 6 scores the option letter; this trains that reading directly).

    Unlike `answer_loss` it has no pull towards the letters as a class of tokens; all of
    its gradient separates the right option from the others.

    Args:
        batch: from `build_batch`, with or without labels (the last prompt token is
            found the same way as in `option_scores`).
        n_options: `(B,)` number of options per row; letters past it are excluded.
        answer_index: `(B,)` index of the correct option (0 = A).
        hidden: `(B, T, D)` from `decoder_hidden`, to share one forward.

    Raises:
        ValueError: an answer index is not among its row's options.
    """
    hidden = decoder_hidden(backbone, batch) if hidden is None else hidden
    pos = last_prompt_positions(batch["attention_mask"], batch.get("labels")).to(hidden.device)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]  # (B, D)
    return option_cross_entropy(backbone, last, n_options, answer_index)


def option_cross_entropy(backbone: Backbone, hidden: torch.Tensor, n_options: torch.Tensor,
                         answer_index: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (scalar, nats) over the option letters' logits of N answer positions
    (docs/methods.md section 6's option-letter reading).

    The core of `option_loss`, for callers that know the positions themselves (e.g. one
    per question of a multi-turn conversation).

    Args:
        hidden: `(N, D)` final hidden states of the tokens that predict the letters.
        n_options: `(N,)` number of options per question; letters past it are excluded.
        answer_index: `(N,)` index of the correct option (0 = A).

    Raises:
        ValueError: an answer index is not among its question's options.
    """
    n_options, answer_index = torch.as_tensor(n_options), torch.as_tensor(answer_index)
    if ((answer_index < 0) | (answer_index >= n_options)).any():
        raise ValueError(f"answer_index {answer_index.tolist()} must lie in [0, n_options) = {n_options.tolist()}.")
    letter_ids = option_letter_ids(backbone, int(n_options.max())).to(hidden.device)
    logits = backbone.model.lm_head(hidden)[:, letter_ids].float()  # (N, K)
    absent = torch.arange(len(letter_ids), device=hidden.device)[None] >= n_options.to(hidden.device)[:, None]
    return F.cross_entropy(logits.masked_fill(absent, float("-inf")), answer_index.to(hidden.device))


def option_letter_ids(backbone: Backbone, n_options: int) -> torch.Tensor:
    """Token ids `(n_options,)` of the letters A, B, ... as the first answer token.

    Raises:
        ValueError: a letter is not a single token for this tokenizer.
    """
    ids = []
    for letter in LETTERS[:n_options]:
        tok = backbone.tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(tok) != 1:
            raise ValueError(f"Option letter {letter!r} is {len(tok)} tokens for backbone '{backbone.name}'.")
        ids.append(tok[0])
    return torch.tensor(ids)


@torch.no_grad()
def option_scores(backbone: Backbone, batch: dict[str, torch.Tensor], n_options: int,
                  hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Logits `(B, n_options)` of the option letters at the last prompt token.

    The prediction is their argmax: a closed-set reading of the first answer token,
    as lm-evaluation-harness scores multiple choice.
    """
    hidden = decoder_hidden(backbone, batch) if hidden is None else hidden
    pos = last_prompt_positions(batch["attention_mask"], batch.get("labels")).to(hidden.device)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]  # (B, D)
    letter_ids = option_letter_ids(backbone, n_options).to(hidden.device)
    return backbone.model.lm_head(last)[:, letter_ids].float()


def predicted_letters(backbone: Backbone, batch: dict[str, torch.Tensor], hidden: torch.Tensor | None,
                      n_options: Sequence[int]) -> list[str | None]:
    """The predicted option letter of every row: the argmax of its own options' letter logits at
    the last prompt token (`option_scores`), the one letter reading of every evaluation and of
    training's validation. None for a row without options (`n_options` 0).

    Args:
        batch: from `Backbone.build_batch`, `B` rows.
        hidden: final hidden states `(B, T, D)` of `batch` (None = run the backbone on it).
        n_options: options per row, `B` ints.
    """
    scores = option_scores(backbone, batch, max(max(n_options, default=0), 1), hidden)
    return [LETTERS[int(row[:k].argmax())] if k else None for row, k in zip(scores, n_options)]
