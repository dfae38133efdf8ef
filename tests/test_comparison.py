"""compare.py machinery: spec parsing, caching, tables, chart."""

from __future__ import annotations

import json

import pytest

from lsg.comparison import compare, plot_deltas, split_context, write_table
from lsg.specs import parse_layers, parse_stack
from lsg.datamodule import load_records
from lsg.gates import LSGGate, VAFGate


def test_parse_layers():
    assert parse_layers("10", 30) == [10]
    assert parse_layers("3-5", 30) == [3, 4, 5]
    assert parse_layers("3,7,10", 30) == [3, 7, 10]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("29-31", 30)
    with pytest.raises(ValueError, match="Bad layer list"):
        parse_layers("a-b", 30)


def test_parse_stack_builds_mixed_stacks(tmp_path, tiny):
    ckpt = LSGGate(tiny.hidden_size, "vsink-lsink-ordinary").save(
        tmp_path / "g.safetensors", backbone="tiny-random", backbone_fingerprint=tiny.fingerprint, layer=2,
        sinks=tiny.sinks.to_dict())
    stack = parse_stack(f"lsg:{ckpt}+vaf@1+oracle@3:0.25", tiny)
    assert sorted(stack.layers) == [1, 2, 3]
    assert isinstance(stack.layers[2][0], LSGGate) and isinstance(stack.layers[1][0], VAFGate)
    assert stack.layers[3][0].coefficients.tolist() == [0.25, 0.75]  # the default grouping: vsink-rest
    three = parse_stack("oracle@3:0.25/0.75/0.75", tiny).layers[3][0]
    assert three.grouping == "vsink-lsink-ordinary" and three.coefficients.tolist() == [0.25, 0.75, 0.75]
    assert parse_stack("vaf", tiny).layers.keys() == set(VAFGate.default_layers(tiny.num_layers))
    with pytest.raises(ValueError, match="Unknown gate 'nope'"):
        parse_stack("nope", tiny)
    with pytest.raises(ValueError, match="needs a layer and alpha"):
        parse_stack("oracle", tiny)
    other = LSGGate(tiny.hidden_size).save(tmp_path / "o.safetensors", backbone="smol-llava", layer=2)
    with pytest.raises(ValueError, match="backbone='smol-llava'"):
        parse_stack(f"lsg:{other}", tiny)
    retrained = LSGGate(tiny.hidden_size).save(tmp_path / "r.safetensors", backbone="tiny-random",
                                               backbone_fingerprint="other-weights", layer=2)
    with pytest.raises(ValueError, match="backbone_fingerprint='other-weights'"):
        parse_stack(f"lsg:{retrained}", tiny)


def test_compare_caches_results_and_writes_table_and_chart(tmp_path, tiny, monkeypatch):
    data = {"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 0, "n_val": 14, "n_test": 0}
    records = load_records(data, "val")
    specs = ["none", "vaf@1", "oracle@2:0.0"]
    import lsg.comparison as comparison

    seconds = {None: 0.5, "vaf@1": 0.75, "oracle@2:0.0": 0.625}  # prefill seconds per batch, by stack
    timed = []

    def fake_time_forward(backbone, batches, stack, repeats=1):
        timed.append((None if stack is None else stack.spec, len(batches), repeats))
        return seconds[None if stack is None else stack.spec]

    monkeypatch.setattr(comparison, "time_forward", fake_time_forward)
    rows, tasks = compare(tiny, specs, records, data, "val", tmp_path / "out", batch_size=7,
                          timing_batches=1, timing_repeats=1)
    assert [r["method"] for r in rows] == ["baseline", "vaf@1", "oracle@2:0.0"]
    # Overhead = the stack's prefill time / the baseline's, both measured in this run.
    assert [r["overhead"] for r in rows] == [1.0, 1.5, 1.25]
    assert [r["prefill_ms_per_batch"] for r in rows] == [500.0, 750.0, 625.0]
    assert sorted(timed, key=str) == sorted([(None, 1, 1), ("vaf@1", 1, 1), ("oracle@2:0.0", 1, 1)], key=str)
    monkeypatch.undo()
    cached = sorted((tmp_path / "out" / "cache").glob("*.json"))
    assert len(cached) == 3
    # Recompute overall accuracy from the cached predictions, independently of the table.
    for path in cached:
        d = json.loads(path.read_text())
        predictions = [d["answers"][r.id]["prediction"] for r in records]  # the answer store's format
        hits = sum(p == r.answer_letter for p, r in zip(predictions, records))
        row = next(r for r in rows if r["method"] == ("baseline" if d["spec"] == "none" else d["spec"]))
        assert row["overall"] == pytest.approx(100 * hits / len(records))

    # A re-run evaluates nothing: make evaluation fail if it is called.
    monkeypatch.setattr(comparison, "evaluate_many", lambda *a, **k: pytest.fail("cache not used"))
    rows2, _ = compare(tiny, specs, records, data, "val", tmp_path / "out", batch_size=7,
                       timing_batches=1, timing_repeats=1)
    assert [r["overall"] for r in rows2] == [r["overall"] for r in rows]
    csv_path, md_path = write_table(rows, tasks, tmp_path / "out")
    assert md_path.read_text().count("\n") == len(rows) + 2
    assert plot_deltas(rows, tasks, tmp_path / "out" / "c.png").stat().st_size > 1000


def test_compare_never_serves_another_checkpoints_answers_under_the_same_name(tmp_path, tiny, monkeypatch):
    """Two checkpoints with one name (another seed = a fine-tune, a 13B...) get separate cache
    entries: the second's baseline is evaluated, and equals a direct evaluation."""
    import lsg
    from lsg.evaluation import evaluate
    from tests.hand import compare_twice

    other = lsg.load_backbone("tiny-random", seed=1)
    assert other.name == tiny.name and other.fingerprint != tiny.fingerprint
    rows, evaluated, records = compare_twice(tmp_path, tiny, other, monkeypatch)
    data = {"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 0, "n_val": 14, "n_test": 0}
    assert evaluated == 1, "the other checkpoint's baseline must be evaluated, not read from the cache"
    assert rows[0]["overall"] == pytest.approx(100 * evaluate(other, records, batch_size=7).overall)
    assert len(list((tmp_path / "out" / "cache").glob("*.json"))) == 2
    # Another split of the same size is another key too.
    from lsg.answers import answer_key

    stack = parse_stack("none", tiny)
    assert answer_key(stack.identity, split_context(tiny, records, data, "val")) != answer_key(
        stack.identity, split_context(tiny, records[::-1], data, "val"))


def test_compare_with_only_the_baseline_writes_the_table_without_a_chart(tmp_path, tiny):
    data = {"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 0, "n_val": 7, "n_test": 0}
    rows, tasks = compare(tiny, ["none"], load_records(data, "val"), data, "val", tmp_path / "out",
                          batch_size=7, timing_batches=1, timing_repeats=1)
    assert [r["method"] for r in rows] == ["baseline"]
    assert plot_deltas(rows, tasks, tmp_path / "out" / "c.png") is None
    assert not (tmp_path / "out" / "c.png").exists()


def test_a_trained_gate_is_not_moved_to_another_layer_unless_asked(tmp_path, tiny):
    ckpt = LSGGate(tiny.hidden_size, "vsink-lsink-ordinary").save(
        tmp_path / "g.safetensors", backbone="tiny-random", backbone_fingerprint=tiny.fingerprint, layer=2,
        sinks=tiny.sinks.to_dict())
    assert list(parse_stack(f"lsg@2:{ckpt}", tiny).layers) == [2]
    with pytest.raises(ValueError, match="trained at layer 2.*allow_layer_move=true"):
        parse_stack(f"lsg@3:{ckpt}", tiny)
    assert list(parse_stack(f"lsg@3:{ckpt}", tiny, allow_layer_move=True).layers) == [3]


def test_hub_fingerprint_comes_from_the_weights_not_the_id(tmp_path, tiny_hub_dir):
    """A local copy of a hub checkpoint has the hub checkpoint's fingerprint (so its gates are
    accepted); other weights saved under the same folder name do not."""
    import hashlib
    import shutil

    import lsg
    from lsg.backbones import weights_fingerprint
    from tests.conftest import save_tiny_hub_checkpoint

    copy = shutil.copytree(tiny_hub_dir, tmp_path / "copy")
    # The hub cache layout: snapshot files are links to blobs named by their sha256.
    snapshot, blobs = tmp_path / "hub" / "snapshots" / "abc", tmp_path / "hub" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in sorted(tiny_hub_dir.iterdir()):
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(blob)
    fine_tune = save_tiny_hub_checkpoint(tmp_path / "ft" / tiny_hub_dir.name, seed=1)
    prints = {name: weights_fingerprint(folder) for name, folder in
              (("hub", tiny_hub_dir), ("copy", copy), ("snapshot", snapshot), ("fine-tune", fine_tune))}
    assert prints["hub"] == prints["copy"] == prints["snapshot"] != prints["fine-tune"]

    hub = lsg.load_backbone("llava-1.5-7b", hf_id=str(tiny_hub_dir), dtype="float32")
    local = lsg.load_backbone("llava-1.5-7b", hf_id=str(copy), dtype="float32")
    assert hub.fingerprint == local.fingerprint == prints["hub"]
    path = LSGGate(hub.hidden_size).save(tmp_path / "g.safetensors", backbone=hub.name,
                                         backbone_fingerprint=hub.fingerprint, layer=1)
    LSGGate.load(path, backbone=local.name, backbone_fingerprint=local.fingerprint, layer=1)
    with pytest.raises(ValueError, match="backbone_fingerprint"):
        LSGGate.load(path, backbone=hub.name, backbone_fingerprint=prints["fine-tune"], layer=1)


def test_paired_delta_gives_the_exact_mcnemar_p_and_a_bootstrap_ci_around_the_delta():
    from lsg.evaluation import paired_delta

    # 100 questions: 1 lost, 4 won, the rest agree. McNemar exact: n = 5 discordant, k = 1,
    # p = 2 * (C(5,0) + C(5,1)) / 2**5 = 0.375.
    base = [True] * 60 + [False] * 40
    gated = list(base)
    gated[0] = False
    for i in (60, 61, 62, 63):
        gated[i] = True
    delta, low, high, p = paired_delta(base, gated, samples=4000)
    assert delta == pytest.approx(3.0) and p == pytest.approx(0.375)
    assert low < 0 < high and low <= delta <= high  # 3 net answers of 100 cannot be told from zero
    # Identical answers: no change, no uncertainty.
    assert paired_delta(base, base) == (0.0, 0.0, 0.0, 1.0)
    # A large consistent gain: 30 of 100 won, none lost; the CI excludes 0; p = 2 / 2**30.
    delta, low, high, p = paired_delta([False] * 30 + [True] * 70, [True] * 100)
    assert delta == pytest.approx(30.0) and 15 < low < 30 < high < 45 and p == pytest.approx(2 / 2 ** 30)
    with pytest.raises(ValueError, match="same non-empty questions"):
        paired_delta([True], [True, False])


def test_comparison_rows_carry_a_paired_ci_per_sub_task(tmp_path, tiny):
    from lsg.evaluation import comparison_rows, evaluate, paired_delta

    data = {"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 0, "n_val": 14, "n_test": 0}
    records = load_records(data, "val")
    base = evaluate(tiny, records, batch_size=7)
    gated = evaluate(tiny, records, {2: LSGGate(tiny.hidden_size, "vsink-lsink-ordinary", gain=1.0)}, batch_size=7)
    rows = comparison_rows(base, {"lsg": gated}, samples=500)
    assert "overall_ci_low" not in rows[0]
    for task in sorted(base.counts):
        mine = [i for i, r in enumerate(records) if r.subtask == task]
        want = paired_delta([base.correct[i] for i in mine], [gated.correct[i] for i in mine], 500)
        assert (rows[1][f"{task}_ci_low"], rows[1][f"{task}_ci_high"], rows[1][f"{task}_p"]) == want[1:]
    for row in rows:
        row["overhead"] = 1.0
    md = write_table(rows, sorted(base.counts), tmp_path / "out")[1].read_text()
    assert md.count("[") == len(base.counts) + 1  # every delta of the gated row has its CI


def test_bad_device_and_weightless_folder_get_clear_errors(tmp_path):
    import torch

    from lsg.backbones import resolve_device, weights_fingerprint

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="is not a device: use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU here: use device=auto or device=cpu"):
            resolve_device("cuda:1")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="No weight files"):
        weights_fingerprint(tmp_path)


def test_spec_errors_name_the_spec_the_user_wrote(tiny):
    with pytest.raises(ValueError, match=r"'oracle:0.3'.*e.g. oracle@10:0.3"):
        parse_stack("oracle:0.3", tiny)
    with pytest.raises(ValueError, match="give the trained gate's checkpoint, e.g. ckpt:"):
        parse_stack("ckpt@2", tiny)
