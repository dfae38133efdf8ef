"""Interruptions: a run killed with SIGKILL mid-epoch resumes from its last checkpoint, sees the
same data order as an uninterrupted run and ends with the same gate; a NaN loss stops training
with a clear error and never reaches the exported gate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lsg.datamodule import VQADataModule
from lsg.gates import LSGGate
from lsg.training import GateTrainingModule, SafetensorsCheckpointIO, accumulation_steps

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, BATCH, EFFECTIVE = 96, 4, 8  # 24 batches (12 optimizer steps) per epoch, 2 epochs


def train_args(run: Path, data: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "model=tiny-random", "layer=2", "logger=none",
            f"data.root={data}", f"data.n_train={N_TRAIN}", "data.n_val=14", f"run_dir={run / 'run'}",
            f"export_path={run / 'ck' / 'lsg-L2.safetensors'}", f"batch_size={BATCH}",
            f"effective_batch_size={EFFECTIVE}", f"hydra.run.dir={run / 'hydra'}", f"batch_log={run / 'batches.jsonl'}",
            "trainer.enable_progress_bar=false", *overrides]


def batches(log: Path) -> dict[tuple[int, int], list[str]]:
    """(epoch, batch index) -> record ids, the last time each batch was trained."""
    out = {}
    for line in log.read_text().splitlines():
        row = json.loads(line)
        out[(row["epoch"], row["batch"])] = row["ids"]
    return out


def kill_when(proc: subprocess.Popen, log: Path, epoch: int, batch: int, timeout_s: float = 240) -> None:
    """Freeze (SIGSTOP) then SIGKILL `proc` as soon as it has logged `batch` of `epoch`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and any(json.loads(l)["epoch"] == epoch and json.loads(l)["batch"] >= batch
                                for l in log.read_text().splitlines() if l.strip()):
            os.kill(proc.pid, signal.SIGSTOP)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"the run ended or stalled before epoch {epoch} batch {batch}: {proc.returncode}")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_resumes_with_same_data_order_and_gate(tmp_path):
    data = tmp_path / "shapes"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(train_args(whole, data), check=True, capture_output=True, cwd=tmp_path, timeout=600)

    proc = subprocess.Popen(train_args(killed, data), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_when(proc, killed / "batches.jsonl", epoch=1, batch=7)
    assert proc.returncode == -signal.SIGKILL
    last = killed / "run" / "last.safetensors"
    state = SafetensorsCheckpointIO().load_checkpoint(last)
    total_steps = 2 * N_TRAIN // EFFECTIVE
    assert N_TRAIN // EFFECTIVE < state["global_step"] < total_steps, "killed in epoch 2, after its first step"
    assert not (killed / "ck").exists()

    result = subprocess.run(train_args(killed, data), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restoring states from the checkpoint" in result.stdout + result.stderr
    assert SafetensorsCheckpointIO().load_checkpoint(last)["global_step"] == total_steps

    order_whole, order_killed = batches(whole / "batches.jsonl"), batches(killed / "batches.jsonl")
    assert len(order_whole) == 2 * N_TRAIN // BATCH
    assert order_killed == order_whole, "the resumed run must see every batch of the uninterrupted run, in order"
    assert order_whole[(0, 0)] != order_whole[(1, 0)], "each epoch has its own order"
    for name in ("gate-epoch1.safetensors", "gate-epoch2.safetensors"):
        a, b = LSGGate.load(whole / "run" / name), LSGGate.load(killed / "run" / name)
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5, msg=f"{name} {key}")


def test_effective_batch_is_the_same_for_any_device_count_and_refuses_a_remainder():
    assert accumulation_steps(128, 16, 1) == 8
    assert accumulation_steps(128, 16, 8) == 1
    assert accumulation_steps(128, 4, 2) == 16
    with pytest.raises(ValueError, match=r"not a multiple of batch_size=16 x 3 device\(s\).*batch_size to one of"):
        accumulation_steps(128, 16, 3)


class PoisonAt(L.Callback):
    """Puts NaN into the gate's output layer before optimizer step `step` (a diverged update)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.gate(2).fc2.bias.fill_(float("nan"))


@pytest.mark.slow
def test_nan_loss_stops_training_naming_the_step_and_never_writes_a_nan_gate(tmp_path, tiny):
    from lsg.training import EpochGateExport, SafetensorsModelCheckpoint

    data = {"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 16, "n_val": 4, "n_test": 0}
    gate = LSGGate(tiny.hidden_size, "vsink-lsink-ordinary")
    module = GateTrainingModule(tiny, {2: gate}, {}, lr=1e-2, effective_batch_size=4, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, plugins=[SafetensorsCheckpointIO()], callbacks=[
                            PoisonAt(step=5), EpochGateExport(tmp_path / "run"),
                            SafetensorsModelCheckpoint(dirpath=tmp_path / "run", save_last=True, save_top_k=0,
                                                       every_n_train_steps=1)])
    with pytest.raises(FloatingPointError, match=r"layer\(s\) \[2\] is not finite at optimizer step 5 \(0-based; batch 1 of epoch 1"):
        trainer.fit(module, datamodule=VQADataModule(tiny, data, batch_size=4))
    assert (tmp_path / "run" / "gate-epoch1.safetensors").exists()
    assert not (tmp_path / "run" / "gate-epoch2.safetensors").exists()
    last = SafetensorsCheckpointIO().load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert last["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values()), "the resumable state stays finite"
    with pytest.raises(ValueError, match="NaN or inf"):
        gate.save(tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
