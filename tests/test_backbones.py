"""Backbone knowledge in one place: a model config names its builder and family, unknown keys are
refused, families register themselves, the default LSG grouping follows the backbone's sinks,
and the backbone carries its own config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import yaml

import lsg
import lsg.configs
from lsg import embedded
from lsg.backbones import BUILDERS, LOADER_KEYS, Backbone, _build_tiny_random, check_model_config
from lsg.configs import CONF_DIR, known_configs
from lsg.families import FAMILIES, Family, get_family, register_family
from lsg.families.llava import LlavaFamily
from lsg.sinks import SinkConfig
from lsg.specs import load_manifest, manifest, parse_stack, write_manifest
from tests.conftest import samples

# The `lsg_grouping:` every model config carried before the default followed from the sinks.
GROUPING_BEFORE = {"llava-1.5-7b": "vsink-rest", "llava-1.5-13b": "vsink-rest", "llava-onevision": "vsink-rest",
                   "qwen2-vl": "lsink-rest", "qwen2.5-vl": "lsink-rest", "smol-llava": "lsink-rest"}


def shipped(name: str) -> dict:
    return yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())


@pytest.fixture
def user_conf(tmp_path, monkeypatch):
    """A config folder holding only what a test writes into `model/` (as a user adds a file to
    conf/model/); `write(name, cfg)` writes `model/<name>.yaml`."""
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(lsg.configs, "CONF_DIR", tmp_path)

    def write(name: str, cfg: dict) -> None:
        (tmp_path / "model" / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return write


# --------------------------------------------------------------------------- builders and families


def test_every_shipped_model_config_names_a_known_builder_and_family_and_only_known_keys():
    for name in known_configs("model"):
        cfg = shipped(name)
        assert cfg["name"] == name and cfg["builder"] in BUILDERS and cfg["family"] in FAMILIES, name
        assert check_model_config(cfg) is BUILDERS[cfg["builder"]]
        assert "lsg_grouping" not in cfg, f"{name}: the default grouping follows from the sinks"


def test_a_new_config_for_a_known_builder_loads_by_its_name_without_code(user_conf):
    user_conf("my-tiny", {"name": "my-tiny", "builder": "tiny", "family": "llava", "num_layers": 2, "seed": 3,
                          "padding_side": "left"})
    bb = lsg.load_backbone("my-tiny")
    model, _, fingerprint = _build_tiny_random(num_layers=2, seed=3)  # the builder called by hand
    assert (bb.name, bb.num_layers, bb.padding_side, bb.fingerprint) == ("my-tiny", 2, "left", fingerprint)
    assert embedded.weights_digest(bb.model.state_dict()) == embedded.weights_digest(model.state_dict())


def test_a_new_config_dict_loads_without_any_file():
    bb = lsg.backbone_from_config({"name": "dict-tiny", "builder": "tiny", "num_layers": 3, "seed": 5})
    assert (bb.name, bb.num_layers, bb.family.name) == ("dict-tiny", 3, "llava")
    assert bb.fingerprint == _build_tiny_random(num_layers=3, seed=5)[2]


def test_a_user_config_of_a_shipped_family_loads_the_hub_checkpoint_it_names(user_conf, tiny_hub_dir):
    """`conf/model/llava-1.5-7b-local.yaml` pointing at a local folder: the same model as the
    shipped config with `hf_id=` overridden."""
    cfg = {**shipped("llava-1.5-7b"), "name": "llava-1.5-7b-local", "hf_id": str(tiny_hub_dir), "dtype": "float32"}
    expected = lsg.backbone_from_config({**cfg, "name": "llava-1.5-7b"})
    user_conf("llava-1.5-7b-local", cfg)
    local = lsg.load_backbone("llava-1.5-7b-local")
    assert local.name == "llava-1.5-7b-local" and local.fingerprint == expected.fingerprint
    images, questions, _ = samples(2)
    batch = local.build_batch(images, questions)
    with torch.no_grad():
        torch.testing.assert_close(local.model(**batch).logits, expected.model(**batch).logits)


def test_a_config_without_builder_and_no_file_to_complete_it_says_what_to_add():
    with pytest.raises(ValueError, match="no `builder:`.*hub, tiny"):
        lsg.backbone_from_config({"name": "nowhere", "num_layers": 2})
    with pytest.raises(ValueError, match="builder='nope'.*embedded, hub, tiny"):
        lsg.backbone_from_config({"name": "x", "builder": "nope"})
    with pytest.raises(ValueError, match="builder 'tiny' builds family llava, not 'qwen2-vl'"):
        lsg.backbone_from_config({"name": "x", "builder": "tiny", "family": "qwen2-vl"})
    with pytest.raises(ValueError, match="'x' \\(builder 'hub'\\) needs hf_id"):
        lsg.backbone_from_config({"name": "x", "builder": "hub"})


def test_every_module_in_lsg_families_registers_the_families_it_defines():
    """Read from the folder itself (not the package's discovery): each module's Family classes
    are registered under their names, and nothing else is."""
    folder = Path(lsg.families.__file__).parent
    defined = []
    for path in sorted(folder.glob("*.py")):
        if path.stem in ("__init__", "base"):
            continue
        tree = ast.parse(path.read_text())
        defined += [node.name for node in tree.body if isinstance(node, ast.ClassDef)
                    and any(getattr(d, "id", None) == "register_family" for d in node.decorator_list)]
    assert sorted(type(f).__name__ for f in FAMILIES.values()) == sorted(defined)
    assert {"llava", "llava-onevision", "qwen2-vl", "qwen2.5-vl"} <= set(FAMILIES)


def test_a_family_registered_anywhere_loads_through_a_config(tiny_hub_dir):
    @register_family
    class RenamedLlava(LlavaFamily):
        name = "renamed-llava"

    try:
        bb = lsg.backbone_from_config({"name": "x", "builder": "hub", "family": "renamed-llava",
                                       "hf_id": str(tiny_hub_dir), "dtype": "float32"})
        assert type(bb.family) is RenamedLlava and get_family("renamed-llava") is bb.family
        with pytest.raises(ValueError, match="taken by RenamedLlava"):
            register_family(type("Other", (Family,), {"name": "renamed-llava"}))
    finally:
        FAMILIES.pop("renamed-llava")


# --------------------------------------------------------------------------- unknown keys (defect 4)


def test_a_misspelt_keyword_is_refused_naming_the_known_keys():
    with pytest.raises(ValueError) as error:
        lsg.load_backbone("tiny-random", dtyp="bfloat16")
    message = str(error.value)
    assert "Unknown key(s) in model config 'tiny-random'" in message and ": dtyp." in message
    for known in ("dtype", "num_layers", "attn_implementation", "sinks", "padding_side"):
        assert known in message.split("Known keys: ")[1]
    assert "Fix the spelling" in message
    with pytest.raises(ValueError, match="lsg_grouping: the LSG gate's grouping is gate.grouping"):
        lsg.load_backbone("tiny-random", lsg_grouping="vsink-rest")
    with pytest.raises(ValueError, match="sinks: vit_dim\\. Known keys: vit_dims"):
        lsg.load_backbone("tiny-random", sinks={"vit_dim": [0]})


def test_a_misspelt_key_in_a_model_config_file_is_refused(user_conf):
    cfg = {**shipped("tiny-random"), "name": "typo-tiny", "num_layer": 2, "attn_implementaton": "eager"}
    user_conf("typo-tiny", cfg)
    with pytest.raises(ValueError, match="typo-tiny.*: attn_implementaton, num_layer\\. Known keys: .*num_layers"):
        lsg.load_backbone("typo-tiny")


def test_keys_that_are_no_builder_argument_but_belong_in_a_model_config_are_accepted():
    bb = lsg.load_backbone("tiny-random", activation_checkpointing=True, device="cpu", family="llava",
                           system_prompt=None, padding_side="left", sinks={"llm_dims": [0]})
    assert bb.config["activation_checkpointing"] is True and bb.padding_side == "left"
    assert set(LOADER_KEYS) >= {"name", "builder", "family", "sinks", "system_prompt", "padding_side",
                                "activation_checkpointing"}
    hub_args = set(BUILDERS["hub"].arguments())
    assert {"hf_id", "dtype", "chat_template", "device_map", "attn_implementation"} <= hub_args
    assert not hub_args & {k for k in LOADER_KEYS if k != "family"}  # each key has one reader


# --------------------------------------------------------------------------- default grouping, own config


@pytest.mark.parametrize("name", sorted(GROUPING_BEFORE))
def test_default_grouping_is_what_each_model_config_used_to_copy(name):
    bb = Backbone(name, None, None, sinks=SinkConfig(**shipped(name)["sinks"]))
    assert bb.default_grouping == GROUPING_BEFORE[name]


def test_default_grouping_follows_the_vit_sinks(tiny):
    assert tiny.sinks.vit_dims and tiny.default_grouping == "vsink-rest"
    assert Backbone("t", None, None, sinks=SinkConfig(vit_dims=[], tau_vit=None)).default_grouping == "lsink-rest"
    assert Backbone("t", None, None, sinks=SinkConfig(vit_dims=[0], tau_vit=1.0)).default_grouping == "vsink-rest"


def test_the_backbone_carries_the_config_it_was_loaded_from():
    bb = lsg.load_backbone("tiny-random", num_layers=2, sinks=SinkConfig(llm_dims=[3], tau_llm=2.0))
    expected = {**shipped("tiny-random"), "num_layers": 2,
                "sinks": {"vit_dims": [], "llm_dims": [3], "tau_vit": None, "tau_llm": 2.0, "normalisation": "raw",
                          "lsink_scope": "layer"}}
    assert bb.config == expected


def test_a_stack_of_a_config_only_backbone_parses_and_round_trips_through_a_manifest(tmp_path):
    """No conf/model/<name>.yaml exists for this backbone: its gates still read its config."""
    bb = lsg.backbone_from_config({**shipped("tiny-random"), "name": "no-file-tiny"})
    stack = parse_stack("oracle@1:0.3+var@2", bb)
    assert stack.layers[1][0].grouping == bb.default_grouping
    path = write_manifest(tmp_path / "stack.json", manifest(["oracle@1:0.3", "var@2"], bb))
    assert {l: [g.name for g in gs] for l, gs in load_manifest(path, bb).items()} == {1: ["keyscale"], 2: ["var"]}


# --------------------------------------------------------------------------- declared model inputs


def test_a_batch_holds_exactly_the_inputs_the_family_declares(tiny):
    images, questions, answers = samples(2)
    batch = tiny.build_batch(images, questions, answers)
    assert set(batch) == set(tiny.family.model_inputs)
    assert tiny.model_inputs({**batch, "records": ["a", "b"], "image_sizes": None}).keys() == batch.keys()
