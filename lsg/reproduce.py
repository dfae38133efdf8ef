"""The paper's workflow as one resumable plan: calibrate -> sweep -> summarize -> stack -> LoRA ->
ablations -> eval -> report (issues 19 and 25; docs/methods.md sections 3, 6, 7).

A plan is a list of `Stage`s, each one command of this project (`python -m lsg.cli.<app> ...`)
with its overrides, composed from an experiment config (`conf/experiment/*.yaml`). A stage
that finished leaves `<out_dir>/stages/<name>.json` (its command, exit status and wall time) and
is skipped when the plan runs again; an interrupted stage resumes through its own command's
resume (training from its last optimizer step, evaluations from the answer store).

The report puts our paired deltas (with their 95% CIs) beside the paper's reference numbers
(`reference:` in the experiment; docs/methods.md section 3 for LLaVA-1.5-7B), and the paper's
Table S5 ablations (Appendix D.2: gate signal, token grouping, joint vs separate training) beside
theirs (`ablations:` in the experiment; `ablation_variants`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lsg.context import GROUPINGS
from lsg.files import write_json
from lsg.gates.lsg import SIGNALS
from lsg.runs import gate_file, layer_dir_name
from lsg.specs import parse_sweep_layers
from lsg.stats import cell, paired_delta

STAGES = ("calibrate", "sweep", "summarize", "stack", "lora", "ablation", "eval", "report")
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


# --- Table S5: ablations (LSG paper Appendix D.2; docs/methods.md section 3) -------------------------

ABLATION_KEYS = {  # the experiment's `ablations:` block; an absent key runs nothing on that axis
    "signals": "gate signals (`gate.signal`) trained at lsg_layer: a list of " + ", ".join(SIGNALS),
    "groupings": "token groupings (`gate.grouping`) trained at lsg_layer: `auto` (every grouping whose sinks "
                 "the backbone has) or a list of " + ", ".join(GROUPINGS),
    "joint_layers": "layers whose gates are trained together (`lsg-train layer=[..] joint=true`) and compared "
                    "with the sweep's separately trained gates of the same layers, stacked; null = none",
}
SINK_KINDS = {"vsink": ("has_vsinks", "V-sinks", "model.sinks.vit_dims and model.sinks.tau_vit"),
              "lsink": ("has_llm_sinks", "L-sinks", "model.sinks.llm_dims and model.sinks.tau_llm")}


@dataclass
class Variant:
    """One row of the report's Table S5 (LSG paper Appendix D.2).

    Attributes:
        axis: "signal", "grouping" or "joint".
        value: a `gate.signal`, a grouping (`lsg.context.GROUPINGS`), or "separate" / "joint" (the
            joint axis: the sweep's gates of the same layers stacked / those gates trained together).
            The paper's number for the row is `reference.<benchmark>.<axis>-<value>`.
        label: the row's text in the report.
        spec: the gate spec the eval stage scores; None when the variant is not run (`note` says why).
        stage: the training stage that makes it; None when it reuses the sweep's gates or is not run.
        versus: (label, spec) of what it is also paired against besides the baseline: the default gate
            (signals, groupings) or the separately trained stack (joint); None for the defaults.
        note: why it is not run, or which earlier gate it reuses.
    """

    axis: str
    value: str
    label: str
    spec: str | None
    stage: Stage | None = None
    versus: tuple[str, str] | None = None
    note: str = ""


def backbone_sinks(exp: dict):
    """The `lsg.sinks.SinkConfig` of the experiment's model config (`conf/model/<model>.yaml` under
    its `model_overrides`), read without loading the backbone."""
    from omegaconf import OmegaConf

    from lsg.configs import load_config
    from lsg.sinks import SinkConfig

    cfg = OmegaConf.merge(OmegaConf.create(load_config("model", exp["model"])), OmegaConf.from_dotlist(
        [o.removeprefix("model.") for o in exp.get("model_overrides", []) if o.startswith("model.")]))
    return SinkConfig(**OmegaConf.to_container(cfg.sinks, resolve=True))


def _swept(exp: dict, layer: int) -> bool:
    swept = exp["layers"]
    if isinstance(swept, str) and swept == "all":
        return True
    if isinstance(swept, str) and swept.startswith("every:"):
        return layer % int(swept.split(":", 1)[1]) == 0
    return layer in parse_sweep_layers(swept, LAYER_BOUND)


def _names(cfg: dict, key: str, known: Sequence[str]) -> list[str]:
    values = cfg.get(key) or []
    values = [values] if isinstance(values, str) else list(values)
    bad = [v for v in values if v not in known]
    if bad:
        raise ValueError(f"experiment.ablations.{key}: unknown {bad}; allowed: {', '.join(known)}.")
    return list(dict.fromkeys(values))


def ablation_variants(exp: dict, out_dir: str | Path) -> list[Variant]:
    """The rows of Table S5 the experiment's `ablations:` block asks for (`ABLATION_KEYS`), in order:
    signals, groupings, joint. Signals and groupings are trained at `lsg_layer` as one-layer
    `lsg-train experiment=<name> ... gate.signal=<s>` (`gate.grouping=<g>`) runs on the experiment's
    data and settings; the variant equal to the sweep's gate (conf/gate/lsg.yaml: `signal: last`,
    `grouping: auto`, resolved as `Backbone.default_grouping` does: vsink-rest with V-sinks, else
    lsink-rest) is not trained again: its row is the sweep's gate at `lsg_layer`. Under `groupings:
    auto`, a grouping whose sinks the backbone lacks (smol-llava has no V-sinks) is a row marked not
    run, saying why. The joint axis compares, on the same `joint_layers`, the sweep's separately
    trained gates stacked (as the greedy stack combines gates) with one `joint=true` run of those
    layers (fixed in the config, not taken from the greedy stack, whose choice may hold one LSG
    layer or a free gate: on smol_paper it chose VAR + L10).

    Returns:
        [] when there is no `ablations:` block or the `ablation` stages are skipped.

    Raises:
        ValueError: an unknown key, signal or grouping (the message lists the allowed ones); a
            grouping the backbone has no sinks for, asked for by name; `joint_layers` with fewer than
            two distinct layers or a layer the sweep does not train.
    """
    cfg, skip, out = exp.get("ablations"), set(exp.get("skip", [])), Path(out_dir)
    if not cfg or "ablation" in skip:
        return []
    unknown = sorted(set(cfg) - set(ABLATION_KEYS))
    if unknown:
        raise ValueError(f"experiment.ablations: unknown keys {unknown}; allowed: {', '.join(ABLATION_KEYS)}.")
    layer, epoch, gate = exp["lsg_layer"], exp["export_epoch"], exp["gate"]
    _, _, _, train = _command_parts(exp)
    default = None if "sweep" in skip else (
        f"LSG L{layer}", f"ckpt:{gate_file(out / 'sweep' / layer_dir_name('lsg', layer), epoch)}")
    sweep_note = "not run: the sweep stage is skipped" if default is None else f"= the sweep's LSG L{layer}"

    def trained(axis: str, value: str, override: str) -> Variant:
        name, folder = f"ablation-{axis}-{value}", out / "ablation" / f"{axis}-{value}"
        export = folder / f"{layer_dir_name('lsg', layer)}.safetensors"
        stage = Stage(name, "train", [*train, f"layer={layer}", override, f"run_dir={folder / 'run'}",
                                      f"export_path={export}", f"export_epoch={epoch}",
                                      f"hydra.run.dir={out / 'hydra' / name}"], [str(export)])
        return Variant(axis, value, f"{value} (L{layer})", f"ckpt:{export}", stage, default)

    variants = []
    for signal in _names(cfg, "signals", SIGNALS):
        if signal == gate["signal"]:
            variants.append(Variant("signal", signal, f"{signal} (L{layer}, default)",
                                    default and default[1], note=sweep_note))
        else:
            variants.append(trained("signal", signal, f"gate.signal={signal}"))

    sinks = backbone_sinks(exp)
    missing = {g: [kind for kind in GROUPINGS[g] if kind in SINK_KINDS and not getattr(sinks, SINK_KINDS[kind][0])]
               for g in GROUPINGS}
    own = gate["grouping"] if gate["grouping"] != "auto" else ("vsink-rest" if sinks.has_vsinks else "lsink-rest")
    auto = cfg.get("groupings") == "auto"
    for grouping in (list(GROUPINGS) if auto else _names(cfg, "groupings", GROUPINGS)):
        lacks = " and ".join(SINK_KINDS[k][1] for k in missing[grouping])
        where = " and ".join(SINK_KINDS[k][2] for k in missing[grouping])
        if missing[grouping] and not auto:
            raise ValueError(f"experiment.ablations.groupings: {grouping} needs {lacks}, which model={exp['model']} "
                             f"does not have ({where} unset); use groupings: auto or one of "
                             f"{', '.join(g for g in GROUPINGS if not missing[g])}.")
        if missing[grouping]:
            variants.append(Variant("grouping", grouping, grouping, None,
                                    note=f"not run: {exp['model']} has no {lacks} ({where} unset in "
                                         f"conf/model/{exp['model']}.yaml)"))
        elif grouping == own:
            variants.append(Variant("grouping", grouping, f"{grouping} (L{layer}, default)", default and default[1],
                                    note=sweep_note))
        else:
            variants.append(trained("grouping", grouping, f"gate.grouping={grouping}"))

    joint_layers = cfg.get("joint_layers")
    if joint_layers is not None:
        layers = sorted({int(l) for l in ([joint_layers] if isinstance(joint_layers, (int, str)) else joint_layers)})
        if len(layers) < 2:
            raise ValueError(f"experiment.ablations.joint_layers={joint_layers}: joint training needs at least two "
                             f"distinct layers (one layer is the ordinary run); e.g. the swept layers.")
        unswept = [l for l in layers if not _swept(exp, l)]
        if unswept:
            raise ValueError(f"experiment.ablations.joint_layers: {unswept} not among the swept layers "
                             f"{exp['layers']}: the separately trained side of the comparison is the sweep's gates.")
        tag = "+".join(f"L{l}" for l in layers)
        separate = None if "sweep" in skip else "+".join(
            f"ckpt:{gate_file(out / 'sweep' / layer_dir_name('lsg', l), epoch)}" for l in layers)
        variants.append(Variant("joint", "separate", f"{tag} trained alone, stacked", separate,
                                note="the sweep's gates" if separate else "not run: the sweep stage is skipped"))
        folder, name = out / "ablation" / "joint", "ablation-joint"
        manifest = folder / "stack.json"
        stage = Stage(name, "train", [*train, f"layer={_list([str(l) for l in layers])}", "joint=true",
                                      f"run_dir={folder / 'run'}", f"stack_export_path={manifest}",
                                      f"export_epoch={epoch}", f"hydra.run.dir={out / 'hydra' / name}"],
                      [str(manifest)])
        variants.append(Variant("joint", "joint", f"{tag} trained together (joint)", f"stack:{manifest}", stage,
                                separate and ("trained alone", separate)))
    return variants


def eval_specs(exp: dict, out: Path) -> list[str]:
    """The gate specs the eval stage scores: the report's methods (`gate_specs`), then the ablation
    variants not among them (`ablation_variants`), each once."""
    return list(dict.fromkeys([*gate_specs(exp, out).values(),
                               *[v.spec for v in ablation_variants(exp, out) if v.spec is not None]]))


TRAINING_KEYS = ("epochs", "batch_size", "effective_batch_size", "lr")  # global settings every training stage gets


def load_experiment(name: str) -> dict:
    """The plan's view of `conf/experiment/<name>.yaml`, a file of global overrides (`python train.py
    experiment=<name>` trains with them): its `experiment:` block, plus `model` and `data` (the
    groups its defaults choose), `data_overrides` (its `data:` values as `data.<key>=<value>`),
    `training` (`TRAINING_KEYS` it sets), `layers` (its `layer`), `export_epoch` and `gate` (the LSG
    gate the sweep trains: conf/gate/lsg.yaml under the experiment's `gate:` values; the ablations'
    defaults are read from it).

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
            "layers": raw["layer"], "export_epoch": raw["export_epoch"],
            "gate": {**load_config("gate", "lsg"), **raw.get("gate", {})}}


def _command_parts(exp: dict) -> tuple[list[str], list[str], list[str], list[str]]:
    """The overrides every stage shares: (model, model + logger, data, a training stage's head:
    `experiment=<name>` + model + logger + data + the experiment's training settings)."""
    model = [f"model={exp['model']}", *exp.get("model_overrides", [])]
    common = [*model, f"logger={exp['logger']}"]
    data = [f"data={exp['data']}", *exp.get("data_overrides", [])]
    training = [f"{k}={v}" for k, v in exp["training"].items()]
    return model, common, data, [f"experiment={exp['name']}", *common, *data, *training]


def plan(exp: dict, out_dir: str | Path) -> list[Stage]:
    """The stages of an experiment (`load_experiment`), in order. The training stages are
    `lsg-train experiment=<name>` with the plan's values written out after it (command-line values
    win, so a changed plan, e.g. a test's tiny sizes, still runs as planned).

    Raises:
        ValueError: the LSG layer the report reads is not among the swept layers, an unknown stage, or
            a bad `ablations:` block (`ablation_variants`).
    """
    out = Path(out_dir)
    model, common, data, train = _command_parts(exp)
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
        Stage("sweep", "train", [*train, f"layer={layers}", f"run_dir={sweep_run}",
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
        stages.append(Stage("lora", "train", [*train, "gate=lora", f"layer={exp['lsg_layer']}",
                                              f"run_dir={out / 'lora' / 'run'}", f"export_path={lora}",
                                              f"export_epoch={exp['export_epoch']}",
                                              f"hydra.run.dir={out / 'hydra' / 'lora'}"], [str(lora)]))
    stages += [v.stage for v in ablation_variants(exp, out) if v.stage is not None]
    specs = eval_specs(exp, out)
    for bench in exp["benchmarks"]:
        name = bench["name"]
        stages.append(Stage(f"eval-{name}", "eval", [
            *common, f"benchmark={name}", *bench.get("overrides", []), f"gates={_list(specs)}",
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


def ablation_rows(exp: dict, out_dir: Path) -> list[dict]:
    """Table S5's rows per benchmark and ablation variant (`ablation_variants`), from the eval stage's
    `results.json`: accuracy, the delta vs the baseline with its paired CI and p (the eval stage's,
    as in the main table), the delta vs `versus` (the default gate, or the separately trained stack)
    with its paired CI and p computed here from the stored per-question answers (`lsg.stats.
    paired_delta`, conf/stats/paired.yaml's samples and level), and the paper's number
    (`reference.<benchmark>.<axis>-<value>`: points vs the baseline, or a sentence where the paper
    gives none). Deltas in accuracy points; a variant not run has its `note` and no numbers."""
    from lsg.configs import load_config

    stats = load_config("stats", "paired")
    out_dir, rows = Path(out_dir), []
    variants = ablation_variants(exp, out_dir)
    for bench in exp["benchmarks"] if variants else []:
        results = json.loads((out_dir / "eval" / bench["name"] / "results.json").read_text())
        by_spec = {r["method"]: r for r in results["rows"]}
        correct = lambda spec: [item[f"{spec}|correct"] >= 0.5 for item in results["items"]]  # noqa: E731
        paper_bench = bench.get("reference_as", bench["name"])
        reference = exp.get("reference", {}).get(paper_bench, {})
        for v in variants:
            row = {"benchmark": bench["name"], "axis": v.axis, "variant": v.value, "label": v.label, "spec": v.spec,
                   "note": v.note, "paper": reference.get(f"{v.axis}-{v.value}"),
                   "paper_benchmark": paper_bench if reference else None, "versus": v.versus and v.versus[0]}
            if v.spec is not None:
                row.update(accuracy=by_spec[v.spec]["acc_pct"]["overall"], baseline=by_spec["none"]["acc_pct"]["overall"],
                           **by_spec[v.spec]["paired"]["overall"])
            if v.spec is not None and v.versus is not None:
                d, lo, hi, p = paired_delta(correct(v.versus[1]), correct(v.spec), stats["bootstrap_samples"],
                                            stats["ci_level"])
                row["vs"] = {"delta": d, "ci_low": lo, "ci_high": hi, "p": p, "significant": lo > 0 or hi < 0}
            rows.append(row)
    return rows


def ablation_lines(exp: dict, rows: list[dict]) -> list[str]:
    """The report's "Table S5: ablations" section (markdown lines); [] without ablation rows."""
    if not rows:
        return []
    joint = next((r["label"].split()[0] for r in rows if r["axis"] == "joint"), None)
    lines = ["", "## Table S5: ablations", "",
             f"LSG paper Appendix D.2 (docs/methods.md section 3): the gate's signal and token grouping at "
             f"L{exp['lsg_layer']}" + (f", and the gates of {joint} trained together vs alone" if joint else "")
             + ". Each trained as the sweep's gate was (same data, settings and seed), scored on the same "
               "questions as above. Delta vs the baseline with its 95% paired bootstrap CI and McNemar's p; "
               "`vs`: the paired delta against the default gate (signal, grouping) or the gates trained alone "
               "(joint), with its CI; `*` = the CI excludes 0. The paper's numbers are LLaVA-1.5-7B vs its "
               "baseline, from a summary of its Table S5 (docs/methods.md section 3).", "",
             "| benchmark | ablation | variant | ours: accuracy | ours: delta [95% CI] | p | ours: vs [95% CI] | "
             "paper: delta (benchmark) |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        paper = r["paper"]
        paper = "-" if paper is None else (f"{paper:+.2f} ({r['paper_benchmark']})" if isinstance(paper, (int, float))
                                           else f"{paper} ({r['paper_benchmark']})")
        if "delta" not in r:
            lines.append(f"| {r['benchmark']} | {r['axis']} | {r['label']} | {r['note']} | - | - | - | {paper} |")
            notes.append(f"{r['axis']} {r['variant']}: {r['note']}.")
            continue
        vs = f"{cell(r['vs'])} vs {r['versus']}" if "vs" in r else (r["note"] or "-")
        lines.append(f"| {r['benchmark']} | {r['axis']} | {r['label']} | {r['accuracy']:.1f} (baseline "
                     f"{r['baseline']:.1f}) | {cell(r)} | {r['p']:.2f} | {vs} | {paper} |")
    if notes:
        lines += ["", "Not run: " + " ".join(dict.fromkeys(notes))]
    return lines


def write_report(exp: dict, out_dir: Path, record: dict) -> tuple[Path, Path]:
    """`report.md` and `report.png` under `out_dir` (and the rows as `report.json`; Table S5's as
    `ablations.json`). The chart has one panel per benchmark, and a second row of panels for the
    ablations when the experiment runs them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows, ablations = report_rows(exp, out_dir), ablation_rows(exp, out_dir)
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
    lines += ablation_lines(exp, ablations)
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
    n_rows, n_bench = 2 if ablations else 1, len(exp["benchmarks"])
    fig, axes = plt.subplots(n_rows, n_bench, figsize=(5.5 * n_bench, 3.6 * n_rows), squeeze=False)
    for i, bench in enumerate(exp["benchmarks"]):
        _plot_deltas(axes[0][i], [r for r in rows if r["benchmark"] == bench["name"]], "method", bench["name"])
        if ablations:
            _plot_deltas(axes[1][i], [r for r in ablations if r["benchmark"] == bench["name"] and "delta" in r],
                         "label", f"{bench['name']}: Table S5 ablations")
    fig.suptitle(exp["title"], fontsize=9)
    fig.tight_layout()
    png = out_dir / "report.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    write_json(out_dir / "report.json", rows, indent=1)
    write_json(out_dir / "ablations.json", ablations, indent=1)
    return md, png


def _plot_deltas(ax, rows: list[dict], name_key: str, title: str) -> None:
    """Our deltas with their CIs (points) per row, the paper's numeric ones as crosses."""
    x = range(len(rows))
    ax.errorbar(x, [r["delta"] for r in rows], yerr=[[r["delta"] - r["ci_low"] for r in rows],
                                                     [r["ci_high"] - r["delta"] for r in rows]],
                fmt="o", capsize=4, label="ours")
    paper = [(i, r["paper"]) for i, r in enumerate(rows) if isinstance(r["paper"], (int, float))]
    if paper:
        ax.scatter([i for i, _ in paper], [v for _, v in paper], marker="x", color="C3", zorder=3,
                   label=f"paper ({rows[0]['paper_benchmark']}, LLaVA-1.5-7B)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(list(x), [r[name_key] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("delta vs baseline (points)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
