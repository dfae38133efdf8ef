"""Shared-prefix layer sweep: train the independent gates of many layers in one pass.

For every batch one ungated forward gives the hidden state entering each swept layer
(`lsg.prefix.compute_prefixes`, which stops at the highest swept layer); each gate l then
runs layers l..L-1 with only itself attached, and its loss is back-propagated at once, so
only one suffix graph is alive at a time. One Adam over every gate's parameters is exactly
independent Adams (Adam's update of a parameter reads only that parameter's gradient and
state), so gate l ends as a separate `train.py layer=l` run ends: same init
(`lsg.training.build_gate`), same data order (`EpochSampler`), same effective batch.

Outputs per layer, as separate runs write them: `<out_dir>/lsg-L{l}/gate-epoch{e}.safetensors`
(+ `.json` metadata) and `val-epoch{e}.json` (per-question answers, baseline and gate
ratios). W&B: one run with per-layer panels (`L{l}/...`): one process and one pass over
the data train every layer, so one run holds their shared config, resume state and system
metrics; `train.py -m layer=...` gives the one-run-per-layer layout, grouped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lsg.answers import Answer
from lsg.backbones import Backbone
from lsg.context import GROUPINGS
from lsg.gates.base import Gate
from lsg.prefix import compute_prefixes, model_inputs, run_suffix
from lsg.scoring import answer_loss
from lsg.training import (FrozenBackboneModule, accumulation_steps, answer_metrics, gather_answers, keep_baseline,
                          val_answers, write_val_answers)


def layer_dir(out_dir: Path, layer: int) -> Path:
    """Where layer `layer`'s exports live (the layout of `train.py run_dir=<out_dir>/lsg-L<layer>`)."""
    return Path(out_dir) / f"lsg-L{layer}"


class SweepModule(FrozenBackboneModule):
    """Trains `gates[l]` at decoder layer l for every l, sharing the frozen prefix.

    Args:
        backbone: a loaded, frozen `Backbone` (kept out of the module's state).
        gates: layer -> trainable gate.
        lr: Adam learning rate, constant (SPEC section 3).
        accumulation: batches per optimizer step; None = `effective_batch_size / (batch_size x
            devices)`, computed when the trainer (and so the device count) is known.
        activation_checkpointing: recompute each gate's frozen layers above it in backward
            (`lsg.prefix.run_suffix(checkpoint_above=True)`).
        effective_batch_size, batch_size: the global and per-device batch, for `accumulation=None`.

    Under DDP (`trainer.strategy=ddp`) every rank holds every gate and reads its share of each
    global batch; DDP's own reducer is off (one forward serves many backward passes, one per
    gate) and the gates' gradients are averaged over the ranks before each optimizer step, so
    2 processes at batch b train the gates of 1 process at batch 2b (tests/test_sweep.py).

    Raises:
        ValueError: no layer, or a gate without trainable parameters.
    """

    def __init__(self, backbone: Backbone, gates: Mapping[int, Gate], lr: float, accumulation: int | None = None,
                 activation_checkpointing: bool = False, effective_batch_size: int | None = None,
                 batch_size: int | None = None):
        super().__init__(backbone)
        if not gates:
            raise ValueError("A sweep needs at least one layer.")
        bad = [l for l, g in gates.items() if not g.trainable]
        if bad:
            raise ValueError(f"Gates at layers {bad} have no trainable parameters; sweep trained gates only.")
        self.layers = sorted(backbone.check_layer(l) for l in gates)
        self.gates = torch.nn.ModuleDict({str(l): gates[l].float() for l in self.layers})
        self.lr, self.accumulation = lr, accumulation
        self.effective_batch_size, self.batch_size = effective_batch_size, batch_size
        if accumulation is None and (effective_batch_size is None or batch_size is None):
            raise ValueError("SweepModule needs accumulation, or effective_batch_size and batch_size.")
        self.activation_checkpointing = bool(activation_checkpointing)
        self.automatic_optimization = False
        self._val: dict[int, dict[str, Answer]] = {l: {} for l in self.layers}
        self._baseline: dict[str, str] = {}
        self.val_answers: dict[int, dict[str, Answer]] = {}

    def gate(self, layer: int) -> Gate:
        return self.gates[str(layer)]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.effective_batch_size is not None:
            self.accumulation = accumulation_steps(self.effective_batch_size, self.batch_size, self.trainer.world_size)

    def _without_ddp_reducer(self) -> None:
        """Keep DDP's reducer out of this step's backward passes (one per gate, after one forward:
        the reducer expects one); `average_gradients` does its averaging. Lightning sets the flag
        back after each training step."""
        model = self.trainer.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.require_backward_grad_sync = False

    def average_gradients(self) -> None:
        """Every gate's gradient averaged over the ranks (DDP's mean), a no-op on one process."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        for p in self.gates.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self._without_ddp_reducer()
        inputs = model_inputs(batch)
        prefixes, _ = compute_prefixes(self.backbone, inputs, self.layers)
        n = len(batch["records"])
        for layer in self.layers:
            hidden = run_suffix(self.backbone, prefixes[layer], {layer: self.gate(layer)},
                                checkpoint_above=self.activation_checkpointing)
            loss = answer_loss(self.backbone, inputs, hidden)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Training loss of the layer-{layer} gate is {loss.item()} at batch "
                                         f"{batch_idx} of epoch {self.current_epoch}; lower lr, or check the data.")
            self.manual_backward(loss / self.accumulation)  # frees this layer's graph before the next
            self.log(f"L{layer}/train_loss", loss.detach(), batch_size=n)
        if (batch_idx + 1) % self.accumulation == 0 or batch_idx + 1 >= self.trainer.num_training_batches:
            optimizer = self.optimizers()
            self.average_gradients()
            optimizer.step()
            optimizer.zero_grad()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        records = batch["records"]
        need_baseline = any(r.options and r.answer_letter and r.id not in self._baseline for r in records)
        prefixes, final = compute_prefixes(self.backbone, model_inputs(batch), self.layers, to_end=need_baseline)
        for layer in self.layers:  # the baseline's letters are read once, with the first layer
            baseline = final if layer == self.layers[0] else None
            loss, answers = val_answers(self.backbone, batch, prefixes[layer], layer, self.gate(layer), baseline)
            keep_baseline(answers, self._baseline)
            self._val[layer].update(answers)
            self.log(f"L{layer}/val_loss", loss, batch_size=len(records))

    def on_validation_epoch_end(self) -> None:
        self.val_answers = {l: gather_answers(self._val[l]) for l in self.layers}
        for layer, answers in self.val_answers.items():
            metrics = answer_metrics(answers)
            for key, value in metrics.items():
                self.log(f"L{layer}/val_{key}", value)
            if "baseline_acc" in metrics:
                self.log(f"L{layer}/val_delta", metrics["acc"] - metrics["baseline_acc"])
        self._val = {l: {} for l in self.layers}

    def configure_optimizers(self):
        return torch.optim.Adam(self.gates.parameters(), lr=self.lr)


class SweepExport(Callback):
    """Per layer, `gate-epoch{e}.safetensors` with the metadata a separate run writes (its own
    layer in the identity), at the epoch's last batch and again after validation with its
    `val` metrics and `val-epoch{e}.json`; rank 0 only."""

    def __init__(self, out_dir: Path, identity: dict):
        self.out_dir, self.identity = Path(out_dir), identity

    def _save(self, trainer: L.Trainer, module: SweepModule, with_val: bool) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or trainer.fast_dev_run:
            return
        epoch = trainer.current_epoch + 1
        for layer in module.layers:
            gate = module.gate(layer)
            identity = {**self.identity, "layer": layer, "gate_config": gate.config()}
            extra = {}
            answers = module.val_answers.get(layer) if with_val else None
            if answers:
                extra["val"] = {f"val/{k}": v for k, v in answer_metrics(answers).items()}
                write_val_answers(layer_dir(self.out_dir, layer) / f"val-epoch{epoch}.json", answers, epoch=epoch,
                                  steps=trainer.global_step, layer=layer,
                                  groups=list(GROUPINGS.get(getattr(gate, "grouping", ""), ())))
            gate.save(layer_dir(self.out_dir, layer) / f"gate-epoch{epoch}.safetensors", **identity, epoch=epoch,
                      steps=trainer.global_step, **extra)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            self._save(trainer, pl_module, with_val=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, with_val=True)
