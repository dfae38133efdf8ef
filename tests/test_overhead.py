"""The overhead benchmark (`lsg.timing`, `lsg-overhead`): interleaved rounds, warm-up excluded,
ratios paired by round with a t interval on the log ratio, checked against hand computations on
known durations; one run of the real app on the tiny backbone."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lsg.cli.overhead import (
    decode_seconds_per_token,
    prompt_batch,
    spec_layers,
    summarise,
    table,
    time_spec,
)
from lsg.timing import InterleavedTimings, paired_ratio, time_interleaved

T_975_DF4 = 2.7764451051977987  # Student t 97.5% quantile, 4 degrees of freedom (statistical tables)
SPECS = ["none", "var", "vaf@1", "oracle@1:0.3"]


def fake_measure(durations):
    """A `measure` that returns `durations[name][k]` on its k-th call for `name` and logs every call."""
    calls, seen = [], {}

    def measure(name):
        k = seen[name] = seen.get(name, -1) + 1
        calls.append(name)
        return {"s": durations[name][k]}

    return measure, calls


def test_every_round_times_every_spec_once_in_a_seeded_shuffled_order():
    durations = {n: [1.0] * 8 for n in SPECS}
    measure, calls = fake_measure(durations)
    timings = time_interleaved(measure, SPECS, repeats=6, warmup=2, seed=3)
    rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
    assert len(calls) == 8 * 4 and all(sorted(r) == sorted(SPECS) for r in rounds)
    assert timings.warmup_order + timings.order == rounds and len(timings.order) == 6
    assert len({tuple(r) for r in rounds}) > 1  # shuffled, not the given order every round
    again = time_interleaved(fake_measure(durations)[0], SPECS, repeats=6, warmup=2, seed=3)
    other = time_interleaved(fake_measure(durations)[0], SPECS, repeats=6, warmup=2, seed=4)
    assert again.order == timings.order and other.order != timings.order


def test_warmup_rounds_run_every_spec_but_are_not_in_the_timings():
    # Call k of each spec lasts (k + 1) s, plus 100 s on the two warm-up calls.
    durations = {n: [100.0 + k + 1 if k < 2 else k + 1.0 for k in range(5)] for n in SPECS}
    measure, calls = fake_measure(durations)
    timings = time_interleaved(measure, SPECS, repeats=3, warmup=2)
    assert all(calls[:8].count(n) == 2 for n in SPECS)
    assert {n: timings.series(n, "s") for n in SPECS} == {n: [3.0, 4.0, 5.0] for n in SPECS}


def test_ratio_is_the_geometric_mean_of_per_round_ratios_with_a_t_interval_on_the_log():
    base = [2.0, 1.0, 4.0, 2.0, 1.0]
    per_round = [1.1, 1.3, 1.2, 1.25, 1.15]
    got = paired_ratio(base, [b * r for b, r in zip(base, per_round)])
    logs = [math.log(r) for r in per_round]
    mean = sum(logs) / 5
    half = T_975_DF4 * math.sqrt(sum((x - mean) ** 2 for x in logs) / 4) / math.sqrt(5)
    assert got["ratio"] == pytest.approx((1.1 * 1.3 * 1.2 * 1.25 * 1.15) ** 0.2, rel=1e-12)
    assert got["ci_low"] == pytest.approx(math.exp(mean - half), rel=1e-9)
    assert got["ci_high"] == pytest.approx(math.exp(mean + half), rel=1e-9)
    assert got["n"] == 5 and got["contains_1"] is False
    # Around 1: the CI contains 1, and the ratio cannot be told from the baseline's cost.
    near = paired_ratio(base, [b * r for b, r in zip(base, [0.9, 1.2, 1.05, 0.95, 1.1])])
    assert near["ci_low"] < 1 < near["ci_high"] and near["contains_1"] is True


def test_pairing_by_round_cancels_drift_that_hits_the_whole_round():
    base = [1.0, 3.0, 2.0, 4.0]  # the machine's speed swings 4x between rounds
    got = paired_ratio(base, [1.5 * b for b in base])
    assert got["ratio"] == pytest.approx(1.5) and got["ci_low"] == pytest.approx(1.5)
    assert got["ci_high"] == pytest.approx(1.5) and got["contains_1"] is False
    assert paired_ratio(base, base) == {"ratio": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 4, "contains_1": True}
    one = paired_ratio([2.0], [3.0])
    assert one["ratio"] == pytest.approx(1.5) and one["ci_low"] is None and one["contains_1"] is None


@pytest.mark.parametrize("call, message", [
    (lambda: paired_ratio([1.0, 2.0], [1.0]), "same non-empty rounds: 2 vs 1"),
    (lambda: paired_ratio([1.0, 0.0], [1.0, 1.0]), "positive measurements"),
    (lambda: paired_ratio([1.0, 2.0], [1.0, 1.0], level=95), "level must lie in"),
    (lambda: time_interleaved(lambda n: {}, ["none"], repeats=0), "repeats must be >= 1"),
    (lambda: time_interleaved(lambda n: {}, ["none", "none"], repeats=1), "distinct names"),
    (lambda: decode_seconds_per_token([1.0]), "set new_tokens >= 2"),
])
def test_bad_input_names_the_value(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_summary_and_table_from_known_rounds():
    base_p, base_d = [0.10, 0.20, 0.10], [0.010, 0.020, 0.020]
    runs = {"none": [{"prefill_s": p, "decode_s": d} for p, d in zip(base_p, base_d)],
            "var": [{"prefill_s": 2 * p, "decode_s": d * r} for p, d, r in zip(base_p, base_d, [0.9, 1.1, 1.0])]}
    rows = summarise(InterleavedTimings([["var", "none"]] * 3, [], runs), 0.95)
    none, var = rows
    assert none["prefill"]["ratio"] == 1.0 and none["decode"]["ratio"] == 1.0
    assert none["prefill_ms"] == pytest.approx(100.0) and var["prefill_ms"] == pytest.approx(200.0)
    assert var["decode_ms_per_token"] == pytest.approx(20.0)  # median of 9, 22, 20 ms
    assert var["prefill"]["ratio"] == pytest.approx(2.0) and var["prefill"]["contains_1"] is False
    assert var["decode"]["ratio"] == pytest.approx(0.99 ** (1 / 3)) and var["decode"]["contains_1"] is True
    md = table(rows, 0.95).splitlines()
    assert md[0].startswith("| gate | prefill ms | prefill x [95% CI] |") and "peak" not in md[0]
    assert md[2] == "| none | 100.0 | 1.00 [1.00, 1.00] | 20.00 | 1.00 [1.00, 1.00] | baseline |"
    assert md[3].startswith("| var | 200.0 | 2.00 [2.00, 2.00] | 20.00 | 1.00 [") and md[3].endswith("| decode |")


def test_time_spec_times_one_prefill_forward_and_each_decode_step(tiny):
    """A clock that reads the number of decoder forwards run so far: the prefill takes exactly
    one forward, a decode step one forward per token (generate's own prefill left out)."""
    forwards = [0]
    handle = tiny.decoder_layers[0].register_forward_pre_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    try:
        batch = prompt_batch(tiny, 2)
        for spec in ("none", "vaf@0"):
            forwards[0] = 0
            got = time_spec(tiny, batch, spec_layers(spec, tiny), new_tokens=4, clock=lambda: float(forwards[0]))
            assert got == {"prefill_s": 1.0, "decode_s": 1.0} and forwards[0] == 1 + 4
    finally:
        handle.remove()
    assert spec_layers("lsg-fresh@1", tiny)[1][0].__class__.__name__ == "LSGGate"


@pytest.mark.slow
def test_overhead_app_interleaves_rounds_and_reports_ratios_to_none(tmp_path):
    """`python scripts/overhead.py model=tiny-random ...` as a user runs it: `none` added and its
    ratios exactly 1, every spec's ratio the geometric mean of its per-round ratios in the JSON,
    every round a permutation of the specs."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(root / "scripts" / "overhead.py"), "model=tiny-random", "batch=2",
                             "new_tokens=2", "repeats=2", "warmup=1", "specs=[var,vaf@1]", f"out_dir={out}",
                             f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {m[0]: m for m in re.findall(r"^\| (\S+) \| ([\d.]+) \| ([\d.]+) \[([\d.]+), ([\d.]+)\] \| ([\d.]+) \| "
                                         r"([\d.]+) \[([\d.]+), ([\d.]+)\] \| ([^|]+) \|$", result.stdout, re.MULTILINE)}
    assert set(lines) == {"none", "var", "vaf@1"}
    assert lines["none"][2:5] == ("1.00", "1.00", "1.00") and lines["none"][6:9] == ("1.00", "1.00", "1.00")
    assert lines["none"][9] == "baseline" and (out / "overhead.md").read_text() in result.stdout
    report = json.loads((out / "overhead.json").read_text())
    assert all(sorted(r) == ["none", "vaf@1", "var"] for r in report["order"]) and len(report["order"]) == 2
    runs, rows = report["runs"], {r["spec"]: r for r in report["rows"]}
    for spec in ("none", "var", "vaf@1"):
        for key, measure in (("prefill_s", "prefill"), ("decode_s", "decode")):
            per_round = [s[key] / b[key] for s, b in zip(runs[spec], runs["none"])]
            assert rows[spec][measure]["ratio"] == pytest.approx(math.sqrt(per_round[0] * per_round[1]), rel=1e-9)
        prefill = [r["prefill_s"] for r in runs[spec]]
        assert float(lines[spec][1]) == pytest.approx(1000 * (prefill[0] + prefill[1]) / 2, abs=0.051)  # median of 2
    assert rows["none"]["prefill"]["ratio"] == 1.0 and rows["none"]["decode"]["ratio"] == 1.0
