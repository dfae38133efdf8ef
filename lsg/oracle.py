"""The oracle grid (docs/methods.md section 4; LSG paper Section 3.4, Figure 5 / S4).

Stage 1: `KeyScaleGate` at one layer at a time, first-group keys x alpha and the rest
x (1 - alpha), alpha in {0, 0.1, ..., 1}, scored per sub-task. Stage 2 (optional): the
V-sink coefficient fixed at a cell's stage-1 optimum, the rest split into L-sinks and
ordinary tokens whose coefficients are re-swept around 1 - alpha* (paper Appendix C.3).

Every cell of a layer reuses the baseline's hidden state entering that layer (one shared
forward per batch for the whole grid, `lsg.evaluation.answer_stacks` in choice mode); answers
are kept per cell in the answer store, so an interrupted grid resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lsg.backbones import Backbone
from lsg.benchmarks.base import Benchmark
from lsg.evaluation import Result, answer_stacks
from lsg.files import write_json
from lsg.specs import BASELINE, GateStack, baseline_stack, parse_stack
from lsg.stats import BOOTSTRAP_SAMPLES, CI_LEVEL, paired_by_subtask

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # docs/methods.md section 4
STAGE2_OFFSETS = (-0.2, -0.1, 0.0, 0.1, 0.2)  # around 1 - alpha*, for the L-sink and ordinary coefficients


def spec(layer: int, alpha: float) -> str:
    return f"oracle@{layer}:{alpha:g}"


def run_grid(backbone: Backbone, benchmark: Benchmark, layers: Sequence[int], alphas: Sequence[float], out_dir: Path,
             batch_size: int = 32, samples: int = BOOTSTRAP_SAMPLES, level: float = CI_LEVEL,
             extra_specs: Sequence[str] = ()) -> dict:
    """Evaluate the grid (plus `extra_specs`) on a multiple-choice benchmark in choice mode (a data
    split: `lsg.benchmarks.base.DataSplit`) and return its table; answers are stored under
    `out_dir/cache`.

    Returns:
        {"split", "n", "baseline": {task: acc %}, "cells": [{layer, alpha, spec, acc (%), stats}],
         "best": {layer: {task: {alpha, delta, ci_low, ci_high, p, significant}}}} where `stats`
        is `lsg.stats.paired_by_subtask` of the cell against the baseline (points); among
        equal best deltas the alpha nearest 0.5 is reported.

    Raises:
        ValueError: no multiple-choice record, a bad layer.
    """
    stacks: list[GateStack] = [baseline_stack()]
    cells = [(backbone.check_layer(l), float(a)) for l in layers for a in alphas]
    stacks += [parse_stack(spec(l, a), backbone) for l, a in cells]
    stacks += [parse_stack(s, backbone) for s in extra_specs]
    results = answer_stacks(backbone, benchmark, stacks, cache_dir=Path(out_dir) / "cache", batch_size=batch_size,
                            progress="oracle grid")
    baseline = results[BASELINE]
    table = {"split": benchmark.split, "n": len(baseline.correct), "layers": list(layers), "alphas": list(alphas),
             "baseline": baseline.acc_pct, "cells": [], "best": {}}

    def row(st: GateStack, layer: int, alpha: float | None) -> dict:
        res: Result = results[st.spec]
        stats = paired_by_subtask(baseline.correct, res.correct, baseline.subtasks, samples, level)
        return {"layer": layer, "alpha": alpha, "spec": st.spec, "acc": res.acc_pct, "stats": stats}

    for st, (l, a) in zip(stacks[1:], cells):
        table["cells"].append(row(st, l, a))
    table["extra"] = [row(st, min(st.layers), None) for st in stacks[1 + len(cells):]]
    for l in layers:
        mine = [c for c in table["cells"] if c["layer"] == l]
        table["best"][str(l)] = {
            t: {"alpha": best["alpha"], **best["stats"][t]}
            for t in mine[0]["stats"]
            for best in [max(mine, key=lambda c: (c["stats"][t]["delta"], -abs(c["alpha"] - 0.5)))]
        }
    return table


def stage2_specs(table: dict, task: str = "overall", offsets: Sequence[float] = STAGE2_OFFSETS) -> list[str]:
    """Stage 2's cells: per layer, V-sink coefficient alpha* (the stage-1 optimum for `task`),
    L-sink and ordinary coefficients each in 1 - alpha* + `offsets` (clipped to [0, 1])."""
    out = []
    for layer, best in table["best"].items():
        alpha = best[task]["alpha"]
        rest = sorted({min(1.0, max(0.0, round(1 - alpha + o, 3))) for o in offsets})
        out += [f"oracle@{layer}:{alpha:g}/{b:g}/{c:g}" for b in rest for c in rest]
    return out


def write_grid(table: dict, out_dir: Path) -> list[Path]:
    """`grid.json`, `best.md` (best alpha per layer and sub-task with its delta and CI) and
    `grid.png` (one layer x alpha heatmap of deltas per sub-task, Figure 5 / S4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsg.stats import cell

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "grid.json", table, indent=1)
    tasks = sorted(t for t in table["baseline"] if t != "overall") + ["overall"]
    lines = [f"Oracle grid on {table['split']} ({table['n']} questions): best alpha per layer and sub-task, "
             f"delta vs baseline in points [95% paired bootstrap CI], * = CI excludes 0; ties go to the alpha nearest "
             f"0.5.", "",
             "| layer | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for layer, best in table["best"].items():
        lines.append(f"| {layer} | " + " | ".join(f"a={best[t]['alpha']:g}: {cell(best[t])}" for t in tasks) + " |")
    if table.get("extra"):
        lines += ["", "| extra cell | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        lines += [f"| {c['spec']} | " + " | ".join(cell(c["stats"][t]) for t in tasks) + " |" for c in table["extra"]]
    (out_dir / "best.md").write_text("\n".join(lines) + "\n")
    layers, alphas = table["layers"], table["alphas"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.0 * len(tasks) + 1.5, 0.45 * len(layers) + 2.4), squeeze=False,
                             layout="constrained")
    vmax = max(1.0, max(abs(c["stats"][t]["delta"]) for c in table["cells"] for t in tasks))
    for ax, t in zip(axes[0], tasks):
        grid = [[next(c for c in table["cells"] if c["layer"] == l and c["alpha"] == a)["stats"][t]["delta"]
                 for a in alphas] for l in layers]
        im = ax.imshow(grid, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_title(t, fontsize=9)
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas], fontsize=6, rotation=90)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
        ax.set_xlabel("alpha")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="delta vs baseline (points)")
    fig.suptitle(f"Oracle key gating: first-group keys x alpha, rest x (1 - alpha); {table['split']}, "
                 f"n={table['n']}")
    fig.savefig(out_dir / "grid.png", dpi=110)
    plt.close(fig)
    return [out_dir / "grid.json", out_dir / "best.md", out_dir / "grid.png"]
