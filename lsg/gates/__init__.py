"""Gates: trainable (LSG) and training-free interventions behind one interface and registry.

Adding a gate is one module in this folder (subclass `Gate`, decorate it with `@register`)
plus one config, `conf/gate/<name>.yaml`, whose keys are the gate's constructor arguments
(tests/test_gate_registry.py checks that they agree). Nothing else: importing `lsg.gates`
imports every module here, which registers its gates, and exports each registered class by
its class name. A spec (`lsg.specs`) builds a gate through `Gate.from_spec`.
"""
import importlib
import pkgutil

from lsg.gates.base import Gate, HookPoint, gate_class, get, known, register, spec_aliases, spec_class

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
del _module

_GATE_CLASSES = {cls.__name__: cls for cls in map(gate_class, known())}
globals().update(_GATE_CLASSES)

__all__ = sorted(["Gate", "HookPoint", "get", "known", "register", "spec_aliases", "spec_class", *_GATE_CLASSES])
