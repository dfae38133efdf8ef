"""lsg-reproduce: the paper's workflow as one resumable plan, and its report (issue 19, item 5), with the
Table S5 ablations (issue 25, section 2, item 3)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lsg.reproduce import ablation_variants, done_path, load_experiment, plan, run_plan, write_report
from lsg.stats import paired_by_subtask

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # starts a process
def test_the_paper_experiment_composes_and_prints_its_plan_offline(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lsg.cli.reproduce", "experiment=lsg_paper", "dry_run=true",
                             f"hydra.run.dir={tmp_path / 'h'}"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split(":")[0].strip().split(". ")[-1]: line for line in result.stdout.splitlines()
             if re.match(r"^ +\d+\. ", line)}  # the numbered stages
    assert list(lines) == ["calibrate", "sweep", "summarize", "stack", "lora", "ablation-signal-mean_all",
                           "ablation-signal-mean_visual", "ablation-grouping-vsink-lsink-ordinary",
                           "ablation-grouping-lsink-rest", "ablation-joint", "eval-mmstar", "eval-cvbench", "report"]
    # LLaVA-1.5 has V-sinks: every grouping but its default (the sweep's gate) is trained; the paper's
    # joint ablation is over its greedy stack's layers (Table 2).
    assert "layer=10 gate.signal=mean_all " in lines["ablation-signal-mean_all"]
    assert "layer=10 gate.grouping=vsink-lsink-ordinary " in lines["ablation-grouping-vsink-lsink-ordinary"]
    assert "'layer=[3,6,7,10,19]' joint=true " in lines["ablation-joint"]
    assert all("lsg-train experiment=lsg_paper model=llava-1.5-7b" in lines[n] for n in lines if "ablation-" in n)
    assert "ablation/joint/stack.json" in lines["eval-cvbench"]
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
                                                            "benchmark.n=14"], "reference_as": "cvbench"}],
               ablations={"signals": ["last", "mean_all"], "groupings": ["vsink-rest"],  # tiny-random's default
                          "joint_layers": [1, 2]})  # (other groupings: the plan tests; kept short here)
    return exp


def correct_of(results: dict, spec: str) -> list[bool]:
    return [item[f"{spec}|correct"] >= 0.5 for item in results["items"]]


def points(base: list[bool], gated: list[bool]) -> float:
    """An accuracy delta by hand, in points."""
    return 100 * (sum(gated) - sum(base)) / len(base)


@pytest.mark.slow  # trains, in processes
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
    # Table S5: ablation deltas vs the baseline and vs the default gate (or the gates trained alone),
    # recomputed by hand from the stored answers; the default variant is the sweep's L2 gate.
    assert [s.name for s in stages if s.name.startswith("ablation")] == ["ablation-signal-mean_all", "ablation-joint"]
    ablations = json.loads((out / "ablations.json").read_text())
    assert [(r["axis"], r["variant"]) for r in ablations] == [
        ("signal", "last"), ("signal", "mean_all"), ("grouping", "vsink-rest"), ("joint", "separate"), ("joint", "joint")]
    base = correct_of(results, "none")
    default = lsg_row["method"]
    separate = "+".join(f"ckpt:{out}/sweep/lsg-L{l}/gate-epoch1.safetensors" for l in (1, 2))
    specs = [default, f"ckpt:{out}/ablation/signal-mean_all/lsg-L2.safetensors", default, separate,
             f"stack:{out}/ablation/joint/stack.json"]
    versus = [None, default, None, None, separate]
    for row, spec, other in zip(ablations, specs, versus):
        assert row["spec"] == spec
        assert row["delta"] == pytest.approx(points(base, correct_of(results, spec)))
        assert row["ci_low"] <= row["delta"] <= row["ci_high"]
        if other is None:
            assert "vs" not in row
        else:
            assert row["vs"]["delta"] == pytest.approx(points(correct_of(results, other), correct_of(results, spec)))
    assert [r["paper"] for r in ablations][:4] == [2.14, -0.07, 2.14, 3.08]
    assert "## Table S5: ablations" in md and "| shapes | signal | mean_all (L2) |" in md and "-0.07 (cvbench)" in md
    assert "L1+L2 trained together (joint)" in md and "vs trained alone" in md
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


@pytest.mark.slow  # starts a process
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


def test_the_smol_plan_trains_only_the_ablations_smol_llava_has_and_says_why(tmp_path):
    exp, out = load_experiment("smol_paper"), tmp_path / "out"
    stages = {s.name: s for s in plan(exp, out)}
    sweep = stages["sweep"].overrides
    head = sweep[:sweep.index("layer=[4,10,16]")]  # experiment, model, logger, data, training settings
    tail = lambda name: ["export_epoch=1", f"hydra.run.dir={out}/hydra/{name}"]  # noqa: E731
    expected = {
        f"ablation-signal-{s}": [*head, "layer=10", f"gate.signal={s}", f"run_dir={out}/ablation/signal-{s}/run",
                                 f"export_path={out}/ablation/signal-{s}/lsg-L10.safetensors",
                                 *tail(f"ablation-signal-{s}")] for s in ("mean_all", "mean_visual")}
    expected["ablation-joint"] = [*head, "layer=[4,10,16]", "joint=true", f"run_dir={out}/ablation/joint/run",
                                  f"stack_export_path={out}/ablation/joint/stack.json", *tail("ablation-joint")]
    assert {n: s.overrides for n, s in stages.items() if n.startswith("ablation")} == expected
    assert all(stages[n].app == "train" for n in expected)
    # No V-sinks: the V-sink groupings are rows that say why; lsink-rest is the sweep's own gate.
    variants = {(v.axis, v.value): v for v in ablation_variants(exp, out)}
    for grouping in ("vsink-rest", "vsink-lsink-ordinary"):
        assert variants["grouping", grouping].spec is None and "has no V-sinks" in variants["grouping", grouping].note
    l10 = f"ckpt:{out}/sweep/lsg-L10/gate-epoch1.safetensors"
    assert variants["grouping", "lsink-rest"].spec == variants["signal", "last"].spec == l10
    gates = next(o for o in stages["eval-shapes"].overrides if o.startswith("gates="))
    assert gates.count(l10 + ",") == 1, "the default gate is scored once"
    assert f"ckpt:{out}/sweep/lsg-L4/gate-epoch1.safetensors+{l10}+ckpt:{out}/sweep/lsg-L16/gate-epoch1.safetensors" in gates
    # skip: [ablation] drops the stages and their gates.
    exp["skip"] = ["ablation"]
    skipped = plan(exp, out)
    assert not any("ablation" in s.name or "ablation" in s.shell() for s in skipped)


def test_a_backbone_gets_the_groupings_whose_sinks_it_has(tmp_path):
    exp = tiny_experiment()
    exp["ablations"] = {"groupings": "auto"}
    trained = [s.name for s in plan(exp, tmp_path) if s.name.startswith("ablation")]
    assert trained == ["ablation-grouping-vsink-lsink-ordinary", "ablation-grouping-lsink-rest"]  # vsink-rest: default
    exp["model_overrides"] = ["model.sinks.tau_vit=null"]  # no V-sinks: lsink-rest is the default, nothing to train
    assert not [s for s in plan(exp, tmp_path) if s.name.startswith("ablation")]
    assert [v.value for v in ablation_variants(exp, tmp_path) if v.spec is None] == ["vsink-rest", "vsink-lsink-ordinary"]


@pytest.mark.parametrize("ablations, message", [
    ({"signals": ["last", "first"]}, r"signals: unknown \['first'\]; allowed: last, mean_all, mean_visual"),
    ({"groupings": ["lsink-ordinary"]}, r"groupings: unknown \['lsink-ordinary'\]; allowed: vsink-rest, "
                                        r"vsink-lsink-ordinary, lsink-rest"),
    ({"groupings": ["vsink-rest"]}, r"vsink-rest needs V-sinks, which model=smol-llava does not have.*lsink-rest"),
    ({"joint_layers": [10]}, r"joint_layers=\[10\]: joint training needs at least two"),
    ({"joint_layers": [10, 10]}, r"at least two distinct layers"),
    ({"joint_layers": [4, 12]}, r"joint_layers: \[12\] not among the swept layers"),
    ({"joint": True}, r"unknown keys \['joint'\]; allowed: signals, groupings, joint_layers"),
])
def test_a_bad_ablation_config_is_refused_naming_the_value(tmp_path, ablations, message):
    exp = load_experiment("smol_paper")
    exp["ablations"] = ablations
    with pytest.raises(ValueError, match=message):
        plan(exp, tmp_path)


def test_the_ablation_table_pairs_each_variant_on_the_stored_answers(tmp_path):
    """The report's Table S5 from a made-up eval result: every delta equals the one computed by hand
    from the per-question answers, and the rows not run say why."""
    import random

    exp, out = load_experiment("smol_paper"), tmp_path
    specs = ["none", *next(o for o in plan(exp, out)[-2].overrides if o.startswith("gates="))[7:-1].split(",")]
    rng = random.Random(0)
    subtasks = [rng.choice(["count", "depth"]) for _ in range(40)]
    correct = {spec: [rng.random() < 0.5 for _ in subtasks] for spec in specs}
    rows = [{"method": spec, "acc_pct": {"overall": 100 * sum(c) / len(c)},
             **({} if spec == "none" else {"paired": paired_by_subtask(correct["none"], c, subtasks)})}
            for spec, c in correct.items()]
    items = [{**{f"{spec}|correct": float(correct[spec][i]) for spec in specs}} for i in range(len(subtasks))]
    (out / "eval" / "shapes").mkdir(parents=True)
    (out / "eval" / "shapes" / "results.json").write_text(json.dumps({"rows": rows, "items": items}))
    md = write_report(exp, out, {})[0].read_text()
    table = json.loads((out / "ablations.json").read_text())
    l10 = f"ckpt:{out}/sweep/lsg-L10/gate-epoch1.safetensors"
    by = {(r["axis"], r["variant"]): r for r in table}
    for (axis, value), other in {("signal", "mean_all"): l10, ("signal", "mean_visual"): l10,
                                 ("joint", "joint"): by["joint", "separate"]["spec"]}.items():
        row = by[axis, value]
        assert row["delta"] == pytest.approx(points(correct["none"], correct[row["spec"]]))
        assert row["vs"]["delta"] == pytest.approx(points(correct[other], correct[row["spec"]]))
    assert by["signal", "last"]["delta"] == pytest.approx(points(correct["none"], correct[l10]))
    assert "Not run: grouping vsink-rest: not run: smol-llava has no V-sinks" in md
    assert "| shapes | grouping | vsink-rest | not run: smol-llava has no V-sinks" in md
    assert f"{by['signal', 'mean_visual']['vs']['delta']:+.1f} [" in md and "-0.15 (cvbench)" in md
    assert "above the 5-layer greedy stack (+3.08); no number in our copy (cvbench)" in md
