"""Benchmarks: each loader reads its hub layout, each scorer gives the scores computed by hand
(malformed answers included), and eval.py runs gate stacks with cached answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import lsg
from lsg.benchmarks import REGISTRY, get_benchmark
from lsg.benchmarks.parsing import extract_letter, mathvista_normalize
from lsg.answers import answer_context, answer_key
from lsg.benchmarks.run import evaluate_benchmark
from lsg.evaluation import answer_cache, answer_stacks
from lsg.specs import baseline_stack, parse_stack
from tests import benchmark_fixtures as fixtures
from tests.hand import run_app
from lsg.configs import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Every benchmark's fixture folder, by name."""
    base = tmp_path_factory.mktemp("hub")
    return {name: build(base / name) for name, build in fixtures.BUILDERS.items()}


def load(name: str, folder: Path, **cfg):
    conf = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "benchmark" / f"{name}.yaml"))
    conf.pop("name")
    return get_benchmark(name, **{**conf, "hf_id": str(folder), **cfg})


def approx(d: dict) -> dict:
    return {k: pytest.approx(v, abs=0.01) for k, v in d.items()}


def test_every_shipped_benchmark_config_builds_and_pins_a_revision():
    names = sorted(p.stem for p in (CONF_DIR / "benchmark").glob("*.yaml"))
    assert names == sorted(REGISTRY)
    for name in names:
        conf = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "benchmark" / f"{name}.yaml"))
        assert conf.pop("name") == name
        bench = get_benchmark(name, **conf)
        if name != "shapes":
            assert re.fullmatch(r"[0-9a-f]{40}", bench.revision), name
    with pytest.raises(ValueError, match="Known benchmarks: .*mmstar"):
        get_benchmark("mmstarr")
    with pytest.raises(ValueError, match="not multiple choice"):
        get_benchmark("pope", hf_id="x", mode="choice")


def test_every_benchmark_module_registers_its_benchmarks_by_being_in_the_folder():
    """Read from the folder (not the package's discovery): the `@register` classes of its modules
    are exactly the registry."""
    import ast

    import lsg.benchmarks

    defined = []
    for path in sorted(Path(lsg.benchmarks.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        defined += [node.name for node in tree.body if isinstance(node, ast.ClassDef)
                    and any(getattr(d, "id", None) == "register" for d in node.decorator_list)]
    assert sorted(cls.__name__ for cls in REGISTRY.values()) == sorted(defined)


def test_mmstar_reads_inline_options_and_the_letter_at_the_start(hub):
    items = load("mmstar", hub["mmstar"]).load()
    assert [it.answer_letter for it in items] == ["A", "B", "C", "D", "A", "B"]
    assert items[0].options == ("The red one", "The blue one", "The green one", "The one on the left, with a hat.")
    assert items[0].question.endswith("D: The one on the left, with a hat.\nAnswer with the option's letter from the "
                                    "given choices directly.")
    assert items[0].load_image().size == (24, 24)
    responses = ["A", "(b) The blue one", "Option C", "The answer is D.", "I think it is A", ""]
    score = load("mmstar", hub["mmstar"]).score(items, responses)
    assert score.parsed == ["A", "B", "C", "D", "I", ""]
    assert score.correct == [1, 1, 1, 1, 0, 0]
    assert score.metrics == approx({"accuracy": 400 / 6})
    assert score.acc_pct["math"] == 0 and score.acc_pct["logical reasoning"] == 100


def test_cvbench_combined_score_averages_2d_sources_then_2d_and_3d(hub):
    bench = load("cvbench", hub["cvbench"])
    items = bench.load()
    assert [it.answer_letter for it in items] == ["C", "A", "B", "A", "A", "B"]
    assert [it.subtask for it in items] == ["Count", "Count", "Relation", "Relation", "Depth", "Distance"]
    responses = ["The answer is (C).", "3", "A", "left", "", "sofa."]
    score = bench.score(items, responses)
    # Cambrian's per-source scorers read one character: "3", "l" and "s" are no letters of the
    # right options, and option texts never count for ADE20K / COCO (tests/test_official_scoring.py).
    assert score.correct == [1, 0, 0, 0, 0, 0]
    assert score.metrics == approx({"accuracy_ADE20K": 50, "accuracy_COCO": 0, "accuracy_Omni3D": 0,
                                    "accuracy_2d": 25, "accuracy_3d": 0, "combined": 12.5})
    assert len(load("cvbench", hub["cvbench"], config="3D").load()) == 2


def test_pope_reads_no_from_the_first_sentence_and_reports_its_five_metrics(hub):
    bench = load("pope", hub["pope"])
    items = bench.load()
    responses = ["Yes, there is a snowboard.", "No.", "There is no car. Yes.", "I cannot tell", "", "NO"]
    score = bench.score(items, responses)
    assert score.parsed == ["yes", "no", "no", "yes", "yes", "yes"]
    assert score.correct == [1, 1, 0, 0, 1, 0]
    m = score.metrics
    assert {k: m[f"adversarial/{k}"] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} == \
        approx({"accuracy": 50, "precision": 50, "recall": 50, "f1": 50, "yes_ratio": 50})
    assert {k: m[f"random/{k}"] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} == \
        approx({"accuracy": 50, "precision": 50, "recall": 100, "f1": 200 / 3, "yes_ratio": 100})
    assert {k: m[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} == \
        approx({"accuracy": 50, "precision": 50, "recall": 200 / 3, "f1": 400 / 7, "yes_ratio": 400 / 6})


def test_mme_scores_accuracy_plus_accuracy_plus_per_subtask_and_sums_perception_and_cognition(hub):
    bench = load("mme", hub["mme"])
    items = bench.load()
    responses = ["Yes", "No, there is not.", "yes.", "The answer is no", "Not sure", "no"]
    score = bench.score(items, responses)
    assert score.parsed == ["yes", "no", "yes", "other", "no", "no"]
    assert score.metrics == approx({"existence": 125, "code_reasoning": 50, "perception": 125, "cognition": 50,
                                    "accuracy": 400 / 6, "accuracy_plus": 100 / 3})


def test_ocrbench_counts_substring_hits_and_compares_handwritten_maths_without_spaces(hub):
    bench = load("ocrbench", hub["ocrbench"])
    items = bench.load()
    assert items[1].answer == ["ANTONIOS", "ANTONIO'S"]
    responses = ["The word is centre.", "antonio's", "12may", "x^{2} + 1", ""]
    score = bench.score(items, responses)
    assert score.correct == [1, 1, 0, 1, 0]
    assert score.metrics == approx({"Text Recognition": 2, "Scene Text-centric VQA": 0, "Doc-oriented VQA": 0,
                                    "Key Information Extraction": 0,
                                    "Handwritten Mathematical Expression Recognition": 1, "final_score": 3})
    # Case is kept for HME100k: "X" is not "x".
    assert bench.score(items[3:4], ["X^{2}+1"]).correct == [0]


def test_mathvista_extracts_by_rules_normalises_and_matches_strings(hub):
    bench = load("mathvista", hub["mathvista"])
    items = bench.load()
    assert items[0].question.startswith("Hint: Please answer") and items[0].options == ("97", "102", "107", "122")
    responses = ["C", "The answer is No", "1,000", "The answer is 1.23", "about half", "[1, 2, 3]"]
    score = bench.score(items, responses)
    assert score.parsed == ["107", "No", "1000", "1.2", "", "[1, 2, 3]"]
    assert score.correct == [1, 1, 1, 1, 0, 1]
    assert score.metrics == approx({"accuracy": 500 / 6, "accuracy_multi_choice": 100, "accuracy_free_form": 75})
    # The official normaliser: anything unreadable becomes the nearest choice by edit distance.
    assert mathvista_normalize("10", ["97", "102", "107"], "multi_choice", "text", None) == "102"


def test_a_data_split_is_a_benchmark_of_its_multiple_choice_questions_scored_by_letter(tmp_path):
    from lsg.benchmarks.base import DataSplit
    from lsg.datamodule import load_records

    data = {"name": "shapes", "root": str(tmp_path / "shapes"), "n_val": 14}
    split = DataSplit(data, "val", limit=4)
    items = split.load()
    assert [it.id for it in items] == [r.id for r in load_records(data, "val")[:4]]
    right = items[0].answer_letter
    wrong = next(l for l in "ABCD" if l != items[1].answer_letter)
    score = split.score(items, [right, f"({wrong.lower()}) no", "", items[3].answer_letter])
    assert score.parsed == [right, wrong, "", items[3].answer_letter] and score.correct == [1, 0, 0, 1]
    # Percent, per sub-task (sorted) then overall; counts have the same keys.
    assert score.metrics == {"accuracy": 50.0} and score.acc_pct["overall"] == 50.0
    assert list(score.acc_pct) == sorted({it.subtask for it in items}) + ["overall"] == list(score.counts)
    assert score.counts["overall"] == 4 and split.answer_source() == {"data": data, "split": "val"}


def test_letter_reading_follows_the_official_start_of_answer_rule():
    assert [extract_letter(r, 4) for r in ["B", "b) blue", "(C)", "option d", "the answer is a", "E", "", "  \n"]] == \
        ["B", "B", "C", "D", "A", "", "", ""]


def test_generation_answers_are_cached_by_weights_revision_and_gates(tiny, hub, tmp_path):
    bench = load("pope", hub["pope"], max_new_tokens=2)
    items = bench.load()
    stacks = [baseline_stack(), parse_stack("var", tiny)]
    first = answer_stacks(tiny, bench, stacks, items, tmp_path, batch_size=4, progress=None)
    assert not any(r.cached for r in first.values())
    assert len(first["none"].predictions) == len(items) == len(first["var"].predictions)
    # The baseline answers are the backbone's own greedy answers, scored by POPE's scorer.
    batch = tiny.build_batch([it.load_image() for it in items], [it.question for it in items], padding_side="left")
    assert first["none"].predictions == [t.strip() for t in tiny.generate(batch, 2)]
    assert first["none"].correct == bench.score(items, first["none"].predictions).correct
    again = answer_stacks(tiny, bench, stacks, items, tmp_path, batch_size=4, progress=None)
    assert all(r.cached for r in again.values())
    assert {s: r.predictions for s, r in again.items()} == {s: r.predictions for s, r in first.items()}
    # A benchmark is keyed as it always was (its identity and files), so earlier answers stay valid.
    assert answer_cache(tiny, bench, items, None).context == answer_context(
        tiny, items, benchmark=bench.identity(), data=bench.data_digest())
    other_revision = load("pope", hub["pope"], max_new_tokens=2, revision="0" * 40)
    other_weights = lsg.load_backbone("tiny-random", seed=1)
    answers_key = lambda ident, bb, bench, its: answer_key(ident, answer_cache(bb, bench, its, None).context)  # noqa: E731
    keys = {answers_key(stacks[1].identity, tiny, bench, items), answers_key(stacks[0].identity, tiny, bench, items),
            answers_key(stacks[1].identity, tiny, other_revision, items),
            answers_key(stacks[1].identity, other_weights, bench, items),
            answers_key(stacks[1].identity, tiny, bench, items[:3])}
    template = tiny.processor.chat_template
    try:  # another chat template (e.g. model.chat_template=hub) never reads these answers
        tiny.processor.chat_template = template.replace("<|im_start|>", "<|im_start|> ")
        keys.add(answers_key(stacks[1].identity, tiny, bench, items))
    finally:
        tiny.processor.chat_template = template
    assert len(keys) == 6
    with pytest.raises(ValueError, match="mode=choice needs options.*Use benchmark.mode=generate"):
        answer_stacks(tiny, load("mmstar", hub["mmstar"], mode="choice"), stacks[:1],
                      [*load("mmstar", hub["mmstar"]).load()[:1], items[0]], progress=None)


@pytest.mark.slow
def test_eval_py_runs_a_gate_stack_on_shapes_and_matches_plain_evaluation(tiny, tmp_path):
    out = tmp_path / "eval"
    args = ["model=tiny-random", "logger=none", "benchmark.n=14", f"benchmark.root={tmp_path / 'shapes'}",
            f"out_dir={out}", "gates=[var,oracle@1:0.3+var]", "batch_size=4", "bootstrap_samples=200",
            f"hydra.run.dir={tmp_path / 'h'}"]
    run_app("eval", *args, cwd=ROOT)
    report = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"none", "var", "oracle@1:0.3+var"}
    assert set(rows["var"]["paired"]["overall"]) >= {"delta", "ci_low", "ci_high", "p"}
    assert (out / "results.md").exists() and (out / "deltas.png").stat().st_size > 1000
    # Independent: the plain evaluation path (one full forward per stack) on the same records.
    from lsg.datamodule import load_records
    from lsg.evaluation import evaluate

    records = load_records({"name": "shapes", "root": str(tmp_path / "shapes"), "n_val": 14}, "val")
    for spec in ("none", "oracle@1:0.3+var"):
        stack = parse_stack(spec, tiny)
        plain = evaluate(tiny, records, stack.layers or None, batch_size=4)
        assert rows[spec]["acc_pct"]["overall"] == pytest.approx(plain.acc_pct["overall"])
        assert [item[f"{spec}|parsed"] for item in report["items"]] == plain.predictions
    again = run_app("eval", *args, cwd=ROOT)
    assert "3 stacks from the cache" in again.stdout


def test_evaluate_benchmark_generates_on_a_hub_fixture(tiny, hub, tmp_path):
    bench = load("mmstar", hub["mmstar"], max_new_tokens=2)
    report = evaluate_benchmark(tiny, bench, ["var"], tmp_path, batch_size=3, samples=100)
    assert [r["method"] for r in report["rows"]] == ["none", "var"]
    assert len(report["items"]) == 6 and (tmp_path / "results.md").exists()
    assert set(report["rows"][1]["paired"]) == {it.subtask for it in bench.load()} | {"overall"}


def test_an_exported_shapes_split_reads_back_as_the_same_items(tmp_path):
    import numpy as np

    from lsg.benchmarks.shapes import export_split

    folder = export_split(tmp_path / "hf", "val", 14, str(tmp_path / "shapes"))
    exported = get_benchmark("shapes", hf_id=str(folder), split="val").load()
    generated = get_benchmark("shapes", root=str(tmp_path / "shapes"), n=14, split="val").load()
    fields = lambda it: (it.id, it.question, it.options, it.answer_letter, it.subtask)  # noqa: E731
    assert [fields(it) for it in exported] == [fields(it) for it in generated]
    assert all(np.array_equal(np.asarray(a.load_image()), np.asarray(b.load_image()))
               for a, b in zip(exported, generated))
