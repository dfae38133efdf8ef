"""The run-directory layout, in one place: where training writes each layer's gates and answers.

A training run (`train.py layer=...`, one or many layers) keeps its resumable Lightning state in
`run_dir/last.safetensors`, and per trained layer l one folder named by gate and layer:

    <gate>-L<l>/gate-epoch<e>.safetensors   the gate after epoch e (+ `.json` metadata)
    <gate>-L<l>/val-epoch<e>.json           per validation question: gold, gate's and baseline's answer, ratios

With one layer the run directory is that folder itself (`runs/smol-llava/lsg-L10`); with many it
holds one such folder per layer (`runs/smol-llava/lsg-Lall/lsg-L3/...`). A joint run (`joint=true`,
all gates trained by one loss; docs/methods.md section 3) keeps everything in its run directory
(`runs/smol-llava/lsg-L3_6_7-joint`), with no `<gate>-L<l>` folder, so that sweeps and stacks never
take its gates for separately trained ones:

    gate-epoch<e>-L<l>.safetensors          the gate of layer l after epoch e (+ `.json` metadata)
    stack-epoch<e>.json                     a stack manifest of those gates (`lsg.specs.manifest`)
    val-epoch<e>.json                       per validation question: the stack's and the baseline's answer Summaries and stacks read
any folder that holds `<gate>-L<l>` folders, whichever run wrote them. The exported gate of layer l
is `export_path` with `{layer}` filled in (`checkpoints/smol-llava/lsg-L10.safetensors`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

LAYER_DIR = re.compile(r"^(?P<gate>[a-z0-9_]+(?:-[a-z0-9_]+)*?)-L(?P<layer>\d+)$")
GATE_FILE = re.compile(r"^gate-epoch(?P<epoch>\d+)\.safetensors$")
LAYER_PLACEHOLDER = "{layer}"


def layer_dir_name(gate: str, layer: int) -> str:
    """`<gate>-L<layer>`, e.g. `lsg-L10`, `lora-L10`."""
    return f"{gate}-L{int(layer)}"


def parse_layer_dir(name: str) -> tuple[str, int] | None:
    """`lsg-L10` -> `("lsg", 10)`; `mean-v-L3` -> `("mean-v", 3)`; None for any other name."""
    m = LAYER_DIR.match(name)
    return (m.group("gate"), int(m.group("layer"))) if m else None


def layer_dir(run_dir: str | Path, gate: str, layer: int, layers: Sequence[int]) -> Path:
    """Where a run over `layers` writes layer `layer`'s files: the run directory itself when it
    trains one layer, else its `<gate>-L<layer>` folder."""
    run_dir = Path(run_dir)
    return run_dir if len(layers) == 1 else run_dir / layer_dir_name(gate, layer)


def gate_file(folder: str | Path, epoch: int) -> Path:
    """`<folder>/gate-epoch<epoch>.safetensors`."""
    return Path(folder) / f"gate-epoch{int(epoch)}.safetensors"


def val_file(folder: str | Path, epoch: int) -> Path:
    """`<folder>/val-epoch<epoch>.json`."""
    return Path(folder) / f"val-epoch{int(epoch)}.json"


def joint_gate_file(run_dir: str | Path, layer: int, epoch: int) -> Path:
    """`<run_dir>/gate-epoch<epoch>-L<layer>.safetensors`: a joint run's gate of `layer`."""
    return Path(run_dir) / f"gate-epoch{int(epoch)}-L{int(layer)}.safetensors"


def stack_file(run_dir: str | Path, epoch: int) -> Path:
    """`<run_dir>/stack-epoch<epoch>.json`: a joint run's stack manifest after `epoch`."""
    return Path(run_dir) / f"stack-epoch{int(epoch)}.json"


def epoch_of(gate_path: str | Path) -> int | None:
    """The epoch of a `gate-epoch<e>.safetensors` path, else None."""
    m = GATE_FILE.match(Path(gate_path).name)
    return int(m.group("epoch")) if m else None


def val_file_beside(gate_path: str | Path) -> Path | None:
    """The `val-epoch<e>.json` written with a `gate-epoch<e>.safetensors`, or None for another name."""
    epoch = epoch_of(gate_path)
    return None if epoch is None else val_file(Path(gate_path).parent, epoch)


def layer_dirs(root: str | Path, gate: str) -> dict[int, Path]:
    """layer -> its `<gate>-L<layer>` folder directly under `root` (a multi-layer run directory, or a
    folder holding single-layer runs); folders of other gates are ignored. Empty if there are none."""
    root = Path(root)
    found = {}
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        parsed = parse_layer_dir(folder.name)
        if folder.is_dir() and parsed is not None and parsed[0] == gate:
            found[parsed[1]] = folder
    return dict(sorted(found.items()))


def gates_under(root: str | Path) -> list[str]:
    """Names of the gates that have `<gate>-L<l>` folders directly under `root`, sorted."""
    root = Path(root)
    names = {p[0] for f in (root.iterdir() if root.is_dir() else []) if f.is_dir() and (p := parse_layer_dir(f.name))}
    return sorted(names)


def export_file(export_path: str | Path, layer: int, layers: Sequence[int]) -> Path:
    """The exported gate of `layer`: `export_path` with `{layer}` filled in.

    Raises:
        ValueError: a run of several layers whose `export_path` has no `{layer}` (they would all
            write one file).
    """
    text = str(export_path)
    if LAYER_PLACEHOLDER not in text and len(layers) > 1:
        raise ValueError(f"export_path={text!r} names one file, but this run trains {len(layers)} layers; put "
                         f"{LAYER_PLACEHOLDER} in it (quoted on the command line, braces are Hydra syntax), e.g. "
                         f"'export_path=\"checkpoints/my-run/lsg-L{LAYER_PLACEHOLDER}.safetensors\"'.")
    return Path(text.replace(LAYER_PLACEHOLDER, str(int(layer))))


JOINT_SUFFIX = "-joint"  # of a joint run's folder names: `lsg-L3_6_7-joint`


def layers_tag(spec, joint: bool = False) -> str:
    """A folder-name form of a `layer=` value: `10` -> `10`, `all` -> `all`, `every:3` -> `every3`,
    `[3, 7, 10]` -> `3_7_10`, `3-7` -> `3to7`, with `-joint` appended for a joint run, so a joint run
    and separate runs of the same layers never share a run directory (the Hydra resolver
    `lsg.layers_tag` of train.yaml: `${lsg.layers_tag:${layer},${joint}}`)."""
    suffix = JOINT_SUFFIX if str(joint).lower() in ("true", "1") else ""
    if isinstance(spec, (list, tuple)) or (hasattr(spec, "__iter__") and not isinstance(spec, str)):
        return "_".join(str(int(x)) for x in spec) + suffix
    text = str(spec).strip().replace(" ", "")
    text = text.replace(":", "").replace("-", "to").replace(",", "_")
    return re.sub(r"[^0-9A-Za-z_]", "", text) + suffix
