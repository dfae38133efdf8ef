"""Answer parsers of the benchmarks' official scoring scripts, rewritten from their rules.

Each function names the script whose rule it follows; the rules are kept as they are,
quirks included (e.g. POPE reads any answer without "no" / "not" as yes), so that scores
are comparable with published ones.
"""

from __future__ import annotations

import re
import string

LETTERS = string.ascii_uppercase


def extract_letter(response: str, n_options: int | None = None) -> str:
    """The option letter MMStar's official evaluator reads (MMStar `eval/vlmeval/evaluate/
    mmstar.py`, also lmms-eval's `mmstar/utils.py exact_match`): only the start of the answer
    counts, lower-cased, newlines as spaces: its first character, or the character after a
    leading "(", "option " or "the answer is ".

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


def cambrian_letter(response: str, options: tuple[str, ...]) -> str:
    """The option CV-Bench's authors' scorer reads (cambrian-mllm `eval/eval/omni/omni_test.py`,
    `ade` alike): lower-cased, the text after the last "answer is" / "answer is:" / "answer:",
    stripped of trailing ".:," and of enclosing "(" ")"; the option whose letter is its first
    character, or whose text it equals.

    Returns the upper-case letter, or "" if neither matches.
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
    """POPE's official reading (RUCAIBox/POPE `evaluate.py`): the first sentence (text before
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


def mathvista_extract(response: str, question_type: str, answer_type: str, choices: list[str] | None) -> str:
    """MathVista's answer extraction without its LLM step (lupantech/MathVista
    `evaluation/extract_answer.py`): the official rule-based steps, then rules in place of
    the GPT-4 extractor.

    Official steps: empty -> ""; a multiple-choice answer that is exactly a choice's text;
    an integer / float answer that parses as one; the quick regex `The answer is "(.*)"\\.`.
    In place of the LLM (this project's rules, documented in the README): for multiple
    choice, the option letter VLMEvalKit's `can_infer` finds (a single letter token among
    the options, else a single option text inside the answer), returned as "(X)" for the
    normaliser; for numbers and lists, the text after the last "answer is" / "answer:" if
    any, and for numbers the last number in it.
    """
    text = response.strip()
    if not text:
        return ""
    if question_type == "multi_choice" and choices and text in choices:
        return text
    if answer_type == "integer":
        try:
            return str(int(text))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(text))
        except ValueError:
            pass
    quick = re.search(r'The answer is "(.*)"\.', text)
    if quick:
        return quick.group(1)
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
    """VLMEvalKit's `can_infer` (`vlmeval/utils/matching_util.py`): with `. ( ) [ ] , : ; ! * # { }`
    as spaces, the only option letter among the answer's words; else the only option whose
    text (lower-cased) is in the answer (lower-cased); else ""."""
    letters = LETTERS[:len(choices)]
    words = answer.translate(str.maketrans({c: " " for c in ".()[],:;!*#{}"})).split()
    found = [c for c in letters if c in words]
    if len(found) == 1:
        return found[0]
    inside = [letters[k] for k, c in enumerate(choices) if c.lower() in answer.lower()]
    return inside[0] if len(inside) == 1 else ""


def mathvista_normalize(extraction: str, choices: list[str] | None, question_type: str, answer_type: str,
                        precision: float | None) -> str | None:
    """MathVista's `normalize_extracted_answer` (`evaluation/calculate_score.py`): multiple
    choice -> a choice's text (a "(X)" or a bare letter maps to its choice, anything else to the
    nearest choice by edit distance); integer -> `str(int(float(x)))`; float ->
    `str(round(float(x), int(precision)))`; list -> `str(x)`; None when a number does not parse."""
    if question_type == "multi_choice":
        text = str(extraction).strip()
        letter = re.search(r"\(([a-zA-Z])\)", text)
        if letter:
            text = letter.group(1).upper()
        letters = LETTERS[:len(choices or [])]
        if text in letters:
            return choices[letters.index(text)]
        return min(choices, key=lambda c: levenshtein(text, c)) if choices else text
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision or 0)))
    except (TypeError, ValueError):
        return None
    return str(extraction)
