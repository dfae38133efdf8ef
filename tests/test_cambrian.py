"""Cambrian-10K: the stratified sample from a Cambrian-7M jsonl, and multi-turn LLaVA records
whose every answer carries the loss."""

from __future__ import annotations

import pytest
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from lsg.segments import IGNORE_INDEX
from lsg.data import load_llava_json
from lsg.data.cambrian import category_of
from tests.conftest import samples

pytestmark = pytest.mark.slow  # every test here starts a process

ROOT = Path(__file__).resolve().parents[1]

# (source, image folder) -> the category the mapping must give; one per kind of rule.
SOURCES = [
    ("docvqa_39k.json", "docvqa", "ocr"),
    ("ai2d_15k.json", "ai2d", "ocr"),
    ("idefics375k.json", "hfdata/chart2text", "ocr"),
    ("sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json", "ocr_vqa/images", "ocr"),
    ("sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json", "coco/train2017", "general"),
    ("lnqa_302k.json", "lnqa", "general"),
    ("clevr_700k.json", "clevr", "counting"),
    ("tallyqa_250k.json", "tallyqa", "counting"),
    ("websight_800k.json", "websight", "code"),
    ("idefics375k.json", "hfdata/datikz", "code"),
    ("geo170k.json", "geo170k", "math"),
    ("idefics375k.json", "hfdata/raven", "math"),
    ("pathvqa_32k.json", "pathvqa", "science"),
    ("scienceqa_12k.json", "scienceqa", "science"),
]


def cambrian_jsonl(tmp_path: Path, per_source: int = 6) -> tuple[Path, Path, Counter]:
    """A jsonl in Cambrian-7M's record schema (`id`, `image` relative to the extracted root,
    `conversations` of human/gpt turns with `<image>` in the first, `source`), the image root,
    and the expected candidate count per category. Adds records that must never be drawn:
    language-only, two `<image>` tags, a missing image, odd turns, an unknown source."""
    root = tmp_path / "Cambrian-10M"
    lines, expected = [], Counter()
    for s, (source, folder, category) in enumerate(SOURCES):
        for i in range(per_source):
            image = f"{folder}/{s:02d}_{i:04d}.jpg"
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (s * 10, i * 20, 0)).save(root / image)
            turns = [{"from": "human", "value": f"<image>\nWhat is shown in picture {i}?"},
                     {"from": "gpt", "value": f"Picture {i} of source {s}."}]
            if i % 2:  # every other record is multi-turn, as LLaVA's conversations are
                turns += [{"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Red."}]
            lines.append({"id": f"{s}-{i}", "image": image, "conversations": turns, "source": source})
            expected[category] += 1
    bad = [
        {"id": "lang", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
         "source": "orca_994k.json"},
        {"id": "two-images", "image": "clevr/00_0000.jpg", "source": "clevr_700k.json",
         "conversations": [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "Yes"}]},
        {"id": "missing", "image": "clevr/absent.jpg", "source": "clevr_700k.json",
         "conversations": [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "3"}]},
        {"id": "odd", "image": "clevr/00_0000.jpg", "source": "clevr_700k.json",
         "conversations": [{"from": "human", "value": "<image>\nHow many?"}]},
        {"id": "unknown", "image": "clevr/00_0000.jpg", "source": "someone_else.json",
         "conversations": [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "3"}]},
    ]
    path = tmp_path / "Cambrian7M_withsystemprompt.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines + bad) + "\n")
    return path, root, expected


def test_categories_follow_source_and_image_folder():
    for source, folder, category in SOURCES:
        assert category_of({"source": source, "image": f"{folder}/x.jpg"}) == category, (source, folder)
    assert category_of({"source": "orca_994k.json", "conversations": []}) is None  # language-only
    assert category_of({"source": "clevr_700k.json", "image": ""}) is None


def test_prepare_cambrian_draws_equal_disjoint_samples_per_category(tmp_path):
    jsonl, root, expected = cambrian_jsonl(tmp_path)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "data" / "prepare_cambrian.py"), "--jsonl", str(jsonl),
                             "--image-folder", str(root), "--out", str(out), "--n", "24", "--n-val", "6"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    train = json.loads((out / "train.json").read_text())
    val = json.loads((out / "val.json").read_text())
    assert Counter(r["subtask"] for r in train) == dict.fromkeys(expected, 4)
    assert Counter(r["subtask"] for r in val) == dict.fromkeys(expected, 1)
    ids = [r["id"] for r in train + val]
    assert len(set(ids)) == len(ids) == 30
    assert not {"lang", "two-images", "missing", "odd", "unknown"} & set(ids)
    by_id = {r["id"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    for r in train + val:  # every turn kept, the category matches the source mapping
        assert r["conversations"] == by_id[r["id"]]["conversations"]
        assert r["subtask"] == category_of(by_id[r["id"]])
    meta = json.loads((out / "meta.json").read_text())
    assert {c: meta["stats"][f"candidates_{c}"] for c in expected} == dict(expected)
    # The same seed draws the same sample; another seed another one.
    again = subprocess.run([sys.executable, str(ROOT / "data" / "prepare_cambrian.py"), "--jsonl", str(jsonl),
                            "--image-folder", str(root), "--out", str(tmp_path / "again"), "--n", "24",
                            "--n-val", "6", "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert {r["id"] for r in json.loads((tmp_path / "again" / "train.json").read_text())} != {r["id"] for r in train}
    # data=llava-json reads it, multi-turn records with their later turns.
    records = load_llava_json(out / "train.json", root)
    assert len(records) == 24 and any(r.turns for r in records)
    assert all(r.turns == (("And its colour?", "Red."),) for r in records if int(r.id.split("-")[1]) % 2)


def test_a_categorys_sample_does_not_depend_on_the_other_categories(tmp_path):
    from lsg.data.cambrian import quotas, read_jsonl, stratified_sample

    jsonl, root, _ = cambrian_jsonl(tmp_path)
    records = list(read_jsonl(str(jsonl)))
    want = quotas(12)
    full, _ = stratified_sample(records, want, root, seed=3)
    fewer_math = [r for r in records if not (category_of(r) == "math" and r["id"].endswith(("-1", "-3")))]
    partial, _ = stratified_sample(fewer_math, want, root, seed=3)
    assert partial["counting"] == full["counting"] and partial["ocr"] == full["ocr"]
    assert partial["math"] != full["math"]


def test_prepare_cambrian_says_which_category_is_short(tmp_path):
    jsonl, root, _ = cambrian_jsonl(tmp_path, per_source=2)
    result = subprocess.run([sys.executable, str(ROOT / "data" / "prepare_cambrian.py"), "--jsonl", str(jsonl),
                             "--image-folder", str(root), "--out", str(tmp_path / "out"), "--n", "60"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Too few usable records" in result.stderr and "counting: 4 of" in result.stderr


def test_every_assistant_turn_of_a_multi_turn_record_carries_the_loss(tiny):
    images, questions, answers = samples(2)
    followups = [[("Yes ?", "No"), ("How many objects ?", "3")], []]
    batch = tiny.build_batch(images, questions, answers, followups=followups, padding_side="left")
    tok = tiny.tokenizer
    eot = tok.eos_token
    row = batch["labels"][0]
    labelled = tok.decode(row[row != IGNORE_INDEX])
    assert labelled.split() == f"{answers[0]} {eot} No {eot} 3 {eot}".split()
    # Independent: the whole conversation rendered by the chat template and tokenised at once.
    messages = tiny._messages(questions[0], [(answers[0], "Yes ?"), ("No", "How many objects ?")])
    messages.append({"role": "assistant", "content": [{"type": "text", "text": "3"}]})
    text = tiny.processor.apply_chat_template(messages, tokenize=False)
    whole = tiny.processor(images=[images[0]], text=[text], return_tensors="pt")["input_ids"][0]
    mine = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert torch.equal(mine, whole[: len(mine)]) and len(whole) - len(mine) <= 1  # the template's final newline
    # A one-turn record is tokenised exactly as before (no followups).
    plain = tiny.build_batch(images[1:], questions[1:], answers[1:], padding_side="left")
    second = batch["attention_mask"][1].bool()
    assert torch.equal(batch["input_ids"][1][second], plain["input_ids"][0][plain["attention_mask"][0].bool()])


def test_train_py_trains_on_the_prepared_multi_turn_sample(tmp_path):
    """The paper's data path end to end: prepare_cambrian.py, then train.py data=llava-json (free-form,
    multi-turn answers: no option to score, so the run ends with the validation loss and the export)."""
    jsonl, root, _ = cambrian_jsonl(tmp_path)
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "data" / "prepare_cambrian.py"), "--jsonl", str(jsonl), "--image-folder",
                    str(root), "--out", str(out), "--n", "24", "--n-val", "6"], check=True, capture_output=True,
                   timeout=300)
    export = tmp_path / "ck" / "lsg-L2.safetensors"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=tiny-random", "layer=2", "logger=none",
                             "data=llava-json", f"data.train_json={out / 'train.json'}",
                             f"data.val_json={out / 'val.json'}", f"data.image_folder={root}",
                             f"run_dir={tmp_path / 'run'}", f"export_path={export}", "batch_size=4",
                             "effective_batch_size=8", f"hydra.run.dir={tmp_path / 'hydra'}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no multiple-choice question" in result.stdout and export.exists()
