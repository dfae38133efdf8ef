"""lmms-eval model `lsg`: any backbone with any gate stack attached, on any lmms-eval task.

    lmms-eval --model lsg --model_args backbone=smol-llava,gates=var --tasks mmstar
    lmms-eval --model lsg --model_args backbone=llava-1.5-7b,gates=lsg:ckpt.safetensors+var,dtype=bfloat16 ...

Registered through lmms-eval's entry-point group `lmms_eval.models` (lmms-eval >= 0.6;
`pyproject.toml` points it at `manifest`). Model args (comma-separated, so a gate spec uses
`+` for stacks and `3-7` for layer ranges, never commas):

    backbone   registered backbone name (conf/model/<name>.yaml)              [smol-llava]
    gates      gate spec (lsg.specs) as eval.py takes it: none, var, lsg:<ckpt>, a "+" stack, stack:<manifest>  [none]
    hf_id      local checkpoint folder or hub id for a hub backbone          [the config's]
    dtype      float32 / bfloat16 / float16                                  [the config's]
    device     auto / cpu / cuda / cuda:N                                    [auto]
    max_new_tokens  default generation budget when a task gives none        [16]
    allow_layer_move  run a trained gate at another layer                    [false]

This module imports lmms-eval, an optional dependency (README: installed with --no-deps so
the project's torch is kept); nothing else in `lsg` imports it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from lmms_eval.api.model import lmms

from lsg.attach import attach
from lsg.backbones import load_backbone
from lsg.data import VQARecord
from lsg.evaluation import generate_answers
from lsg.scoring import decoder_hidden
from lsg.segments import IGNORE_INDEX
from lsg.specs import parse_stack

DEFAULT_MAX_NEW_TOKENS = 16


def manifest():
    """The entry-point payload: lmms-eval's `ModelManifest` naming `LSGModel` as a simple model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="lsg", simple_class_path="lsg.lmms.LSGModel")]


def _wrap(result: Any) -> Any:
    """lmms-eval 0.7 stringifies plain (loss, greedy) tuples; its `GenerationResult` passes them through."""
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:  # lmms-eval < 0.7: plain tuples
        return result
    return GenerationResult(text=result)


class LSGModel(lmms):
    """A `lsg` backbone with a gate stack attached for every request (see the module docstring)."""

    is_simple = True

    def __init__(self, backbone: str = "smol-llava", gates: str = "none", hf_id: str | None = None,
                 dtype: str | None = None, device: str = "auto", batch_size: int | str = 1,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, allow_layer_move: bool = False, **unused):
        super().__init__()
        overrides = {k: v for k, v in {"hf_id": hf_id, "dtype": dtype}.items() if v is not None}
        self.backbone = load_backbone(backbone, **overrides, device=device)
        self.stack = parse_stack(str(gates), self.backbone, allow_layer_move=bool(allow_layer_move))
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def _image(self, request) -> tuple:
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if not visuals or len(visuals) != 1:
            raise ValueError(f"{task}/{split}/{doc_id}: lsg backbones take exactly one image per question, "
                             f"got {0 if not visuals else len(visuals)}.")
        return visuals[0].convert("RGB"), context

    def _gated(self):
        return attach(self.backbone, self.stack.layers) if self.stack.layers else nullcontext()

    def _record(self, request, index: int) -> VQARecord:
        """The request as a question of the answer pipeline (its image read when answered)."""
        return VQARecord(id=str(index), question=request.args[0], answer="",
                         image_loader=lambda: self._image(request)[0])

    def generate_until(self, requests) -> list[str]:
        """Greedy answers through the KV cache with the stack attached, as eval.py's generate mode
        answers (`lsg.evaluation.generate_answers`: left-padded batches of `batch_size`), cut at the
        task's `until` strings; consecutive requests with the same generation settings go together."""
        out: list[str] = []
        i = 0
        while i < len(requests):
            gen = requests[i].args[1]
            j = i + 1
            while j < len(requests) and requests[j].args[1] == gen:
                j += 1
            records = [self._record(r, k) for k, r in enumerate(requests[i:j], i)]
            texts = generate_answers(self.backbone, records, self.stack.layers,
                                     int(gen.get("max_new_tokens", self.max_new_tokens)), self.batch_size_per_gpu)
            until = gen.get("until") or []
            for text in texts:
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                out.append(text.strip())
            i = j
        return out

    @torch.no_grad()
    def loglikelihood(self, requests) -> list:
        """Per request `(negative log-likelihood of the continuation in nats, whether it is the
        greedy continuation)`, the continuation being the assistant's answer after the prompt
        (lmms-eval's convention: lower is better; multiple choice takes the argmin)."""
        out = []
        with self._gated():
            for request in requests:
                image, context = self._image(request)
                continuation = request.args[1]
                if callable(continuation):
                    _, _, _, doc_id, task, split = request.args
                    continuation = continuation(self.task_dict[task][split][doc_id])
                batch = self.backbone.on_device(self.backbone.build_batch([image], [context], [str(continuation).strip()]))
                labels = batch["labels"][0]
                where = (labels != IGNORE_INDEX).nonzero().flatten()
                if self.backbone.tokenizer.eos_token is not None:
                    where = where[:-1]  # the end-of-turn token build_batch appends is not part of the continuation
                hidden = decoder_hidden(self.backbone, batch)[0]
                logits = self.backbone.model.lm_head(hidden[where - 1]).float()  # position t predicts t + 1
                targets = labels[where]
                nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                out.append(_wrap((nll, bool((logits.argmax(-1) == targets).all()))))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("lsg: multi-round generation is not supported; use generate_until tasks.")
