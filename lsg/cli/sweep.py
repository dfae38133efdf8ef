"""Shared-prefix layer sweep: train one LSG gate per layer in one pass over the data.

    python sweep.py layers=all                       # every decoder layer of the embedded default
    python sweep.py layers=every:3 epochs=1          # layers 0, 3, 6, ...
    python summarize.py sweep_dir=runs/smol-llava/sweep   # Table 1, Figures 7 and 8

Writes `<out_dir>/lsg-L<l>/gate-epoch<e>.safetensors` and `val-epoch<e>.json` per layer, as
`train.py layer=<l> run_dir=<out_dir>/lsg-L<l>` would, and resumes from `<out_dir>/last.safetensors`
when re-run. One device: for many GPUs run the W&B sweep (conf/wandb-sweep.yaml), one agent per GPU.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from lsg.cli.common import fast_dev_run_metrics, fit_gates, gate_run_identity, load_backbone_of, plain
from lsg.specs import parse_sweep_layers
from lsg.sweep import SweepExport, SweepModule
from lsg.training import accumulation_steps, build_gate


@hydra.main(version_base="1.3", config_path="../conf", config_name="sweep")
def main(cfg: DictConfig) -> list[int]:
    L.seed_everything(cfg.seed, workers=True)
    backbone, _ = load_backbone_of(cfg)
    layers = parse_sweep_layers(cfg.layers, backbone.num_layers)
    gate_cfg = plain(cfg.gate)
    gates = {l: build_gate(gate_cfg, backbone, cfg.seed) for l in layers}
    data_cfg = plain(cfg.data)
    trainer_cfg = plain(cfg.trainer)
    if trainer_cfg.get("devices") not in (1, "1", None) or trainer_cfg.get("strategy", "auto") != "auto":
        raise ValueError("sweep.py trains on one device (trainer.devices=1). For many GPUs, run one W&B agent per "
                         "GPU over lsg/conf/wandb-sweep.yaml, or `python train.py -m layer=...` (README).")
    accumulation = accumulation_steps(cfg.effective_batch_size, cfg.batch_size, 1)
    module = SweepModule(backbone, gates, cfg.lr, accumulation, cfg.activation_checkpointing)
    out_dir = Path(cfg.out_dir)
    identity = gate_run_identity(backbone, gates[layers[0]], data_cfg)
    module.identity = {**identity, "layers": layers}
    trainer, _ = fit_gates(cfg, module, backbone, out_dir, SweepExport(out_dir, identity),
                           f"{backbone.name}-sweep-{len(layers)}-layers", plain(cfg.logger), accumulate=False)
    if fast_dev_run_metrics(trainer) is not None:
        return layers
    print(f"Swept layers {layers}; gates and answers under {out_dir}. Next: python summarize.py {out_dir}")
    return layers


if __name__ == "__main__":
    main()
