"""Token segments of a multimodal sequence (docs/methods.md section 1).

Every sample splits into four disjoint segments: `sys` (before the first image
token), `vis` (image placeholder positions), `user` (prompt after the image, up to
and including the last prompt token) and `out` (answer or generated tokens).
Padding belongs to none. Segments are computed per sample from the positions of
real tokens, so left and right padding give the same segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # labels ignored by the next-token loss (the Hugging Face convention)



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
            image_token_id: the backbone's `config.image_token_id`.
            labels: `(B, T)` answer labels (teacher forcing) or None (prompt only).

        Raises:
            ValueError: shapes differ; a sample has no image token, or several separate runs
                of image tokens (several images): every prompt must hold exactly one image,
                or `sys`/`user` would overlap or leave tokens in no segment.
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
        runs = (vis & ~torch.nn.functional.pad(vis, (1, 0))[:, :-1]).sum(1)  # separate runs of image tokens
        if (runs != 1).any():
            bad = (runs != 1).nonzero().flatten().tolist()
            raise ValueError(
                f"Sample(s) {bad} hold {runs[bad].tolist()} images (runs of image tokens, id {image_token_id}); "
                f"lsg needs exactly one image per prompt, placed by the chat template (Backbone.build_batch). "
                f"Drop text-only samples or give them an image; split multi-image samples.")
        last = last_prompt_positions(attention_mask, labels)
        big = input_ids.shape[1]
        first_vis = torch.where(vis.any(1), torch.where(vis, pos, big).amin(1), big)
        last_vis = torch.where(vis.any(1), torch.where(vis, pos, -1).amax(1), -1)
        prompt = real & (pos <= last[:, None])
        return cls(
            sys=prompt & (pos < first_vis[:, None]),
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
