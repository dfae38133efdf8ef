"""Where the shipped Hydra configs live, and reading one of them outside Hydra.

The configs are package data (`lsg/conf/`), so a non-editable install finds them; the
entry points (`lsg.cli`) point Hydra at the same folder.
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"


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
