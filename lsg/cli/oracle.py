"""The oracle grid: fixed key scales at each layer x alpha, scored per sub-task (docs/methods.md section 4).

    lsg-oracle layers=[6,12,18,24]                 # 11 alphas each, on the val split
    lsg-oracle layers=every:3 stage2=true          # + the 3-group re-sweep around each optimum

Writes grid.json, best.md (best alpha per layer and sub-task, paired CIs) and grid.png under
`out_dir`, logs them to W&B; `lsg-summarize sweep_dir=<sweep dir> oracle=<out_dir>` puts the
per-layer oracle beside Table 1.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lsg.benchmarks.base import DataSplit
from lsg.cli.common import load_backbone_of, log_results, plain
from lsg.oracle import run_grid, stage2_specs, write_grid
from lsg.specs import parse_sweep_layers


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="oracle")
def main(cfg: DictConfig) -> dict:
    backbone = load_backbone_of(cfg, device=cfg.device)
    layers = parse_sweep_layers(OmegaConf.to_container(cfg.layers) if OmegaConf.is_list(cfg.layers) else cfg.layers,
                                backbone.num_layers)
    split = DataSplit(plain(cfg.data), cfg.split, cfg.max_questions)
    args = (backbone, split, layers, list(cfg.alphas), Path(cfg.out_dir), cfg.batch_size, cfg.bootstrap_samples,
            cfg.ci_level)
    table = run_grid(*args)
    if cfg.stage2:
        table = run_grid(*args, extra_specs=stage2_specs(table, cfg.stage2_task, list(cfg.stage2_offsets)))
    paths = write_grid(table, Path(cfg.out_dir))
    print(paths[1].read_text())
    print("Wrote " + ", ".join(map(str, paths)))
    log_results(cfg, f"oracle-{backbone.name}-{cfg.split}",
                {"oracle_best": (["layer", "task", "alpha", "delta", "ci_low", "ci_high", "p"],
                                 [[int(l), t, b["alpha"], b["delta"], b["ci_low"], b["ci_high"], b["p"]]
                                  for l, best in table["best"].items() for t, b in best.items()])},
                {"oracle_grid": paths[2]})
    return table


if __name__ == "__main__":
    main()
