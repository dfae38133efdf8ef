"""`lsg.attach`: install gates on a loaded backbone for the duration of a `with` block.

    with lsg.attach(backbone, {10: gate}):
        loss = answer_loss(backbone, batch)      # or backbone.generate(batch, 8)

Hooks (all removed on exit, even on error):
- a pre-hook on the top-level model keeps `labels` of the call, so teacher-forced
  answers never move the last prompt token;
- a pre-hook on `LlavaModel` builds the `ForwardContext` (segments; on decode steps it
  extends the prompt's context with the new `out` tokens);
- a forward hook on the vision tower reads the ViT feature layer for V-sinks;
- pre-hooks on decoder layers 0..max(gated layer) record sink values of the hidden
  state entering the layer and let gates `prepare` (LSG reads `x_last` here);
- each gated layer's attention module gets a `LayerBinding`, and the text model's
  attention implementation is switched to the registered `lsg` function.

With `prefix=` (a `lsg.prefix.Prefix`), the block runs from decoder layer `prefix.layer`
on: the context (segments, V-sinks, sink values below the layer) comes from the prefix,
the layers below it pass their input through untouched, and the caller feeds the cached
hidden state to the language model (`lsg.prefix.run_suffix`).
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import torch

from lsg import attention
from lsg.backbones import Backbone
from lsg.context import ForwardContext, LayerView
from lsg.gates.base import Gate, HookPoint
from lsg.segments import Segments
from lsg.sinks import SinkConfig, sink_value

if TYPE_CHECKING:
    from lsg.prefix import Prefix


RUN_ATTR = "_lsg_run"
# Prefill arguments never kept for the patch -> token map (the KV cache, encoder outputs, pixels).
LAYOUT_DROPPED = ("cache", "past_key_values", "mm_encoder_outputs", "pixel_values", "pixel_values_videos",
                  "inputs_embeds", "self", "labels")
# The KV cache's keyword in `LlavaModel.forward`: transformers >= 5.24 passes `cache`,
# earlier releases `past_key_values` (accepted, deprecated, until 5.40).
CACHE_KWARGS = ("cache", "past_key_values")


def kv_cache_of(kwargs: Mapping) -> object | None:
    """The KV cache passed to a forward under either keyword (`CACHE_KWARGS`), or None."""
    return next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)


@dataclass
class AttachedRun:
    """Live state of one `attach` block: the current forward context and settings."""

    backbone: Backbone
    sinks: SinkConfig
    base_implementation: str
    ctx: ForwardContext | None = None
    pending_labels: torch.Tensor | None = None
    pending_vit_flags: torch.Tensor | None = None  # per ViT patch, mapped to tokens once the inputs are known
    inputs: dict | None = None  # the multimodal model's call arguments of the current prefill
    layout: dict = field(default_factory=dict)  # arguments of `Family.layout_calls` since the last prefill


def decoder_layers(backbone: Backbone) -> Sequence[torch.nn.Module]:
    """The backbone's decoder layers, wherever its family keeps them."""
    return backbone.family.decoder_layers(backbone.model)


def _pass_through(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


@contextmanager
def skip_decoder_layers(backbone: Backbone, layers: Sequence[int]) -> Iterator[None]:
    """Within the block, decoder `layers` return their input hidden state unchanged (their
    `forward` is replaced on the instance; hooks still fire). The language model's own forward
    then runs only the other layers: the prefix mechanism uses it to skip the frozen layers
    below a cached hidden state, or the layers above the last one it needs."""
    modules = [decoder_layers(backbone)[l] for l in layers]
    saved = [vars(module).get("forward") for module in modules]  # e.g. accelerate's device-moving forward
    try:
        for module in modules:
            module.forward = _pass_through
        yield
    finally:
        for module, old in zip(modules, saved):
            if old is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = old


def _normalise(gates: Mapping[int, Gate | Sequence[Gate]], backbone: Backbone) -> dict[int, list[Gate]]:
    """`{layer: [gates]}`, every gate on the backbone's device (moved in place if needed)."""
    out = {}
    device = backbone.device
    for layer, g in gates.items():
        backbone.check_layer(layer)
        group = [g] if isinstance(g, Gate) else list(g)
        if not all(isinstance(x, Gate) for x in group):
            raise TypeError(f"attach expects Gate objects per layer, got {[type(x).__name__ for x in group]}.")
        for gate in group:
            gate.to(device)  # a no-op for tensors already there
        out[layer] = group
    return out


@contextmanager
def attach(
    backbone: Backbone,
    gates: Mapping[int, Gate | Sequence[Gate]],
    sinks: SinkConfig | None = None,
    *,
    prefix: "Prefix | None" = None,
    record_sinks_upto: int = -1,
) -> Iterator[AttachedRun]:
    """Install `gates` (`{layer: gate or [gates]}`) on `backbone`; always removes them.

    Works for training forwards, scoring, and `generate` with the KV cache (gate state
    is computed at prefill and reused at every decode step).

    Several gates at one layer (`{10: [a, b]}`, or a stack naming one layer twice) compose
    without retraining: their key scales multiply (`k_j <- c_a(j) c_b(j) k_j`), and their
    value, mask, logit, weight and per-head output edits apply in list order, a before b
    (tested against hand computations in tests/test_interventions.py).

    Args:
        backbone: a loaded `Backbone`.
        gates: decoder layer (0-based) -> gate(s) applied in that layer; gates on another
            device than the backbone are moved to it (in place, as `nn.Module.to`).
        sinks: sink configuration (default: `backbone.sinks`).
        prefix: run from `prefix.layer` on (see the module docstring); every gate must sit
            at or above that layer, and the sinks are the prefix's.
        record_sinks_upto: also record sink values entering layers `0..record_sinks_upto`
            when no gate sits there (how `lsg.prefix.compute_prefixes` keeps them).

    Raises:
        ValueError: a layer out of range, a gate below the prefix's layer, or sinks other
            than those the prefix was computed with.
        TypeError: something other than a `Gate` was given.
    """
    model, family = backbone.model, backbone.family
    layer_gates = _normalise(gates, backbone)
    sinks = sinks if sinks is not None else backbone.sinks
    text_config = family.text_config(model)
    base = text_config._attn_implementation or "sdpa"
    if getattr(model, RUN_ATTR, None) is not None or base == attention.ATTN_IMPLEMENTATION:
        raise RuntimeError("lsg.attach blocks cannot be nested on the same backbone: pass all gates at once.")
    run = AttachedRun(backbone, sinks, "eager" if base == "eager" else "sdpa")
    last_hooked = max(max(layer_gates, default=-1), record_sinks_upto)
    first_hooked = 0
    if prefix is not None:
        below = [l for l in layer_gates if l < prefix.layer]
        if below:
            raise ValueError(f"Gates at layers {below} lie below the prefix's layer {prefix.layer}: their effect "
                             f"would already be in the cached hidden state. Compute the prefix at layer {min(below)}.")
        if sinks.to_dict() != prefix.sinks.to_dict():
            raise ValueError("The prefix was computed with other sinks than this attach block's; recompute it.")
        first_hooked = prefix.layer
        run.ctx = prefix.context()
    def stash_labels(module, args, kwargs):
        run.pending_labels = kwargs.get("labels")

    def build_context(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("lsg.attach needs `input_ids` (not inputs_embeds) to locate the image tokens.")
        mask = kwargs.get("attention_mask")
        past = kv_cache_of(kwargs)
        labels = kwargs.pop("labels", None)
        labels = labels if labels is not None else run.pending_labels
        run.pending_labels = None
        if past is None or past.get_seq_length() == 0:
            # this prefill's arguments (and those of layout calls made for it), without the heavy ones
            given = {k: v for k, v in kwargs.items() if v is not None}
            run.inputs = {k: v for k, v in {**run.layout, **given}.items() if k not in LAYOUT_DROPPED}
            run.layout = {}
            run.ctx = ForwardContext(Segments.from_batch(input_ids, mask, backbone.image_token_id, labels), sinks,
                                     n_prefill=input_ids.shape[1])
            if run.pending_vit_flags is not None:  # generate() encodes images before the first forward
                set_vsinks(run.pending_vit_flags)
                run.pending_vit_flags = None
        else:
            run.ctx.segments = run.ctx.segments.extend(input_ids.shape[1])
            if mask is not None and mask.shape[1] != run.ctx.total_len:
                raise RuntimeError(f"Decode step sees {mask.shape[1]} positions, the gate context "
                                   f"{run.ctx.total_len}; was the KV cache reset without a new prefill?")
        return args, kwargs

    def set_vsinks(patch_flags: torch.Tensor):
        flags = family.patches_to_tokens(model, patch_flags, run.inputs)
        vis = run.ctx.segments.vis
        if int(vis.sum()) != flags.numel():
            raise RuntimeError(f"{flags.numel()} ViT patches but {int(vis.sum())} image tokens in the batch.")
        vsink = torch.zeros_like(vis)
        vsink[vis] = flags.to(vis.device)
        run.ctx.vsink = vsink

    def record_vsinks(module, args, kwargs, output):
        feats = family.vit_features(model, args, kwargs, output)  # (N_patches, D_vit), visual-token order
        flags = sink_value(feats, sinks.vit_dims, sinks.normalisation) >= sinks.tau_vit
        ctx = run.ctx
        if ctx is not None and ctx.vsink is None and ctx.n_prefill == ctx.total_len:
            set_vsinks(flags)  # called from inside the forward whose context was just built
        else:
            run.pending_vit_flags = flags

    def layer_prehook(layer: int):
        def hook(module, args, kwargs):
            ctx = run.ctx
            if ctx.n_prefill != ctx.total_len:  # decode step: sinks and gate state come from prefill
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            if sinks.has_llm_sinks:
                ctx.sink_phi[layer] = sink_value(hidden, sinks.llm_dims, sinks.normalisation)
            view = LayerView(layer, ctx, 0, hidden.shape[1], is_prefill=True)
            for i, gate in enumerate(layer_gates.get(layer, ())):
                ctx.gate_state[(layer, i)] = gate.prepare(view, hidden)
        return hook

    def record_layout(method):
        signature = inspect.signature(method)

        @functools.wraps(method)  # callers (generate) read the signature
        def wrapped(*args, **kwargs):
            run.layout.update(signature.bind_partial(*args, **kwargs).arguments)
            return method(*args, **kwargs)
        return wrapped

    handles = []
    layers = decoder_layers(backbone)
    layout = family.layout_calls(model)
    saved_layout = [vars(owner).get(name) for owner, name in layout]
    try:
        for owner, name in layout:  # on the instance, restored on exit
            setattr(owner, name, record_layout(getattr(owner, name)))
        if prefix is None:
            handles.append(model.register_forward_pre_hook(stash_labels, with_kwargs=True))
            handles.append(family.multimodal_model(model).register_forward_pre_hook(build_context, with_kwargs=True))
            if sinks.has_vsinks:
                handles.append(family.vit_module(model).register_forward_hook(record_vsinks, with_kwargs=True))
        for layer in range(first_hooked, last_hooked + 1):
            handles.append(layers[layer].register_forward_pre_hook(layer_prehook(layer), with_kwargs=True))
        for layer, group in layer_gates.items():
            for gate in group:
                if HookPoint.MODULES in gate.hook_points:
                    handles += gate.install(layer, layers[layer])
        for layer, attn_layer in enumerate(layers):  # every layer: ungated ones keep the base path
            setattr(attn_layer.self_attn, attention.BINDING_ATTR,
                    attention.LayerBinding(layer, layer_gates.get(layer, []), run))
        family.language_model(model).set_attn_implementation(attention.ATTN_IMPLEMENTATION)
        setattr(model, RUN_ATTR, run)
        if prefix is not None:
            with skip_decoder_layers(backbone, range(prefix.layer)):
                yield run
        else:
            yield run
    finally:
        family.language_model(model).set_attn_implementation(base)
        for (owner, name), old in zip(layout, saved_layout):
            if old is None:
                vars(owner).pop(name, None)
            else:
                setattr(owner, name, old)
        for handle in handles:
            handle.remove()
        for attn_layer in layers:
            if hasattr(attn_layer.self_attn, attention.BINDING_ATTR):
                delattr(attn_layer.self_attn, attention.BINDING_ATTR)
        run.ctx = run.inputs = None
        run.layout = {}
        if getattr(model, RUN_ATTR, None) is run:
            delattr(model, RUN_ATTR)


def is_attached(model) -> bool:
    """True inside an `attach` block on this model: `LlavaModel` then accepts `labels`
    (consumed by the context hook, so teacher-forced answers never move the last
    prompt token)."""
    return getattr(model, RUN_ATTR, None) is not None
