"""LightningDataModule over LLaVA-format VQA records (synthetic `shapes` or any `llava-json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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
        return rec.load_image(), rec


class Collator:
    """Builds a model batch (`Backbone.build_batch`) plus the records it came from."""

    def __init__(self, backbone: Backbone, with_answers: bool):
        self.processor, self.with_answers = backbone, with_answers

    def __call__(self, items) -> dict:
        images, records = zip(*items)
        answers = [r.answer for r in records] if self.with_answers else None
        followups = [r.turns for r in records] if self.with_answers and any(r.turns for r in records) else None
        batch = self.processor.build_batch(images, [r.question for r in records], answers, followups=followups)
        batch["records"] = list(records)
        return batch


class EpochSampler(DistributedSampler):
    """This rank's share of a seeded permutation that depends only on `(seed, epoch)`.

    Lightning calls `set_epoch` before every epoch, so epoch e sees the same order in an
    uninterrupted run, in a resumed one and under any number of processes: with R ranks,
    rank r reads positions r, r + R, ... of the permutation (`torch.utils.data.DistributedSampler`,
    which pads the last round by repeating samples when R does not divide the dataset).
    `skip` drops this many samples from the start of the next pass only (mid-epoch resume).
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints and restores mid-epoch (its `state_dict` /
    `load_state_dict` protocol for stateful loaders).

    The state is the epoch and the number of batches of it already trained, read from the
    trainer's own progress when the checkpoint is written (the loader itself runs one batch
    ahead: Lightning prefetches). Restoring it sets the sampler's epoch and skips those batches,
    so a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, *args, progress=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress  # () -> (epoch, batches of it trained, batches per epoch); set by the datamodule

    def state_dict(self) -> dict:
        epoch, done, per_epoch = self.progress() if self.progress is not None else (0, 0, len(self))
        if done >= per_epoch:  # the epoch's last batch (`limit_train_batches` may end it early)
            epoch, done = epoch + 1, 0
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = state["batches_done"] * self.batch_size


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

    def _eval_loader(self, split: str) -> DataLoader:
        """In record order, with answers as labels (validation loss and option accuracy)."""
        return DataLoader(VQADataset(self.records[split]), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=Collator(self.backbone, with_answers=True),
                          persistent_workers=self.num_workers > 0)

    def _training_progress(self) -> tuple[int, int, int]:
        trainer = self.trainer
        return (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                int(trainer.num_training_batches))

    def train_dataloader(self) -> DataLoader:
        """Shuffled by `EpochSampler` (order depends only on seed and epoch, split across ranks),
        resumable mid-epoch (`ResumableDataLoader`)."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        dataset = VQADataset(self.records["train"])
        return ResumableDataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers,
            sampler=EpochSampler(dataset, num_replicas=world, rank=rank, seed=self.seed),
            collate_fn=Collator(self.backbone, True), persistent_workers=self.num_workers > 0,
            progress=self._training_progress if trainer is not None else None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
