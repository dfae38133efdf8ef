"""The gate interface, the gate registry and gate checkpoints.

A gate is an `nn.Module` that declares which attention hook points it needs and
edits only those (peft tuner / TransformerLens hook-point style). The attention
path (`lsg.attention`) reads the declarations to keep the backbone's own kernel (SDPA,
FlashAttention) whenever no active gate needs the attention matrix (`lsg.attention.layer_kernel`).
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
from lsg.files import atomic_target, write_json


class HookPoint(str, Enum):
    """Places in a decoder layer a gate may read or edit."""

    HIDDEN = "hidden_states"  # the hidden state entering the layer (read, at prefill)
    KEYS = "keys"  # key vectors, scaled per key position, for every query (the base kernel)
    ROW_KEYS = "row_keys"  # key vectors scaled per key position for chosen query rows only (the base kernel, per row span)
    VALUES = "values"  # value vectors, edited per key position (the base kernel)
    MASK = "mask"  # the boolean attention mask (SDPA with the edited 4-D mask)
    LOGITS = "logits"  # pre-softmax attention logits (explicit path, chosen rows only)
    WEIGHTS = "weights"  # post-softmax attention weights (explicit path, chosen rows only)
    HEAD_OUTPUTS = "head_outputs"  # per-head attention outputs before o_proj
    MODULES = "modules"  # forward hooks on the decoder layer's own submodules (LoRA), installed by attach


MATRIX_HOOKS = frozenset({HookPoint.LOGITS, HookPoint.WEIGHTS})
AUTO_GROUPING = "auto"  # a gate config's `grouping: auto`: the backbone's `default_grouping`


def backbone_grouping(grouping: str, backbone) -> str:
    """`grouping`, with `"auto"` replaced by `backbone.default_grouping` (vsink-rest when the
    backbone has V-sinks, else lsink-rest; a key of `lsg.context.GROUPINGS`)."""
    return backbone.default_grouping if grouping == AUTO_GROUPING else grouping

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


def gate_class(name: str) -> type["Gate"]:
    """The registered class of a gate name (ValueError listing the known ones otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown gate {name!r}. Known gates: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def known() -> list[str]:
    return sorted(_REGISTRY)


def spec_aliases() -> dict[str, str]:
    """Extra spec names a gate class answers to (`Gate.spec_names`) -> its registered name,
    e.g. `oracle` -> `keyscale`."""
    return {alias: cls.name for cls in _REGISTRY.values() for alias in cls.spec_names if alias != cls.name}


def spec_class(name: str) -> type["Gate"]:
    """The gate class a spec name selects: a registered name or an alias (`spec_aliases`).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    aliases = spec_aliases()
    if name in aliases:
        return _REGISTRY[aliases[name]]
    if name not in _REGISTRY:
        raise ValueError(f"Unknown gate {name!r}. Known gates: none, {', '.join(sorted([*_REGISTRY, *aliases]))}.")
    return _REGISTRY[name]


PROJECT_NAME = "lsg"  # `[project] name` in the repository's pyproject.toml


def _names_this_project(pyproject: Path) -> bool:
    """Whether `pyproject` exists and its `[project]` table has `name = "lsg"`."""
    if not pyproject.is_file():
        return False
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: look for the line inside [project]
        table, name = None, None
        for line in pyproject.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("["):
                table = line
            elif table == "[project]" and line.replace(" ", "").startswith("name="):
                name = line.split("=", 1)[1].strip().strip("\"'")
        return name == PROJECT_NAME
    try:
        return tomllib.loads(pyproject.read_text()).get("project", {}).get("name") == PROJECT_NAME
    except tomllib.TOMLDecodeError:
        return False


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit(source: str | Path | None = None) -> str | None:
    """The HEAD commit of the git checkout this package's source is, for a checkpoint's metadata.

    A commit is recorded only when the package directory holding `source` (`<root>/lsg/`,
    with `source` at `<root>/lsg/gates/base.py`) sits at the top level of a git working
    tree whose `pyproject.toml` names the project `lsg`. An installed copy (site-packages,
    `pip install --target`) gets None, even when the folder it lies in is inside some other
    git checkout: that checkout's HEAD says nothing about this code.

    Args:
        source: a file at `lsg/gates/base.py` of the package to ask about; None = this file.

    Returns:
        The commit hash, or None (not a checkout of this project, or git unavailable).
    """
    package = Path(source if source is not None else __file__).resolve().parents[1]  # <root>/lsg
    root = package.parent
    if package.name != PROJECT_NAME or not _names_this_project(root / "pyproject.toml"):
        return None
    top = _git(["rev-parse", "--show-toplevel"], root)
    if top is None or Path(top).resolve() != root:
        return None
    return _git(["rev-parse", "HEAD"], root)


class Gate(nn.Module):
    """Base class. Subclasses set `name`, `hook_points`, `trainable`, call
    `super().__init__()` and implement the edits for their hook points. All edits are pure
    functions of the view and the state returned by `prepare`, so one gate object can serve
    several layers.

    Attributes:
        metadata: the checkpoint metadata the gate was loaded with (`load`: gate name, config,
            git commit, backbone, layer, sinks, steps, metrics...); empty for a gate built in
            this process.
    """

    name: ClassVar[str] = "gate"
    spec_names: ClassVar[tuple[str, ...]] = ()  # further names a gate spec may call it by (`oracle`)
    hook_points: ClassVar[frozenset[HookPoint]] = frozenset()
    trainable: ClassVar[bool] = False

    metadata: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.metadata = {}

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this gate (JSON-serialisable)."""
        return {}

    def prepare(self, view: LayerView, hidden: torch.Tensor) -> Any:
        """Called at prefill with the hidden state `(B, T, D)` entering the layer; returns
        the per-forward state that the edits receive (kept for decode steps)."""
        return None

    def ratios(self, state: Any) -> torch.Tensor | None:
        """The group ratios `(B, G)` this gate applied in a forward, given the per-forward
        `state` its `prepare` returned (LSG: the softmax ratio of each sample and group,
        rows summing to 1), or None for a gate without ratios (this default)."""
        return None

    def key_scale(self, view: LayerView, state: Any) -> torch.Tensor | None:
        """KEYS: multiplicative scale `(B, T_kv)` of every key position, or None."""
        return None

    def row_key_scale(self, view: LayerView, state: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ROW_KEYS: (`(B, T_kv)` key scale, `(B, T_q)` bool rows it applies to), or None.
        Scaling key j by c for row i equals scaling the logit z_ij by c."""
        return None

    def edit_values(self, view: LayerView, state: Any, value: torch.Tensor) -> torch.Tensor:
        """VALUES: `(B, H_kv, T_kv, d_head)` -> same shape."""
        return value

    def edit_mask(self, view: LayerView, state: Any, mask: torch.Tensor) -> torch.Tensor:
        """MASK: boolean `(B, 1, T_q, T_kv)` (True = may attend) -> same shape."""
        return mask

    def matrix_rows(self, view: LayerView, state: Any) -> torch.Tensor:
        """LOGITS/WEIGHTS: `(B, T_q)` bool query rows whose attention matrix the gate edits.
        Rows before the first such row (over the batch) stay on the base kernel."""
        return torch.ones(view.segments.vis.shape[0], view.n_queries, dtype=torch.bool,
                          device=view.segments.vis.device)

    def edit_logits(self, view: LayerView, state: Any, logits: torch.Tensor) -> torch.Tensor:
        """LOGITS: pre-softmax `(B, H, T_q', T_kv)` for the view's query rows -> same shape."""
        return logits

    def edit_weights(self, view: LayerView, state: Any, weights: torch.Tensor) -> torch.Tensor:
        """WEIGHTS: post-softmax `(B, H, T_q', T_kv)` for the view's query rows -> same shape."""
        return weights

    def edit_head_outputs(self, view: LayerView, state: Any, outputs: torch.Tensor,
                          value: torch.Tensor) -> torch.Tensor:
        """HEAD_OUTPUTS: `(B, T_q, H, d_head)` outputs (with the layer's values
        `(B, H_kv, T_kv, d_head)` for reference) -> same shape."""
        return outputs

    @classmethod
    def build(cls, backbone, **config) -> "Gate":
        """The gate for a loaded backbone: trainable gates that read the hidden state get its
        width as `hidden_size`; gates that need more of the backbone override this."""
        import inspect

        if "hidden_size" in inspect.signature(cls.__init__).parameters:
            config = {"hidden_size": backbone.hidden_size, **config}
        return cls(**config)

    @classmethod
    def from_spec(cls, spec_name: str, arg: str, backbone, config: dict) -> "Gate":
        """The gate a spec names (`lsg.specs`): `spec_name[@layers][:arg]`, with `config` its
        `conf/gate/<name>.yaml` values (resolved, without `name` and `layers`). By default a
        training-free gate is `build` from its config and takes no argument; gates whose spec
        carries values (the oracle's alphas) override this.

        Raises:
            ValueError: a trainable gate named without a checkpoint, or an argument given to a
                gate that takes none.
        """
        if cls.trainable:
            raise ValueError(f"{spec_name!r} is a trained gate: give the trained gate's checkpoint, e.g. "
                             f"ckpt:checkpoints/{backbone.name}/{cls.name}-L10.safetensors")
        if arg:
            raise ValueError(f"{spec_name!r} takes no ':' argument (got {arg!r}); its hyperparameters come from "
                             f"conf/gate/{cls.name}.yaml.")
        return cls.build(backbone, **config)

    def default_layers(self, num_layers: int) -> list[int]:
        """The decoder layers a spec without `@layers` puts the gate at, for a backbone of
        `num_layers` layers.

        Raises:
            ValueError: the gate has none (the spec must name its layers).
        """
        raise ValueError(f"Gate {self.name!r} has no default layers; give them, e.g. {self.name}@10.")

    def install(self, layer: int, decoder_layer: nn.Module) -> list:
        """MODULES: register hooks on `decoder_layer`'s submodules for an attach block; returns
        the hook handles (attach removes them on exit)."""
        return []

    # ---------------------------------------------------------------- checkpoints
    def save(self, path: str | Path, **metadata) -> Path:
        """Write the gate's tensors to `path` (safetensors) and its metadata, readable, to
        the safetensors header and to `path.with_suffix('.json')`.

        Metadata always holds the gate name, its config and the git commit; callers add
        backbone, layer, sinks, data, steps and metrics.

        Raises:
            ValueError: a tensor holds NaN or inf (a diverged gate is never written).
        """
        bad = [k for k, v in self.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"Refusing to save gate {self.name!r} to {path}: {bad} hold NaN or inf values.")
        path = Path(path)
        meta = {"gate": self.name, "config": self.config(), "git_commit": git_commit(), **metadata}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_target(path) as tmp:
            save_file(tensors, tmp, metadata={"lsg": json.dumps(meta)})
        write_json(path.with_suffix(".json"), meta, indent=2)
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

        Returns:
            The gate, its `metadata` filled from the file.
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
        gate.metadata.update(meta)
        return gate
