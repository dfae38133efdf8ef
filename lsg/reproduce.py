"""The paper's workflow as one resumable plan: calibrate -> sweep -> summarize -> stack -> LoRA ->
eval -> report (issue 19; docs/methods.md sections 3, 6, 7).

A plan is a list of `Stage`s, each one command of this project (`python -m lsg.cli.<app> ...`)
with its overrides, composed from an experiment config (`conf/experiment/*.yaml`). A stage
that finished leaves `<out_dir>/stages/<name>.json` (its command, exit status and wall time) and
is skipped when the plan runs again; an interrupted stage resumes through its own command's
resume (training from its last optimizer step, evaluations from the answer store).

The report puts our paired deltas (with their 95% CIs) beside the paper's reference numbers
(`reference:` in the experiment; docs/methods.md section 3 for LLaVA-1.5-7B).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lsg.files import write_json
from lsg.runs import gate_file, layer_dir_name
from lsg.specs import parse_sweep_layers
from lsg.stats import cell

STAGES = ("calibrate", "sweep", "summarize", "stack", "lora", "eval", "report")
LAYER_BOUND = 10 ** 6  # layer lists are checked for syntax only here; the sweep checks them against the backbone


@dataclass
class Stage:
    """One step of a plan: `python -m lsg.cli.<app> <overrides>` (the report runs in-process); the
    sweep stage is the trainer (`train`) over many layers.

    Attributes:
        name: the stage's name (unique in a plan; `eval-<benchmark>` per benchmark).
        app: the `lsg.cli` module that runs it, or None for the report.
        overrides: Hydra overrides, `key=value`.
        outputs: files whose presence the stage promises (checked after it runs).
    """

    name: str
    app: str | None
    overrides: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        return [sys.executable, "-m", f"lsg.cli.{self.app}", *self.overrides]

    def shell(self) -> str:
        """The stage as a shell line a user can paste (`lsg-<app> ...`)."""
        quoted = [f"'{o}'" if any(c in o for c in "[]{},$ ") else o for o in self.overrides]
        return f"lsg-{self.app} " + " ".join(quoted) if self.app else "(report: in-process)"


def _list(values: Sequence[str]) -> str:
    return "[" + ",".join(values) + "]"


def gate_specs(exp: dict, out: Path) -> dict[str, str]:
    """Report row name -> gate spec of every method the eval stage scores."""
    sweep, lsg_layer, skip = out / "sweep", exp["lsg_layer"], set(exp.get("skip", []))
    specs = {} if "sweep" in skip else {
        f"LSG L{lsg_layer}": f"ckpt:{gate_file(sweep / layer_dir_name('lsg', lsg_layer), exp['export_epoch'])}"}
    if "stack" not in skip:
        specs[f"stack ({exp['stack']['policy']})"] = f"stack:{out}/stack/stack-{exp['stack']['policy']}.json"
    specs.update({name.upper(): name for name in exp["free"]})
    if exp["lora"]["enabled"] and "lora" not in skip:
        specs[f"LoRA L{lsg_layer}"] = f"ckpt:{out}/lora/{layer_dir_name('lora', lsg_layer)}.safetensors"  # its export
    return specs


TRAINING_KEYS = ("epochs", "batch_size", "effective_batch_size", "lr")  # global settings every training stage gets


def load_experiment(name: str) -> dict:
    """The plan's view of `conf/experiment/<name>.yaml`, a file of global overrides (`python train.py
    experiment=<name>` trains with them): its `experiment:` block, plus `model` and `data` (the
    groups its defaults choose), `data_overrides` (its `data:` values as `data.<key>=<value>`),
    `training` (`TRAINING_KEYS` it sets), `layers` (its `layer`) and `export_epoch`.

    Raises:
        FileNotFoundError: no such experiment (the message lists the known ones).
        ValueError: the file does not choose a model and a data group, or has no `experiment:` block.
    """
    from lsg.configs import load_config

    raw = load_config("experiment", name)
    groups = {}
    for entry in raw.get("defaults", []):
        for key, value in (entry.items() if isinstance(entry, dict) else ()):
            groups[key.removeprefix("override /")] = value
    missing = [g for g in ("model", "data") if g not in groups] + ([] if "experiment" in raw else ["experiment:"])
    if missing:
        raise ValueError(f"conf/experiment/{name}.yaml must choose `override /model` and `override /data` in its "
                         f"defaults and hold an `experiment:` block; missing {missing}.")
    return {**raw["experiment"], "model": groups["model"], "data": groups["data"],
            "data_overrides": [f"data.{k}={v}" for k, v in raw.get("data", {}).items()],
            "training": {k: raw[k] for k in TRAINING_KEYS if k in raw},
            "layers": raw["layer"], "export_epoch": raw["export_epoch"]}


def plan(exp: dict, out_dir: str | Path) -> list[Stage]:
    """The stages of an experiment (`load_experiment`), in order. The training stages are
    `lsg-train experiment=<name>` with the plan's values written out after it (command-line values
    win, so a changed plan, e.g. a test's tiny sizes, still runs as planned).

    Raises:
        ValueError: the LSG layer the report reads is not among the swept layers, or an unknown stage.
    """
    out = Path(out_dir)
    model = [f"model={exp['model']}", *exp.get("model_overrides", [])]
    common = [*model, f"logger={exp['logger']}"]
    data = [f"data={exp['data']}", *exp.get("data_overrides", [])]
    experiment = f"experiment={exp['name']}"
    training = [f"{k}={v}" for k, v in exp["training"].items()]
    layers = exp["layers"]
    layers = _list([str(l) for l in layers]) if isinstance(layers, (list, tuple)) else layers
    sweep = out / "sweep"  # holds lsg-L<l>/ per swept layer (lsg.runs), read by summarize and stack
    one_layer = isinstance(exp["layers"], (list, tuple, int)) and len(parse_sweep_layers(exp["layers"], LAYER_BOUND)) == 1
    sweep_run = sweep / layer_dir_name("lsg", exp["lsg_layer"]) if one_layer else sweep
    stages = [
        Stage("calibrate", "calibrate", [*model, *data,
                                         f"n_samples={exp['calibrate']['n_samples']}", f"out_dir={out / 'calibrate'}",
                                         f"hydra.run.dir={out / 'hydra' / 'calibrate'}"],
              [str(out / "calibrate" / "sink-histograms.png")]),
        Stage("sweep", "train", [experiment, *common, *data, *training, f"layer={layers}", f"run_dir={sweep_run}",
                                 f'export_path="{out / "sweep-export"}/lsg-L{{layer}}.safetensors"',
                                 f"export_epoch={exp['export_epoch']}", f"hydra.run.dir={out / 'hydra' / 'sweep'}"],
              [str(gate_file(sweep / layer_dir_name("lsg", exp["lsg_layer"]), exp["export_epoch"]))]),
        Stage("summarize", "summarize", [f"sweep_dir={sweep}", f"out={out / 'summary'}", f"epoch={exp['export_epoch']}",
                                         f"logger={exp['logger']}", f"hydra.run.dir={out / 'hydra' / 'summarize'}"],
              [str(out / "summary" / "table1.md")]),
        Stage("stack", "stack", [*common, *data, f"candidates_dir={sweep}", f"epoch={exp['export_epoch']}",
                                 f"free={_list(exp['free'])}", f"max_size={exp['stack']['max_size']}",
                                 f"policies={_list(exp['stack']['policies'])}",
                                 *[f"{k}={v}" for k, v in exp["stack"].get("overrides", {}).items()],
                                 f"out_dir={out / 'stack'}", f"hydra.run.dir={out / 'hydra' / 'stack'}"],
              [str(out / "stack" / f"stack-{exp['stack']['policy']}.json")]),
    ]
    if exp["lora"]["enabled"]:
        lora = out / "lora" / f"{layer_dir_name('lora', exp['lsg_layer'])}.safetensors"
        stages.append(Stage("lora", "train", [experiment, *common, *data, *training, "gate=lora", f"layer={exp['lsg_layer']}",
                                              f"run_dir={out / 'lora' / 'run'}", f"export_path={lora}",
                                              f"export_epoch={exp['export_epoch']}",
                                              f"hydra.run.dir={out / 'hydra' / 'lora'}"], [str(lora)]))
    specs = gate_specs(exp, out)
    for bench in exp["benchmarks"]:
        name = bench["name"]
        stages.append(Stage(f"eval-{name}", "eval", [
            *common, f"benchmark={name}", *bench.get("overrides", []), f"gates={_list(list(specs.values()))}",
            f"out_dir={out / 'eval' / name}", f"hydra.run.dir={out / 'hydra' / f'eval-{name}'}"],
            [str(out / "eval" / name / "results.json")]))
    stages.append(Stage("report", None, [], [str(out / "report.md"), str(out / "report.png")]))
    unknown = [s for s in exp.get("skip", []) if s not in STAGES]
    if unknown:
        raise ValueError(f"experiment.skip={unknown}: stages are {', '.join(STAGES)}.")
    swept = exp["layers"]
    if not (isinstance(swept, str) and (swept == "all" or swept.startswith("every:"))):
        if exp["lsg_layer"] not in parse_sweep_layers(swept, LAYER_BOUND):
            raise ValueError(f"lsg_layer={exp['lsg_layer']} is not among the swept layers {swept}: the report's "
                             f"LSG row reads that layer's gate from the sweep.")
    skip = set(exp.get("skip", []))
    if "eval" in skip:
        skip.add("report")  # the report reads the evaluations
    return [s for s in stages if s.name.split("-")[0] not in skip]


def done_path(out_dir: Path, stage: Stage) -> Path:
    return Path(out_dir) / "stages" / f"{stage.name}.json"


def run_plan(stages: Sequence[Stage], exp: dict, out_dir: Path, log=print) -> dict[str, dict]:
    """Run every stage not yet done, in order; a failed stage stops the plan (what finished stays done).

    Returns:
        stage name -> {command, wall_s, skipped}.

    Raises:
        RuntimeError: a stage exited with an error or did not write what it promises.
    """
    out_dir = Path(out_dir)
    record = {}
    rerun = False  # once a stage runs, every later one runs too: it reads that stage's outputs
    for stage in stages:
        marker = done_path(out_dir, stage)
        earlier = json.loads(marker.read_text()) if marker.exists() else None
        if earlier is not None and not rerun and earlier.get("command") == stage.shell():
            record[stage.name] = {**earlier, "skipped": True}
            log(f"[{stage.name}] done before ({earlier['wall_s']:.0f} s); skipped")
            continue
        if earlier is not None:
            log(f"[{stage.name}] settings or an earlier stage changed: running it again")
        rerun = True
        log(f"[{stage.name}] {stage.shell()}")
        start = time.perf_counter()
        if stage.app is None:
            write_report(exp, out_dir, {**record, stage.name: {"wall_s": 0.0, "command": stage.shell()}})
        else:
            result = subprocess.run(stage.command(), cwd=Path.cwd())
            if result.returncode != 0:
                raise RuntimeError(f"Stage {stage.name} failed (exit {result.returncode}): {stage.shell()}. Fix it "
                                   f"and run the same command again: finished stages are skipped.")
        missing = [o for o in stage.outputs if not Path(o).exists()]
        if missing:
            raise RuntimeError(f"Stage {stage.name} finished without writing {missing}.")
        record[stage.name] = {"command": stage.shell(), "wall_s": time.perf_counter() - start, "skipped": False}
        write_json(marker, record[stage.name], indent=1)
    return record


def report_rows(exp: dict, out_dir: Path) -> list[dict]:
    """Per benchmark and method: our overall accuracy delta (points) with its paired CI and p, and
    the paper's reference delta when the experiment gives one."""
    out_dir, specs = Path(out_dir), gate_specs(exp, Path(out_dir))
    rows = []
    for bench in exp["benchmarks"]:
        results = json.loads((out_dir / "eval" / bench["name"] / "results.json").read_text())
        by_spec = {r["method"]: r for r in results["rows"]}
        base = by_spec["none"]["acc_pct"]["overall"]
        reference = exp.get("reference", {}).get(bench.get("reference_as", bench["name"]), {})
        for method, spec in specs.items():
            paired = by_spec[spec]["paired"]["overall"]
            rows.append({"benchmark": bench["name"], "method": method, "spec": spec, "baseline": base,
                         "accuracy": by_spec[spec]["acc_pct"]["overall"], **paired,
                         "paper": reference.get(method.split()[0]), "paper_baseline": reference.get("baseline"),
                         "paper_benchmark": bench.get("reference_as", bench["name"]) if reference else None})
    return rows


def write_report(exp: dict, out_dir: Path, record: dict) -> tuple[Path, Path]:
    """`report.md` and `report.png` under `out_dir` (and the rows as `report.json`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = report_rows(exp, out_dir)
    lines = [f"# {exp['title']}", "", exp.get("note", "").strip(), "",
             "Overall accuracy delta vs the unmodified backbone, in points, with its 95% paired bootstrap CI over "
             "the questions and McNemar's p; `*` = the CI excludes 0. Paper: docs/methods.md section 3 (LLaVA-1.5-7B).", "",
             "| benchmark | method | ours: accuracy | ours: delta [95% CI] | p | paper: delta (benchmark, baseline) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        baseline = f", {r['paper_baseline']:.2f}" if r["paper_baseline"] is not None else ""
        paper = f"{r['paper']:+.2f} ({r['paper_benchmark']}{baseline})" if r["paper"] is not None else "-"
        lines.append(f"| {r['benchmark']} | {r['method']} | {r['accuracy']:.1f} (baseline {r['baseline']:.1f}) | "
                     f"{cell(r)} | {r['p']:.2f} | {paper} |")
    lines += ["", "## Stages", "", "| stage | wall time | command |", "|---|---|---|"]
    total = 0.0
    for name, info in record.items():
        total += info.get("wall_s", 0.0)
        lines.append(f"| {name} | {info.get('wall_s', 0.0) / 60:.1f} min{' (earlier run)' if info.get('skipped') else ''}"
                     f" | `{info.get('command', '')}` |")
    lines += ["", f"Total wall time of the stages: {total / 60:.1f} min.", "",
              "Per-layer table and figures: [summary/table1.md](summary/table1.md), "
              "[summary/heatmap.png](summary/heatmap.png); stacking: [stack/table2.md](stack/table2.md); "
              "sinks: [calibrate/](calibrate/)."]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(exp["benchmarks"]), figsize=(5.5 * len(exp["benchmarks"]), 3.6), squeeze=False)
    for ax, bench in zip(axes[0], exp["benchmarks"]):
        mine = [r for r in rows if r["benchmark"] == bench["name"]]
        x = range(len(mine))
        ax.errorbar(x, [r["delta"] for r in mine], yerr=[[r["delta"] - r["ci_low"] for r in mine],
                                                         [r["ci_high"] - r["delta"] for r in mine]],
                    fmt="o", capsize=4, label=f"ours ({bench['name']})")
        paper = [(i, r["paper"]) for i, r in enumerate(mine) if r["paper"] is not None]
        if paper:
            ax.scatter([i for i, _ in paper], [v for _, v in paper], marker="x", color="C3", zorder=3,
                       label=f"paper ({mine[0]['paper_benchmark']}, LLaVA-1.5-7B)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(list(x), [r["method"] for r in mine], rotation=20, ha="right")
        ax.set_ylabel("delta vs baseline (points)")
        ax.set_title(bench["name"])
        ax.legend(fontsize=7)
    fig.suptitle(exp["title"], fontsize=9)
    fig.tight_layout()
    png = out_dir / "report.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    write_json(out_dir / "report.json", rows, indent=1)
    return md, png
