"""Gates: trainable (LSG) and training-free interventions behind one interface and registry."""
from lsg.gates.base import Gate, HookPoint, get, known, register
from lsg.gates.keyscale import KeyScaleGate
from lsg.gates.lsg import LSGGate
from lsg.gates.vaf import SPEARGate, VAFGate

__all__ = ["Gate", "HookPoint", "KeyScaleGate", "LSGGate", "SPEARGate", "VAFGate", "get", "known", "register"]
