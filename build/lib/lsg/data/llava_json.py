"""Reader for LLaVA-format conversation JSON (or JSONL) plus an image folder.

This is how every real VQA set (e.g. a Cambrian subset) and the synthetic shapes
benchmark are read: a list of records
    {"id": ..., "image": "rel/path.png",
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}],
     optional "subtask" / "category", optional "options": [...]}
The first human turn (with the image) and its gpt answer are the record's question and
answer; every later human/gpt pair of a multi-turn conversation is kept in `turns`, and
training puts the loss on every assistant turn (`Backbone.build_batch(followups=...)`).
"""
from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

from PIL import Image

from lsg.data.record import VQARecord

IMAGE_TAG = "<image>"
SKIP_REASONS = ("malformed", "no_image_field", "no_image_tag", "empty_answer", "missing_image", "corrupt_image")
_LETTER = re.compile(r"[A-Z]")


def _read_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records, got {type(data).__name__}")
    return data


def _strip_tag(text: str) -> str:
    return text.replace(IMAGE_TAG + "\n", "").replace("\n" + IMAGE_TAG, "").replace(IMAGE_TAG, "").strip()


def _parse(rec, index: int, folder: Path, check_images: bool) -> VQARecord | str:
    """Parsed record, or the skip reason (one of SKIP_REASONS)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        return "malformed"
    if not rec.get("image") or not isinstance(rec["image"], str):
        return "no_image_field"
    turns = rec["conversations"]
    k = next((k for k, t in enumerate(turns) if isinstance(t, dict) and t.get("from") == "human"), None)
    if k is None or k + 1 >= len(turns) or not isinstance(turns[k + 1], dict) \
            or turns[k + 1].get("from") != "gpt" or not isinstance(turns[k].get("value"), str) \
            or not isinstance(turns[k + 1].get("value"), str):
        return "malformed"
    if IMAGE_TAG not in turns[k]["value"]:
        return "no_image_tag"
    answer = turns[k + 1]["value"].strip()
    if not answer:
        return "empty_answer"
    later = turns[k + 2:]
    if len(later) % 2 or any(not isinstance(t, dict) or t.get("from") != role or not isinstance(t.get("value"), str)
                             for t, role in zip(later, ["human", "gpt"] * len(later))):
        return "malformed"
    followups = tuple((_strip_tag(q["value"]), a["value"].strip()) for q, a in zip(later[::2], later[1::2]))
    if any(not q or not a for q, a in followups):
        return "empty_answer"
    image_path = folder / rec["image"]
    if not image_path.is_file():
        return "missing_image"
    if check_images:
        try:
            with Image.open(image_path) as im:
                im.verify()  # header + checksum scan, no full decode
        except Exception:
            return "corrupt_image"
    opts = rec.get("options")
    options = tuple(str(o) for o in opts) if isinstance(opts, (list, tuple)) else ()
    letter = answer if _LETTER.fullmatch(answer) and ord(answer) - ord("A") < len(options) else None
    return VQARecord(
        id=str(rec.get("id", index)),
        image_path=image_path,
        question=_strip_tag(turns[k]["value"]),
        answer=answer,
        subtask=str(rec.get("subtask") or rec.get("category") or "all"),
        options=options,
        answer_letter=letter,
        turns=followups,
    )


def load_llava_json(json_path: str | Path, image_folder: str | Path | None = None,
                    check_images: bool = True) -> list[VQARecord]:
    """Load usable records from a LLaVA-format .json list (or .jsonl, one record a line).

    image_folder: directory the records' "image" paths are relative to (default: the
    JSON's parent). check_images: open and verify every image with PIL (slower).
    Skipped records are summarised in one warning with counts per reason.
    Raises FileNotFoundError if json_path does not exist, ValueError if the file is not
    a list of records or none of them is usable.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"LLaVA JSON not found: {json_path} (generate it, e.g. "
                                f"`python data/make_shapes.py`, or fix the path)")
    folder = Path(image_folder) if image_folder is not None else json_path.parent
    raw = _read_records(json_path)
    records, skipped = [], Counter()
    for index, rec in enumerate(raw):
        parsed = _parse(rec, index, folder, check_images)
        if isinstance(parsed, str):
            skipped[parsed] += 1
        else:
            records.append(parsed)
    summary = ", ".join(f"{reason}={skipped[reason]}" for reason in SKIP_REASONS if skipped[reason])
    if not records:
        raise ValueError(
            f"{json_path}: no usable record out of {len(raw)} (skipped: {summary or 'none'}). "
            f"Each record needs an 'image' path relative to image_folder={folder}, a 'conversations' "
            f"list with a human turn containing '{IMAGE_TAG}' followed by a non-empty gpt turn; "
            f"pass image_folder= if the images live elsewhere.")
    if skipped:
        warnings.warn(f"{json_path}: skipped {sum(skipped.values())} of {len(raw)} records ({summary})",
                      stacklevel=2)
    return records
