"""Sweep summary: Table 1, Figure 7 and Figure 8 from per-layer validation answers, checked by hand."""

from __future__ import annotations

import json

import pytest

from lsg.summary import markdown, plot_heatmap, plot_ratios, ratio_curves, read_sweep, summarize
from tests.hand import run_app


def write_layer(root, layer, epoch, rows, steps, gate="lsg"):
    folder = root / f"{gate}-L{layer}"
    folder.mkdir(parents=True, exist_ok=True)
    answers = {f"q{i}": {"subtask": t, "question": f"question {i}", "gold": "A", "prediction": p, "correct": p == "A",
                         "baseline": b, "ratios": [r, 1 - r]}
               for i, (t, p, b, r) in enumerate(rows)}
    (folder / f"val-epoch{epoch}.json").write_text(json.dumps({"epoch": epoch, "steps": steps, "layer": layer,
                                                               "groups": ["lsink", "rest"], "answers": answers}))


def test_table1_picks_the_best_layer_per_block_and_counts_subtasks(tmp_path):
    # layer 1: count +50 (1 of 2 fixed), color 0; layer 2: count -50, color +50; layer 5: color -50
    write_layer(tmp_path, 1, 1, [("count", "A", "B", .2), ("count", "B", "B", .4), ("color", "A", "A", .6),
                                 ("color", "B", "B", .6)], 3)
    write_layer(tmp_path, 2, 1, [("count", "B", "A", .5), ("count", "B", "B", .5), ("color", "A", "B", .5),
                                 ("color", "A", "B", .5), ("color", "A", "B", .5)], 3)
    write_layer(tmp_path, 5, 1, [("count", "A", "A", .5), ("count", "B", "B", .5), ("color", "B", "A", .5),
                                 ("color", "B", "B", .5)], 3)
    write_layer(tmp_path, 1, 2, [("count", "A", "B", .1), ("count", "A", "B", .3), ("color", "A", "A", .9),
                                 ("color", "B", "B", .7)], 6)
    (tmp_path / "not-a-layer").mkdir()
    sweep = read_sweep(tmp_path)
    assert sorted(sweep) == [1, 2, 5] and sorted(sweep[1]) == [1, 2]
    s = summarize(sweep, epoch=1, block=4, samples=200)
    assert s["layers"][1]["count"]["delta"] == pytest.approx(50.0)
    assert s["layers"][1]["overall"]["delta"] == pytest.approx(25.0)  # +1 of 4 questions
    assert s["layers"][2]["overall"]["delta"] == pytest.approx(40.0)  # -1 + 3 of 5 questions
    assert s["layers"][5]["overall"]["delta"] == pytest.approx(-25.0)
    (b0, b1) = s["table1"]
    assert (b0["block"], b0["layer"], b0["improved"], b0["hurt"]) == ("0-3", 2, 1, 1)
    assert (b1["block"], b1["layer"], b1["improved"], b1["hurt"]) == ("4-7", 5, 0, 1)
    oracle = {"best": {"2": {"overall": {"alpha": 0.3, "delta": 4.0, "ci_low": 1.0, "ci_high": 7.0, "p": 0.01,
                                         "significant": True}}}}
    md = markdown(summarize(sweep, 1, 4, oracle, 200), 4)
    assert "a=0.3: +4.0 [+1.0, +7.0]*" in md and "not run" in md
    last = summarize(sweep, None, 4, samples=200)
    assert last["layers"][1]["overall"]["delta"] == pytest.approx(50.0)  # epoch 2 of layer 1
    curves = ratio_curves(sweep, 1)
    assert curves["count"] == [(0, 0.5), (3, pytest.approx(0.3)), (6, pytest.approx(0.2))]
    assert plot_heatmap(s, tmp_path / "h.png").stat().st_size > 1000
    assert plot_ratios(sweep, [1, 2], tmp_path / "r.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="lsg-L<layer>"):
        read_sweep(tmp_path / "not-a-layer")


def test_a_sweep_folder_is_read_per_gate(tmp_path):
    """A LoRA sweep beside an LSG sweep is never read back as LSG (folders are named by gate)."""
    write_layer(tmp_path, 1, 1, [("count", "A", "B", .2)], 3)
    write_layer(tmp_path, 4, 1, [("count", "B", "B", .2)], 3, gate="lora")
    assert sorted(read_sweep(tmp_path)) == [1] and sorted(read_sweep(tmp_path, "lora")) == [4]
    with pytest.raises(FileNotFoundError, match="It holds runs of lora, lsg: set gate="):
        read_sweep(tmp_path, "var")


@pytest.mark.slow
def test_summarize_is_a_hydra_app_writing_table1_and_figures(tmp_path):
    """`lsg-summarize sweep_dir=...` (a Hydra app like the other commands) writes Table 1,
    the heatmap and summary.json whose per-layer deltas equal `summarize` called directly."""
    write_layer(tmp_path, 1, 1, [("count", "A", "B", .2), ("color", "A", "A", .6)], 3)
    write_layer(tmp_path, 2, 1, [("count", "B", "A", .5), ("color", "A", "A", .5)], 3)
    run_app("summarize", f"sweep_dir={tmp_path}", "logger=none", "bootstrap_samples=200",
            f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path, timeout=300)
    out = tmp_path / "summary"
    assert (out / "table1.md").exists() and (out / "heatmap.png").stat().st_size > 1000
    written = json.loads((out / "summary.json").read_text())
    direct = summarize(read_sweep(tmp_path), 1, 4, samples=200)
    assert [written["layers"][str(l)]["overall"]["delta"] for l in (1, 2)] == \
        [direct["layers"][l]["overall"]["delta"] for l in (1, 2)] == [50.0, -50.0]
