"""Wiring every entry point shares: plain configs, the backbone of a `model=` group, W&B logging."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from lsg.backbones import Backbone, backbone_from_config
from lsg.datamodule import VQADataModule
from lsg.loggers import build_logger, start_run
from lsg.training import check_resumable, gate_trainer


def plain(node) -> Any:
    """A config node as plain Python containers, interpolations resolved."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def load_backbone_of(cfg: DictConfig, **overrides) -> Backbone:
    """The backbone of an app's `model=` group (`lsg.backbone_from_config`; its config is
    `Backbone.config`); `overrides` (e.g. `device=cfg.device`) win over the group's values."""
    return backbone_from_config(plain(cfg.model), **overrides)


def log_results(cfg: DictConfig, run_name: str, tables: dict[str, tuple[Sequence[str], Sequence[Sequence]]] = (),
                images: dict[str, Path | None] = (), metrics: dict[str, float] = ()) -> bool:
    """Log one result run to W&B per the app's `logger=` group: `tables` (name -> columns, rows),
    `images` (name -> PNG path; None skipped) and scalar `metrics`. Returns False when logging
    is off (`logger=none`) or W&B could not start (the run's files are written either way)."""
    run = start_run(plain(cfg.logger), run_name, plain(cfg))
    if run is None:
        return False
    import wandb

    with run:
        payload = {name: wandb.Table(columns=list(cols), data=[list(r) for r in rows])
                   for name, (cols, rows) in dict(tables).items()}
        payload.update({name: wandb.Image(str(path)) for name, path in dict(images).items() if path})
        payload.update(dict(metrics))
        run.log(payload)
    return True


def gate_run_identity(backbone: Backbone, gate, data_cfg: dict, **extra) -> dict:
    """What a gate-training run's checkpoints carry to refuse a resume or a load under another
    setup: backbone name and weights fingerprint, gate config, sinks, data (and `extra`, e.g. the
    layers)."""
    return {"backbone": backbone.name, "backbone_fingerprint": backbone.fingerprint, **extra,
            "gate_config": gate.config(), "sinks": backbone.sinks.to_dict(), "data": data_cfg}


def fit_gates(cfg: DictConfig, module, backbone: Backbone, run_dir: Path, export, run_name: str, logger_cfg: dict):
    """Train `module` (a `lsg.training.GateTrainingModule`): resume from `run_dir/last.safetensors`
    when it holds the same setup (refused otherwise), a Lightning Trainer from `cfg.trainer` with
    safetensors checkpoints and `export`, and the app's data module (the module accumulates
    gradients up to `cfg.effective_batch_size` for the trainer's device count).

    Returns:
        `(trainer, logger)` after `fit`; logger None without W&B.

    Raises:
        ValueError: a checkpoint of another setup in `run_dir`, or an effective batch that does
            not divide (see `lsg.training.check_resumable`, `accumulation_steps`).
    """
    resume = check_resumable(run_dir / "last.safetensors", module.identity)
    logger = build_logger(logger_cfg, run_name, plain(cfg))
    trainer = gate_trainer(plain(cfg.trainer), logger, run_dir, cfg.checkpoint_every_n_steps, export)
    datamodule = VQADataModule(backbone, plain(cfg.data), cfg.batch_size, cfg.num_workers, cfg.seed)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    return trainer, logger


def fast_dev_run_metrics(trainer) -> dict[str, float] | None:
    """The logged metrics of a `trainer.fast_dev_run` smoke test (printed), else None."""
    if not trainer.fast_dev_run:
        return None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"fast_dev_run metrics: {metrics}")
    return metrics
