"""lsg: Layer-wise Sink Gating and training-free attention-sink interventions for LVLMs."""
from lsg import attention as _attention  # noqa: F401  (registers the `lsg` attention function)
from lsg import configs, gates
from lsg.attach import attach
from lsg.backbones import Backbone, backbone_from_config, load_backbone
from lsg.specs import load_manifest as load_stack

__all__ = ["Backbone", "attach", "backbone_from_config", "configs", "gates", "load_backbone", "load_stack"]
