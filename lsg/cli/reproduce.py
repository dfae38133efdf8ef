"""Reproduce the paper's workflow in one command, resumable per stage (lsg.reproduce).

    lsg-reproduce experiment=smol_paper                 # offline, the embedded backbone, small sizes
    lsg-reproduce experiment=lsg_paper dry_run=true     # print the paper's plan (GPUs and the hub to run it)

Writes `<out_dir>/report.md` and `report.png` (our paired deltas with CIs beside the paper's reference
numbers, and a "Table S5: ablations" section when the experiment has an `ablations:` block) and logs
them to W&B; every stage's own outputs stay under `<out_dir>`. `experiment.skip=[ablation]` drops the
ablations.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsg.cli.common import log_results, plain
from lsg.reproduce import ablation_rows, ablation_variants, load_experiment, plan, report_rows, run_plan


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="reproduce")
def main(cfg: DictConfig) -> dict:
    exp = {**load_experiment(cfg.experiment.name), **plain(cfg.experiment)}  # command-line experiment.* win
    out_dir = Path(cfg.out_dir)
    stages = plan(exp, out_dir)
    print(f"Plan of {exp['name']} ({len(stages)} stages, outputs under {out_dir}):")
    for i, stage in enumerate(stages, 1):
        print(f"  {i}. {stage.name}: {stage.shell()}")
    variants = ablation_variants(exp, out_dir)
    if variants:
        print("Table S5 ablations (LSG paper Appendix D.2), scored by the eval stage:")
        for v in variants:
            print(f"  {v.axis} {v.value}: " + (f"stage {v.stage.name}" if v.stage else v.note))
    if cfg.dry_run:
        return {"plan": [{"name": s.name, "command": s.shell()} for s in stages]}
    record = run_plan(stages, exp, out_dir)
    if not any(s.name == "report" for s in stages):
        return {"stages": record}
    print((out_dir / "report.md").read_text())
    rows = report_rows(exp, out_dir)
    ablations = ablation_rows(exp, out_dir)
    cols = ["benchmark", "method", "accuracy", "delta", "ci_low", "ci_high", "p", "paper"]
    s5 = ["benchmark", "axis", "variant", "accuracy", "delta", "ci_low", "ci_high", "p", "versus", "paper", "note"]
    tables = {"report": (cols, [[r.get(c) for c in cols] for r in rows])}
    if ablations:  # the paper's entry may be a sentence: W&B columns hold one type, so all as text
        tables["ablations"] = (s5, [[str(r.get(c)) if c == "paper" else r.get(c) for c in s5] for r in ablations])
    log_results(cfg_for_logging(cfg, exp), f"reproduce-{exp['name']}", tables, {"report_chart": out_dir / "report.png"})
    return {"stages": record, "rows": rows, "ablations": ablations}


def cfg_for_logging(cfg: DictConfig, exp: dict) -> DictConfig:
    """The app's config with the experiment's logger group, for `log_results`."""
    from omegaconf import OmegaConf

    from lsg.configs import load_config

    return OmegaConf.create({**plain(cfg), "logger": load_config("logger", exp["logger"])})


if __name__ == "__main__":
    main()
