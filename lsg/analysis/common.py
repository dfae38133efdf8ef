"""What every analysis returns and the small helpers they share: CIs over questions, atomic PNG
writes and the completion marker that makes an interrupted run restart cleanly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lsg.files import atomic_target, read_json, sha256_json, write_json

GATE_FILE_SUFFIXES = (".safetensors", ".json")  # gate checkpoints and stack manifests in a spec
DONE_FILE = "done.json"  # written last in an analysis's folder: its outputs are complete


@dataclass
class AnalysisResult:
    """One analysis's output.

    Attributes:
        name: the analysis's name on the command line (e.g. "maps", "profiles", "probes").
        figures: plotly figures for the HTML page, in display order.
        files: PNG and JSON files written (paths under the run's output folder).
        summary: JSON-able numbers (also logged to W&B).
    """

    name: str
    figures: list[Any] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def mean_ci(values: np.ndarray, level: float = 0.95, samples: int = 2000, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Mean over questions with a percentile-bootstrap CI (questions resampled with replacement).

    Args:
        values: `(N_questions, ...)`; NaN = the question has no value there (e.g. no L-sink at
            that layer), left out of that entry's mean.
        level: CI coverage (docs/methods.md section 6: 0.95).
        samples: bootstrap resamples.

    Returns:
        `(mean, low, high, n)`, each of shape `values.shape[1:]` (n: questions with a value).
        All NaN where no question has a value.
    """
    values = np.asarray(values, dtype=np.float64)
    n = (~np.isnan(values)).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(values, 0) / n
        if len(values) < 2:
            return mean, mean.copy(), mean.copy(), n
        idx = np.random.default_rng(seed).integers(0, len(values), size=(samples, len(values)))
        picked = values[idx]  # (samples, N, ...)
        boot = np.nansum(picked, 1) / (~np.isnan(picked)).sum(1)
    import warnings

    with warnings.catch_warnings():  # an all-NaN entry (no question has the group) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return mean, np.where(n > 0, low, np.nan), np.where(n > 0, high, np.nan), n


def stack_label(spec: str) -> str:
    """A short display name for a gate stack spec in figures: every gate file reduced to its stem
    (`lsg:checkpoints/smol-llava/lsg-L10.safetensors+var` -> `lsg:lsg-L10+var`). The JSON keeps the
    full spec."""
    parts = []
    for part in spec.split("+"):
        kind, sep, rest = part.partition(":")
        parts.append(f"{kind}:{Path(rest).stem}" if sep and Path(rest).suffix in GATE_FILE_SUFFIXES else part)
    return "+".join(parts)


def save_png(fig, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure to `path` atomically (tmp + rename) and close it."""
    import matplotlib.pyplot as plt

    with atomic_target(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)


def identity_of(backbone, records, cfg: dict, stacks) -> str:
    """sha256 naming one analysis's inputs: weights, sinks, questions, its config and the stacks."""
    return sha256_json({"backbone": backbone.fingerprint, "sinks": backbone.sinks.to_dict(),
                        "questions": [r.id for r in records], "cfg": cfg, "stacks": list(stacks)})


def is_done(folder: Path, identity: str) -> bool:
    """Whether `folder` holds a complete run of the analysis with this identity (its marker,
    written after every other output). A partial or different run is redone from scratch."""
    marker = read_json(Path(folder) / DONE_FILE)
    return isinstance(marker, dict) and marker.get("identity") == identity


def mark_done(folder: Path, identity: str, files: list[Path], summary: dict) -> None:
    """Write the completion marker, last, atomically."""
    write_json(Path(folder) / DONE_FILE, {"identity": identity, "files": [str(f) for f in files],
                                          "summary": summary}, indent=1)


def plt_agg():
    """matplotlib's pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
