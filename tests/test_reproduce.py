"""lsg-reproduce: the paper's workflow as one resumable plan, and its report (issue 19, item 5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lsg.reproduce import done_path, load_experiment, plan, run_plan

pytestmark = pytest.mark.slow  # every test here starts a process

ROOT = Path(__file__).resolve().parents[1]


def test_the_paper_experiment_composes_and_prints_its_plan_offline(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lsg.cli.reproduce", "experiment=lsg_paper", "dry_run=true",
                             f"hydra.run.dir={tmp_path / 'h'}"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split(":")[0].strip().split(". ")[-1]: line for line in result.stdout.splitlines() if ". " in line}
    assert list(lines) == ["calibrate", "sweep", "summarize", "stack", "lora", "eval-mmstar", "eval-cvbench",
                           "report"]
    assert "model=llava-1.5-7b" in lines["sweep"] and "layer=all" in lines["sweep"] and "lsg-train" in lines["sweep"] and "epochs=2" in lines["sweep"]
    assert "data.train_json=data/cambrian10k/train.json" in lines["sweep"]
    assert lines["sweep"].split("lsg-train ")[1].startswith("experiment=lsg_paper") and "experiment=lsg_paper" in lines["lora"]
    assert "max_size=5" in lines["stack"] and "'free=[var]'" in lines["stack"]
    assert "gate=lora layer=10" in lines["lora"]
    for bench in ("mmstar", "cvbench"):
        assert f"benchmark={bench}" in lines[f"eval-{bench}"] and "lsg-eval" in lines[f"eval-{bench}"]
        assert "lsg-L10/gate-epoch1.safetensors" in lines[f"eval-{bench}"] and "var" in lines[f"eval-{bench}"]
    assert not (tmp_path / "runs").exists(), "a dry run runs nothing"


def tiny_experiment() -> dict:
    """smol_paper at unit-test sizes on the tiny random backbone."""
    exp = load_experiment("smol_paper")
    exp.update(model="tiny-random", logger="none", layers=[1, 2], lsg_layer=2,
               data_overrides=["data.root=shapes", "data.n_train=16", "data.n_val=14", "data.n_test=14"],
               training={"epochs": 1, "batch_size": 8, "effective_batch_size": 8, "lr": 0.01},
               calibrate={"n_samples": 4}, stack={**exp["stack"], "max_size": 2},
               benchmarks=[{"name": "shapes", "overrides": ["benchmark.root=shapes", "benchmark.split=test",
                                                            "benchmark.n=14"], "reference_as": "cvbench"}])
    return exp


def test_a_tiny_reproduction_runs_every_stage_writes_the_report_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp, out = tiny_experiment(), tmp_path / "out"
    stages = plan(exp, out)
    record = run_plan(stages, exp, out, log=lambda *_: None)
    assert [name for name in record] == [s.name for s in stages] and not any(r["skipped"] for r in record.values())
    rows = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in rows] == ["LSG L2", "stack (keep-all)", "VAR", "LoRA L2"]
    # Our deltas are the eval stage's paired deltas, and the paper's stand beside them.
    results = json.loads((out / "eval" / "shapes" / "results.json").read_text())
    lsg_row = next(r for r in results["rows"] if r["method"].startswith("ckpt:") and "lsg-L2" in r["method"])
    assert rows[0]["delta"] == pytest.approx(lsg_row["paired"]["overall"]["delta"])
    assert [r["paper"] for r in rows] == [2.14, 3.08, 0.75, -5.30]
    md = (out / "report.md").read_text()
    assert "| shapes | LSG L2 |" in md and "+2.14 (cvbench, 57.29)" in md and "Total wall time" in md
    assert (out / "report.png").stat().st_size > 1000
    # Run again: every stage is skipped. Forget the next-to-last: it and the report run again
    # (a stage that ran again invalidates the stages that read its outputs).
    again = run_plan(stages, exp, out, log=lambda *_: None)
    assert all(r["skipped"] for r in again.values())
    done_path(out, stages[-2]).unlink()
    third = run_plan(stages, exp, out, log=lambda *_: None)
    assert [n for n, r in third.items() if not r["skipped"]] == [stages[-2].name, "report"]
    # Another setting of a stage: it runs again, and so does everything after it.
    exp["benchmarks"][0]["overrides"] = [*exp["benchmarks"][0]["overrides"], "benchmark.mode=choice"]
    fourth = run_plan(plan(exp, out), exp, out, log=lambda *_: None)
    assert [n for n, r in fourth.items() if not r["skipped"]] == ["eval-shapes", "report"]
    # Skipping a stage drops the methods that need its outputs from the evaluation.
    exp["skip"] = ["lora"]
    assert "lora" not in " ".join(s.shell() for s in plan(exp, out))


def test_a_failed_stage_stops_the_plan_and_says_how_to_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = tiny_experiment()
    exp["layers"] = [1, 2]
    exp["lsg_layer"] = 3
    with pytest.raises(ValueError, match="lsg_layer=3 is not among the swept layers"):
        plan(exp, tmp_path / "out")
    exp = tiny_experiment()
    exp["model_overrides"] = ["model.num_layers=2"]  # layer 2 does not exist: the sweep fails
    stages = plan(exp, tmp_path / "out")
    with pytest.raises(RuntimeError, match="Stage sweep failed.*run the same command again"):
        run_plan(stages, exp, tmp_path / "out", log=lambda *_: None)
    assert done_path(tmp_path / "out", stages[0]).exists() and not done_path(tmp_path / "out", stages[1]).exists()
