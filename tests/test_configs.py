"""The shipped configs: shared groups instead of copies."""

from __future__ import annotations

import pytest
import yaml
from hydra import compose, initialize_config_dir

from lsg.configs import CONF_DIR

APPS = sorted(p.stem for p in CONF_DIR.glob("*.yaml") if p.stem != "wandb-sweep")
SHARED = {"hydra": "hydra/default.yaml", "bootstrap_samples": "stats/paired.yaml", "ci_level": "stats/paired.yaml"}


@pytest.mark.parametrize("app", APPS)
def test_shared_settings_live_once_in_their_group(app):
    """No app config copies the Hydra output block or the paired-statistics settings: they come
    from `hydra/default.yaml` and `stats/paired.yaml`, so one edit changes every app."""
    own = yaml.safe_load((CONF_DIR / f"{app}.yaml").read_text())
    copied = {k: where for k, where in SHARED.items() if k in own}
    assert not copied, f"conf/{app}.yaml copies {sorted(copied)}: use the groups {sorted(set(copied.values()))}"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(app, return_hydra_config=True)
    shared = yaml.safe_load((CONF_DIR / "hydra" / "default.yaml").read_text())
    assert cfg.hydra.run.dir.startswith(shared["run"]["dir"].split("$")[0]) and cfg.hydra.job.chdir is False
    assert cfg.hydra.sweep.dir.startswith(shared["sweep"]["dir"].split("$")[0])
    if "stats: paired" in (CONF_DIR / f"{app}.yaml").read_text():
        stats = yaml.safe_load((CONF_DIR / "stats" / "paired.yaml").read_text())
        assert (cfg.bootstrap_samples, cfg.ci_level) == (stats["bootstrap_samples"], stats["ci_level"])
