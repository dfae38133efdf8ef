"""Shared-prefix layer sweep: train one LSG gate per layer in one pass over the data.

    python sweep.py layers=all                       # every decoder layer of the embedded default
    python sweep.py layers=every:3 epochs=1          # layers 0, 3, 6, ...
    python summarize.py sweep_dir=runs/smol-llava/sweep   # Table 1, Figures 7 and 8

Writes `<out_dir>/lsg-L<l>/gate-epoch<e>.safetensors` and `val-epoch<e>.json` per layer, as
`train.py layer=<l> run_dir=<out_dir>/lsg-L<l>` would, and resumes from `<out_dir>/last.safetensors`
when re-run. Many GPUs: `trainer=ddp` (every rank holds every gate, gradients averaged), or the W&B
sweep (conf/wandb-sweep.yaml), one agent per GPU.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from lsg.cli.common import fast_dev_run_metrics, fit_gates, gate_run_identity, load_backbone_of, plain
from lsg.specs import parse_sweep_layers
from lsg.sweep import SweepExport, SweepModule
from lsg.training import build_gate


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="sweep")
def main(cfg: DictConfig) -> list[int]:
    L.seed_everything(cfg.seed, workers=True)
    backbone, _ = load_backbone_of(cfg)
    layers = parse_sweep_layers(cfg.layers, backbone.num_layers)
    gate_cfg = plain(cfg.gate)
    gates = {l: build_gate(gate_cfg, backbone, cfg.seed) for l in layers}
    data_cfg = plain(cfg.data)
    trainer_cfg = plain(cfg.trainer)
    one_device = trainer_cfg.get("devices") in (1, "1", None)
    if trainer_cfg.get("strategy", "auto") not in (("auto", "ddp") if one_device else ("ddp",)):
        raise ValueError(f"sweep.py trains on one device, or on many with trainer.strategy=ddp (trainer=ddp); got "
                         f"devices={trainer_cfg.get('devices')!r}, strategy={trainer_cfg.get('strategy')!r}. For one "
                         f"job per GPU instead, run one W&B agent per GPU over conf/wandb-sweep.yaml (README).")
    module = SweepModule(backbone, gates, cfg.lr, None, cfg.activation_checkpointing, cfg.effective_batch_size,
                         cfg.batch_size)
    out_dir = Path(cfg.out_dir)
    identity = gate_run_identity(backbone, gates[layers[0]], data_cfg)
    module.identity = {**identity, "layers": layers}
    trainer, _ = fit_gates(cfg, module, backbone, out_dir, SweepExport(out_dir, identity),
                           f"{backbone.name}-sweep-{len(layers)}-layers", plain(cfg.logger), accumulate=False)
    if fast_dev_run_metrics(trainer) is not None:
        return layers
    if trainer.is_global_zero:
        print(f"Swept layers {layers}; gates and answers under {out_dir}. Next: python summarize.py "
              f"sweep_dir={out_dir}")
    return layers


if __name__ == "__main__":
    main()
