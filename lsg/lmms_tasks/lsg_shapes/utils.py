"""Helpers of the lsg_shapes lmms-eval tasks (loaded by file path by lmms-eval)."""

import string

from lsg.benchmarks.parsing import extract_letter


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]  # already holds the options and the answer instruction


def doc_to_choice(doc):
    return list(string.ascii_uppercase[:len(doc["options"])])


def doc_to_target(doc):
    return string.ascii_uppercase.index(doc["answer"])


def process_generation(doc, results):
    """1.0 when the letter MMStar's rule reads from the answer is the right one."""
    return {"accuracy": float(extract_letter(results[0], len(doc["options"])) == doc["answer"])}
