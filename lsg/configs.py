"""Where the shipped Hydra configs live, and reading one of them outside Hydra.

The configs sit in the repository's top-level `conf/` and ship inside the wheel as the package
`lsg.conf` (pyproject `package-dir`), so an editable and a non-editable install find them the same
way; the entry points (`lsg.cli`) point Hydra at the same package (`pkg://lsg.conf`).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONF_DIR = Path(str(files("lsg.conf")))


def config_path(group: str, name: str) -> Path:
    """`<CONF_DIR>/<group>/<name>.yaml` (existence not checked)."""
    return CONF_DIR / group / f"{name}.yaml"


def known_configs(group: str) -> list[str]:
    """Names of the configs of a group, sorted (e.g. every `gate=` choice)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_config(group: str, name: str, **context) -> dict:
    """A group's config as a plain dict, interpolations resolved against `context` (e.g.
    `model=<backbone config>` for a gate's `${model.lsg_grouping}`).

    Raises:
        FileNotFoundError: no such config; the message lists the group's configs.
    """
    from omegaconf import OmegaConf

    path = config_path(group, name)
    if not path.exists():
        raise FileNotFoundError(f"No config {group}/{name}.yaml; known: {', '.join(known_configs(group))}.")
    root = OmegaConf.create({**context, "_this": OmegaConf.load(path)})
    return OmegaConf.to_container(root._this, resolve=True)


def register_resolvers() -> None:
    """The project's OmegaConf resolvers, for the shipped configs (idempotent):

    - `lsg.layers_tag`: a `layer=` value as a folder name (`lsg.runs.layers_tag`), for `run_dir`.
    """
    from omegaconf import OmegaConf

    from lsg.runs import layers_tag

    if not OmegaConf.has_resolver("lsg.layers_tag"):
        OmegaConf.register_new_resolver("lsg.layers_tag", layers_tag)


register_resolvers()
