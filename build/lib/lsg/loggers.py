"""Experiment loggers: W&B, offline unless an API key is configured, never prompting, and never
the reason a run dies.

With an API key but no route to the W&B server (cluster compute nodes), `wandb.init` used to
wait for minutes and then raise before training started. Here the server is probed first with
a short TCP connect (`probe_timeout_s`); if it is unreachable, or `wandb.init` still fails within
`init_timeout_s`, the run logs offline into `save_dir` with one warning saying how to sync it
later, and if even that fails the run continues without a logger.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_BASE_URL = "https://api.wandb.ai"


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


def server_reachable(base_url: str, timeout_s: float) -> bool:
    """True if a TCP connection to the host and port of `base_url` opens within `timeout_s` seconds."""
    url = urlparse(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _offline_warning(save_dir: str, why: str) -> None:
    warnings.warn(f"W&B: {why}; logging offline into {save_dir}. Sync the run later from a machine with network: "
                  f"`wandb sync {save_dir}/wandb/offline-run-*`.", RuntimeWarning, stacklevel=3)


def resolve_mode(cfg: dict) -> str:
    """The W&B mode a run will use: `wandb_mode`, downgraded to "offline" (with one warning) when
    the server named by `WANDB_BASE_URL` (default api.wandb.ai) does not answer a TCP connect
    within `cfg["probe_timeout_s"]`."""
    mode = wandb_mode(cfg.get("mode", "auto"))
    if mode == "online":
        base_url = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)
        if not server_reachable(base_url, float(cfg.get("probe_timeout_s", 5.0))):
            _offline_warning(cfg["save_dir"], f"an API key is configured but {base_url} is unreachable")
            return "offline"
    return mode


def _settings(cfg: dict):
    import wandb

    return wandb.Settings(init_timeout=float(cfg.get("init_timeout_s", 60.0)), silent=True)


def _start_with_fallback(cfg: dict, start):
    """`start(mode)` in the resolved mode; if an online start raises, once more offline (one
    warning); None if nothing started."""
    Path(cfg["save_dir"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    mode = resolve_mode(cfg)
    for attempt in ((mode, "offline") if mode == "online" else (mode,)):
        try:
            return start(attempt)
        except Exception as error:  # noqa: BLE001 - a logging failure must never stop the run
            if attempt == "online":
                _offline_warning(cfg["save_dir"], f"wandb.init failed ({type(error).__name__}: {error})")
            else:
                warnings.warn(f"W&B: could not start a run ({type(error).__name__}: {error}); the run continues "
                              f"without a logger.", RuntimeWarning, stacklevel=3)
    return None


def build_logger(cfg: dict, run_name: str, config: dict | None = None):
    """A Lightning logger from a `logger=` config (`wandb` or `none`); False for none.

    The W&B run is started here (on rank 0; other ranks get Lightning's dummy), not at the
    first logged metric, so a failure falls back to offline logging, then to no logger,
    before any training happens.
    """
    if cfg.get("name", "none") == "none":
        return False
    from lightning.pytorch.loggers import WandbLogger

    def start(mode: str):
        logger = WandbLogger(project=cfg["project"], name=run_name, save_dir=cfg["save_dir"], mode=mode,
                             config=config, settings=_settings(cfg), group=cfg.get("group"))
        logger.experiment  # noqa: B018 - starts the run now
        return logger

    return _start_with_fallback(cfg, start) or False


def start_run(cfg: dict, run_name: str, config: dict | None = None):
    """A `wandb.Run` for scripts that log outside Lightning (compare.py), with the same
    fallbacks as `build_logger`; None if W&B is off or could not start."""
    if cfg.get("name", "none") == "none":
        return None
    import wandb

    return _start_with_fallback(cfg, lambda mode: wandb.init(
        project=cfg["project"], name=run_name, mode=mode, dir=cfg["save_dir"], config=config,
        settings=_settings(cfg), group=cfg.get("group")))


def multirun_group(cfg: dict) -> dict:
    """The logger config with `group` set to the Hydra multirun's name when this job is part of
    one (`python train.py -m layer=0,1,...`) and no group was given, so every run of a sweep
    lands in one W&B group (`<job name>-<sweep dir name>`)."""
    if cfg.get("group"):
        return cfg
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not under Hydra
        return cfg
    if hc.mode != RunMode.MULTIRUN:
        return cfg
    return {**cfg, "group": f"{hc.job.name}-{Path(hc.sweep.dir).name}"}
