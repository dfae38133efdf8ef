"""Answer parsers of the benchmarks' official scoring scripts, rewritten from their rules.

Each function names the script and function whose rule it follows; the rules are kept as they
are, quirks included (e.g. POPE reads any answer without "no" / "not" as yes), so that scores
are comparable with published ones. The few functions that are this project's own and not an
official rule say so (`cvbench_lenient_letter`, `mathvista_gpt4_stand_in`, `can_infer`); every
remaining difference is listed in docs/benchmarks.md.
"""

from __future__ import annotations

import re
import string

LETTERS = string.ascii_uppercase


def extract_letter(response: str, n_options: int | None = None) -> str:
    """The option letter MMStar's official evaluator reads (MMStar `eval/vlmeval/evaluate/
    mmstar.py`): only the start of the answer counts, lower-cased, newlines as spaces: its first
    character, or the character after a leading "(", "option " or "the answer is ". Only older
    lmms-eval releases apply the same rule (`lmms_eval/tasks/mmstar/utils.py`, `exact_match`);
    later ones changed that function (more answer forms accepted), so they can differ.

    Returns the upper-case letter, or "" when none of the four readings gives a letter
    among the first `n_options` (any letter when None).
    """
    text = response.lower().replace("\n", " ").strip()
    for prefix in ("(", "option ", "the answer is "):
        if text.startswith(prefix) and len(text) > len(prefix) and _is_option(text[len(prefix)], n_options):
            return text[len(prefix)].upper()
    return text[0].upper() if text and _is_option(text[0], n_options) else ""


def _is_option(char: str, n_options: int | None) -> bool:
    return char.isascii() and char.isalpha() and (n_options is None or ord(char.upper()) - 65 < n_options)


CAMBRIAN_ANSWER_KEYWORDS = ("answer is", "answer is:", "answer:")
CVBENCH_PARSERS = ("official", "lenient")


def cambrian_reading(response: str, trailing: str = ".") -> str:
    """The one character Cambrian's CV-Bench scorers read from an answer (cambrian-mllm/cambrian
    `eval/eval/coco/coco_test.py` and `eval/eval/omni/omni_test.py`, function `extract_mcq_answer`).

    Lower-cased and stripped; then, for each keyword "answer is", "answer is:", "answer:" in that
    order, when the keyword occurs the text becomes what follows its last occurrence (so "The
    answer is: D" leaves ": d"); stripped again, every trailing character in `trailing` removed
    (COCO and ADE20K: "."; Omni3D: ".:,"), every leading "(" and every trailing ")" removed (so
    "((B))" leaves "b"); finally only the first character is kept.

    Returns:
        A lower-case character ("" for an empty answer); it may be no letter at all (":", "2").
    """
    text = response.lower().strip()
    for keyword in CAMBRIAN_ANSWER_KEYWORDS:
        if keyword in text:
            text = text.rsplit(keyword, 1)[1]
    text = text.strip().rstrip(trailing).lstrip("(").rstrip(")")
    return text[:1]


def cvbench_official(response: str, source: str, options: tuple[str, ...], letter: str) -> tuple[str, bool]:
    """CV-Bench's per-source verdict by Cambrian's scorers (cambrian-mllm/cambrian, `compute_metrics`
    of `eval/eval/coco/coco_test.py` for COCO, of `eval/eval/ade/ade_test.py` for ADE20K, of
    `eval/eval/omni/omni_test.py` for Omni3D).

    ADE20K and COCO: right only when the reading (`cambrian_reading`, trailing ".") is the correct
    option's letter; option texts never count (a count answer "2" is wrong even when "2" is the
    correct option's text). Omni3D: the reading with trailing ".:," is right when it is the
    letter or when it equals the correct option's text as stored (case kept), which only a
    one-character option can.

    The ADE20K script was not available to check; its rule is taken to be COCO's (the COCO
    script is a copy of it: it still writes `ade_<model>.csv`). See docs/benchmarks.md.

    Args:
        response: the model's answer.
        source: the row's `source`: "ADE20K", "COCO" or "Omni3D".
        options: the option texts, in letter order.
        letter: the correct option's letter ("C" for the stored answer "(C)"; the scripts read
            the answer's second character, the same letter for answers of the form "(X)").

    Returns:
        (what was read, upper-cased; whether it is right).

    Raises:
        ValueError: an unknown source.
    """
    gt = letter.lower()
    if source in ("ADE20K", "COCO"):
        reading = cambrian_reading(response, ".")
        right = reading == gt
    elif source == "Omni3D":
        reading = cambrian_reading(response, ".:,")
        k = ord(gt) - ord("a")
        right = reading == gt or (0 <= k < len(options) and reading == options[k])
    else:
        raise ValueError(f"CV-Bench source {source!r} has no official scorer: expected ADE20K, COCO or Omni3D.")
    return reading.upper(), right


def cvbench_lenient_letter(response: str, options: tuple[str, ...]) -> str:
    """A lenient CV-Bench letter reader (this project's own, not an official rule; the
    `parser: lenient` option of `cvbench`): lower-cased, the text after the last "answer is:" /
    "answer is" / "answer:" (the first of these found), stripped of trailing ".:," and of one
    enclosing "(" ")"; then the option whose text it equals, else the option whose letter is
    its first character.

    Returns:
        The upper-case letter, or "" if neither matches.
    """
    text = response.lower()
    for marker in ("answer is:", "answer is", "answer:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            break
    text = text.strip().rstrip(".:,").strip()
    text = text[1:] if text.startswith("(") else text
    text = text[:-1] if text.endswith(")") else text
    for k, option in enumerate(options):
        if text == option.lower().strip():
            return LETTERS[k]
    if text and ord(text[0]) - ord("a") in range(len(options)):
        return text[0].upper()
    return ""


def pope_yes_no(response: str) -> str:
    """POPE's official reading (AoiDragon/POPE `evaluate.py`): the first sentence (text before
    the first "."), commas removed, split on spaces; "no" if a word is exactly "No", "not" or
    "no", else "yes" (an empty or unrelated answer counts as yes)."""
    first = response.split(".")[0] if "." in response else response
    words = first.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def mme_yes_no(response: str) -> str:
    """MME's official reading (eval_tool `calculation.py parse_pred_ans`): lower-cased; exactly
    "yes" / "no", else "yes" or "no" within the first four characters (yes first), else
    "other" (always wrong)."""
    text = response.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def ocrbench_hit(response: str, answers: list[str], dataset: str) -> bool:
    """OCRBench's official rule (Yuliang-Liu/MultimodalOCR `OCRBench/example.py`): a hit if
    any reference answer is a substring of the response; for `HME100k` (handwritten maths)
    after removing every space and newline, case kept; otherwise lower-cased, stripped,
    newlines as spaces."""
    for gt in answers:
        if dataset == "HME100k":
            norm = lambda s: s.strip().replace("\n", " ").replace(" ", "")  # noqa: E731
        else:
            norm = lambda s: s.lower().strip().replace("\n", " ")  # noqa: E731
        if norm(gt) in norm(response):
            return True
    return False


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
QUICK_ANSWER = re.compile(r'The answer is "(.*)"\.')


def mathvista_extract(response: str, question_type: str, answer_type: str, choices: list[str] | None,
                      quick_extract: bool = False) -> str:
    """MathVista's answer extraction (lupantech/MathVista `evaluation/extract_answer.py`,
    `extract_answer`) with its GPT-4 step replaced by `mathvista_gpt4_stand_in`.

    The official rule steps, in order, on the answer as generated (not stripped):
    an empty answer -> ""; a multiple-choice answer equal to one of the choices -> itself; an
    integer question whose answer `int()` parses -> `str(int(answer))`; a float question whose
    answer `float()` parses -> `str(float(answer))`; with `quick_extract` only (the script's
    `--quick_extract` flag, off by default) the "x" of `The answer is "x".` (`QUICK_ANSWER`).
    Every other answer goes to GPT-4 in the official pipeline and to `mathvista_gpt4_stand_in`
    here.
    """
    if response == "":
        return ""
    if question_type == "multi_choice" and choices and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except (TypeError, ValueError):
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except (TypeError, ValueError):
            pass
    if quick_extract:
        quick = QUICK_ANSWER.search(response)
        if quick:
            return quick.group(1)
    return mathvista_gpt4_stand_in(response, question_type, answer_type, choices)


def mathvista_gpt4_stand_in(response: str, question_type: str, answer_type: str, choices: list[str] | None) -> str:
    """The rule-based stand-in for MathVista's GPT-4 extraction step: this project's rules, not
    MathVista's (the official step prompts GPT-4 with few-shot examples; `extract_answer.py`,
    `extract_answer`, "general extraction"). No LLM is called.

    On the stripped answer: for multiple choice, the option letter `can_infer` finds, returned
    as "(X)" for the normaliser, else the answer itself (the normaliser then takes the nearest
    choice); for integer / float questions, the last number (thousands commas dropped) in the
    text after the last "answer is:" / "answer is" / "answer:" if any, else in the whole answer,
    or "" when there is none; otherwise (lists, text) that text.
    """
    text = response.strip()
    if question_type == "multi_choice" and choices:
        letter = can_infer(text, choices)
        return f"({letter})" if letter else text
    lowered = text.lower()
    for marker in ("answer is:", "answer is", "answer:"):
        if marker in lowered:
            text = text[lowered.rfind(marker) + len(marker):].strip()
            break
    if answer_type in ("integer", "float"):
        numbers = NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else ""
    return text


def can_infer(answer: str, choices: list[str]) -> str:
    """Part of the GPT-4 stand-in, modelled on VLMEvalKit's `can_infer`
    (`vlmeval/utils/matching_util.py`): with `. ( ) [ ] , : ; ! * # { }` as spaces, the only
    option letter among the answer's words; else the only option whose text (lower-cased) is in
    the answer (lower-cased); else ""."""
    letters = LETTERS[:len(choices)]
    words = answer.translate(str.maketrans({c: " " for c in ".()[],:;!*#{}"})).split()
    found = [c for c in letters if c in words]
    if len(found) == 1:
        return found[0]
    inside = [letters[k] for k, c in enumerate(choices) if c.lower() in answer.lower()]
    return inside[0] if len(inside) == 1 else ""


def nearest_choice(text: str, choices: list[str]) -> str:
    """The choice with the smallest edit distance to `text`, the first one on a tie (MathVista
    `evaluation/calculate_score.py`, `get_most_similar`). For "" that is the shortest choice."""
    distances = [levenshtein(text, c) for c in choices]
    return choices[distances.index(min(distances))]


def mathvista_normalize(extraction: str, choices: list[str] | None, question_type: str, answer_type: str,
                        precision: float | None) -> str | None:
    """MathVista's `normalize_extracted_answer` (lupantech/MathVista `evaluation/calculate_score.py`,
    with `ignore_empty_extractions` off, its default).

    Multiple choice: the extraction stripped; the letter of its first "(x)" if it has one,
    upper-cased; a letter among A, B, ... (one per choice) maps to its choice, anything else --
    "", "BC", a number -- to the nearest choice by edit distance (`nearest_choice`).
    Integer: `str(int(float(x)))`. Float: `str(round(float(x), int(precision)))`. List:
    `str(x)`. None (no prediction, always wrong) when a conversion fails: an unparsable
    number, a float question without a precision, a number too large for `int` (inf).

    Any other answer type (a free-form "text" question) keeps `str(x)`, as older versions of
    the script do; the current one leaves the result unassigned there (docs/benchmarks.md).
    """
    if question_type == "multi_choice":
        text = extraction.strip() if isinstance(extraction, str) else str(extraction)
        if not choices:
            return text
        letter = re.search(r"\(([a-zA-Z])\)", text)
        if letter:
            text = letter.group(1).upper()
        letters = [chr(ord("A") + k) for k in range(len(choices))]
        if text in letters:
            return choices[letters.index(text)]
        return nearest_choice(text, choices)
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))
    except (TypeError, ValueError, OverflowError):
        return None
    return str(extraction)
