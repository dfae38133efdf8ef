"""Greedy stacking: both policies by hand, stack.py end to end, manifests loaded and refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lsg
from lsg.evaluation import Result, evaluate
from lsg.gates import LSGGate
from lsg.specs import manifest, manifest_specs, write_manifest
from lsg.stacking import Candidate, greedy


def result(hits):
    """One sub-task's answers: right where `hits` is 1."""
    return Result([float(h) for h in hits], ["A" if h else "B" for h in hits], ["t"] * len(hits))


def test_greedy_keep_all_adds_every_candidate_and_keep_if_better_only_improvements():
    base = result([0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    accuracy = {("a",): 3, ("a", "b"): 2, ("a", "b", "c"): 5, ("a", "c"): 4}  # hits out of 10, by stack
    calls = []

    def evaluate_stacks(specs):
        calls.append(sorted(specs))
        return {k: result([1] * accuracy[tuple(v)] + [0] * (10 - accuracy[tuple(v)])) for k, v in specs.items()}

    cands = [Candidate("c", gain=10.0), Candidate("a", gain=30.0), Candidate("b", gain=20.0)]
    steps = greedy(cands, evaluate_stacks, base, max_size=3, samples=100)
    keep_all = [s for s in steps if s.policy == "keep-all"]
    kib = [s for s in steps if s.policy == "keep-if-better"]
    assert [s.specs for s in keep_all] == [["a"], ["a", "b"], ["a", "b", "c"]]
    assert [s.specs for s in kib] == [["a"], ["a"], ["a", "c"]]  # b lowered accuracy: dropped
    assert [s.kept for s in kib] == [True, False, True]
    assert [s.selection["overall"]["delta"] for s in kib] == pytest.approx([30.0, 30.0, 40.0])
    assert calls[0] == ["a"] and calls[1] == ["a+b"]  # both policies share a stack until they diverge
    with pytest.raises(ValueError, match="Unknown stacking policies"):
        greedy(cands, evaluate_stacks, base, 2, ["best"])


def trained_gate(tiny, folder, layer, seed, **meta):
    torch.manual_seed(seed)
    gate = LSGGate(tiny.hidden_size, "vsink-lsink-ordinary")
    torch.nn.init.normal_(gate.fc2.weight, std=2.0)
    identity = {"backbone": tiny.name, "backbone_fingerprint": tiny.fingerprint, "sinks": tiny.sinks.to_dict(),
                "layer": layer, **meta}
    return gate.save(folder / f"lsg-L{layer}" / "gate-epoch1.safetensors", **identity, epoch=1)


@pytest.mark.slow
def test_stack_py_end_to_end_manifest_loads_everywhere_and_is_refused_when_stale(tmp_path, tiny):
    sweep = tmp_path / "sweep"
    for layer, seed in ((1, 1), (2, 2)):
        trained_gate(tiny, sweep, layer, seed)
    out = tmp_path / "stack"
    args = [sys.executable, "-m", "lsg.cli.stack", "model=tiny-random", "logger=none", f"candidates_dir={sweep}",
            "free=[oracle@3:0.2]", "max_size=3", f"data.root={tmp_path / 'shapes'}", "data.n_val=14",
            "data.n_test=21", f"out_dir={out}", "bootstrap_samples=200", f"hydra.run.dir={tmp_path / 'h'}"]
    result_ = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result_.returncode == 0, result_.stderr[-3000:]
    steps = json.loads((out / "steps.json").read_text())
    assert {s["policy"] for s in steps} == {"keep-all", "keep-if-better"} and len(steps) == 6
    assert (out / "table2.md").read_text().count("| keep-all |") == 3 and (out / "table2.png").exists()
    # The keep-all stack's held-out delta equals a plain evaluation of its gates on the test split.
    from lsg.datamodule import load_records

    test = load_records({"name": "shapes", "root": str(tmp_path / "shapes"), "n_test": 21}, "test")
    layers = lsg.load_stack(out / "stack-keep-all.json", tiny)
    assert sorted(layers) == [1, 2, 3]
    final = [s for s in steps if s["policy"] == "keep-all"][-1]
    plain, base = evaluate(tiny, test, layers), evaluate(tiny, test)
    assert final["heldout"]["overall"]["delta"] == pytest.approx(plain.acc_pct["overall"] - base.acc_pct["overall"])
    # Every gate spec (eval.py's gates=) reads the manifest.
    from lsg.specs import parse_stack

    assert parse_stack(f"stack:{out / 'stack-keep-all.json'}", tiny).layers.keys() == layers.keys()
    # Another backbone's manifest, or a changed checkpoint, is refused.
    other = lsg.load_backbone("tiny-random", seed=1)
    with pytest.raises(ValueError, match="backbone_fingerprint"):
        manifest_specs(out / "stack-keep-all.json", other)
    ckpt = sweep / "lsg-L1" / "gate-epoch1.safetensors"
    write_manifest(tmp_path / "m.json", manifest([f"lsg:{ckpt}"], tiny))
    trained_gate(tiny, sweep, 1, seed=7)
    with pytest.raises(ValueError, match="changed since the manifest"):
        manifest_specs(tmp_path / "m.json", tiny)


@pytest.mark.slow
def test_a_candidate_from_another_backbone_is_refused_before_evaluating(tmp_path, tiny):
    other = lsg.load_backbone("tiny-random", seed=1)
    trained_gate(other, tmp_path / "sweep", 1, 1)
    args = [sys.executable, "-m", "lsg.cli.stack", "model=tiny-random", "logger=none",
            f"candidates_dir={tmp_path / 'sweep'}", "free=[]", f"data.root={tmp_path / 'shapes'}", "data.n_val=7",
            "data.n_test=7", f"out_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'h'}"]
    bad = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Refusing" in bad.stderr and "backbone_fingerprint" in bad.stderr
