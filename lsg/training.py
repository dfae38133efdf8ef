"""Gate training with PyTorch Lightning: one gate at one decoder layer, backbone frozen.

SPEC section 3: Adam, constant learning rate, next-token loss on answer tokens only,
only gate parameters optimised. Lightning's own checkpoints are written as
safetensors (tensors) plus a JSON header (everything else) by `SafetensorsCheckpointIO`,
never as pickles, atomically after every optimizer step, so a run killed at any point
(SIGKILL included) resumes from `last.safetensors` with the same data order
(`lsg.datamodule.ResumableDataLoader`) and ends with the same gate.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors import safe_open
from safetensors.torch import save_file

from lsg.answers import Answer, answers_of, write_answers
from lsg.backbones import Backbone
from lsg.context import GROUPINGS
from lsg.files import atomic_target
from lsg.gates.base import Gate
from lsg.prefix import PREFIX_CACHE_MB, Prefix, PrefixCache, model_inputs, run_suffix
from lsg.scoring import LETTERS, answer_loss, option_scores

TENSOR_TAG = "__tensor__"
RATIO_DECIMALS = 6  # decimals of the gate ratios kept in validation answer files


# ----------------------------------------------------------------- checkpoint format
def accumulation_steps(effective_batch_size: int, batch_size: int, world_size: int) -> int:
    """Gradient-accumulation steps that make `batch_size` x steps x `world_size` equal
    `effective_batch_size` (SPEC section 3: 128), for any number of devices.

    Raises:
        ValueError: the effective batch is not a multiple of `batch_size * world_size`; the
            message names the settings that would divide.
    """
    per_step = batch_size * world_size
    if effective_batch_size % per_step:
        fits = [b for b in range(1, effective_batch_size + 1) if effective_batch_size % (b * world_size) == 0]
        raise ValueError(
            f"effective_batch_size={effective_batch_size} is not a multiple of batch_size={batch_size} x "
            f"{world_size} device(s) = {per_step}. Set batch_size to one of {fits} (per device), or change "
            f"effective_batch_size or the number of devices.")
    return effective_batch_size // per_step


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able copy of `obj` with every tensor moved into `tensors` under its path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {TENSOR_TAG: path}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"Cannot store a dict with keys {list(obj)[:3]} at {path!r} in a checkpoint.")
        return {"__dict__": [[k, _flatten(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__seq__": type(obj).__name__, "items": [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"Cannot store {type(obj).__name__} at {path!r} in a safetensors checkpoint.")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if TENSOR_TAG in obj:
            return tensors[obj[TENSOR_TAG]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__seq__" in obj:
            items = [_unflatten(v, tensors) for v in obj["items"]]
            return tuple(items) if obj["__seq__"] == "tuple" else items
    return obj


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoint I/O without pickle: tensors in safetensors, the rest as JSON."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        header = _flatten(checkpoint, tensors)
        with atomic_target(path) as tmp:  # a crash while saving never corrupts the previous checkpoint
            save_file(tensors, tmp, metadata={"lightning": json.dumps(header)})

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        with safe_open(str(path), "pt", device="cpu") as f:
            header = json.loads(f.metadata()["lightning"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _unflatten(header, tensors)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


class SafetensorsModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint writing `.safetensors` files (through `SafetensorsCheckpointIO`)."""

    FILE_EXTENSION = ".safetensors"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6 writes `last` here even under fast_dev_run, which checkpoints nothing
        # else; a real run would then resume from that one-batch smoke test.
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)


# ----------------------------------------------------------------- validation answers
def val_answers(backbone: Backbone, batch: dict, prefix: Prefix, layer: int, gate: Gate,
                baseline: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Answer]]:
    """Validation loss and answers of one gate from a prefix.

    Args:
        baseline: final hidden states `(B, T, D)` of the ungated backbone on this batch, to
            record its answers too (None = not recorded).

    Returns:
        (answer loss, record id -> `lsg.answers.Answer` of every multiple-choice record, with
        the gate's group-ratio vector (LSG, SPEC section 3; None for gates without one) and,
        when `baseline` is given, the baseline's letter).
    """
    records = batch["records"]
    state: dict = {}
    hidden = run_suffix(backbone, prefix, {layer: gate}, state)
    loss = answer_loss(backbone, batch, hidden)
    n = max(max(len(r.options) for r in records), 1)
    scores = option_scores(backbone, batch, n, hidden)
    base = option_scores(backbone, batch, n, baseline) if baseline is not None else None
    ratios = state.get((layer, 0))
    ratios = ratios[0] if isinstance(ratios, tuple) and isinstance(ratios[0], torch.Tensor) else None
    out = {}
    for i, r in enumerate(records):
        if not (r.options and r.answer_letter):
            continue
        k = len(r.options)
        out[r.id] = answers_of(
            [r], [LETTERS[int(scores[i, :k].argmax())]],
            ratios=[None if ratios is None else [round(float(x), RATIO_DECIMALS) for x in ratios[i]]],
            baseline=[None if base is None else LETTERS[int(base[i, :k].argmax())]])[0]
    return loss, out


def build_gate(gate_cfg: dict, backbone: Backbone, seed: int) -> Gate:
    """A registered gate from its config (`conf/gate/*.yaml` minus `name` given as `gate_cfg["name"]`),
    its parameters initialised from `seed` alone, so one layer's gate starts the same in
    train.py and in a shared-prefix sweep (loading a backbone draws from the RNG)."""
    from lsg.gates.base import gate_class

    cfg = dict(gate_cfg)
    cls = gate_class(cfg.pop("name"))
    torch.manual_seed(seed)
    return cls.build(backbone, **cfg)


def keep_baseline(answers: dict[str, Answer], store: dict[str, str]) -> None:
    """Fill every answer's `baseline` letter from `store`, adding to `store` the letters this
    batch computed (the ungated backbone is scored once per record and process)."""
    for rid, a in answers.items():
        if a.baseline is not None:
            store.setdefault(rid, a.baseline)
        a.baseline = store[rid]


def gather_answers(answers: dict[str, Answer]) -> dict[str, Answer]:
    """Every rank's answers, merged by record id (records the distributed sampler repeated to
    even out ranks count once); the answers themselves without DDP."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shards = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shards, answers)
        return {k: v for shard in shards for k, v in shard.items()}
    return dict(answers)


def answer_metrics(answers: dict[str, Answer]) -> dict[str, float]:
    """`acc_<subtask>`, `acc` (overall), `n` and, where baselines are present, `baseline_acc`
    (fractions in [0, 1]) over validation answers."""
    per_task = defaultdict(list)
    for a in answers.values():
        per_task[a.subtask].append(a.prediction == a.gold)
    out = {f"acc_{t}": sum(h) / len(h) for t, h in per_task.items()}
    if answers:
        out["acc"] = sum(a.prediction == a.gold for a in answers.values()) / len(answers)
        out["n"] = float(len(answers))
        if all(a.baseline is not None for a in answers.values()):
            out["baseline_acc"] = sum(a.baseline == a.gold for a in answers.values()) / len(answers)
    return out


def write_val_answers(path: Path, answers: dict[str, Answer], **info) -> Path:
    """`val-epoch{e}.json` through the answer store (`lsg.answers.write_answers`): per validation
    question its sub-task, question, gold letter, the gate's prediction, the baseline's and the
    gate ratios, plus `info` (epoch, step, layer, groups). Read by train.py (the final comparison
    without re-evaluating), stack.py (single-gate gains) and summarize.py (Table 1, Figures 7-8)."""
    return write_answers(path, list(answers.values()), **info)


# ----------------------------------------------------------------- the modules
class FrozenBackboneModule(L.LightningModule):
    """What every gate-training module shares: the frozen backbone is held outside the module's
    parameters (never saved in checkpoints, never given gradients) and moved to the training
    device at fit start; batches move their tensors only (records are metadata); checkpoints
    carry `identity` (backbone, fingerprint, layer(s), gate config, sinks, data) so a resume
    with other settings is refused (`check_resumable`)."""

    identity: dict = {}

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.__dict__["backbone"] = backbone  # not a submodule: keep it out of state_dict

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lsg_identity"] = self.identity

    def on_fit_start(self) -> None:
        self.backbone.model.to(self.device)

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def gate_trainer(trainer_cfg: dict, logger, run_dir: Path, checkpoint_every_n_steps: int, export: Callback) -> L.Trainer:
    """A Lightning Trainer for gate training: safetensors checkpoint I/O, a resumable
    `last.safetensors` in `run_dir` every `checkpoint_every_n_steps` optimizer steps, and the
    `export` callback that writes the per-epoch gates."""
    return L.Trainer(
        **trainer_cfg,
        logger=logger,
        plugins=[SafetensorsCheckpointIO()],
        callbacks=[
            SafetensorsModelCheckpoint(dirpath=run_dir, filename="step{step}", save_last=True, save_top_k=0,
                                       every_n_train_steps=checkpoint_every_n_steps),
            export,
        ],
        default_root_dir=run_dir,
    )


class GateTrainingModule(FrozenBackboneModule):
    """Trains `gate` at decoder `layer` of a frozen `backbone`.

    The backbone is held outside the module's parameters (it is not saved in
    checkpoints and never receives gradients); only `gate` is optimised.

    Args:
        backbone: a loaded `Backbone` (frozen by `load_backbone`).
        gate: a trainable `Gate`.
        layer: 0-based decoder layer.
        lr: Adam learning rate, constant (the paper gives none; train.yaml's default is 1e-2).
        prefix_cache_mb: host memory for the frozen prefix (hidden state entering `layer`,
            per sample; `lsg.prefix.PrefixCache`): epoch 2 and every validation after the
            first run layers `layer..L-1` only. Past the budget samples are recomputed.
        prefix_cache_dir: keep the prefix cache on disk there (memory-mapped safetensors shards,
            `lsg.prefix.DiskStore`; `prefix_cache_mb` is then the disk budget) instead of in
            host memory; a resumed run reuses it. None = host memory.
        data_identity: the data config, so a disk cache is not reused for other data.
        activation_checkpointing: recompute the frozen layers above `layer` in backward instead
            of keeping their activations (`lsg.prefix.run_suffix(checkpoint_above=True)`); the
            same gate, less memory (docs/large-models.md).

    Validation also records, per question, the gate's and (once per process) the baseline's
    answer and the gate ratios: `val_answers` after each validation (`write_val_answers`).
    """

    def __init__(self, backbone: Backbone, gate: Gate, layer: int, lr: float = 1e-3,
                 prefix_cache_mb: float = PREFIX_CACHE_MB, activation_checkpointing: bool = False,
                 prefix_cache_dir: str | Path | None = None, data_identity: dict | None = None):
        super().__init__(backbone)
        if not gate.trainable:
            raise ValueError(f"Gate {gate.name!r} has no trainable parameters; use compare.py to evaluate it.")
        self.gate, self.layer, self.lr = gate, backbone.check_layer(layer), lr
        self.activation_checkpointing = bool(activation_checkpointing)
        self.gate.float()
        self.__dict__["prefixes"] = PrefixCache(backbone, self.layer, prefix_cache_mb, disk_dir=prefix_cache_dir,
                                                identity={"data": data_identity})
        self._val: dict[str, Answer] = {}  # record id -> answer (val_answers)
        self._baseline: dict[str, str] = {}  # record id -> the ungated backbone's letter
        self.val_answers: dict[str, Answer] = {}

    _last_loss: torch.Tensor | None = None
    batch_log: Path | None = None  # JSONL of every training batch's record ids (data-order checks)

    def prefix(self, batch: dict, split: str) -> Prefix:
        """The batch's prefix at the gate's layer, per sample keyed by split, record id and image
        (the cache also checks the tokens), so a reused id never serves another sample."""
        return self.prefixes.prefix(batch, [f"{split}/{r.id}/{getattr(r, 'image_path', None) or ''}"
                                            for r in batch["records"]])

    def forward(self, batch: dict) -> torch.Tensor:
        """Answer loss of a training batch: layers below the gate from the prefix cache."""
        inputs = model_inputs(batch)
        hidden = run_suffix(self.backbone, self.prefix(batch, "train"), {self.layer: self.gate},
                            checkpoint_above=self.activation_checkpointing)
        return answer_loss(self.backbone, inputs, hidden)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self._last_loss = loss.detach()  # checked with the gradients, after DDP's all-reduce
        if self.batch_log is not None:
            with open(self.batch_log, "a") as f:
                f.write(json.dumps({"epoch": self.current_epoch, "batch": batch_idx, "rank": self.global_rank,
                                    "ids": [r.id for r in batch["records"]]}) + "\n")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["records"]))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop before a NaN or inf reaches the gate. Checked on the gradients, which DDP has
        already averaged, so every rank raises together (a per-rank loss check would leave the
        other ranks waiting in the all-reduce). A NaN or inf loss always gives such gradients.
        Not under fp16 mixed precision, whose scaler skips overflowing steps by design."""
        if str(self.trainer.precision).startswith("16"):
            return
        grads = [p.grad for p in self.gate.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.abs().max() for g in grads])).all():
            bad = [n for n, p in self.gate.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            raise FloatingPointError(
                f"Training loss is {self._last_loss.item()} and the gradient of {bad} is not finite at optimizer "
                f"step {self.global_step} (0-based; epoch {self.current_epoch}); stopping before it reaches the "
                f"gate. The last finite state is the run's last.safetensors; lower lr, or check the data.")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        records = batch["records"]
        prefix = self.prefix(batch, "val")
        need = any(r.options and r.answer_letter and r.id not in self._baseline for r in records)  # MC only
        baseline = run_suffix(self.backbone, prefix) if need else None
        loss, answers = val_answers(self.backbone, batch, prefix, self.layer, self.gate, baseline)
        keep_baseline(answers, self._baseline)
        self._val.update(answers)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(records))

    def on_train_epoch_end(self) -> None:
        self.prefixes.flush()  # a disk cache writes its last shard: a resumed run finds the epoch's prefixes

    def on_validation_epoch_end(self) -> None:
        """Accuracy over the whole validation split: under DDP every rank's answers are
        gathered, and records the distributed sampler repeated to even out ranks count once.
        Every rank logs the same gathered values."""
        self.prefixes.flush()
        self.val_answers = gather_answers(self._val)
        for key, value in answer_metrics(self.val_answers).items():
            self.log(f"val/{key}", value, prog_bar=key == "acc")
        self._val = {}

    def configure_optimizers(self):
        return torch.optim.Adam(self.gate.parameters(), lr=self.lr)


class EpochGateExport(Callback):
    """Save the gate alone as `run_dir/gate-epoch{e}.safetensors` with its metadata (backbone,
    layer, gate config, sinks, data, steps), rank 0 alone.

    It is written at the epoch's last training batch, before that step's resumable checkpoint
    (Lightning runs checkpoint callbacks last), because a run resumed from that checkpoint
    skips the rest of the epoch; after the epoch's validation it is written again with the
    validation metrics `val` (gathered over every rank) added.
    """

    def __init__(self, run_dir: Path, identity: dict):
        self.run_dir, self.identity = Path(run_dir), identity

    def _save(self, trainer: L.Trainer, pl_module: GateTrainingModule, **extra) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and not trainer.fast_dev_run:
            epoch = trainer.current_epoch + 1
            pl_module.gate.save(self.run_dir / f"gate-epoch{epoch}.safetensors", **self.identity,
                                epoch=epoch, steps=trainer.global_step, **extra)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: GateTrainingModule, outputs, batch,
                           batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            self._save(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: GateTrainingModule) -> None:
        self._save(trainer, pl_module,
                   val={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        if trainer.is_global_zero and not trainer.sanity_checking and not trainer.fast_dev_run and pl_module.val_answers:
            epoch = trainer.current_epoch + 1
            write_val_answers(self.run_dir / f"val-epoch{epoch}.json", pl_module.val_answers, epoch=epoch,
                              steps=trainer.global_step, layer=pl_module.layer,
                              groups=list(GROUPINGS.get(getattr(pl_module.gate, "grouping", ""), ())))


def check_resumable(path: Path, identity: dict) -> str | None:
    """`str(path)` if a resumable checkpoint of the same setup exists, else None.

    Raises:
        ValueError: the checkpoint belongs to another backbone, layer, gate, sink or data setup.
    """
    path = Path(path)
    if not path.exists():
        return None
    saved = SafetensorsCheckpointIO().load_checkpoint(path).get("lsg_identity")
    if saved is not None and json.loads(json.dumps(saved)) != json.loads(json.dumps(identity)):
        diff = [k for k in identity if saved.get(k) != json.loads(json.dumps(identity[k]))]
        raise ValueError(
            f"{path} holds a run with a different {', '.join(diff)}. Resume it with its own settings, "
            f"or move it away / set run_dir=... to start a new run."
        )
    return str(path)
