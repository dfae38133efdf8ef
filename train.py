"""Train one LSG gate at one decoder layer of a frozen LVLM.

    python train.py layer=10                        # embedded default, < 10 min on 2 CPU cores
    python train.py model=llava-1.5-7b data=llava-json data.train_json=... trainer=ddp

Re-running the same command resumes an interrupted run from its last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

import lsg
from lsg.datamodule import VQADataModule, load_records
from lsg.evaluation import evaluate, print_comparison
from lsg.loggers import build_logger
from lsg.training import (GateTrainingModule, SafetensorsCheckpointIO, SafetensorsModelCheckpoint,
                          SaveOnException, EpochGateExport, check_resumable)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    backbone = lsg.load_backbone(model_cfg.pop("name"), **model_cfg)
    layer = backbone.check_layer(cfg.layer)
    gate_cfg = OmegaConf.to_container(cfg.gate, resolve=True)
    gate = lsg.gates.get(gate_cfg.pop("name"), hidden_size=backbone.hidden_size, **gate_cfg)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    datamodule = VQADataModule(backbone, data_cfg, cfg.batch_size, cfg.num_workers, cfg.seed)
    module = GateTrainingModule(backbone, gate, layer, cfg.lr)

    run_dir = Path(cfg.run_dir)
    identity = {"backbone": backbone.name, "backbone_fingerprint": backbone.fingerprint, "layer": layer, "gate_config": gate.config(), "sinks": backbone.sinks.to_dict(),
                "data": data_cfg}
    module.identity = identity
    resume = check_resumable(run_dir / "last.safetensors", identity)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    devices = trainer_cfg.get("devices", 1)
    world = devices if isinstance(devices, int) and devices > 0 else 1
    accumulate = max(1, cfg.effective_batch_size // (cfg.batch_size * world))
    logger = build_logger(OmegaConf.to_container(cfg.logger, resolve=True), f"{backbone.name}-lsg-L{layer}",
                          OmegaConf.to_container(cfg, resolve=True))
    trainer = L.Trainer(
        **trainer_cfg,
        accumulate_grad_batches=accumulate,
        logger=logger,
        plugins=[SafetensorsCheckpointIO()],
        callbacks=[
            SafetensorsModelCheckpoint(dirpath=run_dir, filename="step{step}", save_last=True, save_top_k=0,
                                       every_n_train_steps=cfg.checkpoint_every_n_steps),
            SaveOnException(run_dir),
            EpochGateExport(run_dir, identity),
        ],
        default_root_dir=run_dir,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    if trainer_cfg.get("fast_dev_run"):
        return {}

    export = lsg.gates.Gate.load(run_dir / f"gate-epoch{cfg.export_epoch}.safetensors")
    val = load_records(data_cfg, "val")
    baseline = evaluate(backbone, val, None, cfg.eval_batch_size, progress="baseline (val)")
    gated = evaluate(backbone, val, {layer: export}, cfg.eval_batch_size, progress=f"gated L{layer} (val)")
    print_comparison(baseline, {f"LSG L{layer} (epoch {cfg.export_epoch})": gated})
    metrics = {"baseline": baseline.as_dict(), "gated": gated.as_dict()}
    meta = export.metadata
    export.save(cfg.export_path, **{k: meta[k] for k in meta if k not in ("gate", "config", "git_commit", "gate_config")},
                metrics=metrics)
    if logger:
        logger.log_metrics({f"final/{name}_acc_{t}": a for name, r in (("baseline", baseline), ("gated", gated))
                            for t, a in r.accuracy.items()})
    print(f"Saved gate to {cfg.export_path}")
    return metrics


if __name__ == "__main__":
    main()
