"""A non-editable install (`pip install .`) carries its configs and the embedded weights: the
console scripts run from any directory, with the checkout off the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts a process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    pytest.importorskip("setuptools")
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                             "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return target


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable checkout
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_the_wheel_holds_the_configs_and_the_embedded_weights(installed):
    names = {p.relative_to(installed).as_posix() for p in installed.rglob("*") if p.is_file()}
    assert "lsg/conf/train.yaml" in names and "lsg/conf/gate/lsg.yaml" in names
    assert {"lsg/conf/hydra/launcher/slurm.yaml", "lsg/conf/experiment/smol_paper.yaml"} <= names
    shipped = {"lsg/conf/" + p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert shipped <= names, f"configs left out of the wheel: {sorted(shipped - names)}"
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "lsg").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names, "a package is missing from pyproject's `packages`"
    assert {"lsg/embedded/weights/vision.safetensors", "lsg/embedded/weights/embedded.json"} <= names
    assert {f"bin/lsg-{c}" for c in ("train", "eval", "summarize", "stack", "oracle", "calibrate")} <= names
    assert "bin/lsg-compare" not in names  # one app: lsg-eval
    assert {"lsg/lmms_tasks/lsg_shapes/lsg_shapes_mc.yaml", "lsg/lmms_tasks/lsg_shapes/utils.py"} <= names


def test_console_scripts_run_from_another_directory(installed, tmp_path):
    where = run_installed(installed, tmp_path, "-c", "import lsg, lsg.configs; print(lsg.__file__, lsg.configs.CONF_DIR)")
    assert where.returncode == 0 and str(installed) in where.stdout and str(ROOT) not in where.stdout
    help_ = run_installed(installed, tmp_path, str(installed / "bin" / "lsg-train"), "--help")
    assert help_.returncode == 0, help_.stderr[-3000:]
    assert "gate: keyscale, knockout, lora, lsg" in help_.stdout and "layer: 10" in help_.stdout
    composed = run_installed(installed, tmp_path, str(installed / "bin" / "lsg-eval"), "model=tiny-random",
                             "--cfg", "job")
    assert composed.returncode == 0 and "name: tiny-random" in composed.stdout, composed.stderr[-3000:]
