"""Gate stacks beside the baseline (eval.py on a data split): spec parsing, the answer store,
paired tables, overhead, chart."""

from __future__ import annotations

import json

import pytest

from lsg.benchmarks.base import DataSplit
from lsg.benchmarks.run import evaluate_benchmark
from lsg.comparison import markdown, paired_rows, plot_deltas
from lsg.specs import parse_layers, parse_stack
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


def shapes_split(tmp_path, n_val: int = 14) -> DataSplit:
    """The shapes val split of `n_val` questions under `tmp_path` as a benchmark."""
    return DataSplit({"name": "shapes", "root": str(tmp_path / "shapes"), "n_train": 0, "n_val": n_val, "n_test": 0})


def test_eval_caches_answers_measures_overhead_and_writes_table_and_chart(tmp_path, tiny, monkeypatch):
    split = shapes_split(tmp_path)
    records = split.load()
    specs = ["none", "vaf@1", "oracle@2:0.0"]
    import lsg.comparison as comparison
    import lsg.evaluation as evaluation

    seconds = {None: 0.5, "vaf@1": 0.75, "oracle@2:0.0": 0.625}  # prefill seconds per batch, by stack
    timed = []

    def fake_time_forward(backbone, batches, stack, repeats=1):
        timed.append((None if stack is None else stack.spec, len(batches), repeats))
        return seconds[None if stack is None else stack.spec]

    monkeypatch.setattr(comparison, "time_forward", fake_time_forward)
    report = evaluate_benchmark(tiny, split, specs, tmp_path / "out", batch_size=7, overhead=True, timing_batches=1,
                                timing_repeats=1)
    rows = report["rows"]
    assert [r["method"] for r in rows] == ["none", "vaf@1", "oracle@2:0.0"]
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
        row = next(r for r in rows if r["method"] == d["spec"])
        assert row["acc_pct"]["overall"] == pytest.approx(100 * hits / len(records))

    md = report["files"]["md"].read_text()
    assert "| vaf@1 | " in md and "| 750.0 | 1.50 |" in md  # the overhead table
    assert report["files"]["png"].stat().st_size > 1000

    # A re-run answers nothing: make answering fail if it is called.
    monkeypatch.setattr(evaluation, "choice_letters", lambda *a, **k: pytest.fail("cache not used"))
    again = evaluate_benchmark(tiny, split, specs, tmp_path / "out", batch_size=7)
    assert [r["acc_pct"] for r in again["rows"]] == [r["acc_pct"] for r in rows] and again["cached"] == specs


def test_eval_never_serves_another_checkpoints_answers_under_the_same_name(tmp_path, tiny, monkeypatch):
    """Two checkpoints with one name (another seed = a fine-tune, a 13B...) get separate cache
    entries: the second's baseline is evaluated, and equals a direct evaluation."""
    import lsg
    from lsg.answers import answer_context, answer_key
    from lsg.evaluation import answer_cache, evaluate
    from tests.hand import compare_twice

    other = lsg.load_backbone("tiny-random", seed=1)
    assert other.name == tiny.name and other.fingerprint != tiny.fingerprint
    rows, evaluated, records = compare_twice(tmp_path, tiny, other, monkeypatch)
    assert evaluated == 1, "the other checkpoint's baseline must be evaluated, not read from the cache"
    assert rows[0]["acc_pct"]["overall"] == pytest.approx(evaluate(other, records, batch_size=7).acc_pct["overall"])
    assert len(list((tmp_path / "out" / "cache").glob("*.json"))) == 2
    # A data split is keyed as it always was (data config and split), so earlier answers stay valid.
    split = shapes_split(tmp_path)
    assert answer_cache(tiny, split, records, None).context == answer_context(tiny, records, data=split.data,
                                                                               split="val")
    # Another split of the same size is another key too.
    stack = parse_stack("none", tiny)
    assert answer_key(stack.identity, answer_cache(tiny, split, records, None).context) != answer_key(
        stack.identity, answer_cache(tiny, split, records[::-1], None).context)


def test_eval_with_only_the_baseline_writes_the_table_without_a_chart(tmp_path, tiny):
    report = evaluate_benchmark(tiny, shapes_split(tmp_path, 7), ["none"], tmp_path / "out", batch_size=7)
    assert [r["method"] for r in report["rows"]] == ["none"]
    assert report["files"]["png"] is None and not (tmp_path / "out" / "deltas.png").exists()
    assert plot_deltas(report["rows"], tmp_path / "out" / "c.png") is None


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
    from lsg.stats import paired_delta

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


def test_paired_rows_carry_a_paired_ci_per_sub_task(tmp_path, tiny):
    from lsg.evaluation import evaluate
    from lsg.stats import paired_delta

    records = shapes_split(tmp_path).load()
    base = evaluate(tiny, records, batch_size=7)
    gated = evaluate(tiny, records, {2: LSGGate(tiny.hidden_size, "vsink-lsink-ordinary", gain=1.0)}, batch_size=7)
    rows = paired_rows({"none": base, "lsg": gated}, samples=500)
    assert "paired" not in rows[0]
    tasks = [t for t in base.counts if t != "overall"]
    for task in tasks:
        mine = [i for i, r in enumerate(records) if r.subtask == task]
        want = paired_delta([base.correct[i] for i in mine], [gated.correct[i] for i in mine], 500)
        p = rows[1]["paired"][task]
        assert (p["ci_low"], p["ci_high"], p["p"]) == want[1:]
    md = markdown(rows)
    cells = [line for line in md.splitlines() if line.startswith("| ") and "[" in line]
    assert len(cells) == len(tasks) + 1  # every delta of the gated row has its CI, overall included


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
