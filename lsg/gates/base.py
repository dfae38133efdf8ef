"""The gate interface, the gate registry and gate checkpoints.

A gate is an `nn.Module` that declares which attention hook points it needs and
edits only those (peft tuner / TransformerLens hook-point style). The attention
path (`lsg.attention`) reads the declarations to choose SDPA whenever no active gate
needs the attention matrix.
"""

from __future__ import annotations

import json
import subprocess
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lsg.context import LayerView


class HookPoint(str, Enum):
    """Places in a decoder layer a gate may read or edit."""

    HIDDEN = "hidden_states"  # the hidden state entering the layer (read, at prefill)
    KEYS = "keys"  # key vectors, scaled per key position (SDPA-compatible)
    LOGITS = "logits"  # pre-softmax attention logits
    WEIGHTS = "weights"  # post-softmax attention weights
    MASK = "mask"  # the boolean attention mask
    HEAD_OUTPUTS = "head_outputs"  # per-head attention outputs before o_proj


MATRIX_HOOKS = frozenset({HookPoint.LOGITS, HookPoint.WEIGHTS, HookPoint.MASK})

_REGISTRY: dict[str, type["Gate"]] = {}


def register(cls: type["Gate"]) -> type["Gate"]:
    """Class decorator: make a gate available to `get(name)` and to Hydra's `gate=name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"Gate name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}.")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str, **config) -> "Gate":
    """Build a registered gate by name, e.g. `get("lsg", hidden_size=576, gain=2.0)`.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown gate {name!r}. Known gates: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name](**config)


def known() -> list[str]:
    return sorted(_REGISTRY)


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class Gate(nn.Module):
    """Base class. Subclasses set `name`, `hook_points`, `trainable` and implement the
    edits for their hook points. All edits are pure functions of the view and the
    state returned by `prepare`, so one gate object can serve several layers."""

    name: ClassVar[str] = "gate"
    hook_points: ClassVar[frozenset[HookPoint]] = frozenset()
    trainable: ClassVar[bool] = False

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this gate (JSON-serialisable)."""
        return {}

    @property
    def needs_matrix(self) -> bool:
        return bool(self.hook_points & MATRIX_HOOKS)

    def prepare(self, view: LayerView, hidden: torch.Tensor) -> Any:
        """Called at prefill with the hidden state `(B, T, D)` entering the layer; returns
        the per-forward state that the edits receive (kept for decode steps)."""
        return None

    def key_scale(self, view: LayerView, state: Any) -> torch.Tensor | None:
        """Multiplicative scale `(B, T_kv)` of every key position, or None."""
        return None

    # ---------------------------------------------------------------- checkpoints
    def save(self, path: str | Path, **metadata) -> Path:
        """Write the gate's tensors to `path` (safetensors) and its metadata, readable, to
        the safetensors header and to `path.with_suffix('.json')`.

        Metadata always holds the gate name, its config and the git commit; callers add
        backbone, layer, sinks, data, steps and metrics.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"gate": self.name, "config": self.config(), "git_commit": git_commit(), **metadata}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"lsg": json.dumps(meta)})
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return path

    @staticmethod
    def read_metadata(path: str | Path) -> dict[str, Any]:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["lsg"])

    @classmethod
    def load(cls, path: str | Path, **expect) -> "Gate":
        """Load a gate saved by `save`, refusing a mismatch with `expect`.

        Args:
            path: the `.safetensors` file.
            **expect: metadata that must match, e.g. `backbone="smol-llava", layer=10,
                sinks={...}`. Keys absent from `expect` are not checked.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file was saved for another backbone, layer, sink setup or gate.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"No gate checkpoint at {path}.")
        meta = cls.read_metadata(path)
        if cls is not Gate and meta["gate"] != cls.name:
            raise ValueError(f"{path} holds a {meta['gate']!r} gate, not {cls.name!r}.")
        for key, want in expect.items():
            if want is not None and meta.get(key) != want:
                raise ValueError(
                    f"Refusing {path}: it was saved with {key}={meta.get(key)!r}, but this run has {key}={want!r}. "
                    f"Train a gate for this setup (python train.py ...) or pick the matching checkpoint."
                )
        gate = get(meta["gate"], **meta["config"])
        gate.load_state_dict(load_file(path))
        gate.metadata = meta
        return gate
