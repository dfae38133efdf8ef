"""Interleaved, paired timing of alternatives (gate specs) and their cost ratios to a baseline.

On a shared machine the speed of the same forward drifts by tens of percent within minutes (other
processes, the CPU clock, the allocator). Timing each spec in its own block confounds the spec
with that drift: block timings gave a gate "faster" than no gate, and one spec 1.56x then 1.20x
in the same run. So every round (repeat) times every spec once, in a seeded shuffled order
(`time_interleaved`), after `warmup` rounds that are run the same way and discarded, and each
ratio to the baseline is paired by round (`paired_ratio`): drift that hits a whole round cancels
in its ratio, and what is left varies from round to round, which the CI measures.

Ratio and CI (`paired_ratio`): with `t_i` the spec's time in round `i` and `b_i` the baseline's,
the ratio is the geometric mean of `t_i / b_i`, i.e. `exp(mean(log(t_i / b_i)))`, and its CI is
the Student-t interval of the mean log ratio over the `n` rounds mapped back by `exp`:
`exp(m +- t_{(1+level)/2, n-1} * s / sqrt(n))`, `m` and `s` the mean and sample standard
deviation of the log ratios. A ratio whose CI contains 1 cannot be told from the baseline's cost
in this run. Log ratios, because costs compose by multiplication (1.2x slower and 1.2x faster
are symmetric on the log scale); a t interval rather than the project's question bootstrap
(`lsg.stats`), because a run has a handful of rounds, where a percentile bootstrap is too narrow.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from lsg.stats import CI_LEVEL

WARMUP_ROUNDS = 1  # untimed rounds before the timed ones (config: warmup)
ORDER_SEED = 0  # seed of each round's shuffled order (config: seed)


@dataclass
class InterleavedTimings:
    """What `time_interleaved` measured.

    Attributes:
        order: per timed round, the names in the order they ran (each name once).
        warmup_order: the same for the discarded warm-up rounds.
        runs: name -> one `measure(name)` result per timed round, in round order (so
            `runs[a][i]` and `runs[b][i]` come from the same round: paired).
    """

    order: list[list[str]]
    warmup_order: list[list[str]]
    runs: dict[str, list[dict[str, float]]]

    def series(self, name: str, key: str) -> list[float]:
        """`key` of every timed round of `name`, in round order."""
        return [r[key] for r in self.runs[name]]


def interleaved_order(names: Sequence[str], rounds: int, seed: int = ORDER_SEED) -> list[list[str]]:
    """`rounds` independent shuffles of `names` from one seeded generator (`random.Random(seed)`):
    every round holds every name once; the same seed gives the same order."""
    rng = random.Random(seed)
    return [rng.sample(list(names), len(names)) for _ in range(rounds)]


def time_interleaved(measure: Callable[[str], Mapping[str, float]], names: Sequence[str], repeats: int,
                     warmup: int = WARMUP_ROUNDS, seed: int = ORDER_SEED) -> InterleavedTimings:
    """Call `measure(name)` for every name in each of `warmup + repeats` rounds, each round in its
    own shuffled order (`interleaved_order`); the first `warmup` rounds are discarded.

    Args:
        measure: name -> measurements of one call, e.g. `{"prefill_s": 0.12, "decode_s": 0.03}`
            (the timer lives here, so tests feed known durations).
        names: what to time (unique), e.g. gate specs with the baseline among them.
        repeats: timed rounds (>= 1; >= 2 for a CI).
        warmup: untimed rounds run first (>= 0): kernels, allocator and caches of every name warm.
        seed: the order's seed.

    Returns:
        `InterleavedTimings`.

    Raises:
        ValueError: no names, repeated names, `repeats < 1` or `warmup < 0`.
    """
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"time_interleaved needs distinct names to time, got {names}.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    order = interleaved_order(names, warmup + repeats, seed)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for index, round_names in enumerate(order):
        for name in round_names:
            result = dict(measure(name))
            if index >= warmup:
                runs[name].append(result)
    return InterleavedTimings(order[warmup:], order[:warmup], runs)


def paired_ratio(base: Sequence[float], other: Sequence[float], level: float = CI_LEVEL) -> dict:
    """Cost of `other` relative to `base`, paired by round, with its CI (module docstring).

    Args:
        base, other: positive measurements (seconds, bytes), one per round, same rounds in the
            same order.
        level: CI coverage, in (0, 1).

    Returns:
        {"ratio": geometric mean of other_i / base_i, "ci_low", "ci_high": the t interval
         (None with one round), "n": rounds, "contains_1": whether the CI contains 1 (None with
         one round: cannot be told)}.

    Raises:
        ValueError: different or zero lengths, a measurement <= 0, or `level` outside (0, 1).
    """
    if len(base) != len(other) or not base:
        raise ValueError(f"paired_ratio needs the same non-empty rounds: {len(base)} vs {len(other)}.")
    if min(base) <= 0 or min(other) <= 0:
        raise ValueError(f"paired_ratio needs positive measurements, got base {list(base)}, other {list(other)}.")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}.")
    logs = [math.log(o / b) for b, o in zip(base, other)]
    n = len(logs)
    mean = sum(logs) / n
    out = {"ratio": math.exp(mean), "ci_low": None, "ci_high": None, "n": n, "contains_1": None}
    if n > 1:
        from scipy.stats import t  # scipy comes with scikit-learn, a dependency

        sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
        half = float(t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
        out.update(ci_low=math.exp(mean - half), ci_high=math.exp(mean + half))
        out["contains_1"] = out["ci_low"] <= 1.0 <= out["ci_high"]
    return out


def ratio_cell(stats: Mapping) -> str:
    """`1.23 [1.10, 1.37]` (the ratio and its CI), or `1.23` with one round."""
    if stats["ci_low"] is None:
        return f"{stats['ratio']:.2f}"
    return f"{stats['ratio']:.2f} [{stats['ci_low']:.2f}, {stats['ci_high']:.2f}]"
