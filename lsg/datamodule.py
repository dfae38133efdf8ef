"""LightningDataModule over LLaVA-format VQA records (synthetic `shapes` or any `llava-json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lsg.backbones import Backbone
from lsg.data import VQARecord, generate_split, load_llava_json

SPLITS = ("train", "val", "test")


def load_records(data_cfg: dict, split: str) -> list[VQARecord]:
    """Records of one split for a `data=` config.

    `shapes`: generated on first use into `data_cfg["root"]` (deterministic, seeds
    disjoint by split). `llava-json`: read from `data_cfg["<split>_json"]` with images
    under `data_cfg["image_folder"]` (bad records skipped with a warning).

    Raises:
        ValueError: unknown data kind, or a split the config does not provide.
    """
    kind = data_cfg["name"]
    if kind == "shapes":
        n = int(data_cfg[f"n_{split}"])
        json_path = generate_split(split, n, Path(data_cfg["root"]))
        return load_llava_json(json_path, check_images=False)
    if kind == "llava-json":
        path = data_cfg.get(f"{split}_json")
        if not path:
            raise ValueError(f"data.{split}_json is not set: give a LLaVA-format JSON for the {split} split.")
        return load_llava_json(path, data_cfg.get("image_folder"), check_images=data_cfg.get("check_images", True))
    raise ValueError(f"Unknown data kind {kind!r}; known: shapes, llava-json.")


class VQADataset(Dataset):
    """Records -> (PIL image, question, answer, record)."""

    def __init__(self, records: Sequence[VQARecord]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        with Image.open(rec.image_path) as im:
            return im.convert("RGB"), rec


class Collator:
    """Builds a model batch (`Backbone.build_batch`) plus the records it came from."""

    def __init__(self, backbone: Backbone, with_answers: bool):
        self.processor, self.with_answers = backbone, with_answers

    def __call__(self, items) -> dict:
        images, records = zip(*items)
        answers = [r.answer for r in records] if self.with_answers else None
        batch = self.processor.build_batch(images, [r.question for r in records], answers)
        batch["records"] = list(records)
        return batch


class VQADataModule(L.LightningDataModule):
    """Train / val / test loaders for gate training (answers as labels on train and val)."""

    def __init__(self, backbone: Backbone, data_cfg: dict, batch_size: int = 16, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        self.backbone, self.data_cfg = backbone, dict(data_cfg)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.records: dict[str, list[VQARecord]] = {}

    def setup(self, stage: str | None = None):
        for split in SPLITS:
            if split not in self.records and (split != "test" or stage in (None, "test")):
                self.records[split] = load_records(self.data_cfg, split)

    def _loader(self, split: str, shuffle: bool, with_answers: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(VQADataset(self.records[split]), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=Collator(self.backbone, with_answers),
                          generator=generator, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, with_answers=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, with_answers=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, with_answers=True)
