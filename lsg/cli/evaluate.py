"""Evaluate gates and gate stacks on a benchmark, scored by its official protocol.

    python eval.py                                    # shapes (offline), baseline only
    python eval.py benchmark=mmstar 'gates=[lsg:checkpoints/smol-llava/lsg-L10.safetensors]'
    python eval.py benchmark=pope 'gates=[var,stack:runs/stack/smol-llava/stack-keep-all.json]'
    python eval.py benchmark=mmstar benchmark.hf_id=/data/MMStar    # a local copy in the hub layout

Writes results.json (metrics, per-sub-task accuracy with paired deltas, every answer) and
results.md under `out_dir`; answers are cached per stack (weights fingerprint + benchmark
revision + gate config), so a re-run or an interrupted run reuses them.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsg.benchmarks import get_benchmark
from lsg.benchmarks.run import evaluate_benchmark
from lsg.cli.common import load_backbone_of, log_results, plain


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    backbone = load_backbone_of(cfg, device=cfg.device)
    bench_cfg = plain(cfg.benchmark)
    benchmark = get_benchmark(bench_cfg.pop("name"), **bench_cfg)
    report = evaluate_benchmark(backbone, benchmark, list(cfg.gates), Path(cfg.out_dir), cfg.batch_size,
                                cfg.allow_layer_move, cfg.bootstrap_samples, cfg.ci_level)
    print((Path(cfg.out_dir) / "results.md").read_text())
    print(f"Wrote {Path(cfg.out_dir) / 'results.json'}" + (f" ({len(report['cached'])} stacks from the cache)"
                                                          if report["cached"] else ""))
    log_results(cfg, f"evaluate-{backbone.name}-{benchmark.name}",
                metrics={f"{row['method']}/{key}": value for row in report["rows"]
                         for key, value in {**row["metrics"], **row["accuracy"]}.items()})
    return report


if __name__ == "__main__":
    main()
