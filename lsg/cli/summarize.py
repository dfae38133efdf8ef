"""Summarize a layer sweep: Table 1, Figure 7 (layer x sub-task heatmap), Figure 8 (gate ratios).

    lsg-summarize sweep_dir=runs/smol-llava/lsg-Lall
    lsg-summarize sweep_dir=runs/smol-llava/lsg-Lall oracle=runs/oracle/smol-llava 'ratio_layers=[3,9,15]'

Reads `<sweep_dir>/<gate>-L<l>/val-epoch<e>.json` (`train.py layer=<many>`, or one-layer runs under one folder)
and writes table1.md, heatmap.png, ratios.png and summary.json under `<sweep_dir>/summary`
(or `out=`), logging them to W&B unless `logger=none`.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsg.cli.common import log_results, plain
from lsg.files import write_json
from lsg.summary import markdown, plot_heatmap, plot_ratios, read_sweep, summarize


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="summarize")
def main(cfg: DictConfig) -> dict:
    sweep_dir = Path(cfg.sweep_dir)
    sweep = read_sweep(sweep_dir, cfg.gate)
    oracle = json.loads((Path(cfg.oracle) / "grid.json").read_text()) if cfg.oracle else None
    epoch = None if str(cfg.epoch) == "last" else int(cfg.epoch)
    summary = summarize(sweep, epoch, cfg.block, oracle, cfg.bootstrap_samples, cfg.ci_level)
    out = Path(cfg.out) if cfg.out else sweep_dir / "summary"
    n = next(iter(summary["layers"].values()))["overall"]["n"]
    (out / "table1.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "table1.md").write_text(markdown(summary, n))
    write_json(out / "summary.json", summary, indent=1)
    heat = plot_heatmap(summary, out / "heatmap.png")
    ratio_layers = plain(cfg.ratio_layers) or [r["layer"] for r in summary["table1"]][:4]
    ratios = plot_ratios(sweep, ratio_layers, out / "ratios.png")
    print((out / "table1.md").read_text())
    print(f"Wrote {out / 'table1.md'}, {heat}" + (f", {ratios}" if ratios else " (no gate ratios logged)"))
    tasks = summary["tasks"] + ["overall"]
    log_results(cfg, f"summary-{sweep_dir.name}", {
        "table1": (["block", "layer", "delta", "ci_low", "ci_high", "improved", "hurt"],
                   [[r["block"], r["layer"], r["overall"]["delta"], r["overall"]["ci_low"], r["overall"]["ci_high"],
                     r["improved"], r["hurt"]] for r in summary["table1"]]),
        "per_layer": (["layer", *tasks], [[l, *[s[t]["delta"] for t in tasks]] for l, s in summary["layers"].items()])},
        {"fig7_heatmap": heat, "fig8_ratios": ratios})
    return summary


if __name__ == "__main__":
    main()
