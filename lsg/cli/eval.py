"""Score gates and gate stacks on a benchmark (a data split is one: `benchmark=shapes`), by its
official protocol, each beside the baseline with paired CIs.

    python eval.py                                    # shapes val (offline), baseline only
    python eval.py 'gates=[none,var,vaf,spear,outro,lsg:checkpoints/smol-llava/lsg-L10.safetensors]' overhead=true
    python eval.py benchmark=mmstar 'gates=[lsg:checkpoints/smol-llava/lsg-L10.safetensors+var@2-5]'
    python eval.py benchmark=pope 'gates=[var,stack:runs/stack/smol-llava/stack-keep-all.json]'
    python eval.py benchmark=mmstar benchmark.hf_id=/data/MMStar    # a local copy in the hub layout

Writes results.json (metrics, accuracy per sub-task with paired deltas, every answer), results.md
and deltas.png under `out_dir`, logs them to W&B. Answers are kept per stack in the answer store
(`out_dir/cache`, keyed by weights, processor, questions, benchmark and gates), so a re-run or an
interrupted run reuses them. `overhead=true` adds prefill ms per batch with each stack and its
ratio to the baseline's, measured in this run.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsg.benchmarks import get_benchmark
from lsg.benchmarks.run import evaluate_benchmark
from lsg.cli.common import load_backbone_of, log_results, plain
from lsg.comparison import flat_rows


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    backbone = load_backbone_of(cfg, device=cfg.device)
    bench_cfg = plain(cfg.benchmark)
    benchmark = get_benchmark(bench_cfg.pop("name"), **bench_cfg)
    report = evaluate_benchmark(backbone, benchmark, list(cfg.gates), Path(cfg.out_dir), cfg.batch_size,
                                cfg.allow_layer_move, cfg.bootstrap_samples, cfg.ci_level, cfg.overhead,
                                cfg.timing_batches, cfg.timing_repeats)
    for row in report["rows"]:
        took = "cached" if row["cached"] else f"{row['elapsed_s']:.1f} s"
        print(f"{row['method']}: overall {row['acc_pct']['overall']:.1f}% ({took})", flush=True)
    files = report["files"]
    print(files["md"].read_text())
    print(f"Wrote {files['json']}, {files['md']}" + (f", {files['png']}" if files["png"] else "")
          + (f" ({len(report['cached'])} stacks from the cache)" if report["cached"] else ""))
    log_results(cfg, f"eval-{backbone.name}-{benchmark.name}", {"results": flat_rows(report["rows"])},
                {"deltas": files["png"]},
                {f"{row['method']}/{key}": value for row in report["rows"]
                 for key, value in {**row["metrics"], **{f"acc_pct/{t}": a for t, a in row["acc_pct"].items()}}.items()})
    return report


if __name__ == "__main__":
    main()
