"""Data configs: `shapes` generates, `llava-json` reads any LLaVA-format file; batches carry labels on answers."""

from __future__ import annotations

import json

import pytest

from lsg.segments import IGNORE_INDEX
from lsg.data import generate_split
from lsg.datamodule import VQADataModule, load_records


def test_llava_json_config_reads_a_llava_file_and_skips_bad_records(tmp_path):
    json_path = generate_split("val", 7, tmp_path / "shapes")
    records = json.loads(json_path.read_text())
    records.append({"id": "bad", "image": "images/missing.png", "conversations": records[0]["conversations"]})
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    cfg = {"name": "llava-json", "train_json": str(tmp_path / "mixed.json"), "val_json": str(json_path),
           "image_folder": str(tmp_path / "shapes"), "check_images": True}
    with pytest.warns(UserWarning, match="skipped 1 of 8 records.*missing_image=1"):
        train = load_records(cfg, "train")
    assert len(train) == 7 and train[0].answer_letter in "ABCDE"
    with pytest.raises(ValueError, match="data.test_json is not set"):
        load_records({**cfg, "test_json": None}, "test")
    with pytest.raises(ValueError, match="Unknown data kind 'coco'"):
        load_records({"name": "coco"}, "val")


def test_train_batches_have_labels_on_answer_tokens_only(tmp_path, tiny):
    cfg = {"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 8, "n_val": 7, "n_test": 0}
    dm = VQADataModule(tiny, cfg, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for row, labels, record in zip(batch["input_ids"], batch["labels"], batch["records"]):
        answer = row[labels != IGNORE_INDEX]
        assert tiny.tokenizer.decode(answer, skip_special_tokens=True).strip() == record.answer
