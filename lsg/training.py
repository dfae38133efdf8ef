"""Gate training with PyTorch Lightning: one gate per decoder layer, 1..N layers in one pass, backbone frozen.

docs/methods.md section 3: Adam, constant learning rate, next-token loss on answer tokens only,
only gate parameters optimised. Lightning's own checkpoints are written as
safetensors (tensors) plus a JSON header (everything else) by `SafetensorsCheckpointIO`,
never as pickles, atomically after every optimizer step, so a run killed at any point
(SIGKILL included) resumes from `last.safetensors` with the same data order
(`lsg.datamodule.ResumableDataLoader`) and ends with the same gate.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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
from lsg.prefix import PREFIX_CACHE_MB, Prefix, PrefixCache, compute_prefixes, run_suffix
from lsg.runs import gate_file, joint_gate_file, layer_dir, stack_file, val_file
from lsg.scoring import answer_token_losses, loss_by_kind, predicted_letters

TENSOR_TAG = "__tensor__"
RATIO_DECIMALS = 6  # decimals of the gate ratios kept in validation answer files


# ----------------------------------------------------------------- checkpoint format
def accumulation_steps(effective_batch_size: int, batch_size: int, world_size: int) -> int:
    """Gradient-accumulation steps that make `batch_size` x steps x `world_size` equal
    `effective_batch_size` (docs/methods.md section 3: 128), for any number of devices.

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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        # The gates step inside training_step (manual optimization); the state after the step is
        # the one to resume from, so Lightning's warning about pre-step states does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6 writes `last` here even under fast_dev_run, which checkpoints nothing
        # else; a real run would then resume from that one-batch smoke test.
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)


# ----------------------------------------------------------------- validation answers
def val_answers(backbone: Backbone, batch: dict, prefix: Prefix, layer: int, gate: Gate | Mapping[int, Gate],
                baseline: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]], dict[str, Answer]]:
    """Validation loss and answers of one gate (or of jointly trained gates, all attached) from a prefix.

    Args:
        layer: the gate's layer (a joint stack: its lowest, the prefix's layer).
        gate: the gate, or `{layer: gate}` of a joint stack (docs/methods.md section 3, joint training).
        baseline: final hidden states `(B, T, D)` of the ungated backbone on this batch, to
            record its answers too (None = not recorded).

    Returns:
        (answer loss, the loss per kind of answer token (`lsg.scoring.loss_by_kind`),
        record id -> `lsg.answers.Answer` of every multiple-choice record, with
        the gate's group-ratio vector (LSG, docs/methods.md section 3; a joint stack: its gates' vectors
        concatenated in layer order; None for gates without one) and, when `baseline` is given, the
        baseline's letter).
    """
    records = batch["records"]
    state: dict = {}
    gates = dict(gate) if isinstance(gate, Mapping) else {layer: gate}
    hidden = run_suffix(backbone, prefix, gates, state)
    losses, targets = answer_token_losses(backbone, batch, hidden)
    n_options = [len(r.options) if r.options and r.answer_letter else 0 for r in records]
    letters = predicted_letters(backbone, batch, hidden, n_options)
    base = predicted_letters(backbone, batch, baseline, n_options) if baseline is not None else [None] * len(records)
    per_gate = [g.ratios(state.get((l, 0))) for l, g in sorted(gates.items())]
    ratios = None if any(r is None for r in per_gate) else torch.cat(per_gate, dim=1)
    out = {}
    for i, r in enumerate(records):
        if n_options[i]:
            out[r.id] = answers_of(
                [r], [letters[i]], baseline=[base[i]],
                ratios=[None if ratios is None else [round(float(x), RATIO_DECIMALS) for x in ratios[i]]])[0]
    return losses.mean(), loss_by_kind(losses, targets, backbone.tokenizer.eos_token_id), out


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


# ----------------------------------------------------------------- the module
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


class GateTrainingModule(L.LightningModule):
    """Trains one gate per decoder layer (1..N layers) of a frozen backbone, in one pass over the data.

    Per batch the hidden states entering the gated layers come from one ungated forward
    (`lsg.prefix.compute_prefixes`, which stops at the highest gated layer) or, for a single
    layer, from the prefix cache (`lsg.prefix.PrefixCache`: epoch 2 and every validation after
    the first run layers `layer..L-1` only). Each gate l then runs layers l..L-1 with only itself
    attached and its loss is back-propagated at once, so one suffix graph is alive at a time. One
    Adam over every gate's parameters is exactly independent Adams (Adam's update of a parameter
    reads only that parameter's gradient and state), so gate l ends as a one-layer run of l ends:
    same init (`build_gate`), same data order (`lsg.datamodule.EpochSampler`), same effective batch
    (docs/methods.md section 3: Adam, constant lr, next-token loss on answer tokens, only gates optimised).

    The backbone is held outside the module's parameters (never saved in checkpoints, never given
    gradients) and moved to the training device at fit start. Checkpoints carry `identity`, so a
    resume under other settings is refused (`check_resumable`).

    Under DDP (`trainer=ddp`) every rank holds every gate and reads its share of each global batch;
    DDP's own reducer is off (one forward serves one backward per gate) and the gates' gradients
    are averaged over the ranks before each optimizer step, so 2 processes at batch b train the
    gates of 1 process at batch 2b. A non-finite loss or gradient on any rank stops every rank
    with the same error (the flags are all-reduced before anyone raises).

    Args:
        backbone: a loaded, frozen `Backbone`.
        gates: decoder layer (0-based) -> trainable gate.
        identity: what the run's checkpoints carry (backbone, fingerprint, layers, gate config,
            sinks, data; `lsg.cli.common.gate_run_identity`).
        lr: Adam learning rate, constant (its default lives in conf/train.yaml).
        effective_batch_size, batch_size: the global and the per-device batch; batches per
            optimizer step = `effective_batch_size / (batch_size x devices)` (`accumulation_steps`).
        activation_checkpointing: recompute each gate's frozen layers above it in backward
            (`lsg.prefix.run_suffix(checkpoint_above=True)`); the same gates, less memory.
        prefix_cache_mb: host memory (or disk, with `prefix_cache_dir`) for the prefix cache of a
            one-layer run, MiB; samples past it are recomputed. Runs of many layers recompute the
            shared prefix every batch (one forward for all of them).
        prefix_cache_dir: keep that cache on disk there (`lsg.prefix.DiskStore`), reused by a
            resumed run; None = host memory.
        batch_log: a JSONL file to append every training batch's record ids to (data-order
            checks); None = no log.
        joint: train the gates together (LSG paper Appendix D.2, docs/methods.md section 3): every
            gate attached in one suffix forward from the lowest layer's prefix, one answer loss, one
            backward per batch (one forward over the union suffix, not one per layer). Needs at
            least two layers. False (default): each gate trained alone, as above.

    The gates trained by one loss form a *unit*, keyed by its lowest layer: `{l: (l,)}` per layer
    (default), or one unit `{lowest: (all layers)}` with `joint`. Losses, metrics (`metric`) and
    validation answers are per unit. Validation records, per unit and question, the answer of the
    unit's gates attached together, the baseline's (once per process) and the gates' ratios
    (`Gate.ratios`, concatenated in layer order): `val_answers[key]` after each validation.

    Raises:
        ValueError: no layer, a gate without trainable parameters, a layer out of range, or
            `joint` with one layer.
    """

    def __init__(self, backbone: Backbone, gates: Mapping[int, Gate], identity: dict, lr: float,
                 effective_batch_size: int, batch_size: int, activation_checkpointing: bool = False,
                 prefix_cache_mb: float = PREFIX_CACHE_MB, prefix_cache_dir: str | Path | None = None,
                 batch_log: str | Path | None = None, joint: bool = False):
        super().__init__()
        if not gates:
            raise ValueError("Gate training needs at least one layer.")
        bad = [l for l, g in gates.items() if not g.trainable]
        if bad:
            raise ValueError(f"Gate {gates[bad[0]].name!r} (layers {bad}) has no trainable parameters; evaluate it "
                             f"with eval.py instead.")
        self.__dict__["backbone"] = backbone  # not a submodule: keep it out of state_dict
        self.layers = sorted(backbone.check_layer(l) for l in gates)
        self.joint = bool(joint)
        if self.joint and len(self.layers) < 2:
            raise ValueError(f"joint=true trains several layers' gates together, but layer={self.layers} is one layer; "
                             f"give two or more (layer=[3,6,7,10,19] joint=true), or drop joint=true.")
        # unit key (its lowest layer, where its prefix starts) -> the layers its one loss trains
        self.units = {self.layers[0]: tuple(self.layers)} if self.joint else {l: (l,) for l in self.layers}
        self.gates = torch.nn.ModuleDict({str(l): gates[l].float() for l in self.layers})
        self.identity = identity
        self.lr = lr
        self.effective_batch_size, self.batch_size = effective_batch_size, batch_size
        self.accumulation = 1  # set at fit start, when the device count is known
        self.activation_checkpointing = bool(activation_checkpointing)
        self.batch_log = Path(batch_log) if batch_log else None
        self.automatic_optimization = False
        cache = None
        if len(self.units) == 1:  # one prefix per batch (one layer, or a joint run): cached per sample
            cache = PrefixCache(backbone, self.layers[0], prefix_cache_mb, disk_dir=prefix_cache_dir,
                                identity={"data": identity.get("data")})
        self.__dict__["prefix_cache"] = cache
        self._val: dict[int, dict[str, Answer]] = {k: {} for k in self.units}
        self._baseline: dict[str, str] = {}  # record id -> the ungated backbone's letter
        self.val_answers: dict[int, dict[str, Answer]] = {}

    def gate(self, layer: int) -> Gate:
        """The gate trained at decoder `layer`."""
        return self.gates[str(layer)]

    def unit_gates(self, key: int) -> dict[int, Gate]:
        """`{layer: gate}` of the unit keyed `key` (one gate, or every gate of a joint run)."""
        return {l: self.gate(l) for l in self.units[key]}

    def metric(self, key: int, name: str) -> str:
        """A logged metric's name: `train/loss` in a run of one unit (one layer, or a joint run),
        `L<layer>/train/loss` per layer in a run of many separately trained layers."""
        return name if len(self.units) == 1 else f"L{key}/{name}"

    # ---------------------------------------------------------------- plumbing
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lsg_identity"] = self.identity

    def on_fit_start(self) -> None:
        self.backbone.model.to(self.device)
        self.accumulation = accumulation_steps(self.effective_batch_size, self.batch_size, self.trainer.world_size)

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def prefixes(self, batch: dict, split: str, to_end: bool = False) -> tuple[dict[int, Prefix], torch.Tensor | None]:
        """`({layer: Prefix}, baseline final hidden state (B, T, D) or None)` of a batch: from the
        prefix cache (one unit; keyed per sample by split, record id and image, the tokens
        checked too) or one shared ungated forward (`compute_prefixes`). One prefix per unit, at its
        lowest layer."""
        if self.prefix_cache is None:
            return compute_prefixes(self.backbone, self.backbone.model_inputs(batch), list(self.units), to_end=to_end)
        keys = [f"{split}/{r.id}/{getattr(r, 'image_path', None) or ''}" for r in batch["records"]]
        prefix = self.prefix_cache.prefix(batch, keys)
        return {self.layers[0]: prefix}, (run_suffix(self.backbone, prefix) if to_end else None)

    def _without_ddp_reducer(self) -> None:
        """Keep DDP's reducer out of this step's backward passes (one per gate, after one forward:
        the reducer expects one); `average_gradients` does its averaging. Lightning sets the flag
        back after each training step."""
        model = self.trainer.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.require_backward_grad_sync = False

    def average_gradients(self) -> None:
        """Every gate's gradient averaged over the ranks (DDP's mean), a no-op on one process."""
        if not _distributed():
            return
        world = torch.distributed.get_world_size()
        for p in self.gates.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

    def stop_if_not_finite(self, losses: dict[int, torch.Tensor], batch_idx: int, stepping: bool) -> None:
        """Raise on every rank at once when any rank has a non-finite loss (or, at an optimizer step,
        a non-finite gradient) for any unit (`losses` is keyed by unit): the per-unit flags are
        all-reduced first, so no rank is left waiting in a collective. Not under fp16 mixed
        precision, whose scaler skips overflowing steps by design.

        Raises:
            FloatingPointError: naming the layer(s), the optimizer step and the batch.
        """
        if str(self.trainer.precision).startswith("16"):
            return
        keys = list(self.units)
        flags = torch.zeros(len(keys), device=self.device)
        for i, key in enumerate(keys):
            bad = not torch.isfinite(losses[key]).item()
            if stepping:
                bad |= any(p.grad is not None and not torch.isfinite(p.grad).all()
                           for l in self.units[key] for p in self.gate(l).parameters())
            flags[i] = float(bad)
        if _distributed():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags.any():
            bad_keys = [k for k, f in zip(keys, flags.tolist()) if f]
            bad_layers = [l for k in bad_keys for l in self.units[k]]
            local = {k: round(float(losses[k]), 4) for k in bad_keys}
            raise FloatingPointError(
                f"Gate training stopped: the loss or gradient of the gate at layer(s) {bad_layers} is not finite at "
                f"optimizer step {self.global_step} (0-based; batch {batch_idx} of epoch {self.current_epoch}; "
                f"this rank's losses: {local}). Nothing non-finite reached the gates: the last good state is the "
                f"run's last.safetensors. Lower lr, or check the data.")

    # ---------------------------------------------------------------- steps
    def layer_losses(self, batch: dict, split: str = "train"
                     ) -> Iterator[tuple[int, torch.Tensor, dict[str, tuple[torch.Tensor, int]]]]:
        """`(unit key, answer loss, loss per kind of answer token)` of each unit on a batch
        (`lsg.scoring.loss_by_kind`: answer text and end of turn), one unit at a time (a
        generator: the caller back-propagates one suffix graph before the next is built). A unit
        is one layer's gate (key = its layer), or, in a joint run, every gate attached in one
        suffix forward (key = the lowest layer). The layers below a unit come from the prefix
        (cache or shared forward)."""
        inputs = self.backbone.model_inputs(batch)
        prefixes, _ = self.prefixes(batch, split)
        for key in self.units:
            hidden = run_suffix(self.backbone, prefixes[key], self.unit_gates(key),
                                checkpoint_above=self.activation_checkpointing)
            losses, targets = answer_token_losses(self.backbone, inputs, hidden)
            yield key, losses.mean(), loss_by_kind(losses.detach(), targets, self.backbone.tokenizer.eos_token_id)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self._without_ddp_reducer()
        records = batch["records"]
        if self.batch_log is not None:
            with open(self.batch_log, "a") as f:
                f.write(json.dumps({"epoch": self.current_epoch, "batch": batch_idx, "rank": self.global_rank,
                                    "ids": [r.id for r in records]}) + "\n")
        losses = {}
        for layer, loss, kinds in self.layer_losses(batch):
            losses[layer] = loss.detach()
            if torch.isfinite(loss):
                self.manual_backward(loss / self.accumulation)  # frees this layer's graph before the next
            self.log(self.metric(layer, "train/loss"), loss.detach(), prog_bar=len(self.units) == 1,
                     batch_size=len(records))
            self.log_kinds(layer, "train", kinds)
        stepping = (batch_idx + 1) % self.accumulation == 0 or batch_idx + 1 >= self.trainer.num_training_batches
        if stepping:
            self.average_gradients()
        self.stop_if_not_finite(losses, batch_idx, stepping)
        if stepping:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        records = batch["records"]
        need_baseline = any(r.options and r.answer_letter and r.id not in self._baseline for r in records)  # MC only
        prefixes, final = self.prefixes(batch, "val", to_end=need_baseline)
        for key in self.units:  # the baseline's letters are read once, with the first unit
            baseline = final if key == self.layers[0] else None
            loss, kinds, answers = val_answers(self.backbone, batch, prefixes[key], key, self.unit_gates(key), baseline)
            keep_baseline(answers, self._baseline)
            self._val[key].update(answers)
            self.log(self.metric(key, "val/loss"), loss, prog_bar=len(self.units) == 1, batch_size=len(records))
            self.log_kinds(key, "val", kinds)

    def log_kinds(self, layer: int, split: str, kinds: dict[str, tuple[torch.Tensor, int]]) -> None:
        """Log `<split>/loss_text` and `<split>/loss_eot` (nats per token of that kind) beside the
        total, each weighted by its token count, so the epoch value is the mean over that kind's
        tokens: a user sees when one kind (e.g. an end-of-turn token the backbone cannot
        predict) dominates the objective."""
        for kind, (mean, count) in kinds.items():
            self.log(self.metric(layer, f"{split}/loss_{kind}"), mean, prog_bar=len(self.units) == 1,
                     batch_size=count)

    def on_train_epoch_end(self) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.flush()  # a disk cache writes its last shard: a resumed run finds the epoch's prefixes

    def on_validation_epoch_end(self) -> None:
        """Accuracy over the whole validation split, per layer: under DDP every rank's answers are
        gathered (records the distributed sampler repeated count once), so every rank logs the same
        values."""
        if self.prefix_cache is not None:
            self.prefix_cache.flush()
        self.val_answers = {k: gather_answers(self._val[k]) for k in self.units}
        for unit, answers in self.val_answers.items():
            metrics = answer_metrics(answers)
            for key, value in metrics.items():
                self.log(self.metric(unit, f"val/{key}"), value, prog_bar=key == "acc" and len(self.units) == 1)
            if "baseline_acc" in metrics:
                self.log(self.metric(unit, "val/delta"), metrics["acc"] - metrics["baseline_acc"])
        self._val = {k: {} for k in self.units}

    def configure_optimizers(self):
        return torch.optim.Adam(self.gates.parameters(), lr=self.lr)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class EpochGateExport(Callback):
    """Per trained layer, `gate-epoch{e}.safetensors` (with the run's identity, its own layer and the
    steps) in the layer's folder (`lsg.runs.layer_dir`), rank 0 alone. A joint run (`joint=True`)
    writes its gates as `gate-epoch{e}-L{l}.safetensors` in the run directory (`lsg.runs.joint_gate_file`;
    metadata `joint_layers` names the gates trained with it), the stack's validation answers as
    `val-epoch{e}.json` and a stack manifest `stack-epoch{e}.json` (`lsg.runs.stack_file`), written
    by `write_stack(path, specs, **info)` (the command line passes `lsg.specs.manifest` +
    `write_manifest`: what eval.py, lsg-stack and lmms-eval read as `stack:<manifest>`).

    It is written at the epoch's last training batch, before that step's resumable checkpoint
    (Lightning runs checkpoint callbacks last), because a run resumed from that checkpoint skips
    the rest of the epoch; after the epoch's validation it is written again with the validation
    metrics `val` (gathered over every rank) added, beside `val-epoch{e}.json`.
    """

    def __init__(self, run_dir: Path, write_stack: Callable[..., Path] | None = None):
        self.run_dir = Path(run_dir)
        self.write_stack = write_stack

    def _save(self, trainer: L.Trainer, module: GateTrainingModule, with_val: bool) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or trainer.fast_dev_run:
            return
        epoch = trainer.current_epoch + 1
        identity = {k: v for k, v in module.identity.items() if k != "layers"}
        if module.joint:
            self._save_joint(trainer, module, with_val, epoch, identity)
            return
        for layer in module.layers:
            gate = module.gate(layer)
            folder = layer_dir(self.run_dir, gate.name, layer, module.layers)
            extra = {}
            answers = module.val_answers.get(layer) if with_val else None
            if with_val:
                loss = trainer.callback_metrics.get(module.metric(layer, "val/loss"))
                extra["val"] = {**({} if loss is None else {"val/loss": float(loss)}),
                                **{f"val/{k}": v for k, v in answer_metrics(answers or {}).items()}}
                if answers:
                    write_val_answers(val_file(folder, epoch), answers, epoch=epoch, steps=trainer.global_step,
                                      layer=layer, groups=list(GROUPINGS.get(getattr(gate, "grouping", ""), ())))
            gate.save(gate_file(folder, epoch), **identity, layer=layer, epoch=epoch, steps=trainer.global_step,
                      **extra)

    def _save_joint(self, trainer: L.Trainer, module: GateTrainingModule, with_val: bool, epoch: int,
                    identity: dict) -> None:
        if self.write_stack is None:
            raise RuntimeError("A joint run exports a stack manifest: give EpochGateExport a write_stack "
                               "(lsg.cli.train passes lsg.specs' manifest writer).")
        key, steps = module.layers[0], trainer.global_step
        info: dict = {"joint": True, "layers": module.layers, "epoch": epoch, "steps": steps}
        if with_val:
            answers = module.val_answers.get(key)
            loss = trainer.callback_metrics.get(module.metric(key, "val/loss"))
            info["val"] = {**({} if loss is None else {"val/loss": float(loss)}),
                           **{f"val/{k}": v for k, v in answer_metrics(answers or {}).items()}}
            if answers:
                groups = [list(GROUPINGS.get(getattr(module.gate(l), "grouping", ""), ())) for l in module.layers]
                write_val_answers(val_file(self.run_dir, epoch), answers, epoch=epoch, steps=steps,
                                  layers=module.layers, groups=groups)
        paths = [module.gate(l).save(joint_gate_file(self.run_dir, l, epoch), **identity, layer=l,
                                     joint_layers=module.layers, epoch=epoch, steps=steps,
                                     **({"val": info["val"]} if with_val else {}))
                 for l in module.layers]
        self.write_stack(stack_file(self.run_dir, epoch), [f"ckpt:{p.resolve()}" for p in paths], **info)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            self._save(trainer, pl_module, with_val=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, with_val=True)


def check_resumable(path: Path, identity: dict) -> str | None:
    """`str(path)` if a resumable checkpoint of the same setup exists, else None.

    Raises:
        ValueError: the checkpoint belongs to another backbone, layer, gate, sink or data setup, or
            was written by a joint run and this one trains separately (or the other way round).
    """
    path = Path(path)
    if not path.exists():
        return None
    saved = SafetensorsCheckpointIO().load_checkpoint(path).get("lsg_identity")
    if saved is not None and json.loads(json.dumps(saved)) != json.loads(json.dumps(identity)):
        have = json.loads(json.dumps(identity))
        diff = [k for k in dict.fromkeys([*have, *saved]) if saved.get(k) != have.get(k)]
        raise ValueError(
            f"{path} holds a run with a different {', '.join(diff)}. Resume it with its own settings, "
            f"or move it away / set run_dir=... to start a new run."
        )
    return str(path)
