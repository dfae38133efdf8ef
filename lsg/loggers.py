"""Experiment loggers: W&B, offline unless an API key is configured, never prompting."""

from __future__ import annotations

import os
from pathlib import Path


def wandb_mode(requested: str = "auto") -> str:
    """"online" if requested, or if "auto" and an API key is configured; else "offline".

    `WANDB_MODE` in the environment wins, as in wandb itself.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return "online" if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore") else "offline"


def build_logger(cfg: dict, run_name: str, config: dict | None = None):
    """A Lightning logger from a `logger=` config (`wandb` or `none`)."""
    if cfg.get("name", "none") == "none":
        return False
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(cfg.get("mode", "auto"))
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(cfg["save_dir"]).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project=cfg["project"], name=run_name, save_dir=cfg["save_dir"], mode=mode,
                         config=config)
    return logger
