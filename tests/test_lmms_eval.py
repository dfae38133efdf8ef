"""lmms-eval as a client: `lmms-eval --model lsg` on the exported shapes split gives the scores
eval.py gives, with and without a gate, for generation and for multiple choice by
log-likelihood. Needs lmms-eval (scripts/lmms_eval_check.sh installs it); skipped otherwise."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts a process

pytest.importorskip("lmms_eval")

ROOT = Path(__file__).resolve().parents[1]
N_QUESTIONS = 14  # two per sub-task
GATES = ["none", "outro"]  # OutRo changes answers of this split (checked below)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory holding `data/shapes-hf`, where the shipped task YAMLs look."""
    from lsg.benchmarks.shapes import export_split

    work = tmp_path_factory.mktemp("lmms")
    export_split(work / "data" / "shapes-hf", "val", N_QUESTIONS, str(work / "shapes"))
    return work


def lmms_scores(work: Path, gates: str) -> dict[str, dict[str, list]]:
    """Run the real `lmms-eval` console script; per task mode, per question (doc order): 1.0 if
    right, and the answer (the chosen letter; the generated text)."""
    out = work / f"out-{gates}"
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "lsg",
           "--model_args", f"backbone=smol-llava,gates={gates},device=cpu", "--tasks", "lsg_shapes_mc,lsg_shapes_gen",
           "--include_path", str(ROOT / "lsg" / "lmms_tasks"), "--batch_size", "1", "--output_path", str(out),
           "--log_samples", "--verbosity", "DEBUG"]  # DEBUG: lmms-eval 0.7 exits 0 on errors otherwise
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=work, env=env)
    files = sorted(out.glob("**/*_results.json"))
    assert result.returncode == 0 and files, (result.stdout[-2000:], result.stderr[-4000:])
    results = json.loads(files[-1].read_text())["results"]
    answers = {}
    for mode, task, metric in (("choice", "lsg_shapes_mc", "acc"), ("generate", "lsg_shapes_gen", "accuracy")):
        samples = [json.loads(line) for f in out.glob(f"**/*_samples_{task}.jsonl") for line in f.read_text().splitlines()]
        samples.sort(key=lambda s: s["doc_id"])
        correct = [float(s[metric]) for s in samples]
        assert 100 * sum(correct) / len(correct) == pytest.approx(100 * results[task][f"{metric},none"])
        if mode == "choice":  # one (negative log-likelihood, greedy) per option letter: the lowest wins
            picked = [min(range(len(s["filtered_resps"])), key=lambda k: float(s["filtered_resps"][k][0]))
                      for s in samples]
            answers[mode] = {"correct": correct, "answer": [string.ascii_uppercase[k] for k in picked]}
        else:  # the generated text, cut at the task's "\n\n"
            answers[mode] = {"correct": correct, "answer": [s["filtered_resps"] for s in samples]}
    return answers


def evaluate_py_scores(work: Path, mode: str) -> dict[str, dict]:
    """`python eval.py benchmark=shapes` on the exported folder: per gate spec, per question
    1.0 if right and the parsed answer."""
    out = work / f"evaluate-{mode}"
    cmd = [sys.executable, str(ROOT / "eval.py"), "logger=none", f"benchmark.hf_id={work / 'data' / 'shapes-hf'}",
           f"benchmark.mode={mode}", f"out_dir={out}", "gates=[outro]", "batch_size=1", "bootstrap_samples=100"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    items = json.loads((out / "results.json").read_text())["items"]
    return {g: {"correct": [it[f"{g}|correct"] for it in items],
                "answer": [it[f"{g}|parsed"] if mode == "choice" else it[f"{g}|response"].split("\n\n")[0].strip()
                           for it in items]} for g in GATES}


def test_lmms_eval_reproduces_evaluate_py_with_and_without_a_gate(workdir):
    ours = {mode: evaluate_py_scores(workdir, mode) for mode in ("choice", "generate")}
    # The comparison can fail: the gate changes answers of this split.
    assert ours["choice"]["outro"]["answer"] != ours["choice"]["none"]["answer"]
    for gates in GATES:
        theirs = lmms_scores(workdir, gates)
        for mode in ("choice", "generate"):
            assert theirs[mode] == ours[mode][gates], (gates, mode)
