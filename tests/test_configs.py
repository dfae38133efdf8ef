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


@pytest.mark.parametrize("name,model,data,layer,epochs", [("smol_paper", "smol-llava", "shapes", [4, 10, 16], 1),
                                                          ("lsg_paper", "llava-1.5-7b", "llava-json", "all", 2)])
def test_an_experiment_is_global_overrides_of_train_py(name, model, data, layer, epochs):
    """`python train.py experiment=<name>` trains the experiment's setup (lightning-hydra-template
    style); a value on the command line still wins; lsg-reproduce reads the same file."""
    from lsg.reproduce import load_experiment

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", [f"experiment={name}"])
        assert (cfg.model.name, cfg.data.name, cfg.epochs) == (model, data, epochs)
        assert (list(cfg.layer) if not isinstance(cfg.layer, str) else cfg.layer) == layer
        assert compose("train", [f"experiment={name}", "epochs=5", "model=tiny-random"]).epochs == 5
        assert compose("train", [f"experiment={name}", "model=tiny-random"]).model.name == "tiny-random"
    exp = load_experiment(name)
    assert (exp["model"], exp["data"], exp["training"]["epochs"], exp["layers"]) == (model, data, epochs, layer)
    assert all(o.startswith("data.") for o in exp["data_overrides"]) and exp["name"] == name
