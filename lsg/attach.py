"""`lsg.attach`: install gates on a loaded backbone for the duration of a `with` block.

    with lsg.attach(backbone, {10: gate}):
        loss = answer_loss(backbone, batch)      # or backbone.generate(batch, 8)

The block's live state is one typed object, `lsg.context.RunState`, reachable from the model
(`lsg.context.run_state(model)`). `GateHooks` installs, and always removes on exit:
- a pre-hook on the top-level model that puts the call's `labels` on the run state, so
  teacher-forced answers never move the last prompt token (`lsg.scoring` sets them directly);
- a pre-hook on the multimodal model that builds the `ForwardContext` (segments; on decode
  steps it extends the prompt's context with the new `out` tokens);
- a forward hook on the vision tower that reads the ViT feature layer for V-sinks;
- pre-hooks on decoder layers `start_layer..max(gated layer)` that, at prefill
  (`ForwardContext.is_prefill`), record the sink values of the hidden state entering the layer
  and let gates `prepare` (LSG reads `x_last` here);
- `generate` gets a KV cache that keeps every position of sliding-window layers too (gates
  index keys by position; `_full_length_cache`);
- each decoder layer's attention module gets a `LayerBinding`, and the text model's
  attention implementation is switched to the registered lsg function whose masks match the
  backbone's own implementation (`lsg` for SDPA's 4-D masks, `lsg_padding` for FlashAttention's
  2-D padding masks).

What runs where (`kernel_plan` says it per layer; `lsg.attention` explains it): ungated layers
and gates that only scale keys, edit values or per-head outputs keep the backbone's own kernel
(`flash_attention_2`, `sdpa`, any registered kernel; an `eager` backbone runs the explicit
path, HF eager's equal); ROW_KEYS gates (VAF, SPEAR) call that kernel once per span of rows
sharing a key scale; LOGITS/WEIGHTS gates (VAR) compute the attention matrix of the rows they
edit, and MASK gates (knockout, OutRo) run SDPA with their edited mask under a padding-mask
kernel (FlashAttention takes no 4-D mask).

With `start_layer=l` and a `context` (how `lsg.prefix.run_suffix` runs from a cached hidden
state), the block runs from decoder layer l on: the context (segments, V-sinks, sink values
below l) is given, the layers below l pass their input through untouched, and the caller
feeds the hidden state entering l to the language model.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import ExitStack, contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from lsg import attention
from lsg.backbones import Backbone
from lsg.context import RUN_ATTR, ForwardContext, LayerView, RunState, run_state
from lsg.gates.base import Gate, HookPoint
from lsg.segments import Segments
from lsg.sinks import SinkConfig, sink_value

# The KV cache's keyword in `LlavaModel.forward`: transformers >= 5.24 passes `cache`,
# earlier releases `past_key_values` (accepted, deprecated, until 5.40).
CACHE_KWARGS = ("cache", "past_key_values")


# `generate`'s cache preparation, wrapped inside attach (`_full_length_cache`).
PREPARE_CACHE = "_prepare_cache_for_generation"


def kv_cache_of(kwargs: Mapping) -> object | None:
    """The KV cache passed to a forward under either keyword (`CACHE_KWARGS`), or None."""
    return next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)


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


class GateHooks:
    """The hooks of one attach block over `backbone`, writing to `run` (see the module docstring).

    Args:
        backbone: the loaded backbone.
        layer_gates: `{layer: [gates]}` (normalised).
        run: the block's run state.
        start_layer: the first decoder layer that runs (0 = the whole model).
        last_hooked: the highest decoder layer whose input is read (sink values, `prepare`).
        restore_implementation: the language model's attention implementation to restore on exit.
    """

    def __init__(self, backbone: Backbone, layer_gates: dict[int, list[Gate]], run: RunState, start_layer: int,
                 last_hooked: int, restore_implementation: str):
        self.backbone, self.model, self.family = backbone, backbone.model, backbone.family
        self.layer_gates, self.run = layer_gates, run
        self.start_layer, self.last_hooked = start_layer, last_hooked
        self.restore_implementation = restore_implementation

    # ---- hook bodies ------------------------------------------------------------------
    def keep_labels(self, module, args, kwargs) -> None:
        """Top-level model call: its labels (if any) are the next context's."""
        self.run.labels = kwargs.get("labels")

    def build_context(self, module, args, kwargs) -> None:
        """Multimodal model call: a new `ForwardContext` when the KV cache is empty (a new prompt:
        the context is then at its prefill, `ForwardContext.is_prefill`), else the current one
        extended by the decode step's tokens."""
        run = self.run
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("lsg.attach needs `input_ids` (not inputs_embeds) to locate the image tokens.")
        mask = kwargs.get("attention_mask")
        past = kv_cache_of(kwargs)
        labels = run.take_labels()
        if past is None or past.get_seq_length() == 0:
            # the arguments of this prefill (and of layout calls made for it) the family's map reads
            given = {**run.layout, **{k: v for k, v in kwargs.items() if v is not None}}
            run.inputs = {k: given[k] for k in self.family.layout_inputs if given.get(k) is not None}
            run.layout = {}
            run.ctx = ForwardContext(Segments.from_batch(input_ids, mask, self.backbone.image_token_id, labels),
                                     run.sinks, n_prefill=input_ids.shape[1])
            if run.vit_flags is not None:  # generate() encodes images before the first forward
                self.set_vsinks(run.vit_flags)
                run.vit_flags = None
        else:
            run.ctx.segments = run.ctx.segments.extend(input_ids.shape[1])
            if mask is not None and mask.shape[1] != run.ctx.total_len:
                raise RuntimeError(f"Decode step sees {mask.shape[1]} positions, the gate context "
                                   f"{run.ctx.total_len}; was the KV cache reset without a new prefill?")

    def set_vsinks(self, patch_flags: torch.Tensor) -> None:
        """V-sink mask of the context from per-patch flags `(N_patches,)`, through the family's map."""
        ctx = self.run.ctx
        flags = self.family.patches_to_tokens(self.model, patch_flags, self.run.inputs)
        vis = ctx.segments.vis
        if int(vis.sum()) != flags.numel():
            raise RuntimeError(f"{flags.numel()} ViT patches but {int(vis.sum())} image tokens in the batch.")
        vsink = torch.zeros_like(vis)
        vsink[vis] = flags.to(vis.device)
        ctx.vsink = vsink

    def record_vsinks(self, module, args, kwargs, output) -> None:
        """Vision tower output: flag V-sink patches (docs/methods.md section 2), now or at the next prefill."""
        sinks = self.run.sinks
        feats = self.family.vit_features(self.model, args, kwargs, output)  # (N_patches, D_vit), token order
        flags = sink_value(feats, sinks.vit_dims, sinks.normalisation) >= sinks.tau_vit
        ctx = self.run.ctx
        if ctx is not None and ctx.vsink is None and ctx.is_prefill:
            self.set_vsinks(flags)  # called from inside the forward whose context was just built
        else:
            self.run.vit_flags = flags

    def enter_layer(self, layer: int):
        """Pre-hook of decoder `layer`: its sink values and the gates' prepared state, at prefill."""
        def hook(module, args, kwargs):
            ctx, sinks = self.run.ctx, self.run.sinks
            if not ctx.is_prefill:  # decode step: sinks and gate state come from prefill
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            if sinks.has_llm_sinks:
                ctx.sink_phi[layer] = sink_value(hidden, sinks.llm_dims, sinks.normalisation)
            view = LayerView(layer, ctx, 0, hidden.shape[1])
            for i, gate in enumerate(self.layer_gates.get(layer, ())):
                ctx.gate_state[(layer, i)] = gate.prepare(view, hidden)
        return hook

    def record_layout(self, method):
        """`method` wrapped to keep its call arguments for the patch -> token map."""
        signature = inspect.signature(method)

        @functools.wraps(method)  # callers (generate) read the signature
        def wrapped(*args, **kwargs):
            self.run.layout.update(signature.bind_partial(*args, **kwargs).arguments)
            return method(*args, **kwargs)
        return wrapped

    # ---- install / remove -------------------------------------------------------------
    @contextmanager
    def installed(self) -> Iterator[None]:
        """Every hook in place within the block, all removed on exit (even on error)."""
        model, family, layers = self.model, self.family, self.backbone.decoder_layers
        with ExitStack() as undo:
            wrapped = [(owner, name, self.record_layout) for owner, name in family.layout_calls(model)]
            if hasattr(model, PREPARE_CACHE):
                wrapped.append((model, PREPARE_CACHE, _full_length_cache))
            for owner, name, wrap in wrapped:  # on the instance, restored on exit
                saved = vars(owner).get(name)
                setattr(owner, name, wrap(getattr(owner, name)))
                undo.callback(_restore_attribute, owner, name, saved)
            handles = []
            undo.callback(lambda: [h.remove() for h in handles])
            if self.run.ctx is None:  # contexts are built per forward (not given for a suffix run)
                handles.append(model.register_forward_pre_hook(self.keep_labels, with_kwargs=True))
                handles.append(family.multimodal_model(model).register_forward_pre_hook(self.build_context,
                                                                                      with_kwargs=True))
                if self.run.sinks.has_vsinks:
                    handles.append(family.vit_module(model).register_forward_hook(self.record_vsinks,
                                                                                  with_kwargs=True))
            for layer in range(self.start_layer, self.last_hooked + 1):
                handles.append(layers[layer].register_forward_pre_hook(self.enter_layer(layer), with_kwargs=True))
            for layer, group in self.layer_gates.items():
                for gate in group:
                    if HookPoint.MODULES in gate.hook_points:
                        handles += gate.install(layer, layers[layer])
            base = self.run.base_implementation
            for layer, decoder_layer in enumerate(layers):  # every layer: ungated ones keep the base kernel
                gates = self.layer_gates.get(layer, [])
                setattr(decoder_layer.self_attn, attention.BINDING_ATTR,
                        attention.LayerBinding(layer, gates, self.run, attention.layer_kernel(gates, base)))
                undo.callback(vars(decoder_layer.self_attn).pop, attention.BINDING_ATTR, None)
            language_model = family.language_model(model)
            language_model.set_attn_implementation(attention.lsg_implementation(base))
            undo.callback(language_model.set_attn_implementation, self.restore_implementation)
            setattr(model, RUN_ATTR, self.run)
            undo.callback(vars(model).pop, RUN_ATTR, None)
            undo.callback(self.run.clear)
            if self.start_layer > 0:
                undo.enter_context(self.backbone.skip_decoder_layers(range(self.start_layer)))
            yield


def _full_length_cache(prepare):
    """`generate`'s cache preparation (`PREPARE_CACHE`), then, in place of the dynamic cache it made
    when that cache keeps only the last window of a sliding-window layer's keys (Gemma 3, Mistral
    with `sliding_window`), a dynamic cache that keeps every position: gates index keys by position
    from 0 (`lsg.context.LayerView`), and the window still applies through the mask. A cache the
    caller passes, or another `cache_implementation`, is kept as it is (the attention path refuses
    a gated layer whose keys do not cover every position)."""
    from transformers import DynamicCache

    @functools.wraps(prepare)
    def wrapped(generation_config, model_kwargs, *args, **kwargs):
        result = prepare(generation_config, model_kwargs, *args, **kwargs)
        for key in CACHE_KWARGS:
            cache = model_kwargs.get(key)
            if (type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False)
                    and generation_config.cache_implementation in (None, "dynamic")
                    and any(getattr(layer, "is_sliding", False) for layer in cache.layers)):
                model_kwargs[key] = DynamicCache()  # no config: every layer keeps every position
        return result
    return wrapped


def _restore_attribute(owner, name: str, saved) -> None:
    if saved is None:
        vars(owner).pop(name, None)
    else:
        setattr(owner, name, saved)


@contextmanager
def attach(
    backbone: Backbone,
    gates: Mapping[int, Gate | Sequence[Gate]],
    sinks: SinkConfig | None = None,
    *,
    start_layer: int = 0,
    context: ForwardContext | None = None,
    record_sinks_upto: int = -1,
) -> Iterator[RunState]:
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
        sinks: sink configuration (default: `backbone.sinks`, or the context's).
        start_layer: run from this decoder layer on (the layers below pass their input
            through); needs `context`, and every gate must sit at or above it.
        context: the forward context of the hidden state entering `start_layer` (segments,
            V-sinks, sink values below it), e.g. `lsg.prefix.Prefix.context()`.
        record_sinks_upto: also record sink values entering layers `0..record_sinks_upto`
            when no gate sits there (how `lsg.prefix.compute_prefixes` keeps them).

    Yields:
        the block's `RunState` (its `ctx` holds the last forward's context and gate state).

    Raises:
        ValueError: a layer out of range, a gate below `start_layer`, `start_layer` without a
            context, or sinks other than the context's.
        TypeError: something other than a `Gate` was given.
        RuntimeError: attach blocks nested on one backbone.
    """
    model, family = backbone.model, backbone.family
    layer_gates = _normalise(gates, backbone)
    if context is not None and sinks is not None and sinks.to_dict() != context.sinks.to_dict():
        raise ValueError("The context was computed with other sinks than this attach block's; recompute it.")
    sinks = sinks if sinks is not None else context.sinks if context is not None else backbone.sinks
    base = family.text_config(model)._attn_implementation or attention.SDPA
    if run_state(model) is not None or base in attention.LSG_IMPLEMENTATIONS:
        raise RuntimeError("lsg.attach blocks cannot be nested on the same backbone: pass all gates at once.")
    if start_layer:
        backbone.check_layer(start_layer)
        if context is None:
            raise ValueError(f"start_layer={start_layer} needs the forward context of the hidden state entering it "
                             f"(lsg.prefix.compute_prefixes gives it).")
        below = [l for l in layer_gates if l < start_layer]
        if below:
            raise ValueError(f"Gates at layers {below} lie below the prefix's layer {start_layer} (the start layer): "
                             f"their effect would already be in the given hidden state. Compute the prefix at "
                             f"layer {min(below)}.")
    run = RunState(sinks, attention.resolve_base(base), ctx=context)
    last_hooked = max(max(layer_gates, default=-1), record_sinks_upto)
    with GateHooks(backbone, layer_gates, run, start_layer, last_hooked, base).installed():
        yield run


def kernel_plan(backbone: Backbone, gates: Mapping[int, Gate | Sequence[Gate]]) -> list[attention.LayerKernel]:
    """What each decoder layer's attention calls inside `attach(backbone, gates)`, without running
    it: `LayerKernel` per layer (index = decoder layer), for the backbone's own attention
    implementation (`lsg.attention.layer_kernel`). E.g. on a FlashAttention-2 backbone with VAR at
    layer 2: `LayerKernel("flash_attention_2")` for every other layer and
    `LayerKernel("flash_attention_2", matrix_rows=True)` at layer 2 (its text rows explicit).

    Raises:
        ValueError: a layer out of range.
    """
    for layer in gates:
        backbone.check_layer(layer)
    groups = {layer: [g] if isinstance(g, Gate) else list(g) for layer, g in gates.items()}
    base = attention.resolve_base(backbone.family.text_config(backbone.model)._attn_implementation)
    return [attention.layer_kernel(groups.get(layer, []), base) for layer in range(backbone.num_layers)]


def is_attached(model) -> bool:
    """True inside an `attach` block on this model."""
    return run_state(model) is not None
