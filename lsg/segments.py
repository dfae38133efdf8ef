"""Token segments of a multimodal sequence (docs/methods.md section 1).

Every sample splits into four disjoint segments: `sys` (the text before the image,
and the image's own marker tokens between its runs of image tokens), `vis` (image
placeholder positions), `user` (prompt after the image, up to and including the last
prompt token) and `out` (answer or generated tokens). Padding belongs to none.
Segments are computed per sample from the positions of real tokens, so left and right
padding give the same segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # labels ignored by the next-token loss (the Hugging Face convention)


class ImageTokenId(int):
    """An image token id (an `int`) that also names the marker tokens one image's span may hold
    between its runs of image tokens: Idefics3 / SmolVLM write an image as several runs of
    `<image>` (one per tile) separated by `<fake_token_around_image>`, `<row_i_col_j>`,
    `<global-img>` and newlines. Runs joined only by these markers count as one image
    (`Segments.from_batch`); a plain `int` id allows no marker (one run per image).

    Attributes:
        span_markers: the marker token ids.
    """

    span_markers: frozenset[int]

    def __new__(cls, image_token_id: int, span_markers=()):
        self = super().__new__(cls, image_token_id)
        self.span_markers = frozenset(int(m) for m in span_markers)
        return self


def last_prompt_positions(attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Index `(B,)` of the last prompt token, the one that predicts the first answer token.

    With labels (teacher forcing) it is the position just before the first labelled
    token, so answer tokens never move it; without labels, or for a row without
    labelled tokens, it is the last non-padding token.

    Args:
        attention_mask: `(B, T)`, 1 on real tokens.
        labels: optional `(B, T)`, -100 on non-answer positions.
    """
    real = attention_mask.bool()
    last_real = real.shape[1] - 1 - real.flip(1).long().argmax(1)
    if labels is None:
        return last_real
    is_answer = (labels != IGNORE_INDEX) & real
    first_answer = is_answer.long().argmax(1)
    return torch.where(is_answer.any(1), first_answer - 1, last_real)


@dataclass
class Segments:
    """Boolean masks `(B, T)` of the four segments plus the last prompt index `(B,)`."""

    sys: torch.Tensor
    vis: torch.Tensor
    user: torch.Tensor
    out: torch.Tensor
    last_prompt: torch.Tensor

    @classmethod
    def from_batch(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_token_id: int,
        labels: torch.Tensor | None = None,
    ) -> "Segments":
        """Segments of a tokenised batch.

        Args:
            input_ids: `(B, T)` with image placeholders already expanded by the processor.
            attention_mask: `(B, T)`, 1 on real tokens (None = no padding).
            image_token_id: the backbone's `config.image_token_id`; an `ImageTokenId` also names
                the marker tokens that may separate the runs of one image (they join `sys`).
            labels: `(B, T)` answer labels (teacher forcing) or None (prompt only).

        Raises:
            ValueError: shapes differ; a sample has no image token, or several separate runs
                of image tokens (several images; runs joined only by the `ImageTokenId`'s markers
                are one image): every prompt must hold exactly one image, or `sys`/`user` would
                overlap or leave tokens in no segment.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape or (labels is not None and labels.shape != input_ids.shape):
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and labels "
                f"{None if labels is None else tuple(labels.shape)} must all be (B, T)."
            )
        real = attention_mask.bool()
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        vis = (input_ids == image_token_id) & real
        markers = sorted(getattr(image_token_id, "span_markers", ()))
        joined = vis | (torch.isin(input_ids, input_ids.new_tensor(markers)) & real) if markers else vis
        run = (joined & ~torch.nn.functional.pad(joined, (1, 0))[:, :-1]).long().cumsum(1)  # run number
        before = torch.nn.functional.pad(torch.where(vis, run, 0).cummax(1).values, (1, 0))[:, :-1]
        runs = (vis & (run > before)).sum(1)  # separate runs of image tokens (joined by the markers)
        if (runs != 1).any():
            bad = (runs != 1).nonzero().flatten().tolist()
            raise ValueError(
                f"Sample(s) {bad} hold {runs[bad].tolist()} images (runs of image tokens, id {image_token_id}); "
                f"lsg needs exactly one image per prompt, placed by the chat template (Backbone.build_batch). "
                f"Drop text-only samples or give them an image; split multi-image samples.")
        last = last_prompt_positions(attention_mask, labels)
        last_vis = torch.where(vis.any(1), torch.where(vis, pos, -1).amax(1), -1)
        prompt = real & (pos <= last[:, None])
        return cls(
            sys=prompt & ~vis & (pos < last_vis[:, None]),  # before the image, and its markers
            vis=vis,
            user=prompt & (pos > last_vis[:, None]),
            out=real & (pos > last[:, None]),
            last_prompt=last,
        )

    @property
    def prompt(self) -> torch.Tensor:
        """Real prompt tokens `(B, T)`: sys, vis and user (never `out`, never padding)."""
        return self.sys | self.vis | self.user

    @property
    def text(self) -> torch.Tensor:
        """Non-visual real tokens `(B, T)`."""
        return self.sys | self.user | self.out

    def extend(self, n_new: int) -> "Segments":
        """Segments after `n_new` decoded tokens, which all belong to `out`."""
        def grow(mask: torch.Tensor, value: bool) -> torch.Tensor:
            return torch.cat([mask, mask.new_full((mask.shape[0], n_new), value)], dim=1)

        return Segments(grow(self.sys, False), grow(self.vis, False), grow(self.user, False),
                        grow(self.out, True), self.last_prompt)
