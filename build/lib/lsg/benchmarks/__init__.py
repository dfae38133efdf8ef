"""Benchmarks: the offline `shapes` splits and the public ones the papers report (MMStar,
CV-Bench, POPE, MME, OCRBench, MathVista), each loaded with `datasets` from a pinned
revision and scored by its official protocol (`lsg.benchmarks.base`, one module each)."""
from lsg.benchmarks.base import REGISTRY, Benchmark, Score, get_benchmark, register
from lsg.benchmarks import cvbench, mathvista, mme, mmstar, ocrbench, pope, shapes  # noqa: F401  (register)

__all__ = ["REGISTRY", "Benchmark", "Score", "get_benchmark", "register"]
