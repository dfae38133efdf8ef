"""The oracle grid: every cell equals a plain evaluation of its KeyScaleGate; best alphas and
stage 2's cells follow from the cells."""

from __future__ import annotations

import pytest

from lsg.benchmarks.base import DataSplit
from lsg.evaluation import evaluate
from lsg.gates import KeyScaleGate
from lsg.oracle import run_grid, stage2_specs, write_grid


def test_grid_cells_equal_plain_evaluations_and_best_is_the_argmax(tiny, tmp_path):
    split = DataSplit({"name": "shapes", "root": str(tmp_path / "shapes"), "n_val": 14}, "val")
    records = split.load()
    table = run_grid(tiny, split, [1, 3], [0.0, 0.5, 1.0], tmp_path / "out", batch_size=5, samples=200)
    base = evaluate(tiny, records).acc_pct["overall"]
    assert table["baseline"]["overall"] == pytest.approx(base)
    for c in table["cells"]:
        plain = evaluate(tiny, records, {c["layer"]: KeyScaleGate.oracle(c["alpha"], tiny.default_grouping)})
        assert c["acc"]["overall"] == pytest.approx(plain.acc_pct["overall"])
        assert c["stats"]["overall"]["delta"] == pytest.approx(plain.acc_pct["overall"] - base)
    for layer, best in table["best"].items():
        mine = [c for c in table["cells"] if c["layer"] == int(layer)]
        for task, b in best.items():
            assert b["delta"] == max(c["stats"][task]["delta"] for c in mine)
    specs = stage2_specs(table, offsets=[-0.1, 0.0])
    assert len(specs) == 2 * 4 and all(s.count("/") == 2 for s in specs)
    alpha = table["best"]["1"]["overall"]["alpha"]
    assert f"oracle@1:{alpha:g}/{1 - alpha:g}/{1 - alpha:g}" in specs
    again = run_grid(tiny, split, [1], [0.5], tmp_path / "out", 5, 200, extra_specs=specs[:1])
    assert again["extra"][0]["spec"] == specs[0]
    paths = write_grid(table, tmp_path / "out")
    assert all(p.stat().st_size > 100 for p in paths)
