"""Gates: trainable (LSG) and training-free interventions behind one interface and registry.

Adding a gate: one module here (subclass `Gate`, decorate with `@register`) plus one
config file in `conf/gate/`, and its import below; a spec (`lsg.specs`) builds it through
`Gate.from_spec`.
"""
from lsg.gates.base import Gate, HookPoint, get, known, register, spec_aliases, spec_class
from lsg.gates.interventions import KeyKnockoutGate, MeanValueGate, ZeroValueGate
from lsg.gates.keyscale import KeyScaleGate
from lsg.gates.lora import LoRAGate
from lsg.gates.lsg import LSGGate
from lsg.gates.outro import OutRoGate
from lsg.gates.vaf import SPEARGate, VAFGate
from lsg.gates.var import VARGate

__all__ = ["Gate", "HookPoint", "KeyKnockoutGate", "KeyScaleGate", "LSGGate", "LoRAGate", "MeanValueGate", "OutRoGate",
           "SPEARGate", "VAFGate", "VARGate", "ZeroValueGate", "get", "known", "register",
           "spec_aliases", "spec_class"]
