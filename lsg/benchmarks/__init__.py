"""Benchmarks: the offline `shapes` splits and the public ones the papers report (MMStar,
CV-Bench, POPE, MME, OCRBench, MathVista), each loaded with `datasets` from a pinned
revision and scored by its official protocol (`lsg.benchmarks.base`, one module each).

A benchmark registers itself (`@register`) by being a module of this folder: every module but
the shared machinery below is imported here, so adding one needs no list edited
(docs/extending.md).
"""
import importlib
import pkgutil

from lsg.benchmarks.base import REGISTRY, Benchmark, get_benchmark, register

_MACHINERY = {"base", "parsing", "run"}  # shared code, not benchmarks (`run` needs the whole package)
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _MACHINERY:
        importlib.import_module(f"{__name__}.{_module}")
del _module

__all__ = ["REGISTRY", "Benchmark", "get_benchmark", "register"]
