"""Training: only the gate learns, the backbone stays bit-identical, train.py runs and resumes."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lsg.gates import LSGGate
from lsg.scoring import answer_loss, answer_token_losses, loss_by_kind, option_loss, option_scores
from lsg.segments import last_prompt_positions
from lsg.training import GateTrainingModule, SafetensorsCheckpointIO
from tests.conftest import samples

ROOT = Path(__file__).resolve().parents[1]


def test_answer_loss_equals_hf_loss_on_labels(tiny, batch):
    with torch.no_grad():
        expected = tiny.model(**batch).loss  # full logits, HF's shifted cross-entropy
        got = answer_loss(tiny, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def hand_token_losses(bb, batch) -> list[tuple[int, float]]:
    """(target id, cross-entropy in nats) of every answer token, from the full logits, by hand."""
    with torch.no_grad():
        logits = bb.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels, out = batch["labels"], []
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                row = logits[b, t - 1]
                out.append((int(labels[b, t]), float(row.logsumexp(0) - row[labels[b, t]])))
    return out


def hand_kinds(hand: list[tuple[int, float]], eot: int) -> dict[str, list[float]]:
    return {"text": [l for t, l in hand if t != eot], "eot": [l for t, l in hand if t == eot]}


def test_loss_by_kind_splits_answer_tokens_as_by_hand(tiny, batch):
    eot = tiny.tokenizer.eos_token_id
    hand = hand_kinds(hand_token_losses(tiny, batch), eot)
    with torch.no_grad():
        losses, targets = answer_token_losses(tiny, batch)
    kinds = loss_by_kind(losses, targets, eot)
    assert kinds["eot"][1] == len(hand["eot"]) == 4  # one end of turn per answer
    assert kinds["text"][1] == len(hand["text"]) == 4  # the answer letters
    for kind, values in hand.items():
        assert kinds[kind][0].item() == pytest.approx(sum(values) / len(values), rel=1e-5)
    total = (sum(hand["text"]) + sum(hand["eot"])) / (len(hand["text"]) + len(hand["eot"]))
    assert answer_loss(tiny, batch).item() == pytest.approx(total, rel=1e-5)
    assert set(loss_by_kind(losses, targets, None)) == {"text"}


class KeepFirstBatch(L.Callback):
    """Keeps the first training batch and the gate's state before the first optimizer step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = batch
            self.gate_state = {k: v.clone() for k, v in pl_module.gate(2).state_dict().items()}


def test_training_logs_the_loss_per_kind_of_answer_token(tmp_path, tiny):
    """train/loss_text and train/loss_eot are the means over the step's text and end-of-turn
    tokens, checked against the gated backbone's full logits by hand; val/ gets them too."""
    from lsg.attach import attach
    from lsg.datamodule import VQADataModule

    data = {"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 4, "n_val": 4, "n_test": 0}
    gate = LSGGate(tiny.hidden_size, "vsink-lsink-ordinary")
    module = GateTrainingModule(tiny, {2: gate}, {}, lr=1e-2, effective_batch_size=4, batch_size=4)
    keep = KeepFirstBatch()
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False,
                        callbacks=[keep])
    trainer.fit(module, datamodule=VQADataModule(tiny, data, batch_size=4))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    before = LSGGate(tiny.hidden_size, "vsink-lsink-ordinary")
    before.load_state_dict(keep.gate_state)
    with attach(tiny, {2: before}):
        hand = hand_kinds(hand_token_losses(tiny, tiny.model_inputs(keep.batch)), tiny.tokenizer.eos_token_id)
    assert len(hand["eot"]) == 4
    for kind, values in hand.items():
        assert logged[f"train/loss_{kind}"] == pytest.approx(sum(values) / len(values), rel=1e-4)
    assert logged["train/loss"] == pytest.approx(sum(hand["text"] + hand["eot"]) / len(hand["text"] + hand["eot"]),
                                                 rel=1e-4)
    assert {"val/loss", "val/loss_text", "val/loss_eot"} <= set(logged)


def test_option_scores_read_the_last_prompt_token(tiny):
    images, questions, answers = samples()
    batch = tiny.build_batch(images, questions)
    with torch.no_grad():
        logits = tiny.model(**batch).logits
    pos = last_prompt_positions(batch["attention_mask"])
    letters = [tiny.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ABCDE"]
    expected = logits[torch.arange(4), pos][:, letters]
    torch.testing.assert_close(option_scores(tiny, batch, 5), expected, atol=1e-5, rtol=1e-5)


def test_option_loss_is_cross_entropy_over_each_rows_own_letters(tiny):
    images, questions, answers = samples()
    batch = tiny.build_batch(images, questions, answers)
    n_options, answer_index = torch.tensor([2, 4, 5, 3]), torch.tensor([1, 3, 0, 2])
    with torch.no_grad():
        logits = tiny.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        got = option_loss(tiny, batch, n_options, answer_index)
    pos = last_prompt_positions(batch["attention_mask"], batch["labels"])
    letters = [tiny.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ABCDE"]
    expected = 0.0
    for b in range(4):  # softmax over this row's own options only, by hand
        row = logits[b, pos[b], letters[: n_options[b]]]
        expected += (row.logsumexp(0) - row[answer_index[b]]) / 4
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="answer_index"):
        option_loss(tiny, batch, n_options, torch.tensor([2, 0, 0, 0]))


def test_only_gate_parameters_train_and_backbone_is_bit_identical(tiny, batch):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    gate = LSGGate(tiny.hidden_size, "vsink-lsink-ordinary")
    module = GateTrainingModule(tiny, {2: gate}, {}, lr=1e-2, effective_batch_size=4, batch_size=4)
    optimizer = module.configure_optimizers()
    gate_before = {k: v.clone() for k, v in gate.state_dict().items()}
    for _ in range(3):
        loss = {l: v for l, v, _ in module.layer_losses({**batch, "records": [SimpleNamespace(id=f"r{i}") for i in range(4)]})}[2]
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in tiny.model.parameters())
        assert gate.fc2.weight.grad is not None and gate.fc2.weight.grad.abs().sum() > 0
        optimizer.step()
    assert list(dict(module.named_parameters())) == [f"gates.2.{k}" for k, _ in gate.named_parameters()]
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, gate_before[k]) for k, v in gate.state_dict().items())


def test_checkpoint_io_round_trips_lightning_state_without_pickle(tmp_path):
    state = {"state_dict": {"gate.w": torch.randn(3, 2)}, "epoch": 1, "global_step": 7,
             "optimizer_states": [{"state": {0: {"step": torch.tensor(7.0)}}, "param_groups": [
                 {"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]}], "loops": {"fit": {"x": None, "y": [1, 2]}}}
    io = SafetensorsCheckpointIO()
    io.save_checkpoint(state, tmp_path / "c.safetensors")
    # No pickle: the file is a safetensors file (8-byte header length, a JSON header naming
    # every tensor, raw bytes), which torch.load cannot read and safe_open can.
    raw = (tmp_path / "c.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert set(header) - {"__metadata__"} == {"/state_dict/gate.w", "/optimizer_states/0/state/0/step"}
    json.loads(header["__metadata__"]["lightning"])
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:2]  # neither torch.save's zip nor a raw pickle
    back = io.load_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(back["state_dict"]["gate.w"], state["state_dict"]["gate.w"])
    assert back["optimizer_states"][0]["state"][0]["step"] == 7.0
    assert back["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["loops"] == state["loops"] and back["global_step"] == 7


def run_train(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "train.py"), "model=tiny-random", "layer=2", "logger=none",
            f"data.root={tmp_path / 'shapes'}", "data.n_train=32", "data.n_val=14", f"run_dir={tmp_path / 'run'}",
            f"export_path={tmp_path / 'ck' / 'lsg-L2.safetensors'}", "batch_size=4", "effective_batch_size=8",
            f"hydra.run.dir={tmp_path / 'hydra'}", *overrides]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_train_py_fast_dev_run_on_tiny_random(tmp_path):
    """One training and one validation batch, then stop: a finite loss, four validation
    answers, one logged batch, and nothing written that a real run would resume from."""
    import ast
    import math

    result = run_train(tmp_path, "trainer.fast_dev_run=true", f"batch_log={tmp_path / 'batches.jsonl'}")
    line = next(l for l in result.stdout.splitlines() if l.startswith("fast_dev_run metrics: "))
    metrics = ast.literal_eval(line.removeprefix("fast_dev_run metrics: "))
    assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    assert metrics["val/n"] == 4 and 0 <= metrics["val/acc"] <= 1
    assert len((tmp_path / "batches.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_train_py_end_to_end_exports_gate_with_metadata_and_resumes(tmp_path):
    # An interrupted run: stop after 2 optimizer steps (of 8 in 2 epochs).
    run_train(tmp_path, "+trainer.max_steps=2")
    last = tmp_path / "run" / "last.safetensors"
    assert SafetensorsCheckpointIO().load_checkpoint(last)["global_step"] == 2
    # Re-running the same command resumes and finishes; the export carries its metadata.
    result = run_train(tmp_path)
    assert "Restoring states from the checkpoint" in result.stdout + result.stderr
    assert SafetensorsCheckpointIO().load_checkpoint(last)["global_step"] == 8
    meta = json.loads((tmp_path / "ck" / "lsg-L2.json").read_text())
    assert meta["backbone"] == "tiny-random" and meta["layer"] == 2 and meta["epoch"] == 1
    assert meta["config"]["grouping"] == "vsink-rest" and meta["steps"] == 4  # auto: tiny-random has V-sinks
    assert set(meta["metrics"]["baseline"]["acc_pct"]) == set(meta["metrics"]["gated"]["acc_pct"])
    assert meta["sinks"]["llm_dims"] == [0, 1] and meta["data"]["n_train"] == 32
    gate = LSGGate.load(tmp_path / "ck" / "lsg-L2.safetensors", backbone="tiny-random", layer=2)
    assert not torch.equal(gate.fc2.weight, torch.zeros_like(gate.fc2.weight))
    # The final comparison reads epoch 1's validation answers, not a second evaluation; they equal
    # a plain evaluation of the exported gate and of the backbone on the same split.
    from lsg.datamodule import load_records
    from lsg.evaluation import evaluate

    val = json.loads((tmp_path / "run" / "val-epoch1.json").read_text())
    records = load_records({"name": "shapes", "root": str(tmp_path / "shapes"), "n_val": 14}, "val")
    assert [val["answers"][r.id]["prediction"] for r in records] == evaluate(
        __import__("lsg").load_backbone("tiny-random"), records, {2: gate}).predictions
    assert all(len(a["ratios"]) == 2 and abs(sum(a["ratios"]) - 1) < 1e-4 for a in val["answers"].values())
    assert "baseline and gated" not in result.stdout + result.stderr
    # The same run directory with another layer's settings is refused, not overwritten.
    bad = run_train(tmp_path, "gate.width=8", check=False)
    assert bad.returncode != 0 and "different gate_config" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("layer=99", "Layers [99] are out of range for a backbone with 4 decoder layers"),
    ("layer=[1,7]", "Layers [7] are out of range"),
])
def test_train_py_bad_input_gets_clear_error(tmp_path, override, message):
    result = run_train(tmp_path, override, "trainer.fast_dev_run=true", check=False)
    assert result.returncode != 0 and message in result.stderr


def test_training_through_the_prefix_cache_equals_plain_training(tiny, batch):
    """Two epochs over the same batches: the module (epoch 2 served from the prefix cache)
    ends with the gate plain `attach` training gives, same init, same data order."""
    from lsg.attach import attach

    torch.manual_seed(3)
    plain = LSGGate(tiny.hidden_size, "vsink-lsink-ordinary")
    torch.nn.init.normal_(plain.fc2.weight, std=0.3)
    cached = LSGGate(tiny.hidden_size, "vsink-lsink-ordinary")
    cached.load_state_dict(plain.state_dict())
    module = GateTrainingModule(tiny, {2: cached}, {}, lr=1e-2, effective_batch_size=2, batch_size=2)
    opt_plain, opt_cached = torch.optim.Adam(plain.parameters(), 1e-2), module.configure_optimizers()
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    for epoch in range(2):
        for i, half in enumerate(halves):
            with attach(tiny, {2: plain}):
                loss = answer_loss(tiny, half)
            opt_plain.zero_grad(), loss.backward(), opt_plain.step()
            loss = {l: v for l, v, _ in module.layer_losses({**half, "records": [SimpleNamespace(id=f"{i}-{j}") for j in range(2)]})}[2]
            opt_cached.zero_grad(), loss.backward(), opt_cached.step()
    assert module.prefix_cache.stats()["hits"] == 4 and module.prefix_cache.stats()["misses"] == 4
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def test_checkpoint_from_another_backbone_is_refused(tmp_path, tiny):
    path = LSGGate(tiny.hidden_size).save(tmp_path / "g.safetensors", backbone="smol-llava", layer=10)
    with pytest.raises(ValueError, match="backbone='smol-llava', but this run has backbone='tiny-random'"):
        LSGGate.load(path, backbone="tiny-random", layer=10)
