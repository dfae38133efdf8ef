"""Paired statistics for accuracy deltas (docs/methods.md section 6).

Every delta the project reports compares two methods on the same questions, so its
uncertainty is paired: a percentile bootstrap over questions for the confidence interval,
and McNemar's exact test on the discordant pairs for the p-value. A delta whose CI contains
zero is reported as not distinguishable from zero (tables mark the others with `*`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

BOOTSTRAP_SAMPLES = 2000  # resamples of the questions for a paired CI (config: bootstrap_samples)
CI_LEVEL = 0.95  # (config: ci_level)


def paired_delta(base: Sequence[bool], gated: Sequence[bool], samples: int = BOOTSTRAP_SAMPLES,
                 level: float = CI_LEVEL, seed: int = 0) -> tuple[float, float, float, float]:
    """Accuracy delta of `gated` over `base` on the same questions, in points, with its paired
    percentile-bootstrap CI (questions resampled with replacement, `samples` times) and the
    two-sided exact McNemar p-value on the discordant pairs (docs/methods.md section 6).

    Args:
        base, gated: per-question correctness, same questions in the same order.

    Returns:
        (delta, ci_low, ci_high, p): points, points, points, probability.

    Raises:
        ValueError: lengths differ or there are no questions.
    """
    import numpy as np

    a, b = np.asarray(base, dtype=float), np.asarray(gated, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_delta needs the same non-empty questions: {a.size} vs {b.size}.")
    diff = b - a
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(samples, diff.size))
    boot = diff[idx].mean(1)
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    lost, won = int((diff < 0).sum()), int((diff > 0).sum())
    n, k = lost + won, min(lost, won)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return 100 * float(diff.mean()), 100 * float(low), 100 * float(high), p



def paired_by_subtask(base: Sequence[bool], gated: Sequence[bool], subtasks: Sequence[str],
                      samples: int = BOOTSTRAP_SAMPLES, level: float = CI_LEVEL) -> dict[str, dict[str, float]]:
    """`paired_delta` per sub-task and over all questions (`overall`).

    Returns:
        sub-task -> {delta, ci_low, ci_high, p (as `paired_delta`), n, significant (CI excludes 0)}.
    """
    groups = defaultdict(list)
    for i, t in enumerate(subtasks):
        groups[t].append(i)
    groups["overall"] = list(range(len(subtasks)))
    out = {}
    for task, idx in groups.items():
        d, lo, hi, p = paired_delta([base[i] for i in idx], [gated[i] for i in idx], samples, level)
        out[task] = {"delta": d, "ci_low": lo, "ci_high": hi, "p": p, "n": len(idx), "significant": lo > 0 or hi < 0}
    return out


def cell(stats: dict[str, float]) -> str:
    """`+1.2 [-0.3, +2.7]`, with `*` when the CI excludes zero."""
    return (f"{stats['delta']:+.1f} [{stats['ci_low']:+.1f}, {stats['ci_high']:+.1f}]"
            + ("*" if stats["significant"] else ""))
