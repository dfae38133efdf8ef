"""Summarize a layer sweep: Table 1, Figure 7 (layer x sub-task heatmap), Figure 8 (gate ratios).

    python summarize.py runs/smol-llava/sweep
    python summarize.py runs/smol-llava/sweep --oracle runs/oracle/smol-llava --ratio-layers 3 9 15

Reads `<sweep dir>/lsg-L<l>/val-epoch<e>.json` (sweep.py, or train.py runs under one folder)
and writes table1.md, heatmap.png, ratios.png and summary.json under `<sweep dir>/summary`
(or --out), logging them to W&B unless --logger none.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from lsg.embedded import REPO_ROOT
from lsg.loggers import start_run
from lsg.stats import BOOTSTRAP_SAMPLES, CI_LEVEL
from lsg.summary import markdown, plot_heatmap, plot_ratios, read_sweep, summarize


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--epoch", default="1", help="validation epoch to summarize (the paper reports 1), or 'last'")
    ap.add_argument("--block", type=int, default=4, help="layers per block of Table 1")
    ap.add_argument("--oracle", type=Path, default=None, help="oracle.py out_dir: its best alpha beside Table 1")
    ap.add_argument("--ratio-layers", type=int, nargs="*", default=None,
                    help="layers of Figure 8 (default: Table 1's best layers)")
    ap.add_argument("--out", type=Path, default=None, help="default: <sweep dir>/summary")
    ap.add_argument("--logger", default="wandb", help="a conf/logger/<name>.yaml (wandb, none)")
    ap.add_argument("--bootstrap-samples", type=int, default=BOOTSTRAP_SAMPLES)
    ap.add_argument("--ci-level", type=float, default=CI_LEVEL)
    args = ap.parse_args(argv)

    sweep = read_sweep(args.sweep_dir)
    oracle = json.loads((args.oracle / "grid.json").read_text()) if args.oracle else None
    epoch = None if args.epoch == "last" else int(args.epoch)
    summary = summarize(sweep, epoch, args.block, oracle, args.bootstrap_samples, args.ci_level)
    out = args.out or args.sweep_dir / "summary"
    out.mkdir(parents=True, exist_ok=True)
    n = next(iter(summary["layers"].values()))["overall"]["n"]
    (out / "table1.md").write_text(markdown(summary, n))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    heat = plot_heatmap(summary, out / "heatmap.png")
    ratios = plot_ratios(sweep, args.ratio_layers or [r["layer"] for r in summary["table1"]][:4], out / "ratios.png")
    print((out / "table1.md").read_text())
    print(f"Wrote {out / 'table1.md'}, {heat}" + (f", {ratios}" if ratios else " (no gate ratios logged)"))
    logger = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "logger" / f"{args.logger}.yaml"))
    run = start_run(logger, f"summary-{args.sweep_dir.name}", {"sweep_dir": str(args.sweep_dir), "epoch": args.epoch})
    if run is not None:
        import wandb

        with run:
            tasks = summary["tasks"] + ["overall"]
            run.log({"table1": wandb.Table(columns=["block", "layer", "delta", "ci_low", "ci_high", "improved", "hurt"],
                                           data=[[r["block"], r["layer"], r["overall"]["delta"], r["overall"]["ci_low"],
                                                  r["overall"]["ci_high"], r["improved"], r["hurt"]]
                                                 for r in summary["table1"]]),
                     "per_layer": wandb.Table(columns=["layer", *tasks],
                                              data=[[l, *[s[t]["delta"] for t in tasks]]
                                                    for l, s in summary["layers"].items()]),
                     "fig7_heatmap": wandb.Image(str(heat)),
                     **({"fig8_ratios": wandb.Image(str(ratios))} if ratios else {})})
    return summary


if __name__ == "__main__":
    main()
