"""Greedy stacking of single-layer gates, chosen on one split, reported on another (Table 2).

    lsg-stack candidates_dir=runs/smol-llava/lsg-Lall free=[var,vaf,spear] max_size=4
    lsg-eval benchmark.split=test 'gates=[stack:runs/stack/smol-llava/stack-keep-all.json]' 

Writes table2.md, table2.png, steps.json and one manifest per policy (stack-<policy>.json)
under `out_dir`, logs them to W&B.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsg.benchmarks.base import DataSplit
from lsg.files import write_json
from lsg.evaluation import Result, answer_stacks
from lsg.cli.common import load_backbone_of, log_results, plain
from lsg.specs import manifest, manifest_specs, parse_stack, write_manifest
from lsg.stacking import Candidate, answers_beside, greedy, plot_table2, sweep_candidates, table2_markdown
from lsg.stats import paired_by_subtask


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="stack")
def main(cfg: DictConfig) -> list[dict]:
    backbone = load_backbone_of(cfg, device=cfg.device)
    data_cfg = plain(cfg.data)
    out_dir = Path(cfg.out_dir)
    if cfg.selection_split == cfg.heldout_split:
        raise ValueError(f"selection_split and heldout_split are both {cfg.selection_split!r}: choosing layers and "
                         f"reporting on the same questions overstates gains. Report on another split (e.g. test).")
    splits = {"selection": DataSplit(data_cfg, cfg.selection_split, cfg.selection_questions),
              "heldout": DataSplit(data_cfg, cfg.heldout_split, cfg.heldout_questions)}
    items = {which: split.load() for which, split in splits.items()}

    def run(which: str, specs: dict[str, str]) -> dict[str, Result]:
        stacks = [parse_stack(s, backbone, allow_layer_move=cfg.allow_layer_move) for s in specs.values()]
        results = answer_stacks(backbone, splits[which], stacks, items[which], out_dir / "cache", cfg.batch_size,
                                progress=f"{which} ({splits[which].split})")
        return {name: results[st.spec] for name, st in zip(specs, stacks)}

    base = manifest_specs(Path(cfg.base), backbone) if cfg.base else []
    candidates = (sweep_candidates(Path(cfg.candidates_dir), cfg.epoch, cfg.candidates_gate) if cfg.candidates_dir else [])
    candidates += [Candidate(s) for s in cfg.free]
    if not candidates:
        raise ValueError("No candidate: give candidates_dir=<sweep dir> and/or free=[var,vaf,...].")
    for c in candidates:  # a candidate from another backbone or sink setup is refused here, before any evaluation
        parse_stack(c.spec, backbone, allow_layer_move=cfg.allow_layer_move)
    sel_records = items["selection"]
    known = {c.spec: answers_beside(c.checkpoint, splits["selection"], sel_records, c.spec)
             for c in candidates if c.checkpoint and not base}
    todo = {"none": "none", **{c.spec: "+".join(base + [c.spec]) for c in candidates if known.get(c.spec) is None}}
    singles = {**{k: v for k, v in known.items() if v is not None}, **run("selection", todo)}
    baseline = singles.pop("none")
    for c in candidates:
        c.gain = paired_by_subtask(baseline.correct, singles[c.spec].correct, baseline.subtasks,
                                   cfg.bootstrap_samples, cfg.ci_level)["overall"]["delta"]
    print("Single-candidate gains on the selection split (points): "
          + ", ".join(f"{c.spec}: {c.gain:+.1f}" for c in sorted(candidates, key=lambda c: -c.gain)))
    steps = greedy(candidates, lambda specs: run("selection", {k: "+".join(v) for k, v in specs.items()}), baseline,
                   cfg.max_size, list(cfg.policies), cfg.bootstrap_samples, cfg.ci_level, base)
    held = run("heldout", {"none": "none", **{s.spec: s.spec for s in steps}})
    held_base = held.pop("none")
    for s in steps:
        s.heldout = paired_by_subtask(held_base.correct, held[s.spec].correct, held_base.subtasks,
                                      cfg.bootstrap_samples, cfg.ci_level)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = table2_markdown(steps, len(sel_records), len(items["heldout"]))
    (out_dir / "table2.md").write_text(md)
    write_json(out_dir / "steps.json", [asdict(s) | {"spec": s.spec} for s in steps], indent=1)
    chart = plot_table2(steps, out_dir / "table2.png")
    for policy in cfg.policies:
        final = [s for s in steps if s.policy == policy][-1]
        write_manifest(out_dir / f"stack-{policy}.json",
                       manifest(final.specs, backbone, policy=policy, selection_split=cfg.selection_split,
                                heldout_split=cfg.heldout_split, selection=final.selection["overall"],
                                heldout=final.heldout["overall"]))
    print(md)
    print(f"Wrote {out_dir / 'table2.md'}, {chart} and stack-<policy>.json manifests under {out_dir}")
    cols = ["policy", "size", "added", "kept", "selection_delta", "heldout_delta", "heldout_ci_low", "heldout_ci_high",
            "heldout_p"]
    log_results(cfg, f"stack-{backbone.name}", {"table2": (cols, [
        [s.policy, s.size, s.added, s.kept, s.selection["overall"]["delta"], s.heldout["overall"]["delta"],
         s.heldout["overall"]["ci_low"], s.heldout["overall"]["ci_high"], s.heldout["overall"]["p"]] for s in steps])},
        {"table2_chart": chart})
    return [asdict(s) for s in steps]


if __name__ == "__main__":
    main()
