"""Joint comparison of gates and gate stacks on one evaluation split (SPEC section 6).

A gate spec is a string: `name[@layers][:arg]`, stacks joined by `+`.

    none                        the unmodified backbone
    var  vaf  spear  outro      training-free gates at their default layers for this depth
    vaf@8-13                    explicit layers ("8-13", "3,7,10" or "10")
    lsg:checkpoints/smol-llava/lsg-L10.safetensors     a trained gate (layer from its metadata)
    oracle@10:0.3               KeyScaleGate.oracle(alpha=0.3) at layer 10 (SPEC section 4)
    oracle@10:0.3/0.5/0.9       V-sink / L-sink / ordinary keys x 0.3 / 0.5 / 0.9 (3-group oracle)
    lsg:ckpt_a+lsg:ckpt_b+var@2-5                      a stack mixing trained and training-free gates
    stack:runs/stack/smol-llava/stack-keep-all.json    a stack manifest written by stack.py

Hyperparameters of a named gate come from `conf/gate/<name>.yaml`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import OmegaConf

from lsg import gates as gate_registry
from lsg.attach import attach
from lsg.backbones import Backbone
from lsg.data import VQARecord
from lsg.embedded import REPO_ROOT, sha256_of
from lsg.evaluation import (BOOTSTRAP_SAMPLES, CI_LEVEL, EvalResult, comparison_rows, delta_cell, evaluate_many,
                            images_and_questions)
from lsg.gates.base import Gate

GATE_CONF_DIR = REPO_ROOT / "conf" / "gate"


@dataclass
class GateStack:
    """A parsed spec: `{layer: [gates]}` plus what identifies it for caching."""

    spec: str
    layers: dict[int, list[Gate]]
    identity: dict


def parse_layers(text: str, num_layers: int) -> list[int]:
    """"10" -> [10]; "3-7" -> [3..7]; "3,7,10" -> [3, 7, 10]. Raises ValueError on bad syntax/range."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"Bad layer list {text!r}: use '10', '3-7' or '3,7,10'.") from None
    bad = [l for l in out if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"Layers {bad} are out of range for a backbone with {num_layers} decoder layers.")
    return out


def gate_config(name: str, backbone_cfg: dict) -> dict:
    """`conf/gate/<name>.yaml` resolved against the backbone's config (for `${model.*}`)."""
    path = GATE_CONF_DIR / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"Unknown gate {name!r}. Known gates: none, oracle, "
                         f"{', '.join(p.stem for p in sorted(GATE_CONF_DIR.glob('*.yaml')))}.")
    root = OmegaConf.create({"model": backbone_cfg, "gate": OmegaConf.load(path)})
    return OmegaConf.to_container(root.gate, resolve=True)


def oracle_gate(arg: str, grouping: str) -> Gate:
    """The oracle of a spec's argument (SPEC section 4): `0.3` = first group x 0.3, the rest
    x 0.7, in the backbone's grouping; `0.3/0.5/0.9` = one coefficient per group of the
    3-group split (V-sinks / L-sinks / ordinary, the paper's stage 2).

    Raises:
        ValueError: not a number, or a coefficient list that fits no grouping.
    """
    try:
        values = [float(x) for x in arg.split("/")]
    except ValueError:
        raise ValueError(f"Bad oracle argument {arg!r}: give alpha (0.3) or per-group coefficients (0.3/0.5/0.9).") from None
    if len(values) == 1:
        return gate_registry.KeyScaleGate.oracle(values[0], grouping)
    if len(values) == 3:
        return gate_registry.KeyScaleGate(values, "vsink-lsink-ordinary")
    return gate_registry.KeyScaleGate(values, grouping)


def parse_stack(spec: str, backbone: Backbone, backbone_cfg: dict, allow_layer_move: bool = False) -> GateStack:
    """Build the gates of one spec (see the module docstring).

    A trained gate runs at the layer it was trained at; `lsg@N:ckpt` at another layer is
    refused unless `allow_layer_move` (compare.py `allow_layer_move=true`).

    Raises:
        ValueError: unknown gate, bad layers, a checkpoint for another backbone or sink setup,
            a trained gate moved to another layer without `allow_layer_move`.
        FileNotFoundError: a checkpoint path that does not exist.
    """
    layers: dict[int, list[Gate]] = {}
    parts = []
    if spec.strip() == "none":
        return GateStack("none", {}, {"spec": "none"})
    elements = []
    for element in spec.split("+"):  # a stack manifest expands into its gates' specs
        if element.strip().startswith("stack:"):
            from lsg.stacking import manifest_specs

            elements += manifest_specs(Path(element.strip().split(":", 1)[1]), backbone)
        else:
            elements.append(element)
    for element in elements:
        head, _, arg = element.strip().partition(":")
        name, _, layer_text = head.partition("@")
        if name == "lsg":
            if not arg:
                raise ValueError(f"{element!r}: give the trained gate's checkpoint, e.g. lsg:checkpoints/"
                                 f"{backbone.name}/lsg-L10.safetensors")
            gate = Gate.load(arg, backbone=backbone.name, backbone_fingerprint=backbone.fingerprint,
                             sinks=backbone.sinks.to_dict())
            trained_at = gate.metadata["layer"]
            chosen = parse_layers(layer_text, backbone.num_layers) if layer_text else [trained_at]
            if chosen != [trained_at] and not allow_layer_move:
                raise ValueError(f"{element!r}: this gate was trained at layer {trained_at}; running it at {chosen} "
                                 f"moves it to layers it never saw. Drop '@{layer_text}', or pass "
                                 f"allow_layer_move=true to compare.py to do it on purpose.")
            ident = {"gate": "lsg", "checkpoint": sha256_of(Path(arg))[:16], "layers": chosen}
        elif name == "oracle":
            if not layer_text or not arg:
                raise ValueError(f"{element!r}: the oracle needs a layer and alpha, e.g. oracle@10:0.3")
            gate = oracle_gate(arg, backbone_cfg.get("lsg_grouping", "vsink-rest"))
            chosen = parse_layers(layer_text, backbone.num_layers)
            ident = {"gate": "keyscale", "config": gate.config(), "layers": chosen}
        else:
            cfg = gate_config(name, backbone_cfg)
            cfg.pop("name")
            default = cfg.pop("layers", "auto")
            if "num_layers" in cfg and cfg["num_layers"] is None:  # depth-scaled defaults (OutRo)
                cfg["num_layers"] = backbone.num_layers
            gate = gate_registry.get(name, **cfg)
            if layer_text:
                chosen = parse_layers(layer_text, backbone.num_layers)
            elif default == "auto" and hasattr(gate, "default_layers"):
                chosen = gate.default_layers(backbone.num_layers)
            elif default != "auto":
                chosen = parse_layers(str(default), backbone.num_layers)
            else:
                raise ValueError(f"{element!r}: gate {name!r} has no default layers; give them, e.g. {name}@10.")
            ident = {"gate": name, "config": gate.config(), "layers": chosen}
        for layer in chosen:
            layers.setdefault(layer, []).append(gate)
        parts.append(ident)
    return GateStack(spec, layers, {"spec": parts})


def cache_key(stack: GateStack, backbone: Backbone, records: Sequence[VQARecord], data_cfg: dict, split: str) -> str:
    """Key of one stack's cached answers: the stack (gate configs, checkpoint digests, layers),
    the backbone's weights (`Backbone.fingerprint`, never just its name), dtype and sinks, the
    data config, the split and the questions themselves (ids and answers), so a cache never
    serves another model's, another gate's or another split's answers."""
    questions = hashlib.sha256(json.dumps([(r.id, r.question, r.answer) for r in records]).encode()).hexdigest()
    blob = json.dumps({"stack": stack.identity, "backbone": backbone.name, "fingerprint": backbone.fingerprint,
                       "dtype": str(backbone.model.dtype), "sinks": backbone.sinks.to_dict(), "data": data_cfg,
                       "split": split, "questions": questions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_cached(records: Sequence[VQARecord], cache_dir: Path, key: str) -> EvalResult | None:
    """A stack's answers from `cache_dir/<key>.json`, or None if not cached."""
    path = Path(cache_dir) / f"{key}.json"
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    return EvalResult.from_predictions(records, d["predictions"], d["elapsed_s"])


def write_cached(result: EvalResult, spec: str, cache_dir: Path, key: str) -> None:
    """Store a stack's answers under `cache_dir/<key>.json` (atomically)."""
    path = Path(cache_dir) / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**result.as_dict(), "predictions": result.predictions, "spec": spec}))
    tmp.replace(path)


def cached_evaluate_many(stacks: Sequence[GateStack], backbone: Backbone, records: Sequence[VQARecord],
                         cache_dir: Path, keys: Sequence[str], batch_size: int,
                         progress: str | None = "evaluating") -> tuple[dict[str, EvalResult], set[str]]:
    """Answers of every stack: cached ones read from `cache_dir`, the others computed together
    in one pass with prefix reuse (`lsg.evaluation.evaluate_many`) and cached.

    Returns:
        (spec -> result, the specs that were read from the cache).
    """
    results, hits = {}, set()
    todo = {}
    for stack, key in zip(stacks, keys):
        cached = read_cached(records, cache_dir, key)
        if cached is not None:
            results[stack.spec] = cached
            hits.add(stack.spec)
        else:
            todo[stack.spec] = (stack, key)
    if todo:
        fresh = evaluate_many(backbone, records, {spec: st.layers for spec, (st, _) in todo.items()}, batch_size,
                              progress=f"{progress} ({len(todo)} in one pass)" if progress else None)
        for spec, (stack, key) in todo.items():
            write_cached(fresh[spec], spec, cache_dir, key)
            results[spec] = fresh[spec]
    return results, hits


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously), so wall-clock timings
    measure the work, not its launch; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(backbone: Backbone, batches: Sequence[dict], stack: GateStack | None, repeats: int = 1) -> float:
    """Seconds per prefill forward over `batches` (mean of `repeats` passes, after one warm-up)."""
    from contextlib import nullcontext

    with attach(backbone, stack.layers) if stack and stack.layers else nullcontext():
        backbone.family.multimodal_model(backbone.model)(**batches[0])  # warm-up on the path that is timed
        synchronize(backbone.device)
        start = time.perf_counter()
        for _ in range(repeats):
            for batch in batches:
                backbone.family.multimodal_model(backbone.model)(**batch)
        synchronize(backbone.device)
        return (time.perf_counter() - start) / (repeats * len(batches))


def columns(rows: list[dict]) -> list[str]:
    """Every key of the rows, in first-seen order (gated rows add CI and p columns)."""
    return list(dict.fromkeys(k for r in rows for k in r))


def write_table(rows: list[dict], tasks: list[str], out_dir: Path) -> tuple[Path, Path]:
    """Write `comparison.csv` and `comparison.md` (accuracy %, paired delta in points with its
    bootstrap CI, `*` where the CI excludes zero; the CSV also holds McNemar p per cell)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "comparison.csv", out_dir / "comparison.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)
    cols = tasks + ["overall"]
    lines = ["| gate | " + " | ".join(cols) + " | wall s | overhead x |", "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        cells = [delta_cell(r, t) for t in cols]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['elapsed_s']:.1f} | {r['overhead']:.2f} |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_deltas(rows: list[dict], tasks: list[str], path: Path) -> Path | None:
    """Heatmap of accuracy delta (points) vs baseline: gates x sub-tasks. None (and no file)
    when there is no gated row, e.g. `gates=[none]`."""
    if not any(r["method"] != "baseline" for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = tasks + ["overall"]
    gated = [r for r in rows if r["method"] != "baseline"]
    data = [[r[f"{t}_delta"] for t in cols] for r in gated]
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 3, 0.5 * len(gated) + 1.8))
    vmax = max(1.0, max((abs(v) for row in data for v in row), default=1.0))
    im = ax.imshow(data, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(gated)), [r["method"] if len(r["method"]) < 40 else r["method"][:37] + "..."
                                      for r in gated])
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy delta vs baseline (points)")
    ax.set_title("Gate effect per sub-task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(backbone: Backbone, backbone_cfg: dict, specs: Sequence[str], records: Sequence[VQARecord],
            data_cfg: dict, split: str, out_dir: Path, batch_size: int = 32, timing_batches: int = 4,
            timing_repeats: int = 2, allow_layer_move: bool = False, bootstrap_samples: int = BOOTSTRAP_SAMPLES,
            ci_level: float = CI_LEVEL) -> tuple[list[dict], list[str]]:
    """Evaluate every spec on the same records; returns table rows and sub-task names.

    Stacks not yet cached are evaluated together in one pass that computes the frozen
    prefix once per batch (`lsg.evaluation.evaluate_many`); each stack's answers are cached
    per (stack, split) under `out_dir/cache`, so a re-run reuses them.
    Overhead is measured in this run: prefill time per batch with the stack / without.
    """
    from lsg.evaluation import mc_records

    records = mc_records(records)
    stacks = [parse_stack(s, backbone, backbone_cfg, allow_layer_move) for s in specs]
    if not any(s.spec == "none" for s in stacks):
        stacks.insert(0, GateStack("none", {}, {"spec": "none"}))
    stacks.sort(key=lambda s: s.spec != "none")  # the baseline row first
    keys = [cache_key(stack, backbone, records, data_cfg, split) for stack in stacks]
    results, hits = cached_evaluate_many(stacks, backbone, records, out_dir / "cache", keys, batch_size)
    results = {stack.spec: results[stack.spec] for stack in stacks}  # table rows in the order asked
    for stack in stacks:
        res = results[stack.spec]
        print(f"{stack.spec}: overall {100 * res.overall:.1f}%"
              f" ({'cached' if stack.spec in hits else f'{res.elapsed_s:.1f} s'})", flush=True)
    timing = [backbone.on_device(backbone.build_batch(*images_and_questions(records[i * batch_size:(i + 1) * batch_size])))
              for i in range(min(timing_batches, max(1, len(records) // batch_size)))]
    base_s = time_forward(backbone, timing, None, timing_repeats)
    baseline = results.pop("none")
    rows = comparison_rows(baseline, results, bootstrap_samples, ci_level)
    for row, stack in zip(rows, stacks):
        row["overhead"] = 1.0 if stack.spec == "none" else time_forward(backbone, timing, stack, timing_repeats) / base_s
        row["prefill_ms_per_batch"] = 1000 * base_s * row["overhead"]
    return rows, sorted(baseline.counts)
