"""The gate registry and `conf/gate/` agree, name for name and default for default; a gate
module registers by being in `lsg/gates/` (issue 23)."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys

import pytest
from omegaconf import OmegaConf

import lsg.gates
from lsg.configs import CONF_DIR, config_path, known_configs, load_config
from lsg.gates.base import gate_class, known
from lsg.specs import gate_config

SPEC_KEYS = ("name", "layers")  # read by lsg.specs (which gate, where it sits), never passed to the gate
DEFAULTS_APP = "train"  # the app whose defaults list names the shipped default model


def default_model() -> str:
    """The model config the shipped apps start from: `model:` of conf/train.yaml's defaults list."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{DEFAULTS_APP}.yaml").defaults)
    return next(entry["model"] for entry in defaults if isinstance(entry, dict) and "model" in entry)


def gate_arguments(cls) -> dict[str, inspect.Parameter]:
    """Every argument a gate config may set: the constructor's, overridden by `build`'s own
    (a spec calls `Gate.from_spec` -> `build(backbone, **config)` -> the constructor, so a
    `build` default is the one a config meets first)."""
    skip = {"self", "backbone"}
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    arguments = {}
    for function in (cls.__init__, cls.build):
        arguments.update({name: p for name, p in inspect.signature(function).parameters.items()
                          if name not in skip and p.kind not in variadic})
    return arguments


def as_config_value(value):
    """A Python default as YAML would hold it (tuples become lists)."""
    return json.loads(json.dumps(value))


def shipped_gate_config(name: str) -> dict:
    """`conf/gate/<name>.yaml` resolved as `lsg.specs` resolves it, against the default model's config."""
    model = default_model()
    try:
        return gate_config(name, load_config("model", model))
    except Exception as error:  # an interpolation the shipped model config cannot fill
        pytest.fail(f"conf/gate/{name}.yaml does not resolve against conf/model/{model}.yaml: {error}")


def test_every_registered_gate_has_its_config_and_every_config_names_a_registered_gate():
    configs = known_configs("gate")
    assert configs, "no gate configs found"
    assert sorted(known()) == configs
    for name in configs:
        assert OmegaConf.load(config_path("gate", name)).name == name, f"conf/gate/{name}.yaml names another gate"


@pytest.mark.parametrize("name", known_configs("gate"))
def test_config_keys_are_gate_arguments_with_the_gate_defaults(name):
    cls = gate_class(name)
    arguments = gate_arguments(cls)
    config = {k: v for k, v in shipped_gate_config(name).items() if k not in SPEC_KEYS}
    unknown = sorted(set(config) - set(arguments))
    assert not unknown, f"conf/gate/{name}.yaml sets {unknown}, which {cls.__name__} does not take"
    for key, value in config.items():
        default = arguments[key].default
        if default is not inspect.Parameter.empty:
            assert value == as_config_value(default), (
                f"conf/gate/{name}.yaml has {key}={value!r}, {cls.__name__} defaults to {default!r}")


@pytest.mark.parametrize("name", known_configs("gate"))
def test_every_config_builds_its_gate_with_empty_metadata(tiny, name):
    cls = gate_class(name)
    config = {k: v for k, v in gate_config(name, tiny).items() if k not in SPEC_KEYS}
    gate = cls.build(tiny, **config)
    assert type(gate) is cls
    assert gate.metadata == {}, "a gate built in this process has no checkpoint metadata"


def test_importing_the_package_registers_every_gate_module_and_exports_its_gates():
    modules = sorted(m.name for m in pkgutil.iter_modules(lsg.gates.__path__))
    assert {"base", "lsg", "outro"} <= set(modules)
    assert all(f"lsg.gates.{m}" in sys.modules for m in modules)
    registered = {gate_class(name) for name in known()}
    assert {cls.__module__ for cls in registered} <= {f"lsg.gates.{m}" for m in modules}
    for cls in registered:
        assert getattr(lsg.gates, cls.__name__) is cls and cls.__name__ in lsg.gates.__all__
    for name in ("Gate", "HookPoint", "get", "known", "register", "spec_aliases", "spec_class"):
        assert name in lsg.gates.__all__ and getattr(lsg.gates, name) is getattr(importlib.import_module(
            "lsg.gates.base"), name)
