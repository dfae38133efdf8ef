"""LVLM families (`lsg.families.base.Family`), registered by name: one module per family.

Every module of this package is imported here, so a family registers itself (`@register_family`)
by being in `lsg/families/`; nothing lists them.
"""
import importlib
import pkgutil

from lsg.families.base import (FAMILIES, TEXT_INPUTS, Family, family_for_model_type, get_family, read_config,
                               register_family, supported_families)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
del _module

__all__ = ["FAMILIES", "TEXT_INPUTS", "Family", "family_for_model_type", "get_family", "read_config",
           "register_family", "supported_families"]
