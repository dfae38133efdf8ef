"""Greedy stacking of single-layer gates (LSG paper Section 5, Table 2), chosen on one split
and reported on another (docs/methods.md section 6).

1. Every candidate (trained checkpoints from a sweep, training-free gate specs) is scored
   alone on the selection split; its gain is its paired delta vs the baseline.
2. Candidates are ranked by gain; the stack starts from the best and tries the others in
   descending order, evaluated after each addition. Two policies run side by side:
   `keep-all` (the paper: every candidate is added) and `keep-if-better` (a candidate
   stays only if the stack's selection accuracy rises).
3. Every stack of both policies is then scored on the held-out split, with paired CIs.

A stack is saved as a manifest (`lsg.specs.manifest`), loaded by `lsg.specs.load_manifest`, by
every gate spec (`stack:<manifest>`) and by lsg-stack (`base=<manifest>`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lsg.answers import answers_for, read_answers
from lsg.benchmarks.base import Benchmark
from lsg.data import VQARecord
from lsg.evaluation import Result, scored
from lsg.runs import gate_file, layer_dirs, val_file_beside
from lsg.specs import short_name
from lsg.stats import BOOTSTRAP_SAMPLES, CI_LEVEL, paired_by_subtask

POLICIES = ("keep-all", "keep-if-better")


@dataclass
class Candidate:
    """One single-layer gate: its spec (`lsg.specs` syntax) and, for a checkpoint, its path."""

    spec: str
    checkpoint: Path | None = None
    gain: float | None = None  # overall paired delta on the selection split, points


@dataclass
class Step:
    """A stack after one greedy addition under one policy."""

    policy: str
    size: int
    specs: list[str]
    added: str
    kept: bool
    selection: dict = field(default_factory=dict)  # the stack's paired_by_subtask vs the baseline
    heldout: dict = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return "+".join(self.specs)


def sweep_candidates(sweep_dir: Path, epoch: int = 1, gate: str = "lsg") -> list[Candidate]:
    """`ckpt:<checkpoint>` candidates for every `<gate>-L<l>/gate-epoch<epoch>.safetensors` under a
    sweep directory (the run_dir of `train.py layer=<many>`, or one-layer runs in one folder;
    `lsg.runs`), by layer.

    Raises:
        FileNotFoundError: none found.
    """
    paths = [gate_file(folder, epoch) for folder in layer_dirs(sweep_dir, gate).values()]
    paths = [p for p in paths if p.exists()]
    if not paths:
        raise FileNotFoundError(f"No {gate}-L<layer>/gate-epoch{epoch}.safetensors under {sweep_dir}; train the "
                                f"layers first (python train.py layer=all), or give candidates_dir=<its run_dir> and "
                                f"the epoch it exported.")
    return [Candidate(f"ckpt:{p}", p) for p in paths]


def answers_beside(checkpoint: Path, benchmark: Benchmark, items: Sequence[VQARecord], spec: str = "") -> Result | None:
    """The gate's answers to `items` (a data split's questions) from the `val-epoch<e>.json` its
    training wrote beside it, scored by `benchmark`, or None when that file is absent or misses a
    question."""
    beside = val_file_beside(checkpoint)
    found = read_answers(beside) if beside is not None else None
    answers = answers_for(items, found[1]) if found is not None else None
    if answers is None:
        return None
    return scored(benchmark, items, [a.prediction for a in answers], spec, cached=True)


def greedy(candidates: Sequence[Candidate], evaluate, baseline: Result, max_size: int,
           policies: Sequence[str] = POLICIES, samples: int = BOOTSTRAP_SAMPLES, level: float = CI_LEVEL,
           base: Sequence[str] = ()) -> list[Step]:
    """Greedy stacking on the selection split.

    Args:
        candidates: with `gain` set (single-candidate overall delta, points).
        evaluate: `{spec: [specs]} -> {spec: Result}` on the selection split (one pass).
        baseline: the unmodified backbone's selection answers.
        max_size: largest stack (gates from `base` excluded).
        base: specs every stack starts from (a loaded manifest).

    Returns:
        The steps of every policy, in order (size 1 = the best candidate alone).

    Raises:
        ValueError: an unknown policy.
    """
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"Unknown stacking policies {bad}; known: {', '.join(POLICIES)}.")
    ranked = sorted(candidates, key=lambda c: -c.gain)[:max_size]
    stats = lambda res: paired_by_subtask(baseline.correct, res.correct, baseline.subtasks, samples, level)  # noqa: E731
    current = {p: list(base) for p in policies}
    current_stats: dict[str, dict | None] = {p: None for p in policies}
    steps: list[Step] = []
    for size, cand in enumerate(ranked, 1):
        trials = {p: current[p] + [cand.spec] for p in policies}
        results = evaluate({"+".join(t): t for t in trials.values()})
        for p in policies:
            tried = stats(results["+".join(trials[p])])
            keep = (p == "keep-all" or current_stats[p] is None
                    or tried["overall"]["delta"] > current_stats[p]["overall"]["delta"])
            if keep:
                current[p], current_stats[p] = trials[p], tried
            steps.append(Step(p, size, list(current[p]), cand.spec, keep, current_stats[p]))
    return steps


def table2_markdown(steps: Sequence[Step], n_selection: int, n_heldout: int) -> str:
    """Table 2: every stack of every policy, its selection and held-out overall delta with CIs."""
    from lsg.stats import cell

    lines = [f"Greedy stacking: chosen on the selection split ({n_selection} questions), reported on the held-out "
             f"split ({n_heldout} questions). Deltas vs the baseline in points [95% paired bootstrap CI], * = CI "
             f"excludes 0.", "", "| policy | size | added | kept | selection delta | held-out delta | held-out p | stack |",
             "|---|---|---|---|---|---|---|---|"]
    for s in steps:
        held = cell(s.heldout["overall"]) if s.heldout else "-"
        p = f"{s.heldout['overall']['p']:.2f}" if s.heldout else "-"
        lines.append(f"| {s.policy} | {s.size} | `{short_name(s.added)}` | {'yes' if s.kept else 'no'} | "
                     f"{cell(s.selection['overall'])} | {held} | {p} | `{' + '.join(short_name(x) for x in s.specs)}` |")
    return "\n".join(lines) + "\n"


def plot_table2(steps: Sequence[Step], path: Path) -> Path:
    """Held-out overall delta with its CI after each addition, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, policy in enumerate(dict.fromkeys(s.policy for s in steps)):
        mine = [s for s in steps if s.policy == policy and s.heldout]
        x = [s.size + 0.08 * i for s in mine]
        y = [s.heldout["overall"]["delta"] for s in mine]
        err = [[v - s.heldout["overall"]["ci_low"] for v, s in zip(y, mine)],
               [s.heldout["overall"]["ci_high"] - v for v, s in zip(y, mine)]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=policy)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("stack size (greedy additions)")
    ax.set_ylabel("held-out delta vs baseline (points)")
    ax.legend()
    ax.set_title("Greedy stacking, held-out split (95% paired CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
