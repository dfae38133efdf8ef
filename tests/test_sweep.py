"""Layer sweeps through the one trainer: `train.py layer=<many>` writes what separate one-layer runs
write, with the same gates; DDP; every rank stops together on a non-finite loss."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from lsg.configs import CONF_DIR
from lsg.gates import Gate
from lsg.runs import layer_dirs, layers_tag, parse_layer_dir
from lsg.specs import parse_sweep_layers
from lsg.training import GateTrainingModule
from tests.hand import ROOT, run_app

COMMON = ["model=tiny-random", "logger=none", "data.n_train=24", "data.n_val=14", "batch_size=4",
          "effective_batch_size=8", "epochs=2", "trainer.enable_progress_bar=false"]


def train(tmp_path: Path, *overrides: str, check: bool = True, env: dict | None = None):
    return run_app("train", *COMMON, f"data.root={tmp_path / 'shapes'}", f"hydra.run.dir={tmp_path / 'hydra'}",
                   *overrides, cwd=tmp_path, check=check, env=env)


@pytest.mark.slow
def test_a_many_layer_run_equals_separate_one_layer_runs(tmp_path):
    train(tmp_path, "layer=[1,3]", f"run_dir={tmp_path / 'sweep'}",
          f'export_path="{tmp_path}/ck-sweep/lsg-L{{layer}}.safetensors"')
    for layer in (1, 3):
        train(tmp_path, f"layer={layer}", f"run_dir={tmp_path / 'sep' / f'lsg-L{layer}'}",
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
            assert swept.metadata["val"]["val/loss"] == pytest.approx(alone.metadata["val"]["val/loss"], rel=1e-4)
        exported = Gate.load(tmp_path / "ck-sweep" / f"lsg-L{layer}.safetensors")
        assert exported.metadata["layer"] == layer and exported.metadata["epoch"] == 1
        assert set(exported.metadata["metrics"]["gated"]["acc_pct"]) == \
               set(Gate.load(tmp_path / "ck" / f"L{layer}.safetensors").metadata["metrics"]["gated"]["acc_pct"])


@pytest.mark.slow
def test_a_sweep_of_another_gate_writes_folders_named_by_that_gate(tmp_path):
    """Defect: the sweep wrote `lsg-L<l>` whatever the gate, so LoRA sweeps were read back as LSG."""
    train(tmp_path, "gate=lora", "layer=[1,2]", "epochs=1", f"run_dir={tmp_path / 'sweep'}",
          f'export_path="{tmp_path}/ck/lora-L{{layer}}.safetensors"')
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["lora-L1", "lora-L2"]
    assert list(layer_dirs(tmp_path / "sweep", "lora")) == [1, 2] and layer_dirs(tmp_path / "sweep", "lsg") == {}
    assert Gate.load(tmp_path / "sweep" / "lora-L2" / "gate-epoch1.safetensors").name == "lora"


@pytest.mark.slow
def test_train_refuses_many_devices_without_ddp_and_one_export_file_for_many_layers(tmp_path):
    bad = train(tmp_path, "layer=1", "trainer.devices=2", check=False)
    assert bad.returncode != 0 and "one device" in bad.stderr
    bad = train(tmp_path, "layer=[1,2]", f"export_path={tmp_path / 'one.safetensors'}", check=False)
    assert bad.returncode != 0 and "put {layer} in it" in bad.stderr


def test_layer_lists_and_run_folder_names():
    assert parse_sweep_layers("all", 4) == [0, 1, 2, 3] and parse_sweep_layers("every:3", 30)[:3] == [0, 3, 6]
    assert parse_sweep_layers([3, 1, 3], 4) == [1, 3] and parse_sweep_layers("1-2", 4) == [1, 2]
    assert parse_sweep_layers(10, 30) == [10]
    with pytest.raises(ValueError, match="out of range"):
        parse_sweep_layers("2,9", 4)
    with pytest.raises(ValueError, match="every:K"):
        parse_sweep_layers("every:0", 4)
    assert [layers_tag(s) for s in (10, "all", "every:3", [3, 7, 10], "3-7")] == \
           ["10", "all", "every3", "3_7_10", "3to7"]
    assert layers_tag([3, 7], True) == "3_7-joint" and layers_tag("all", "false") == "all"  # joint runs: own folders
    assert parse_layer_dir("mean-v-L3") == ("mean-v", 3) and parse_layer_dir("lsg-L10") == ("lsg", 10)
    assert parse_layer_dir("lsg-sweep") is None


def test_the_learning_rate_and_every_shared_training_default_live_in_train_yaml():
    """Defect: `GateTrainingModule(lr=1e-3)` while train.yaml said 1e-2. The module takes no lr
    default, and any constructor default that is also a train.yaml setting equals the yaml's."""
    params = inspect.signature(GateTrainingModule.__init__).parameters
    assert params["lr"].default is inspect.Parameter.empty
    config = yaml.safe_load((CONF_DIR / "train.yaml").read_text())
    shared = {k: p.default for k, p in params.items()
              if p.default is not inspect.Parameter.empty and isinstance(config.get(k), (int, float, bool))}
    assert "prefix_cache_mb" in shared
    assert shared == {k: config[k] for k in shared}


@pytest.mark.slow
def test_two_ddp_processes_with_batch_b_train_the_gates_of_one_process_with_batch_2b(tmp_path):
    """`train.py trainer.strategy=ddp trainer.devices=2` (gloo on the CPU): every rank holds every
    gate, the gradients are averaged, and each layer's gate equals the one-process run at twice
    the per-device batch (the effective batch is the same)."""
    common = ["layer=[1,3]", "epochs=1", "data.n_train=32", "effective_batch_size=16", "trainer.accelerator=cpu",
              f'export_path="{tmp_path}/ck/L{{layer}}.safetensors"']
    train(tmp_path, *common, "batch_size=8", f"run_dir={tmp_path / 'one'}")
    train(tmp_path, *common, "batch_size=4", "trainer.devices=2", "trainer.strategy=ddp", f"run_dir={tmp_path / 'two'}")
    for layer in (1, 3):
        name = f"lsg-L{layer}/gate-epoch1.safetensors"
        one, two = Gate.load(tmp_path / "one" / name), Gate.load(tmp_path / "two" / name)
        assert one.metadata["steps"] == two.metadata["steps"] == 2, "the effective batch must not grow with ranks"
        assert not torch.equal(one.fc2.weight, torch.zeros_like(one.fc2.weight)), "the gate trained"
        for (key, a), b in zip(one.state_dict().items(), two.state_dict().values()):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=f"L{layer} {key}")
        assert one.metadata["val"]["val/n"] == two.metadata["val"]["val/n"] == 14  # gathered over both ranks


POISONED_TRAIN = """
import os

import lsg.training

real_token_losses = lsg.training.answer_token_losses


def answer_token_losses(backbone, inputs, hidden):  # NaN on rank 1 only, from its first batch
    losses, targets = real_token_losses(backbone, inputs, hidden)
    return (losses * float("nan") if os.environ.get("LOCAL_RANK", "0") == "1" else losses), targets


lsg.training.answer_token_losses = answer_token_losses
from lsg.cli.train import main

main()
"""


@pytest.mark.slow
def test_a_nan_loss_on_one_ddp_rank_stops_every_rank_with_the_same_error(tmp_path):
    """Defect: a rank that raised on its own NaN loss left the others waiting in the gradient
    all-reduce until the collective timeout. Both processes must exit, non-zero, naming the layer
    and the step, well before any timeout."""
    script = tmp_path / "poisoned_train.py"
    script.write_text(textwrap.dedent(POISONED_TRAIN))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script), *COMMON, f"data.root={tmp_path / 'shapes'}",
                             f"hydra.run.dir={tmp_path / 'hydra'}", "layer=[1,3]", "epochs=1", "data.n_train=32",
                             "effective_batch_size=16", "trainer.accelerator=cpu", "trainer.devices=2",
                             "trainer.strategy=ddp", f"run_dir={tmp_path / 'run'}",
                             f'export_path="{tmp_path}/ck/L{{layer}}.safetensors"'],
                            capture_output=True, text=True, cwd=tmp_path, timeout=240, env=env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("FloatingPointError")]
    assert len(errors) == 2, result.stderr[-3000:]  # one per process
    assert all("layer(s) [1, 3] is not finite at optimizer step 0" in e for e in errors)


@pytest.mark.slow
def test_the_closing_comparison_evaluates_what_validation_missed_in_one_pass(tmp_path):
    """With part of the validation skipped (limit_val_batches), the closing comparison evaluates the
    baseline and every layer's gate on the whole split; each equals a plain full-forward evaluation."""
    import lsg
    from lsg.datamodule import load_records
    from lsg.evaluation import evaluate

    result = train(tmp_path, "layer=[1,3]", "epochs=1", "trainer.limit_val_batches=1", f"run_dir={tmp_path / 'run'}",
                   f'export_path="{tmp_path}/ck/L{{layer}}.safetensors"')
    assert "Saved gate to" in result.stdout
    tiny = lsg.load_backbone("tiny-random")
    val = [r for r in load_records({"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 24, "n_val": 14,
                                    "n_test": 0}, "val") if r.options and r.answer_letter]
    baseline = evaluate(tiny, val).acc_pct
    for layer in (1, 3):
        gate = Gate.load(tmp_path / "ck" / f"L{layer}.safetensors")
        metrics = gate.metadata["metrics"]
        assert metrics["baseline"]["acc_pct"] == pytest.approx(baseline)
        assert metrics["gated"]["acc_pct"] == pytest.approx(evaluate(tiny, val, {layer: gate}).acc_pct)
        assert metrics["baseline"]["counts"]["overall"] == metrics["gated"]["counts"]["overall"] == len(val) == 14
