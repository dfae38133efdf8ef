"""The paper's training data: a stratified sample of Cambrian-7M (Tong et al. 2024).

The LSG paper trains on "10K stratified samples from Cambrian-7M", "equal across 6
categories (OCR, general, counting, code, math, science)" (its Table S1). Cambrian-7M is
`jsons/Cambrian7M_withsystemprompt.jsonl` of the hub dataset `nyu-visionx/Cambrian-10M`:
LLaVA records `{"id", "image", "conversations", "source"}`, images relative to the folder
its tarballs were extracted into. Records carry no category, only `source` (the json file
they came from), so the category is read from `source` and, where one file mixes several
datasets, the image's first folder (`CATEGORY_OF_SOURCE`, `CATEGORY_OF_FOLDER`).

How the categories map to Cambrian's source datasets (Cambrian's README gives the seven
categories and their shares; the per-source split is its Figure 7, reproduced here from
public scripts that split the jsonl by category; see docs/cambrian.md):

- ocr: DVQA, SynthDog, ArxivQA, ScreenQA, DocVQA, ChartQA, LLaVAR, AI2D, the Cauldron's
  chart/table/document subsets, and OCR-VQA / TextCaps images inside the LLaVA-665K mix;
- general: the LLaVA/ShareGPT4V 665K mix, LNQA, LVIS-Instruct4V, Q-Instruct, Q-Align, ALLaVA,
  GPT-4V 77K, ALFWorld, VizWiz, LAION-GPT4V, IDK, OODVQA, SketchyVQA, Cauldron visual7w...;
- counting: CLEVR, TallyQA;
- code: WebSight, Design2Code, DaTikz;
- math: Geo170K, MathVision, Cauldron raven / geomverse / intergps / tqa;
- science: the Cambrian data engine, PathVQA, ScienceQA.
Language-only sources (and any record without an image) are not sampled.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

CATEGORIES = ("ocr", "general", "counting", "code", "math", "science")

# `source` (Cambrian's provenance tag: the json file a record came from) -> category.
CATEGORY_OF_SOURCE: dict[str, str] = {
    **dict.fromkeys(["random_3rd_dvqa_2325k.json", "dvqa_2325k.json", "synthdog_500k_modified.json",
                     "arxivqa_100k.json", "screenqa_79k.json", "docvqa_39k.json", "chartqa_28k.json",
                     "clean_llava_instruct_150k_llavar_20k.json", "ai2d_15k.json"], "ocr"),
    **dict.fromkeys(["sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json", "lnqa_302k.json",
                     "lvis_instruct4v_220k.json", "q-instruct_200k.json", "qalign_200k.json",
                     "allava-laion-500k.json", "allava-vflan-200k.json", "gpt77k.json", "alfworldgpt_45k.json",
                     "vizwiz_20k.json", "laion_gpt4v_11k.json", "idk_11k.json", "oodvqa_8k.json",
                     "sketchyvqa_8k.json"], "general"),
    **dict.fromkeys(["clevr_700k.json", "tallyqa_250k.json"], "counting"),
    **dict.fromkeys(["websight_800k.json", "design2code_0k.json"], "code"),
    **dict.fromkeys(["geo170k.json", "mathvision_3k.json"], "math"),
    **dict.fromkeys(["filtered_data_engine_161k.json", "pathvqa_32k.json", "scienceqa_12k.json"], "science"),
}
# Sources that mix datasets of several categories: the image's folder decides.
MIXED_SOURCES = {"idefics375k.json": "general",  # the Cauldron subsets (hfdata/<subset>/...)
                 "sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json": "general"}
CATEGORY_OF_FOLDER: dict[str, str] = {
    **dict.fromkeys(["hfdata/robut_wtq", "hfdata/robut_wikisql", "hfdata/iconqa", "hfdata/chart2text",
                     "hfdata/tabmwp", "hfdata/st_vqa", "hfdata/rendered_text", "hfdata/vistext", "hfdata/finqa",
                     "hfdata/infographic_vqa", "hfdata/tat_qa", "hfdata/hitab", "ocr_vqa", "textvqa"], "ocr"),
    "hfdata/datikz": "code",
    **dict.fromkeys(["hfdata/raven", "hfdata/geomverse", "hfdata/intergps", "hfdata/tqa"], "math"),
}


def image_folder_key(image: str) -> str:
    """The first folder of an image path (`hfdata/<subset>` for the Cauldron's two levels)."""
    parts = Path(image).parts
    return "/".join(parts[:2]) if parts and parts[0] == "hfdata" else (parts[0] if parts else "")


def category_of(record: dict) -> str | None:
    """The record's category (one of CATEGORIES), or None for language-only records,
    records without an image and unknown sources."""
    image = record.get("image")
    if not isinstance(image, str) or image in ("", "None", "none", "nan"):
        return None
    source = record.get("source")
    if source in MIXED_SOURCES:
        return CATEGORY_OF_FOLDER.get(image_folder_key(image), MIXED_SOURCES[source])
    return CATEGORY_OF_SOURCE.get(source)


def usable(record: dict) -> bool:
    """One image (a single `<image>` tag, in the first human turn) and alternating turns that
    end with an answer: what `lsg.data.load_llava_json` and training read."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        return False
    if any(not isinstance(t, dict) or t.get("from") != role or not isinstance(t.get("value"), str)
           or not t["value"].strip() for t, role in zip(turns, ["human", "gpt"] * len(turns))):
        return False
    return sum(t["value"].count("<image>") for t in turns) == 1 and "<image>" in turns[0]["value"]


def read_jsonl(source: str, data_files: str | None = None) -> Iterator[dict]:
    """Records of a Cambrian jsonl, streamed: a local path, or a `datasets` hub id whose
    `data_files` names the jsonl in the repo (e.g. `jsons/Cambrian7M_withsystemprompt.jsonl`).

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
    """
    path = Path(source).expanduser()
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        yield {}  # counted as malformed by the caller
        return
    if source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json")):
        raise FileNotFoundError(f"Cambrian jsonl not found: {source}. Give the local path of "
                                f"Cambrian7M_withsystemprompt.jsonl or a hub id with --data-files.")
    import datasets

    yield from datasets.load_dataset(source, data_files=data_files, split="train", streaming=True)


def quotas(n: int, categories: Iterable[str] = CATEGORIES) -> dict[str, int]:
    """`n` split as equally as possible over the categories (the first ones take the remainder)."""
    categories = list(categories)
    base, extra = divmod(n, len(categories))
    return {c: base + (i < extra) for i, c in enumerate(categories)}


def stratified_sample(records: Iterable[dict], want: dict[str, int], image_folder: str | Path | None,
                      seed: int = 0, check_images: bool = True) -> tuple[dict[str, list[dict]], Counter]:
    """An equal-per-category uniform random sample of usable records, in one streaming pass
    (reservoir sampling per category, so a 7M-line file never sits in memory).

    `want` is the number of records per category (`quotas`). A record is a candidate if
    `category_of` gives one of those categories, it is `usable`, and
    (with `check_images`) its image exists under `image_folder`. A category's sample depends
    only on the file's order of its own candidates and `seed` (one generator per category).

    Returns:
        (category -> sampled records in file order, counts of candidates and skips).

    Raises:
        ValueError: a category has fewer candidates than its quota (the message gives counts).
    """
    rng = {c: random.Random(f"{seed}/reservoir/{c}") for c in want}  # a category's draw ignores the others
    seen, stats = Counter(), Counter()
    reservoir: dict[str, list[tuple[int, dict]]] = {c: [] for c in want}
    folder = Path(image_folder) if image_folder is not None else None
    for index, record in enumerate(records):
        category = category_of(record) if isinstance(record, dict) else None
        if category not in want:
            stats["other_category"] += 1
            continue
        if not usable(record):
            stats["unusable"] += 1
            continue
        if check_images and folder is not None and not (folder / record["image"]).is_file():
            stats["missing_image"] += 1
            continue
        seen[category] += 1
        k = want[category]
        slot = len(reservoir[category]) if seen[category] <= k else rng[category].randrange(seen[category])
        if slot >= k:
            continue
        if slot == len(reservoir[category]):
            reservoir[category].append((index, record))
        else:
            reservoir[category][slot] = (index, record)
    short = {c: (len(reservoir[c]), want[c]) for c in want if len(reservoir[c]) < want[c]}
    if short:
        raise ValueError("Too few usable records for the stratified sample: "
                         + ", ".join(f"{c}: {have} of {need}" for c, (have, need) in short.items())
                         + ". Check --image-folder (images must exist) or lower --n / --n-val.")
    stats.update({f"candidates_{c}": seen[c] for c in want})
    return {c: [r for _, r in sorted(reservoir[c], key=lambda x: x[0])] for c in want}, stats


def split_sample(by_category: dict[str, list[dict]], val: dict[str, int], seed: int = 0
                 ) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Per category, a seeded shuffle, then the first `val[c]` records for validation and the
    rest for training: (train, val), disjoint."""
    train_out, val_out = {}, {}
    for c, records in by_category.items():
        order = list(range(len(records)))
        random.Random(f"{seed}/{c}").shuffle(order)
        val_out[c] = [records[i] for i in sorted(order[:val.get(c, 0)])]
        train_out[c] = [records[i] for i in sorted(order[val.get(c, 0):])]
    return train_out, val_out


def to_llava(records_by_category: dict[str, list[dict]]) -> list[dict]:
    """LLaVA-JSON records for `data=llava-json`: every turn kept, the category as `subtask`
    (so validation reports accuracy per category), the Cambrian `source` kept."""
    out = []
    for category, records in records_by_category.items():
        for r in records:
            out.append({"id": str(r.get("id")), "image": r["image"], "conversations": r["conversations"],
                        "subtask": category, "source": r.get("source")})
    return out
