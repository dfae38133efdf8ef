"""Many devices without GPUs: Lightning DDP on CPU (gloo), as the template projects test it.

Two processes with per-device batch b must train the same gate as one process with batch
2b: the ranks split each global batch between them, gradients are averaged, and the
effective batch stays `effective_batch_size`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsg.gates import LSGGate
from lsg.training import SafetensorsCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, EFFECTIVE = 48, 14, 16  # 3 optimizer steps in the one epoch


def train(run: Path, data: Path, batch_size: int, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "train.py"), "model=tiny-random", "layer=2", "logger=none", "epochs=1",
            f"data.root={data}", f"data.n_train={N_TRAIN}", f"data.n_val={N_VAL}", f"run_dir={run / 'run'}",
            f"export_path={run / 'ck' / 'lsg-L2.safetensors'}", f"batch_size={batch_size}",
            f"effective_batch_size={EFFECTIVE}", f"hydra.run.dir={run / 'hydra'}", f"batch_log={run / 'batches.jsonl'}",
            "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", *overrides]
    result = subprocess.run(args, capture_output=True, text=True, cwd=run.parent, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_ddp_processes_with_batch_b_train_the_gate_of_one_process_with_batch_2b(tmp_path):
    data = tmp_path / "shapes"
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train(single, data, batch_size=8)
    result = train(ddp, data, 4, "trainer.devices=2", "trainer.strategy=ddp")

    # The two ranks read complementary halves of each of the single process's batches.
    logs = {name: [json.loads(l) for l in (run / "batches.jsonl").read_text().splitlines()]
            for name, run in (("single", single), ("ddp", ddp))}
    assert {row["rank"] for row in logs["ddp"]} == {0, 1}
    for row in logs["single"]:
        halves = [r["ids"] for r in logs["ddp"] if r["batch"] == row["batch"]]
        assert len(halves) == 2 and sorted(halves[0] + halves[1]) == sorted(row["ids"])
        assert not set(halves[0]) & set(halves[1])

    steps = [SafetensorsCheckpointIO().load_checkpoint(run / "run" / "last.safetensors")["global_step"]
             for run in (single, ddp)]
    assert steps == [N_TRAIN // EFFECTIVE] * 2, "the effective batch must not grow with the device count"
    a = LSGGate.load(single / "run" / "gate-epoch1.safetensors")
    b = LSGGate.load(ddp / "run" / "gate-epoch1.safetensors")
    assert not torch.equal(a.fc2.weight, torch.zeros_like(a.fc2.weight)), "the gate trained"
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4, msg=key)

    # Validation is gathered over both ranks: the whole split once, not one rank's share.
    val_single, val_ddp = a.metadata["val"], b.metadata["val"]
    assert val_single["val/n"] == val_ddp["val/n"] == N_VAL
    assert abs(val_single["val/acc"] - val_ddp["val/acc"]) < 1e-6
    # Only rank 0 evaluates and writes the export, which carries the same metrics.
    assert json.loads((ddp / "ck" / "lsg-L2.json").read_text())["val"]["val/n"] == N_VAL
    assert (result.stdout + result.stderr).count("Saved gate to") == 1
