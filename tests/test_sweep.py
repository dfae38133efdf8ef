"""The shared-prefix sweep writes what separate train.py runs write, with the same gates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsg.gates import Gate
from lsg.specs import parse_sweep_layers

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["model=tiny-random", "logger=none", "data.n_train=24", "data.n_val=14", "batch_size=4",
          "effective_batch_size=8", "epochs=2", "trainer.enable_progress_bar=false"]


def run(script: str, tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / script), *COMMON, f"data.root={tmp_path / 'shapes'}",
            f"hydra.run.dir={tmp_path / 'hydra'}", *overrides]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def test_sweep_equals_separate_train_runs(tmp_path):
    run("sweep.py", tmp_path, "layers=[1,3]", f"out_dir={tmp_path / 'sweep'}")
    for layer in (1, 3):
        run("train.py", tmp_path, f"layer={layer}", f"run_dir={tmp_path / 'sep' / f'lsg-L{layer}'}",
            f"export_path={tmp_path / 'ck' / f'L{layer}.safetensors'}")
        for epoch in (1, 2):
            name = f"lsg-L{layer}/gate-epoch{epoch}.safetensors"
            swept, alone = Gate.load(tmp_path / "sweep" / name), Gate.load(tmp_path / "sep" / name)
            assert swept.metadata["steps"] == alone.metadata["steps"] == 3 * epoch
            for key in ("backbone", "backbone_fingerprint", "layer", "gate_config", "sinks", "data", "epoch"):
                assert swept.metadata[key] == alone.metadata[key], key
            for (k, a), b in zip(alone.state_dict().items(), swept.state_dict().values()):
                torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=f"L{layer} epoch {epoch} {k}")
            assert not torch.equal(swept.fc2.weight, torch.zeros_like(swept.fc2.weight))
            va = json.loads((tmp_path / "sweep" / f"lsg-L{layer}/val-epoch{epoch}.json").read_text())["answers"]
            vb = json.loads((tmp_path / "sep" / f"lsg-L{layer}/val-epoch{epoch}.json").read_text())["answers"]
            assert {k: (a["prediction"], a["baseline"]) for k, a in va.items()} == \
                   {k: (a["prediction"], a["baseline"]) for k, a in vb.items()}
            assert swept.metadata["val"]["val/acc"] == pytest.approx(alone.metadata["val"]["val/acc"])


def test_sweep_refuses_many_devices_and_bad_layers(tmp_path):
    bad = run("sweep.py", tmp_path, "layers=1", "trainer.devices=2", check=False)
    assert bad.returncode != 0 and "one device" in bad.stderr
    assert parse_sweep_layers("all", 4) == [0, 1, 2, 3] and parse_sweep_layers("every:3", 30)[:3] == [0, 3, 6]
    assert parse_sweep_layers([3, 1, 3], 4) == [1, 3] and parse_sweep_layers("1-2", 4) == [1, 2]
    with pytest.raises(ValueError, match="out of range"):
        parse_sweep_layers("2,9", 4)
    with pytest.raises(ValueError, match="every:K"):
        parse_sweep_layers("every:0", 4)


def test_two_ddp_processes_with_batch_b_sweep_the_gates_of_one_process_with_batch_2b(tmp_path):
    """`sweep.py trainer.strategy=ddp trainer.devices=2` (gloo on the CPU): every rank holds every
    gate, the gradients are averaged, and each layer's gate equals the one-process sweep at twice
    the per-device batch (the effective batch is the same)."""
    common = ["layers=[1,3]", "epochs=1", "data.n_train=32", "effective_batch_size=16", "trainer.accelerator=cpu"]
    run("sweep.py", tmp_path, *common, "batch_size=8", f"out_dir={tmp_path / 'one'}")
    run("sweep.py", tmp_path, *common, "batch_size=4", "trainer.devices=2", "trainer.strategy=ddp",
        f"out_dir={tmp_path / 'two'}")
    for layer in (1, 3):
        name = f"lsg-L{layer}/gate-epoch1.safetensors"
        one, two = Gate.load(tmp_path / "one" / name), Gate.load(tmp_path / "two" / name)
        assert one.metadata["steps"] == two.metadata["steps"] == 2, "the effective batch must not grow with ranks"
        assert not torch.equal(one.fc2.weight, torch.zeros_like(one.fc2.weight)), "the gate trained"
        for (key, a), b in zip(one.state_dict().items(), two.state_dict().values()):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=f"L{layer} {key}")
        assert one.metadata["val"]["val/n"] == two.metadata["val"]["val/n"] == 14  # gathered over both ranks
