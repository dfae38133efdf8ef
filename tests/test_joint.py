"""Joint multi-layer training (LSG paper Appendix D.2, docs/methods.md section 3): every gate attached
in one suffix forward, one loss; resumable; exported as a stack manifest that eval.py reads."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

import lsg
from lsg.datamodule import VQADataModule, load_records
from lsg.gates import Gate, LSGGate
from lsg.scoring import answer_loss
from lsg.training import GateTrainingModule, SafetensorsCheckpointIO
from tests.hand import ROOT, run_app

LAYERS = (1, 3)
LR = 1e-2


class KeepBatches(L.Callback):
    """Every training batch, and how often `last_layer` (a module of the last decoder layer) ran in training steps."""

    def __init__(self, last_layer):
        self.batches, self.last_layer_calls, self._training = [], 0, False
        self.handle = last_layer.register_forward_hook(self._count)  # removed by the test

    def _count(self, *args):
        self.last_layer_calls += self._training

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)
        self._training = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._training = False


def random_gates(tiny) -> dict[int, LSGGate]:
    """Gates with non-uniform ratios (so every parameter gets a gradient), one per layer."""
    torch.manual_seed(5)
    gates = {l: LSGGate(tiny.hidden_size, "vsink-lsink-ordinary") for l in LAYERS}
    for gate in gates.values():
        torch.nn.init.normal_(gate.fc2.weight, std=0.3)
    return gates


def test_joint_gates_after_two_steps_equal_a_hand_written_loop(tmp_path, tiny):
    """The trainer with joint=True, 2 optimizer steps, against attach(every gate) + answer_loss + one Adam
    over all gates on the same batches (the plain full forward, no prefix): the same gates. One step runs
    one forward over the union suffix: the last decoder layer runs once per batch, not once per layer."""
    data = {"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 8, "n_val": 4, "n_test": 0}
    trained, hand = random_gates(tiny), random_gates(tiny)
    module = GateTrainingModule(tiny, trained, {}, lr=LR, effective_batch_size=4, batch_size=4, joint=True)
    keep = KeepBatches(tiny.decoder_layers[-1].mlp)  # skipped layers (below the gates, in the prefix) pass through
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[keep])
    try:
        trainer.fit(module, datamodule=VQADataModule(tiny, data, batch_size=4))
    finally:
        keep.handle.remove()
    assert len(keep.batches) == 2 and keep.last_layer_calls == 2

    optimizer = torch.optim.Adam([p for l in LAYERS for p in hand[l].parameters()], lr=LR)
    for batch in keep.batches:
        with lsg.attach(tiny, dict(hand)):
            loss = answer_loss(tiny, tiny.model_inputs(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for layer in LAYERS:
        assert not torch.equal(hand[layer].fc1.weight, random_gates(tiny)[layer].fc1.weight), "the gates trained"
        for (name, want), got in zip(hand[layer].state_dict().items(), trained[layer].state_dict().values()):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=f"L{layer} {name}")


def test_joint_training_of_one_layer_is_refused_naming_the_layer(tiny):
    with pytest.raises(ValueError, match=r"joint=true trains several layers' gates together, but layer=\[2\]"):
        GateTrainingModule(tiny, {2: LSGGate(tiny.hidden_size)}, {}, lr=LR, effective_batch_size=4, batch_size=4,
                           joint=True)


COMMON = ["model=tiny-random", "logger=none", "data.n_train=16", "data.n_val=14", "batch_size=4",
          "effective_batch_size=8", "epochs=2", "layer=[1,3]", "trainer.enable_progress_bar=false"]


def train(tmp_path: Path, *overrides: str, check: bool = True):
    return run_app("train", *COMMON, f"data.root={tmp_path / 'shapes'}", f"hydra.run.dir={tmp_path / 'hydra'}",
                   *overrides, cwd=tmp_path, check=check)


@pytest.mark.slow
def test_a_joint_run_resumes_after_a_kill_and_its_manifest_answers_as_its_validation(tmp_path):
    """A joint run stopped after 2 of 4 optimizer steps and run again ends with the gates of an
    uninterrupted run; a separate-layers run is refused its run directory; the exported stack manifest,
    through eval.py, answers every validation question as the trainer's validation did."""
    run, export = tmp_path / "run", tmp_path / "ck" / "stack.json"
    train(tmp_path, "joint=true", f"run_dir={run}", f"stack_export_path={export}", "+trainer.max_steps=2")
    assert SafetensorsCheckpointIO().load_checkpoint(run / "last.safetensors")["global_step"] == 2
    result = train(tmp_path, "joint=true", f"run_dir={run}", f"stack_export_path={export}")
    assert "Restoring states from the checkpoint" in result.stdout + result.stderr
    train(tmp_path, "joint=true", f"run_dir={tmp_path / 'whole'}", f"stack_export_path={tmp_path / 'ck2' / 's.json'}")
    for layer in LAYERS:
        resumed, whole = (Gate.load(d / f"gate-epoch2-L{layer}.safetensors") for d in (run, tmp_path / "whole"))
        assert resumed.metadata["steps"] == whole.metadata["steps"] == 4 and resumed.metadata["joint"] is True
        assert resumed.metadata["joint_layers"] == list(LAYERS) and resumed.metadata["layer"] == layer
        for (name, want), got in zip(whole.state_dict().items(), resumed.state_dict().values()):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=f"L{layer} {name}")
    bad = train(tmp_path, "joint=false", f"run_dir={run}", f'export_path="{tmp_path}/sep/L{{layer}}.safetensors"',
                check=False)
    assert bad.returncode != 0 and "different joint" in bad.stderr

    manifest = json.loads(export.read_text())
    assert manifest["joint"] is True and manifest["layers"] == list(LAYERS) and manifest["epoch"] == 1
    assert [Gate.load(g["spec"].removeprefix("ckpt:")).metadata["layer"] for g in manifest["gates"]] == list(LAYERS)
    out = tmp_path / "eval"
    run_app("eval", "model=tiny-random", "logger=none", "benchmark.n=14", f"benchmark.root={tmp_path / 'shapes'}",
            f"out_dir={out}", f"gates=[stack:{export}]", "batch_size=4", "bootstrap_samples=200",
            f"hydra.run.dir={tmp_path / 'h'}", cwd=ROOT)
    items = json.loads((out / "results.json").read_text())["items"]
    validation = json.loads((run / "val-epoch1.json").read_text())["answers"]
    records = load_records({"name": "shapes", "root": str(tmp_path / "shapes"), "n_val": 14}, "val")
    assert len(items) == len(records) == 14
    assert [item[f"stack:{export}|parsed"] for item in items] == [validation[r.id]["prediction"] for r in records]
    assert [item["none|parsed"] for item in items] == [validation[r.id]["baseline"] for r in records]
    assert all(len(a["ratios"]) == 2 * len(LAYERS) for a in validation.values())  # both gates' ratios
