"""CV-Bench and MathVista scorers against verdicts worked out by hand from the official code.

Each test names the official file and function whose rule gives the expected verdict:
- CV-Bench: cambrian-mllm/cambrian `eval/eval/coco/coco_test.py` and `eval/eval/omni/omni_test.py`
  (`extract_mcq_answer`, `compute_metrics`); ADE20K follows the COCO rule (docs/benchmarks.md).
- MathVista: lupantech/MathVista `evaluation/extract_answer.py` (`extract_answer`) and
  `evaluation/calculate_score.py` (`normalize_extracted_answer`, `get_most_similar`, `safe_equal`).
"""

from __future__ import annotations

import pytest

from lsg.benchmarks import parsing
from lsg.benchmarks.cvbench import CVBench
from lsg.benchmarks.mathvista import MathVista
from lsg.benchmarks.parsing import cvbench_lenient_letter, cvbench_official, mathvista_extract, mathvista_normalize

COUNT = ("3", "2", "1", "0")  # an ADE20K / COCO count question's options, in letter order


def official(response, source, options, letter):
    return cvbench_official(response, source, options, letter)[1]


# --- CV-Bench -------------------------------------------------------------------------------


def test_cvbench_ade_and_coco_take_letters_only_so_a_count_answer_is_wrong():
    # coco_test.py compute_metrics: right iff extract_mcq_answer(answer) == gt_answer.lower()[1];
    # "2" reads as "2", never "b", although "2" is option (B)'s text. ADE20K: the same rule.
    assert official("2", "COCO", COUNT, "B") is False
    assert official("2", "ADE20K", COUNT, "B") is False
    assert official("B", "COCO", COUNT, "B") is True
    # The lenient reader (not official) takes the exact option text.
    assert cvbench_lenient_letter("2", COUNT) == "B"


def test_cvbench_omni3d_also_accepts_the_correct_option_text_as_stored():
    # omni_test.py compute_metrics: right iff the reading equals the gt letter or
    # options[gt position] (case kept); the reading is one character, so "2" matches option "2"
    # while "sofa" reads "s" and matches neither "b" nor "sofa".
    assert official("2", "Omni3D", ("3", "2"), "B") is True
    assert official("sofa", "Omni3D", ("table", "sofa"), "B") is False
    assert official("sofa.", "Omni3D", ("table", "sofa"), "B") is False
    assert official("(B).", "Omni3D", ("table", "sofa"), "B") is True
    # omni_test.py extract_mcq_answer strips trailing ".:," (coco_test.py only "."): a lone ","
    # reads "" for Omni3D and "," for COCO; wrong either way.
    assert cvbench_official(",", "Omni3D", ("table", "sofa"), "B") == ("", False)
    assert cvbench_official(",", "COCO", ("left", "right"), "B") == (",", False)


def test_cvbench_answer_keywords_are_split_on_each_in_turn():
    # extract_mcq_answer (coco_test.py, omni_test.py): for "answer is", "answer is:", "answer:"
    # in turn, text = text.split(keyword)[-1]. "the answer is: d" -> ": d" after "answer is";
    # the others no longer occur; the first character is ":" -> wrong for every source.
    for source in ("ADE20K", "COCO", "Omni3D"):
        assert cvbench_official("The answer is: D", source, COUNT, "D") == (":", False)
    # "answer is" first, then "answer:" in what is left: "my answer is a; final answer: b" -> " b".
    assert cvbench_official("My answer is A; final answer: B", "COCO", COUNT, "B") == ("B", True)
    assert cvbench_official("Answer: C", "ADE20K", COUNT, "C") == ("C", True)
    # The lenient reader stops at the first marker found ("answer is:" before "answer is").
    assert cvbench_lenient_letter("The answer is: D", COUNT) == "D"
    assert cvbench_lenient_letter("My answer is A; final answer: B", COUNT) == "A"


def test_cvbench_reads_the_first_character_even_of_a_word():
    # extract_mcq_answer: `if len(text) > 1: text = text[0]`; "bed" reads "b" == gt "(B)"[1].
    assert official("bed", "COCO", ("bed", "sofa"), "B") is True
    assert official("bed", "Omni3D", ("bed", "sofa"), "B") is True
    assert official("bed", "ADE20K", ("bed", "sofa"), "A") is False
    # The lenient reader matches "bed" to option (A)'s text instead.
    assert cvbench_lenient_letter("bed", ("bed", "sofa")) == "A"


def test_cvbench_strips_every_leading_and_trailing_bracket():
    # extract_mcq_answer: .lstrip('(').rstrip(')') removes all of them: "((b))" -> "b".
    assert official("((B))", "COCO", COUNT, "B") is True
    assert official("((B))", "Omni3D", ("table", "sofa"), "B") is True
    # The lenient reader removes one pair only and reads nothing.
    assert cvbench_lenient_letter("((B))", COUNT) == ""


def cvbench_items(bench):
    rows = [("ADE20K", "Count", COUNT, "(B)"), ("COCO", "Relation", ("left", "right"), "(A)"),
            ("Omni3D", "Depth", ("lamp", "chair"), "(B)"), ("Omni3D", "Distance", ("3", "2"), "(B)")]
    return [bench.item({"idx": i, "type": "3D" if s == "Omni3D" else "2D", "task": task, "image": None,
                        "choices": list(options), "answer": answer, "prompt": f"Question {i}?", "source": s}, i)
            for i, (s, task, options, answer) in enumerate(rows)]


def test_cvbench_scores_by_the_official_per_source_rule_by_default_and_lenient_on_request():
    bench = CVBench(hf_id="unused")
    assert bench.parser == "official"
    items = cvbench_items(bench)
    responses = ["2", "left", "chair", "2"]
    # Official (coco_test.py / omni_test.py compute_metrics): "2" -> "2" != "b" (ADE20K);
    # "left" -> "l" != "a" (COCO); "chair" -> "c", neither "b" nor "chair" (Omni3D); "2" equals
    # option (B)'s stored text "2" (Omni3D). Card: 2D = mean(0, 0), 3D = 50, combined = 25.
    score = bench.score(items, responses)
    assert score.correct == [0, 0, 0, 1]
    assert score.parsed == ["2", "L", "C", "2"]
    assert score.metrics == pytest.approx({"accuracy_ADE20K": 0, "accuracy_COCO": 0, "accuracy_Omni3D": 50,
                                           "accuracy_2d": 0, "accuracy_3d": 50, "combined": 25})
    # Lenient (this project's reader): every exact option text counts.
    lenient = CVBench(hf_id="unused", parser="lenient").score(items, responses)
    assert lenient.correct == [1, 1, 1, 1] and lenient.metrics["combined"] == pytest.approx(100)
    with pytest.raises(ValueError, match="benchmark.parser='strict'"):
        CVBench(hf_id="unused", parser="strict")


# --- MathVista ------------------------------------------------------------------------------


@pytest.fixture
def no_gpt(monkeypatch):
    """The GPT-4 stand-in replaced by a marker, to see which official step answered."""
    monkeypatch.setattr(parsing, "mathvista_gpt4_stand_in", lambda *args: "<gpt step>")


def test_mathvista_empty_extraction_becomes_the_shortest_choice():
    # calculate_score.py normalize_extracted_answer: "" is not among ["A", "B"], so
    # get_most_similar("", choices): distances 3 ("Yes"), 2 ("No") -> "No".
    assert mathvista_normalize("", ["Yes", "No"], "multi_choice", "text", None) == "No"
    # extract_answer.py extract_answer: an empty response extracts "" (no GPT call).
    assert mathvista_extract("", "multi_choice", "text", ["Yes", "No"]) == ""


def test_mathvista_multi_letter_extraction_becomes_the_nearest_choice():
    # normalize_extracted_answer: "BC" is not one of ["A", "B", "C"] -> get_most_similar:
    # distances 1 ("BCE"), 2 ("4"), 2 ("5") -> "BCE" (not option B's "4").
    assert mathvista_normalize("BC", ["BCE", "4", "5"], "multi_choice", "text", None) == "BCE"
    # A tie keeps the first choice (distances.index(min(distances))): 2, 2, 2, 2 -> "3".
    assert mathvista_normalize("BC", ["3", "4", "5", "6"], "multi_choice", "text", None) == "3"
    # "(b)" and a bare "C" are letters: choices[1] / choices[2].
    assert mathvista_normalize(" (b) 4", ["BCE", "4", "5"], "multi_choice", "text", None) == "4"
    assert mathvista_normalize("C", ["BCE", "4", "5"], "multi_choice", "text", None) == "5"


def test_mathvista_exact_choice_step_tests_the_answer_unstripped(no_gpt):
    # extract_answer.py extract_answer: `response in choices` on the response as generated;
    # " No" is not a choice, so it goes to the GPT-4 step.
    assert mathvista_extract("No", "multi_choice", "text", ["Yes", "No"]) == "No"
    assert mathvista_extract(" No", "multi_choice", "text", ["Yes", "No"]) == "<gpt step>"
    # int(" 12") parses (Python strips whitespace itself): "12", no GPT call.
    assert mathvista_extract(" 12", "free_form", "integer", None) == "12"
    assert mathvista_extract("2.50", "free_form", "float", None) == "2.5"


def test_mathvista_quick_extract_regex_runs_only_when_asked(no_gpt):
    # extract_answer.py extract_answer: the `The answer is "(.*)"\.` rule is under
    # `if quick_extract:` (the --quick_extract flag, off by default).
    response = 'The answer is "42".'
    assert mathvista_extract(response, "free_form", "integer", None) == "<gpt step>"
    assert mathvista_extract(response, "free_form", "integer", None, quick_extract=True) == "42"
    assert MathVista(hf_id="unused").quick_extract is False
    assert MathVista(hf_id="unused", quick_extract=True).quick_extract is True


def test_mathvista_float_without_precision_is_no_prediction():
    # normalize_extracted_answer: str(round(float(x), int(precision))); int(None) raises
    # TypeError -> except -> None (no prediction, never equal to the answer).
    assert mathvista_normalize("1.5", None, "free_form", "float", None) is None
    assert mathvista_normalize("1.25", None, "free_form", "float", 1.0) == "1.2"


def test_mathvista_integer_too_large_for_float_is_no_prediction():
    # extract_answer.py: int("9" * 400) parses, so the extraction is that string; then
    # normalize_extracted_answer: float() of it is inf, int(inf) raises OverflowError -> None.
    huge = "9" * 400
    assert mathvista_extract(huge, "free_form", "integer", None) == huge
    assert mathvista_normalize(huge, None, "free_form", "integer", None) is None
    assert mathvista_normalize("1e400", None, "free_form", "integer", None) is None
    assert mathvista_normalize("7.9", None, "free_form", "integer", None) == "7"


def test_mathvista_score_applies_the_official_steps_end_to_end():
    bench = MathVista(hf_id="unused")
    rows = [("multi_choice", "text", ["Yes", "No"], None, "No"), ("free_form", "float", None, None, "1.5"),
            ("free_form", "integer", None, None, "9" * 400), ("multi_choice", "text", ["BCE", "4", "5"], None, "BCE")]
    items = [bench.item({"pid": str(i), "query": "Q", "choices": c, "precision": p, "answer": a, "question_type": q,
                         "answer_type": t, "metadata": {"task": "t"}, "decoded_image": None}, i)
             for i, (q, t, c, p, a) in enumerate(rows)]
    # "" -> "" -> shortest choice "No" (right); "1.5" -> "1.5" -> no precision -> None (wrong);
    # the huge integer -> None (wrong); "BC" -> stand-in finds B and C, no single letter, and no
    # single choice text inside -> "BC" -> nearest choice "BCE" (right).
    score = bench.score(items, ["", "1.5", "9" * 400, "BC"])
    assert score.parsed == ["No", "", "", "BCE"]
    assert score.correct == [1, 0, 0, 1]
