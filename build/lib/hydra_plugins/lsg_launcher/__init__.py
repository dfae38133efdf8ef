"""`hydra/launcher=subprocess`: every job of a multirun in its own Python process.

`python train.py -m layer=0,1,...` then runs `python train.py <job overrides>` once per job, in
order. A job that crashes, runs out of memory or is killed fails alone: the others still run,
and the multirun reports every failure at the end (non-zero exit). Each job writes its Hydra
output under `<hydra.sweep.dir>/<job number>` and, unless `logger.group` is set, logs into one
W&B group named after the sweep (`lsg.loggers.multirun_group`).
"""

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@dataclass
class SubprocessLauncherConf:
    _target_: str = "hydra_plugins.lsg_launcher.SubprocessLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="subprocess", node=SubprocessLauncherConf, provider="lsg")


class JobFailed(RuntimeError):
    """A multirun job exited with a non-zero status."""


class SubprocessLauncher(Launcher):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        group = f"{self.config.hydra.job.name}-{sweep_dir.name}"
        log.info(f"Launching {len(job_overrides)} jobs, one process each")
        returns = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            extra = [f"hydra.run.dir={sweep_dir / str(idx)}", f"hydra.job.num={idx}"]
            if not any(o.startswith(("logger.group=", "logger=")) for o in overrides):
                extra.append(f"+logger.group={group}" if "group" not in self.config.get("logger", {}) else
                             f"logger.group={group}")
            command = [sys.executable, sys.argv[0], *overrides, *extra]
            status = subprocess.run(command).returncode
            ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED if status == 0 else JobStatus.FAILED,
                            hydra_cfg=self.config)
            ret._return_value = status if status == 0 else JobFailed(
                f"job #{idx} ({' '.join(overrides)}) exited with status {status}")
            returns.append(ret)
        return returns
