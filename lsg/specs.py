"""Gate specs: the one syntax every entry point uses to name gates and gate stacks (docs/methods.md section 6).

A spec is `name[@layers][:arg]`; a stack joins specs with `+`.

    none                        the unmodified backbone
    var  vaf  spear  outro      training-free gates at their default layers for this depth
    vaf@8-13                    explicit layers ("8-13", "3,7,10" or "10")
    ckpt:checkpoints/smol-llava/lsg-L10.safetensors    a trained gate (LSG, LoRA...), at the layer it was
                                trained at (its metadata); `lsg:<path>` is the same (kept alias)
    oracle@10:0.3               KeyScaleGate's oracle, alpha = 0.3 at layer 10 (docs/methods.md section 4)
    oracle@10:0.3/0.5/0.9       V-sink / L-sink / ordinary keys x 0.3 / 0.5 / 0.9 (3-group oracle)
    ckpt:a+ckpt:b+var@2-5       a stack mixing trained and training-free gates
    stack:runs/stack/smol-llava/stack-keep-all.json    a stack manifest written by stack.py

A named gate's hyperparameters come from its config, `conf/gate/<name>.yaml`, resolved
against the backbone's own model config (`Backbone.config`); the gate class builds itself from it and from the
spec's argument (`Gate.from_spec`), so adding a gate needs no branch here. A stack manifest
(JSON: backbone, fingerprint, sinks, one entry per gate with its spec and, for checkpoints,
their sha256) is written by `manifest`/`write_manifest` and expanded by `manifest_specs`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lsg import gates as gate_registry
from lsg.backbones import Backbone
from lsg.configs import config_path, known_configs, load_config
from lsg.files import sha256_file, write_json
from lsg.gates.base import Gate
from lsg.runs import parse_layer_dir

CHECKPOINT_SPECS = ("ckpt", "lsg")  # `ckpt:<path>`, and `lsg:<path>` as it was first written
MANIFEST_SPEC = "stack"
MANIFEST_VERSION = 1
CHECKPOINT_DIGEST_HEX_DIGITS = 16  # of a checkpoint's sha256 inside a stack identity (64 bits)


@dataclass
class GateStack:
    """A parsed spec: `{layer: [gates]}` plus what identifies it for caching.

    Attributes:
        spec: the spec as given.
        layers: decoder layer -> the gates applied there, in spec order.
        identity: JSON-able gate configs, checkpoint digests and layers (the cache key's stack part).
    """

    spec: str
    layers: dict[int, list[Gate]]
    identity: dict


BASELINE = "none"


def baseline_stack() -> GateStack:
    """The unmodified backbone as a stack."""
    return GateStack(BASELINE, {}, {"spec": BASELINE})


def parse_layers(text: str, num_layers: int) -> list[int]:
    """"10" -> [10]; "3-7" -> [3..7]; "3,7,10" -> [3, 7, 10].

    Raises:
        ValueError: bad syntax, or a layer outside `0..num_layers-1`.
    """
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"Bad layer list {text!r}: use '10', '3-7' or '3,7,10'.") from None
    bad = [l for l in out if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"Layers {bad} are out of range for a backbone with {num_layers} decoder layers.")
    return out


def parse_sweep_layers(spec: str | int | Sequence[int], num_layers: int) -> list[int]:
    """`all`, `every:K` (0, K, 2K, ...), `3-7`, `3,7,10`, an int or a list -> sorted layers.

    Raises:
        ValueError: bad syntax or a layer out of range.
    """
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        return sorted({int(x) for x in parse_layers(",".join(str(int(x)) for x in spec), num_layers)})
    if spec == "all":
        return list(range(num_layers))
    if spec.startswith("every:"):
        try:
            step = int(spec.split(":", 1)[1])
        except ValueError:
            step = 0
        if step < 1:
            raise ValueError(f"Bad layers={spec!r}: every:K needs a positive K, e.g. every:3.")
        return list(range(0, num_layers, step))
    return sorted(set(parse_layers(spec, num_layers)))


def model_context(backbone: Backbone | dict) -> dict:
    """What a gate config's `${model.*}` reads: the backbone's model config (`Backbone.config`),
    or a dict taken as that config."""
    return dict(backbone.config if isinstance(backbone, Backbone) else backbone)


def gate_config(name: str, backbone: Backbone | dict) -> dict:
    """`conf/gate/<name>.yaml` resolved against the backbone's model config (`model_context`).

    Raises:
        ValueError: no such gate config; the message lists the known gates.
    """
    if not config_path("gate", name).exists():
        raise ValueError(f"Unknown gate {name!r}. Known gates: {BASELINE}, {', '.join(known_spec_names())}.")
    return load_config("gate", name, model=model_context(backbone))


def known_spec_names() -> list[str]:
    """Every gate name a spec accepts: the gate configs and the registered spec aliases."""
    return sorted(set(known_configs("gate")) | set(gate_registry.spec_aliases()))


def checkpoint_path(element: str) -> Path | None:
    """The checkpoint a single-gate spec names (`ckpt:<path>`, `lsg:<path>`, `ckpt@3:<path>`), else None."""
    head, _, arg = element.strip().partition(":")
    return Path(arg) if head.partition("@")[0] in CHECKPOINT_SPECS and arg else None


def _expand(spec: str, backbone: Backbone) -> list[str]:
    """The single-gate elements of a stack spec, manifests expanded."""
    elements = []
    for element in spec.split("+"):
        element = element.strip()
        if element.startswith(f"{MANIFEST_SPEC}:"):
            elements += manifest_specs(Path(element.split(":", 1)[1]), backbone)
        else:
            elements.append(element)
    return elements


def _checkpoint_gate(element: str, path: Path, layer_text: str, backbone: Backbone,
                     allow_layer_move: bool) -> tuple[Gate, list[int], dict]:
    gate = Gate.load(path, backbone=backbone.name, backbone_fingerprint=backbone.fingerprint,
                     sinks=backbone.sinks.to_dict())
    trained_at = gate.metadata["layer"]
    chosen = parse_layers(layer_text, backbone.num_layers) if layer_text else [trained_at]
    if chosen != [trained_at] and not allow_layer_move:
        raise ValueError(f"{element!r}: this gate was trained at layer {trained_at}; running it at {chosen} moves it "
                         f"to layers it never saw. Drop '@{layer_text}', or pass allow_layer_move=true to do it on "
                         f"purpose.")
    digest = sha256_file(path)[:CHECKPOINT_DIGEST_HEX_DIGITS]
    return gate, chosen, {"gate": gate.name, "checkpoint": digest, "layers": chosen}


def _named_gate(element: str, name: str, arg: str, layer_text: str, backbone: Backbone
                ) -> tuple[Gate, list[int], dict]:
    cls = gate_registry.spec_class(name)  # ValueError listing the known names
    cfg = gate_config(cls.name, model_context(backbone))
    cfg.pop("name")
    default = cfg.pop("layers", "auto")
    gate = cls.from_spec(name, arg, backbone, cfg)
    if layer_text:
        chosen = parse_layers(layer_text, backbone.num_layers)
    elif default != "auto":
        chosen = parse_layers(str(default), backbone.num_layers)
    else:
        try:
            chosen = gate.default_layers(backbone.num_layers)
        except ValueError as error:
            example = f"{name}@10" + (f":{arg}" if arg else "")
            raise ValueError(f"{element!r}: {error} Give the layers in the spec, e.g. {example}.") from None
    return gate, chosen, {"gate": cls.name, "config": gate.config(), "layers": chosen}


def parse_stack(spec: str, backbone: Backbone, allow_layer_move: bool = False) -> GateStack:
    """Build the gates of one spec (see the module docstring).

    A trained gate runs at the layer it was trained at; `ckpt@N:<path>` at another layer is
    refused unless `allow_layer_move`.

    Args:
        spec: the spec (a stack joins specs with `+`).
        backbone: the loaded backbone the gates are for; gate configs read `${model.*}` from
            its `Backbone.config`.
        allow_layer_move: let a trained gate run at another layer than it was trained at.

    Raises:
        ValueError: unknown gate, bad layers or argument, a checkpoint for another backbone or
            sink setup, a trained gate moved to another layer without `allow_layer_move`.
        FileNotFoundError: a checkpoint or manifest that does not exist.
    """
    if spec.strip() == BASELINE:
        return baseline_stack()
    layers: dict[int, list[Gate]] = {}
    parts = []
    for element in _expand(spec, backbone):
        head, _, arg = element.partition(":")
        name, _, layer_text = head.partition("@")
        path = checkpoint_path(element)
        if path is None and name == CHECKPOINT_SPECS[0]:
            raise ValueError(f"{element!r}: give the trained gate's checkpoint, e.g. ckpt:checkpoints/"
                             f"{backbone.name}/lsg-L10.safetensors")
        if path is not None:
            gate, chosen, ident = _checkpoint_gate(element, path, layer_text, backbone, allow_layer_move)
        else:
            gate, chosen, ident = _named_gate(element, name, arg, layer_text, backbone)
        for layer in chosen:
            layers.setdefault(layer, []).append(gate)
        parts.append(ident)
    return GateStack(spec, layers, {"spec": parts})


def parse_stacks(specs: Sequence[str], backbone: Backbone, allow_layer_move: bool = False) -> list[GateStack]:
    """`parse_stack` of every spec, the baseline first (added when absent), then in the order given."""
    stacks = [parse_stack(s, backbone, allow_layer_move) for s in specs]
    if not any(st.spec == BASELINE for st in stacks):
        stacks.insert(0, baseline_stack())
    stacks.sort(key=lambda st: st.spec != BASELINE)
    return stacks


def short_name(spec: str) -> str:
    """`ckpt:.../lsg-L10/gate-epoch1.safetensors` -> `lsg-L10` (a run's `<gate>-L<l>` folder,
    `lsg.runs`), `ckpt:.../lora-L10.safetensors` -> `lora-L10`; other specs unchanged."""
    path = checkpoint_path(spec)
    if path is None:
        return spec
    return path.parent.name if parse_layer_dir(path.parent.name) is not None else path.stem


# ------------------------------------------------------------------ stack manifests
def manifest(specs: Sequence[str], backbone: Backbone, **info) -> dict:
    """A stack manifest: the backbone it belongs to and each gate's spec, with the sha256 of
    every checkpoint it names."""
    gates = []
    for s in specs:
        entry = {"spec": s}
        path = checkpoint_path(s)
        if path is not None:
            entry["sha256"] = sha256_file(path)
        gates.append(entry)
    return {"version": MANIFEST_VERSION, "backbone": backbone.name, "backbone_fingerprint": backbone.fingerprint,
            "sinks": backbone.sinks.to_dict(), "gates": gates, **info}


def write_manifest(path: Path, data: dict) -> Path:
    """Write a manifest (atomically, readable JSON)."""
    return write_json(path, data, indent=2)


def manifest_specs(path: Path, backbone: Backbone) -> list[str]:
    """The gate specs of a manifest, checked against this backbone and the checkpoints' hashes.

    Raises:
        FileNotFoundError: no such manifest, or a checkpoint it names is gone.
        ValueError: the manifest belongs to another backbone, weights or sink setup, or a
            checkpoint changed since the manifest was written.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No stack manifest at {path}.")
    data = json.loads(path.read_text())
    for key, have in (("backbone", backbone.name), ("backbone_fingerprint", backbone.fingerprint),
                      ("sinks", backbone.sinks.to_dict())):
        if data.get(key) != have:
            raise ValueError(f"Refusing stack {path}: it was built with {key}={data.get(key)!r}, but this backbone has "
                             f"{key}={have!r}. Build the stack for this setup (lsg-stack ...).")
    for g in data["gates"]:
        if "sha256" in g:
            ckpt = checkpoint_path(g["spec"])
            if not ckpt.exists():
                raise FileNotFoundError(f"Stack {path} names {ckpt}, which does not exist.")
            if sha256_file(ckpt) != g["sha256"]:
                raise ValueError(f"Refusing stack {path}: {ckpt} changed since the manifest was written "
                                 f"(sha256 differs); rebuild the stack or restore the checkpoint.")
    return [g["spec"] for g in data["gates"]]


def load_manifest(path: Path, backbone: Backbone) -> dict[int, list[Gate]]:
    """`{layer: [gates]}` of a manifest, ready for `lsg.attach(backbone, ...)`.

    Raises:
        see `manifest_specs` and `parse_stack`.
    """
    return parse_stack("+".join(manifest_specs(path, backbone)), backbone).layers
