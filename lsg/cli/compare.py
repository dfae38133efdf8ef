"""Compare gates and gate stacks on one evaluation split, in one table.

    lsg-compare gates=[none,var,vaf,spear,outro,lsg:checkpoints/smol-llava/lsg-L10.safetensors]
    lsg-compare 'gates=[lsg:checkpoints/smol-llava/lsg-L10.safetensors+var@2-5]'

Writes comparison.csv, comparison.md and comparison.png under `out_dir`, logs them to
W&B, and caches each gate's answers so a re-run (or an interrupted one) reuses them.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsg.cli.common import load_backbone_of, log_results, plain
from lsg.comparison import columns, compare, plot_deltas, write_table
from lsg.datamodule import load_records


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="compare")
def main(cfg: DictConfig) -> list[dict]:
    backbone = load_backbone_of(cfg, device=cfg.device)
    data_cfg = plain(cfg.data)
    records = load_records(data_cfg, cfg.split)
    out_dir = Path(cfg.out_dir)
    rows, tasks = compare(backbone, list(cfg.gates), records, data_cfg, cfg.split, out_dir,
                          cfg.batch_size, cfg.timing_batches, cfg.timing_repeats, cfg.allow_layer_move,
                          cfg.bootstrap_samples, cfg.ci_level)
    csv_path, md_path = write_table(rows, tasks, out_dir)
    png_path = plot_deltas(rows, tasks, out_dir / "comparison.png")
    print(md_path.read_text())
    print(f"Wrote {csv_path}, {md_path}" + (f", {png_path}" if png_path else " (no gate to chart)"))
    cols = columns(rows)
    log_results(cfg, f"compare-{backbone.name}-{cfg.split}", {"comparison": (cols, [[r.get(c) for c in cols] for r in rows])},
                {"comparison_chart": png_path})
    return rows


if __name__ == "__main__":
    main()
