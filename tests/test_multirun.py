"""Runs as separate jobs: Hydra multirun (one W&B group; submitit_local: a failed job spares the rest),
SLURM launcher configs and the W&B sweep file for clusters."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from lsg.configs import CONF_DIR
from lsg.loggers import multirun_group
from tests.hand import run_app

ROOT = Path(__file__).resolve().parents[1]


def test_wandb_sweep_file_parameters_parse_into_the_train_config():
    sweep = yaml.safe_load((CONF_DIR / "wandb-sweep.yaml").read_text())
    assert sweep["program"] == "train.py" and "${args_no_hyphens}" in sweep["command"]
    params = sweep["parameters"]
    names = list(params)
    grids = [p["values"] if "values" in p else [p["value"]] for p in params.values()]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for combo in itertools.product(*grids):
            args = [f"{k}={v}" for k, v in zip(names, combo)]  # what ${args_no_hyphens} passes
            cfg = compose("train", overrides=args)
            chosen = dict(zip(names, combo))
            assert cfg.layer == chosen["layer"] and cfg.model.name == chosen["model"]
            assert cfg.trainer.devices == chosen["trainer.devices"]
            assert cfg.run_dir.endswith(f"lsg-L{chosen['layer']}")
    assert sorted(params["layer"]["values"]) == list(range(32))  # LLaVA-1.5-7B has 32 decoder layers


def test_multirun_jobs_share_one_wandb_group_named_after_the_sweep():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["layer=3"], return_hydra_config=True)
    from omegaconf import read_write

    with read_write(cfg.hydra):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.sweep.dir = "/x/runs/multirun/2026-11-30_21-00-00"
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    try:
        assert multirun_group({"name": "wandb"})["group"] == "train-2026-11-30_21-00-00"
        assert multirun_group({"name": "wandb", "group": "mine"})["group"] == "mine"
        with read_write(cfg.hydra):
            cfg.hydra.mode = "RUN"
        HydraConfig.instance().set_config(cfg)
        assert multirun_group({"name": "wandb"}).get("group") is None
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.slow
def test_a_failed_multirun_job_does_not_stop_the_others(tmp_path):
    """hydra/launcher=submitit_local (the kept launcher; the home-made one is gone) runs each job in
    its own process: a job that fails leaves the others running, and the multirun exits non-zero
    with that job's error."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = run_app("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                     "hydra.launcher.cpus_per_task=1", "model=tiny-random", "logger=none", "layer=99,2",
                     f"data.root={tmp_path / 'shapes'}", "data.n_train=8", "data.n_val=7", "batch_size=4",
                     "effective_batch_size=8", "epochs=1", "trainer.enable_progress_bar=false",
                     f"hydra.sweep.dir={tmp_path / 'multirun'}", f"run_dir={tmp_path}/run/lsg-L${{layer}}",
                     f"export_path={tmp_path}/ck/L${{layer}}.safetensors", cwd=tmp_path, check=False, timeout=300)
    assert result.returncode != 0 and "Layers [99] are out of range" in result.stderr
    assert (tmp_path / "ck" / "L2.safetensors").exists()  # the other job ran to the end
    assert "layer=2" in (tmp_path / "multirun" / "1" / ".hydra" / "overrides.yaml").read_text()
    assert "layer=99" in (tmp_path / "multirun" / "0" / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_a_two_job_multirun_runs_through_submitit(tmp_path):
    """hydra/launcher=submitit_local runs the jobs through submitit, as hydra/launcher=slurm does
    on a cluster (the same plugin, another executor): both jobs train and export their gate."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1", "model=tiny-random", "logger=none",
            "layer=1,2", f"data.root={tmp_path / 'shapes'}", "data.n_train=8", "data.n_val=7", "batch_size=4",
            "effective_batch_size=8", "epochs=1", "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={tmp_path / 'multirun'}", f"run_dir={tmp_path}/run/lsg-L${{layer}}",
            f"export_path={tmp_path}/ck/L${{layer}}.safetensors"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    from lsg.gates import Gate

    assert [Gate.load(tmp_path / "ck" / f"L{l}.safetensors").metadata["layer"] for l in (1, 2)] == [1, 2]
    assert list((tmp_path / "multirun" / ".submitit").glob("*/*_result.pkl")), "the jobs ran through submitit"


@pytest.mark.slow
def test_the_slurm_launcher_configs_compose(tmp_path):
    """hydra/launcher=slurm (and slurm-8gpu for a DDP sweep) compose onto the plugin's submitit_slurm."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    for launcher, want in (("slurm", "gpus_per_node: 1"), ("slurm-8gpu", "gpus_per_node: 8")):
        result = run_app("train", f"hydra/launcher={launcher}", "--cfg", "hydra", "--package", "hydra.launcher",
                         cwd=tmp_path, check=False, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in result.stdout
        assert want in result.stdout and "timeout_min" in result.stdout
