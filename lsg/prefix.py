"""Prefix reuse: compute the frozen layers below a gate once, run only the layers above it.

The backbone is frozen and a gate at decoder layer l changes nothing below l, so the
hidden state entering l is the same for every gate, every epoch and every alpha placed at
l or above. So are the token segments, the V-sinks (read from the ViT) and the sink
values of the hidden states entering layers < l (L-sinks with scope `upto`). A `Prefix`
holds all of them for one batch; `run_suffix` runs layers l..L-1 from it with gates
attached and returns the final hidden states, equal to a plain `attach` forward up to
float rounding (tests/test_prefix.py compares answers and gate weights after training).

Three consumers:
- `compute_prefixes` gives, from one ungated forward, the prefixes of many layers (a layer
  sweep, `lsg.training.GateTrainingModule`) and the baseline's final hidden state (evaluations
  of many gates and stacks in one pass, `lsg.evaluation.choice_letters`);
- `PrefixCache` keeps per-sample prefixes of one layer in host memory, within a budget, so
  epoch 2 of a one-layer run and its repeated validations run layers l..L-1 only
  (`lsg.training.GateTrainingModule`).

transformers' own decoder forward does the work: the layers below l are skipped (their
input passes through, `Backbone.skip_decoder_layers`) and the cached state is given to
the language model as its input embeddings, so positions, masks and rotary embeddings are
built by transformers exactly as in the plain forward (a family whose multimodal model builds
other masks, Gemma 3's bidirectional image block, gives them: `Family.decoder_attention_mask`).
What the language model adds between layers (Qwen3-VL's DeepStack features,
`Family.layer_additions`) is kept for the layers at or above l and added back to their outputs.
"""

from __future__ import annotations

import json
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lsg.attach import attach
from lsg.backbones import Backbone
from lsg.context import ForwardContext
from lsg.files import atomic_target, read_json, write_json
from lsg.gates.base import Gate
from lsg.scoring import decoder_hidden
from lsg.segments import Segments
from lsg.sinks import SinkConfig

PREFIX_CACHE_MB = 4096  # default budget of a PrefixCache, MiB (config: prefix_cache_mb)
PREFIX_CACHE_KINDS = ("host", "disk")  # where a PrefixCache keeps its entries (config: prefix_cache)
PREFIX_SHARD_MB = 256  # MiB of prefix entries per safetensors shard of a disk store
SHARD_NAME_HEX_DIGITS = 16  # random hex digits naming a shard (unique among a cache's shards)


@dataclass
class Prefix:
    """What the frozen layers below `layer` produce for one batch. Tensors are `(B, T)` unless noted.

    Attributes:
        layer: the first decoder layer the suffix runs (0-based).
        hidden: `(B, T, D)` hidden state entering `layer` (the token embeddings at layer 0).
        attention_mask: 1 on real tokens.
        segments: token segments of the batch (labels included, so answers are `out`).
        sinks: the sink configuration the sink values and V-sinks were read with.
        vsink: V-sink mask, or None when the backbone has no ViT sink configured.
        sink_phi: layer -> sink value of the hidden state entering it, for layers < `layer`.
        position_ids: the position ids the language model was given (`(3, B, T)` M-RoPE ids for
            Qwen2-VL), or None when it builds them itself from the mask (LLaVA).
        additions: decoder layer (>= `layer`) -> `(B, T, D)` what the language model adds to that
            layer's output besides the layer itself (Qwen3-VL's DeepStack features at the visual
            positions, `Family.layer_additions`); those of the layers below are already in `hidden`.
    """

    layer: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    segments: Segments
    sinks: SinkConfig
    vsink: torch.Tensor | None = None
    sink_phi: dict[int, torch.Tensor] = field(default_factory=dict)
    position_ids: torch.Tensor | None = None
    additions: dict[int, torch.Tensor] = field(default_factory=dict)

    def context(self) -> ForwardContext:
        """A fresh `ForwardContext` for a suffix forward (gates add their state to it)."""
        return ForwardContext(self.segments, self.sinks, self.vsink, dict(self.sink_phi),
                              n_prefill=self.hidden.shape[1])


@torch.no_grad()
def compute_prefixes(backbone: Backbone, batch: Mapping[str, Any], layers: Sequence[int],
                     sinks: SinkConfig | None = None, to_end: bool = False
                     ) -> tuple[dict[int, Prefix], torch.Tensor | None]:
    """One ungated forward that returns the prefix of every layer in `layers`.

    Args:
        backbone: the loaded backbone.
        batch: from `Backbone.build_batch` (labels, if any, make answers `out` tokens).
        layers: decoder layers whose prefixes are wanted (0-based).
        sinks: sink configuration (default `backbone.sinks`).
        to_end: also run the layers above the highest requested one and return the
            baseline's final hidden state `(B, T, D)` (after the final norm); otherwise those
            layers are skipped and None is returned.

    Returns:
        (`{layer: Prefix}`, final hidden state or None).

    Raises:
        ValueError: a layer out of range.
    """
    layers = sorted({backbone.check_layer(l) for l in layers})
    sinks = sinks if sinks is not None else backbone.sinks
    inputs = backbone.on_device(backbone.model_inputs(batch))
    stop = max(layers, default=-1)
    positions: dict[str, torch.Tensor | None] = {}
    additions: dict[int, torch.Tensor] = {}

    def keep_positions(module, args, kwargs):
        positions["ids"] = kwargs.get("position_ids")
        if kwargs.get("inputs_embeds") is not None:
            additions.update(backbone.family.layer_additions(backbone.model, kwargs, kwargs["inputs_embeds"]))

    handle = backbone.family.language_model(backbone.model).register_forward_pre_hook(keep_positions,
                                                                                       with_kwargs=True)
    above = [] if to_end else range(stop + 1, backbone.num_layers)
    try:
        with attach(backbone, {}, sinks, record_sinks_upto=stop) as run, backbone.skip_decoder_layers(above), \
                backbone.layer_inputs(layers) as entering:
            final = decoder_hidden(backbone, inputs)
            ctx = run.ctx
    finally:
        handle.remove()
    prefixes = {
        l: Prefix(l, entering[l], inputs["attention_mask"], ctx.segments, sinks, ctx.vsink,
                  {k: v for k, v in ctx.sink_phi.items() if k < l}, positions.get("ids"),
                  {k: v for k, v in additions.items() if k >= l})
        for l in layers
    }
    return prefixes, (final if to_end else None)


# base attention whose recompute equals the forward inside attach (an ungated layer keeps its kernel there)
CHECKPOINTABLE_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3")


def checkpointable(backbone: Backbone) -> bool:
    """Whether the layers above a gate can be checkpointed on this backbone. Their recompute runs
    in `backward`, after `attach` has restored the backbone's own attention implementation; inside
    `attach` an ungated layer keeps the backbone's kernel (`lsg.attention.layer_kernel`) but an eager
    backbone runs the project's explicit path, so only SDPA and FlashAttention backbones recompute the
    same graph. Others train without checkpointing (a warning, shown once per call site by Python's
    default warning filter)."""
    implementation = backbone.family.text_config(backbone.model)._attn_implementation or "sdpa"
    if implementation in CHECKPOINTABLE_IMPLEMENTATIONS:
        return True
    warnings.warn(f"activation_checkpointing needs attn_implementation in {list(CHECKPOINTABLE_IMPLEMENTATIONS)}; "
                  f"this backbone runs "
                  f"{implementation!r}, so the layers above the gate keep their activations.", stacklevel=3)
    return False


def run_suffix(backbone: Backbone, prefix: Prefix, gates: Mapping[int, Gate | Sequence[Gate]] | None = None,
               gate_state: dict | None = None, checkpoint_above: bool = False) -> torch.Tensor:
    """Final hidden states `(B, T, D)` (after the final norm, no LM head) of the decoder run from
    `prefix.layer` with `gates` attached, as `lsg.scoring.decoder_hidden` gives for the full
    forward. Differentiable in the gates' parameters (the prefix itself carries no graph).

    Args:
        prefix: from `compute_prefixes` or `PrefixCache`.
        gates: `{layer: gate(s)}`, every layer >= `prefix.layer`; None or {} = the baseline.
        gate_state: if given, filled with the forward's `(layer, gate index) -> state` (e.g.
            LSG's gate ratios, for logging).
        checkpoint_above: activation checkpointing of the frozen layers above the highest gated
            one (`Backbone.checkpoint_decoder_layers`): backward recomputes them, so the graph
            holds one such layer's activations at a time. Same result, less memory, one more
            forward of those layers per backward.

    Raises:
        ValueError: a gate below `prefix.layer` (see `lsg.attach.attach`).
    """
    above = range(max(gates) + 1, backbone.num_layers) if checkpoint_above and gates else range(0)
    if above and not checkpointable(backbone):
        above = range(0)
    with attach(backbone, gates or {}, prefix.sinks, start_layer=prefix.layer, context=prefix.context()) as run, \
            backbone.checkpoint_decoder_layers(above), _added_to_outputs(backbone, prefix.additions):
        mask = backbone.family.decoder_attention_mask(backbone.model, prefix.hidden, prefix.attention_mask,
                                                      prefix.position_ids, prefix.segments.vis)
        out = backbone.family.language_model(backbone.model)(
            inputs_embeds=prefix.hidden, attention_mask=mask, position_ids=prefix.position_ids, use_cache=False)
        if gate_state is not None:
            gate_state.update(run.ctx.gate_state)
    return out.last_hidden_state


@contextmanager
def _added_to_outputs(backbone: Backbone, additions: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Within the block, decoder layer l's output gets `additions[l]` `(B, T, D)` added (forward
    hooks, removed on exit): what the language model adds after layer l in the full forward
    (`Prefix.additions`), so the next layer's input is the model's own."""
    def add(extra: torch.Tensor):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + extra.to(output[0].dtype), *output[1:])
            return output + extra.to(output.dtype)
        return hook

    handles = [backbone.decoder_layers[l].register_forward_hook(add(extra)) for l, extra in additions.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Entry:
    input_ids: torch.Tensor  # (n,) real tokens, checked on every hit
    hidden: torch.Tensor  # (n, D)
    vsink: torch.Tensor | None  # (n,)
    sink_phi: dict[int, torch.Tensor]  # layer -> (n,)
    position_ids: torch.Tensor | None = None  # (P, n) when the model was given position ids (M-RoPE)
    additions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (n, D), `Prefix.additions`

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The entry as named tensors (`sink_phi.<layer>` per layer), for a safetensors shard."""
        out = {"input_ids": self.input_ids, "hidden": self.hidden,
               **{f"sink_phi.{l}": v for l, v in self.sink_phi.items()},
               **{f"addition.{l}": v for l, v in self.additions.items()}}
        out.update({k: v for k, v in (("vsink", self.vsink), ("position_ids", self.position_ids)) if v is not None})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "_Entry":
        return cls(tensors["input_ids"], tensors["hidden"], tensors.get("vsink"),
                   {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("sink_phi.")},
                   tensors.get("position_ids"),
                   {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("addition.")})


class HostStore(dict):
    """Prefix entries in host memory: key -> `_Entry` (the default, `prefix_cache: host`)."""

    def flush(self) -> None:
        """Nothing to write: host entries live as long as the process."""


class DiskStore:
    """Prefix entries in safetensors shards under `folder`, memory-mapped when read
    (`prefix_cache: disk`): a 10K-sample LLaVA-1.5-7B cache (10K x 680 tokens x 4096 x 2 bytes = 56 GB,
    computed) lives on disk instead of in host memory. New entries wait in memory until `shard_mb` of them are there (or `flush`), then go
    to one shard; `index.json` maps each sample key to its shard, and carries `identity` (backbone
    fingerprint, layer, sinks), so a resumed run reuses the shards of the same setup and a
    different setup starts a new cache.

    Args:
        folder: the shards' folder (train.py: `<run_dir>/prefix-cache`).
        identity: what the prefixes depend on; a stored index with another is discarded.
        shard_mb: MiB of entries per shard.
    """

    def __init__(self, folder: str | Path, identity: dict, shard_mb: float = PREFIX_SHARD_MB):
        self.folder, self.identity = Path(folder), json.loads(json.dumps(identity, default=str))
        self.shard_bytes = int(shard_mb * 2**20)
        self.index: dict[str, list] = {}  # key -> [shard file name, entry number]
        self.pending: dict[str, _Entry] = {}
        self.pending_bytes = 0
        self._open: dict[str, tuple[Any, dict[int, list[str]]]] = {}  # shard -> (handle, entry -> tensor names)
        found = read_json(self.folder / "index.json")
        if found is not None and found.get("identity") == self.identity:
            self.index = {k: v for k, v in found["entries"].items() if (self.folder / v[0]).exists()}

    def __contains__(self, key: str) -> bool:
        return key in self.pending or key in self.index

    def __len__(self) -> int:
        return len(self.index.keys() | self.pending.keys())

    def get(self, key: str) -> _Entry | None:
        if key in self.pending:
            return self.pending[key]
        if key not in self.index:
            return None
        shard, n = self.index[key]
        if shard not in self._open:
            handle = safe_open(str(self.folder / shard), "pt", device="cpu")  # memory-mapped
            names: dict[int, list[str]] = {}
            for name in handle.keys():
                names.setdefault(int(name.split("/", 1)[0]), []).append(name)
            self._open[shard] = (handle, names)
        handle, names = self._open[shard]
        return _Entry.from_tensors({name.split("/", 1)[1]: handle.get_tensor(name) for name in names[n]})

    def __setitem__(self, key: str, entry: _Entry) -> None:
        old = self.pending.get(key)
        self.pending[key] = entry
        self.pending_bytes += entry.nbytes - (old.nbytes if old is not None else 0)
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one shard (atomically) and the index after it."""
        if not self.pending:
            return
        shard = f"shard-{uuid.uuid4().hex[:SHARD_NAME_HEX_DIGITS]}.safetensors"  # never an existing shard's name
        tensors = {f"{n}/{name}": t.contiguous() for n, e in enumerate(self.pending.values())
                   for name, t in e.tensors().items()}
        with atomic_target(self.folder / shard) as tmp:
            save_file(tensors, tmp)
        self.index.update({k: [shard, n] for n, k in enumerate(self.pending)})
        self.pending, self.pending_bytes = {}, 0
        write_json(self.folder / "index.json", {"identity": self.identity, "entries": self.index})


class PrefixCache:
    """Per-sample prefixes of one decoder layer, in host memory, within `budget_mb`.

    `prefix(batch, keys)` returns the batch's `Prefix`: assembled from stored samples when
    every row is stored (no backbone layer below `layer` runs), otherwise computed by
    `compute_prefixes` and stored row by row while the budget lasts. Past the budget the
    remaining samples are recomputed every time they come back (the documented fallback):
    results are the same, only slower. Each row is stored with its real tokens only, so a
    sample reassembles into any batch, with any padding width or side.

    Args:
        backbone: the loaded backbone.
        layer: the decoder layer the prefixes end at (the gate's layer).
        budget_mb: memory for stored prefixes, MiB (config `prefix_cache_mb`; 0 = off): host
            memory, or disk space with `disk_dir`.
        sinks: sink configuration (default `backbone.sinks`).
        disk_dir: keep the prefixes in memory-mapped safetensors shards under this folder
            (`DiskStore`, config `prefix_cache: disk`) instead of host memory, one subfolder per
            DDP rank (`rank<r>`: each rank reads its own share of the data); a re-run with the same
            backbone (weights, processor), layer, sinks and `identity` reuses them. The budget is
            per rank.
        identity: what else the prefixes depend on (e.g. the data config), for a disk store.
    """

    def __init__(self, backbone: Backbone, layer: int, budget_mb: float = PREFIX_CACHE_MB,
                 sinks: SinkConfig | None = None, disk_dir: str | Path | None = None, identity: dict | None = None):
        self.backbone, self.layer = backbone, backbone.check_layer(layer)
        self.budget_bytes = int(budget_mb * 2**20)
        self.sinks = sinks if sinks is not None else backbone.sinks
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.identity = {"backbone": backbone.name, "fingerprint": backbone.fingerprint,
                         "processor": backbone.processor_digest(), "layer": self.layer,
                         "sinks": self.sinks.to_dict(), "dtype": str(backbone.model.dtype), **(identity or {})}
        self._store: HostStore | DiskStore | None = HostStore() if disk_dir is None else None
        self.nbytes = 0
        self.hits = self.misses = 0
        self.full = False

    @property
    def store(self) -> HostStore | DiskStore:
        """The entries; a disk store opens at first use, when the DDP rank is known."""
        if self._store is None:
            rank = torch.distributed.get_rank() if (torch.distributed.is_available()
                                                    and torch.distributed.is_initialized()) else 0
            self._store = DiskStore(self.disk_dir / f"rank{rank}", self.identity)
            self.nbytes = self._stored_bytes()
        return self._store

    def _stored(self, key: str, ids: torch.Tensor) -> _Entry | None:
        entry = self.store.get(key)
        return entry if entry is not None and torch.equal(entry.input_ids, ids.cpu()) else None

    def prefix(self, batch: Mapping[str, Any], keys: Sequence[str]) -> Prefix:
        """The `Prefix` at `layer` of `batch`, whose rows are the samples named by `keys`
        (e.g. record ids; a key whose stored tokens differ from the row's is recomputed).

        Raises:
            ValueError: `keys` and the batch have different lengths.
        """
        inputs = self.backbone.on_device(self.backbone.model_inputs(batch))
        mask = inputs["attention_mask"].bool()
        if len(keys) != mask.shape[0]:
            raise ValueError(f"PrefixCache.prefix got {len(keys)} keys for a batch of {mask.shape[0]} rows.")
        rows = [inputs["input_ids"][b][mask[b]] for b in range(mask.shape[0])]
        entries = [self._stored(k, ids) for k, ids in zip(keys, rows)]  # read (memory-mapped) from a disk store
        if all(e is not None for e in entries):
            self.hits += len(keys)
            return self._assemble(inputs, entries)
        self.misses += len(keys)
        prefix = compute_prefixes(self.backbone, inputs, [self.layer], self.sinks)[0][self.layer]
        for b, (key, ids) in enumerate(zip(keys, rows)):
            entry = _Entry(ids.cpu(), prefix.hidden[b][mask[b]].cpu(),
                           None if prefix.vsink is None else prefix.vsink[b][mask[b]].cpu(),
                           {l: phi[b][mask[b]].cpu() for l, phi in prefix.sink_phi.items()},
                           None if prefix.position_ids is None else prefix.position_ids[:, b][:, mask[b]].cpu(),
                           {l: a[b][mask[b]].cpu() for l, a in prefix.additions.items()})
            old = self.store.get(key)  # stored with other tokens (a reused key): the new sample replaces it
            grow = entry.nbytes - (old.nbytes if old is not None else 0)
            if self.nbytes + grow > self.budget_bytes:
                self.full = True
                continue
            self.store[key] = entry
            self.nbytes += grow
        return prefix

    def _stored_bytes(self) -> int:
        """Bytes of the entries a disk store found from an earlier run (their shards' sizes)."""
        shards = {v[0] for v in self.store.index.values()}
        return sum((self.store.folder / s).stat().st_size for s in shards)

    def flush(self) -> None:
        """Write what a disk store holds in memory (end of an epoch); a no-op in host memory."""
        if self._store is not None:
            self._store.flush()

    def _assemble(self, inputs: dict[str, torch.Tensor], entries: list[_Entry]) -> Prefix:
        mask = inputs["attention_mask"].bool()
        device = mask.device
        B, T = mask.shape
        first = entries[0]
        hidden = first.hidden.new_zeros(B, T, first.hidden.shape[-1], device=device)
        vsink = None if first.vsink is None else torch.zeros(B, T, dtype=torch.bool, device=device)
        phi = {l: v.new_zeros(B, T, device=device) for l, v in first.sink_phi.items()}
        positions = None if first.position_ids is None else \
            first.position_ids.new_zeros(first.position_ids.shape[0], B, T, device=device)
        additions = {l: a.new_zeros(B, T, a.shape[-1], device=device) for l, a in first.additions.items()}
        for b, e in enumerate(entries):
            for l in additions:
                additions[l][b, mask[b]] = e.additions[l].to(device)
            if positions is not None:
                positions[:, b, mask[b]] = e.position_ids.to(device)
            hidden[b, mask[b]] = e.hidden.to(device)
            if vsink is not None:
                vsink[b, mask[b]] = e.vsink.to(device)
            for l in phi:
                phi[l][b, mask[b]] = e.sink_phi[l].to(device)
        segments = Segments.from_batch(inputs["input_ids"], inputs["attention_mask"], self.backbone.image_token_id,
                                       inputs.get("labels"))
        return Prefix(self.layer, hidden, inputs["attention_mask"], segments, self.sinks, vsink, phi, positions,
                      additions)

    def stats(self) -> dict[str, float]:
        """Samples served from the store (`hits`) and computed (`misses`), stored MiB, and
        whether the budget was reached."""
        return {"hits": self.hits, "misses": self.misses, "stored_mb": self.nbytes / 2**20,
                "samples": len(self.store), "budget_reached": self.full}
