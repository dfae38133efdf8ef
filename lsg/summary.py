"""Sweep summaries: Table 1, Figure 7 and Figure 8 of the LSG paper from a sweep directory.

A sweep directory holds one folder per layer, `<gate>-L<l>/` (`lsg.runs`), with `val-epoch<e>.json`
(per validation question: sub-task, answer, the gate's and the baseline's prediction, gate
ratios), as written by `train.py layer=<many>` or by one-layer runs under one folder. Every delta here is
paired over the same questions, with its bootstrap CI and McNemar p (`lsg.stats`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lsg.answers import Answer, read_answers
from lsg.runs import gates_under, layer_dirs
from lsg.stats import BOOTSTRAP_SAMPLES, CI_LEVEL, cell, paired_by_subtask

BLOCK = 4  # layers per block of Table 1 (the paper's)


def read_sweep(sweep_dir: Path, gate: str = "lsg") -> dict[int, dict[int, dict]]:
    """layer -> epoch -> the `val-epoch<e>.json` content of `gate`'s `<gate>-L<l>` folders.

    Raises:
        FileNotFoundError: no `<gate>-L<l>/val-epoch<e>.json` under `sweep_dir`; the message names
            the gates that are there.
    """
    out: dict[int, dict[int, dict]] = {}
    for layer, folder in layer_dirs(sweep_dir, gate).items():
        for path in folder.glob("val-epoch*.json"):
            epoch = int(path.stem.removeprefix("val-epoch"))
            info, answers = read_answers(path)
            out.setdefault(layer, {})[epoch] = {**info, "answers": answers}
    if not out:
        others = [g for g in gates_under(sweep_dir) if g != gate]
        hint = f" It holds runs of {', '.join(others)}: set gate=<name>." if others else ""
        raise FileNotFoundError(f"No {gate}-L<layer>/val-epoch<e>.json under {sweep_dir}: give the run_dir of "
                                f"train.py layer=<many>, or the folder holding one-layer runs.{hint}")
    return out


def layer_stats(answers: dict[str, Answer], samples: int = BOOTSTRAP_SAMPLES, level: float = CI_LEVEL) -> dict:
    """`lsg.stats.paired_by_subtask` of a layer's gate against the baseline on its validation answers."""
    ids = sorted(answers)
    return paired_by_subtask([answers[i].baseline == answers[i].gold for i in ids],
                             [answers[i].prediction == answers[i].gold for i in ids],
                             [answers[i].subtask for i in ids], samples, level)


def summarize(sweep: dict[int, dict[int, dict]], epoch: int | None = 1, block: int = BLOCK,
              oracle: dict | None = None, samples: int = BOOTSTRAP_SAMPLES, level: float = CI_LEVEL) -> dict:
    """Per-layer paired deltas at `epoch` (None = each layer's last) and Table 1's rows.

    Returns:
        {"epoch", "tasks", "layers": {l: stats}, "table1": [{block, layer, overall, improved,
        hurt, improved_significant, hurt_significant, oracle}]}; `oracle` is the grid's best
        overall cell at that layer (`lsg.oracle.run_grid`'s `best`) or None.
    """
    layers = {}
    for l, epochs in sorted(sweep.items()):
        e = max(epochs) if epoch is None else epoch
        if e in epochs:
            layers[l] = layer_stats(epochs[e]["answers"], samples, level)
    if not layers:
        raise ValueError(f"No layer has validation answers for epoch {epoch}; epochs present: "
                         f"{sorted({e for v in sweep.values() for e in v})}.")
    tasks = sorted({t for s in layers.values() for t in s if t != "overall"})
    rows = []
    for start in range(0, max(layers) + 1, block):
        inside = [l for l in layers if start <= l < start + block]
        if not inside:
            continue
        best = max(inside, key=lambda l: layers[l]["overall"]["delta"])
        s = layers[best]
        rows.append({
            "block": f"{start}-{start + block - 1}", "layer": best, "overall": s["overall"],
            "improved": sum(s[t]["delta"] > 0 for t in tasks), "hurt": sum(s[t]["delta"] < 0 for t in tasks),
            "improved_significant": sum(s[t]["delta"] > 0 and s[t]["significant"] for t in tasks),
            "hurt_significant": sum(s[t]["delta"] < 0 and s[t]["significant"] for t in tasks),
            "oracle": (oracle or {}).get("best", {}).get(str(best), {}).get("overall"),
        })
    return {"epoch": epoch, "tasks": tasks, "layers": layers, "table1": rows}


def markdown(summary: dict, n_questions: int | None = None) -> str:
    """Table 1 (best layer per block) and the per-layer table, as markdown."""
    tasks = summary["tasks"]
    head = (f"Deltas vs the baseline in points on the same {n_questions or ''} validation questions, "
            f"[95% paired bootstrap CI], * = CI excludes 0; improved / hurt = sub-tasks with a positive / negative "
            f"delta (significant ones in brackets).")
    lines = ["## Table 1: best layer per block", "", head, "",
             "| block | best layer | overall delta | improved / hurt | oracle at that layer |", "|---|---|---|---|---|"]
    for r in summary["table1"]:
        o = r["oracle"]
        oracle = f"a={o['alpha']:g}: {cell(o)}" if o else "not run"
        lines.append(f"| {r['block']} | {r['layer']} | {cell(r['overall'])} | {r['improved']} / {r['hurt']} "
                     f"({r['improved_significant']} / {r['hurt_significant']}) | {oracle} |")
    lines += ["", "## Per layer", "", "| layer | overall | p | " + " | ".join(tasks) + " |",
              "|---" * (len(tasks) + 3) + "|"]
    for l, s in summary["layers"].items():
        lines.append(f"| {l} | {cell(s['overall'])} | {s['overall']['p']:.2f} | "
                     + " | ".join(f"{s[t]['delta']:+.1f}{'*' if s[t]['significant'] else ''}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot_heatmap(summary: dict, path: Path) -> Path:
    """Figure 7: layer x sub-task heatmap of deltas (points); `*` marks CIs that exclude 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["tasks"] + ["overall"]
    layers = list(summary["layers"])
    data = [[summary["layers"][l][t]["delta"] for t in tasks] for l in layers]
    vmax = max(1.0, max(abs(v) for row in data for v in row))
    fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 2.5, 0.32 * len(layers) + 1.8))
    im = ax.imshow(data, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_ylabel("decoder layer")
    for i, l in enumerate(layers):
        for j, t in enumerate(tasks):
            s = summary["layers"][l][t]
            ax.text(j, i, f"{s['delta']:+.0f}{'*' if s['significant'] else ''}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy delta vs baseline (points)")
    ax.set_title(f"LSG gate per layer (epoch {summary['epoch'] or 'last'}): delta per sub-task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ratio_curves(sweep: dict[int, dict[int, dict]], layer: int, group: int = 0) -> dict[str, list[tuple[int, float]]]:
    """Figure 8's data: sub-task -> [(optimizer steps, mean ratio of gate group `group`)] over
    the layer's validation checkpoints (the uniform ratio 1/G at step 0)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for epoch, data in sorted(sweep[layer].items()):
        per_task: dict[str, list[float]] = {}
        for a in data["answers"].values():
            if a.ratios:
                per_task.setdefault(a.subtask, []).append(a.ratios[group])
                groups = len(a.ratios)
        for task, values in per_task.items():
            curve = curves.setdefault(task, [(0, 1.0 / groups)])
            curve.append((data.get("steps", epoch), sum(values) / len(values)))
    return curves


def plot_ratios(sweep: dict[int, dict[int, dict]], layers: Sequence[int], path: Path) -> Path | None:
    """Figure 8: the first group's gate ratio per sub-task over training, one panel per layer.
    None (and no file) when no chosen layer logged ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [l for l in layers if l in sweep and any(ratio_curves(sweep, l).values())]
    if not layers:
        return None
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.2), squeeze=False)
    for ax, l in zip(axes[0], layers):
        any_epoch = next(iter(sweep[l].values()))
        group = (any_epoch.get("groups") or ["group 0"])[0]
        for task, curve in sorted(ratio_curves(sweep, l).items()):
            ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label=task)
        ax.set_title(f"layer {l}")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(f"gate ratio r[{group}]")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
