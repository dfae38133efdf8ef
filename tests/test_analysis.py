"""Sink analyses (issue 25 items 1-3): attention maps and per-group attention against transformers'
eager `output_attentions=True` weights, group norms against hand-computed ones, the token grid
against the family's own patch -> token map on a planted V-sink, bad input, and a clean restart."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import lsg
from lsg.analysis import attention_maps, profiles
from lsg.analysis.common import mean_ci
from lsg.analysis.data import available_groups, load_questions, observe, resolve_groups
from lsg.data.record import VQARecord
from lsg.segments import Segments
from tests.conftest import samples
from tests.hand import vsinks_with_planted_patch
from tests.tiny_families import SINKS, save_tiny_onevision, save_tiny_qwen2_vl

SHAPES = {"name": "shapes", "root": None, "n": 6}


def records(tmp_path_factory, n: int = 3) -> list[VQARecord]:
    root = tmp_path_factory.getbasetemp() / "shapes"
    return load_questions({**SHAPES, "root": str(root)}, n)


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    return records(tmp_path_factory)


@pytest.fixture(scope="module", params=["llava", "qwen2-vl", "llava-onevision"])
def family_pair(request, tmp_path_factory):
    """(SDPA backbone, eager backbone) of one family's tiny hub-format checkpoint."""
    if request.param == "llava":
        return lsg.load_backbone("tiny-random"), lsg.load_backbone("tiny-random", attn_implementation="eager")
    folder = tmp_path_factory.mktemp(request.param)
    (save_tiny_qwen2_vl if request.param == "qwen2-vl" else save_tiny_onevision)(folder)
    load = lambda impl: lsg.load_backbone(request.param, hf_id=str(folder), dtype="float32",  # noqa: E731
                                          attn_implementation=impl, sinks=SINKS)
    return load("sdpa"), load("eager")


def eager_reference(bb, questions, queries="last", attentions=True):
    """transformers' eager attention weights `(L, B, H, T, T)`, hidden states entering each layer and
    segments of the questions' batch (built the same way as the analysis builds it)."""
    images = [r.load_image() for r in questions]
    answers = [str(r.answer) for r in questions] if queries != "last" else None
    batch = bb.build_batch(images, [r.question for r in questions], answers)
    with torch.no_grad():
        out = bb.model(**bb.model_inputs(batch), output_attentions=attentions, output_hidden_states=True)
    seg = Segments.from_batch(batch["input_ids"], batch["attention_mask"], bb.image_token_id, batch.get("labels"))
    return torch.stack(out.attentions) if attentions else None, out.hidden_states, seg, batch


def test_maps_and_group_mass_match_eager_output_attentions(family_pair, questions):
    sdpa, eager = family_pair
    layers = list(range(sdpa.num_layers))
    groups = available_groups(sdpa)
    obs = observe(sdpa, questions, None, layers, groups, "last", batch_size=2)
    attn, _, seg, _ = eager_reference(eager, questions)
    for b, o in enumerate(obs):
        rows = attn[:, b, :, seg.last_prompt[b]]  # (L, H, T)
        np.testing.assert_allclose(np.stack([o.maps[l] for l in layers]), rows[:, :, seg.vis[b]].numpy(),
                                   atol=2e-5, rtol=1e-4)
        # mass on the visual groups together = the eager row's visual mass (head mean)
        vis_groups = [groups.index(g) for g in ("vsink", "lsink", "ordinary") if g in groups]
        visual_mass = np.nansum(o.attn_mass[:, vis_groups], 1)
        np.testing.assert_allclose(visual_mass, rows.mean(1)[:, seg.vis[b]].sum(-1).numpy(), atol=2e-5)
        np.testing.assert_allclose(o.attn_mass.sum(1), 1.0, atol=1e-4)  # the groups cover every key


def test_per_token_attention_from_user_and_answer_rows_matches_eager(questions):
    """Every user / answer query, causal: each row sees only the group tokens up to itself. On a
    backbone without sinks, so that "other_text" is every text token and "ordinary" every visual one."""
    no_sinks = {**SINKS, "vit_dims": [], "tau_vit": None, "llm_dims": [], "tau_llm": None}
    tiny, tiny_eager = (lsg.load_backbone("tiny-random", attn_implementation=impl, sinks=no_sinks)
                        for impl in ("sdpa", "eager"))
    obs = observe(tiny, questions, None, [1, 3], ["other_text", "ordinary"], "user+answer", maps=False,
                  batch_size=3)
    attn, _, seg, _ = eager_reference(tiny_eager, questions, "user+answer")
    T = attn.shape[-1]
    causal = torch.ones(T, T).tril().bool()
    for b, o in enumerate(obs):
        rows = (seg.user[b] | seg.out[b]).nonzero().flatten()
        for i, layer in enumerate([1, 3]):
            w = attn[layer, b].mean(0)  # (T, T) head mean
            for g, mask in enumerate([seg.text[b], seg.vis[b]]):
                per_row = [(w[r] * mask).sum() / (mask & causal[r]).sum() for r in rows]
                assert o.attn_per_token[i, g] == pytest.approx(float(torch.stack(per_row).mean()), abs=1e-6)


def test_group_norms_match_hand_computed_norms(tiny, questions):
    """Without ViT sinks: text sinks and L-sinks by `phi_rms >= tau` on the hidden state entering the layer."""

    bb = lsg.load_backbone("tiny-random", sinks={**SINKS, "vit_dims": [], "tau_vit": None})
    groups = resolve_groups(bb, "auto")
    assert groups == ["text_sink", "lsink", "ordinary", "other_text"]
    obs = observe(bb, questions, None, [0, 2, 3], groups, "last", maps=False, batch_size=2)
    _, hidden, seg, _ = eager_reference(bb, questions, attentions=False)
    for i, layer in enumerate([0, 2, 3]):
        x = hidden[layer]
        phi = x[..., SINKS["llm_dims"]].abs().amax(-1) / x.pow(2).mean(-1).sqrt()
        flagged = phi >= SINKS["tau_llm"]
        hand = {"text_sink": flagged & seg.text, "lsink": flagged & seg.vis, "ordinary": seg.vis & ~flagged,
                "other_text": seg.text & ~flagged}
        for b, o in enumerate(obs):
            for g, name in enumerate(groups):
                sel = hand[name][b]
                want = x[b][sel].norm(dim=-1).mean().item() if sel.any() else np.nan
                np.testing.assert_allclose(o.norm[i, g], want, rtol=1e-5, equal_nan=True)
    assert not np.isnan(np.stack([o.norm for o in obs])).all((0, 1)).any(), "every group must occur somewhere"


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "llava-onevision"])
def test_token_grid_places_a_planted_vsink_where_the_family_maps_it(family, tmp_path):
    """A V-sink planted at ViT patch p lands, through the family's own patch -> token map, on the
    visual token whose grid cell is p's position on the image."""
    if family == "llava":
        bb = lsg.load_backbone("tiny-random")
    else:
        folder = (save_tiny_qwen2_vl if family == "qwen2-vl" else save_tiny_onevision)(tmp_path)
        bb = lsg.load_backbone(family, hf_id=str(folder), dtype="float32", sinks=SINKS)
    image = Image.new("RGB", (64, 32) if family == "llava-onevision" else (32, 32), "gray")
    batch = bb.build_batch([image], ["How many objects are in the image ?"])
    side = 4  # 32 px / 8 px patches
    if family == "llava":
        patch, cell = 6, (0, 6 // side, 6 % side)  # row 1, col 2
    elif family == "qwen2-vl":
        # processor order: 2x2 blocks of patches, blocks in raster order over the 2x2 merged grid
        patch, cell = 1 * 4 + 2, (0, 0, 1)  # block 1 = merged cell (row 0, col 1)
    else:
        # crops: the base (whole image), then two 32 px sub-crops side by side (no unpadding at 2:1)
        patch, cell = 2 * 16 + 5, (1, 5 // side, side + 5 % side)  # second sub-crop, its patch (1, 1)

    def plant(module, args, output):
        hidden = output.hidden_states[bb.model.config.vision_feature_layer] if family != "qwen2-vl" \
            else output.last_hidden_state
        flat = hidden.view(-1, hidden.shape[-1]) if hidden.is_contiguous() else None
        if flat is None:  # a strided view (OneVision): index the crops directly
            hidden[patch // hidden.shape[1], patch % hidden.shape[1], 0] = 1000.0
            return
        offset = 1 if family == "llava" else 0  # LLaVA's CLS token comes first, then the patches
        per_crop = flat.shape[0] // (hidden.shape[0] if hidden.dim() == 3 else 1)
        row = (patch // (per_crop - offset)) * per_crop + offset + patch % (per_crop - offset) if offset else patch
        flat[row, 0] = 1000.0

    vsink, vis = vsinks_with_planted_patch(bb, batch, plant)
    flags = vsink[0][vis[0]]
    assert int(flags.sum()) == 1
    grid = bb.family.token_grid(bb.model, batch)[0]
    assert tuple(grid[flags.nonzero().item()].tolist()) == cell


def test_attention_maps_with_a_stack_side_by_side(tiny, questions, tmp_path):
    from lsg.specs import parse_stack

    stack = parse_stack("oracle@1:0.1", tiny).layers
    result = attention_maps.run(tiny, questions[:2], {"layers": [1, 2], "heads": "all", "batch_size": 2}, tmp_path,
                                {"oracle@1:0.1": stack}, progress=False)
    data = json.loads((tmp_path / "maps" / "maps.json").read_text())
    q = data["questions"][0]
    assert list(q["stacks"]) == ["none", "oracle@1:0.1"]
    with_gate, without = (np.asarray(q["stacks"][s]["maps"]["1"]) for s in ("oracle@1:0.1", "none"))
    assert with_gate.shape == without.shape == (4, 16) and not np.allclose(with_gate, without)
    assert len(result.figures) == 2 and all(f.suffix in (".json", ".png") for f in result.files)
    assert len(result.figures[0].frames) == 2  # one frame per layer on the slider


def test_profiles_and_activations_write_json_png_and_cis(tiny, questions, tmp_path):
    result = profiles.run_layers(tiny, questions, {"layers": "all", "groups": ["ordinary", "other_text"]}, tmp_path,
                                 {"var@1-2": lsg.specs.parse_stack("var@1-2", tiny).layers}, progress=False)
    data = json.loads((tmp_path / "profiles" / "profiles.json").read_text())
    stats = data["stacks"]["none"]["norm"]
    mean, low, high = (np.asarray(stats[k], dtype=float) for k in ("mean", "low", "high"))
    assert mean.shape == (4, 2) and (low <= mean + 1e-9).all() and (mean <= high + 1e-9).all()
    assert {f.name for f in result.files} == {"profiles.json", "profiles.png"} and "var@1-2" in data["stacks"]
    result = profiles.run_activations(tiny, questions, {"layers": [2]}, tmp_path, progress=False)
    act = json.loads((tmp_path / "activations" / "activations.json").read_text())
    assert list(act["panels"]) == ["vit", "layer 0", "layer 2"]
    assert len(act["panels"]["layer 2"]["abs_x"][0]) == tiny.hidden_size
    assert (tmp_path / "activations" / "activations.png").stat().st_size > 0


def test_mean_ci_brackets_the_mean_and_skips_missing_values():
    values = np.array([[1.0, np.nan], [2.0, np.nan], [3.0, 5.0]])
    mean, low, high, n = mean_ci(values, samples=500)
    assert mean[0] == 2.0 and low[0] < 2.0 < high[0] and n.tolist() == [3, 1] and mean[1] == 5.0


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_naming_the_allowed_values(tiny, questions, tmp_path):
    from lsg.cli.analyze import resolve_what

    with pytest.raises(ValueError, match=r"layer.*0\.\.3"):
        attention_maps.run(tiny, questions, {"layers": [7]}, tmp_path)
    with pytest.raises(ValueError, match=r"Head 9 .*0\.\.3"):
        attention_maps.run(tiny, questions, {"heads": [9]}, tmp_path)
    smol_like = lsg.load_backbone("tiny-random", sinks={**SINKS, "vit_dims": [], "tau_vit": None})
    with pytest.raises(ValueError, match=r"'vsink' is not available.*available: text_sink, lsink"):
        profiles.run_layers(smol_like, questions, {"groups": ["vsink"]}, tmp_path)
    with pytest.raises(ValueError, match=r"Unknown token group 'sinks'.*text_sink, vsink"):
        resolve_groups(tiny, ["sinks"])
    with pytest.raises(ValueError, match=r"Unknown analysis \['heatmap'\].*maps, profiles, activations, probes"):
        resolve_what("heatmap")
    no_image = VQARecord(id="text-only", question="How many ?", answer="A")
    with pytest.raises(ValueError, match=r"\['text-only'\] have no image"):
        observe(tiny, [no_image], None, [0], ["ordinary"])
    with pytest.raises(ValueError, match=r"queries='every'.*last, user, answer"):
        observe(tiny, questions, None, [0], ["ordinary"], "every")


def test_an_interrupted_analysis_restarts_and_a_finished_one_is_reused(tiny, questions, tmp_path, monkeypatch):
    import lsg.analysis.profiles as module

    cfg = {"layers": [0, 1]}
    real_png = module.save_png
    monkeypatch.setattr(module, "save_png", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed after the JSON, before the PNG and the marker
        module.run_layers(tiny, questions, cfg, tmp_path, progress=False)
    assert (tmp_path / "profiles" / "profiles.json").exists() and not (tmp_path / "profiles" / "done.json").exists()
    monkeypatch.setattr(module, "save_png", real_png)
    calls = []
    real_observe = module.observe
    monkeypatch.setattr(module, "observe", lambda *a, **k: calls.append(1) or real_observe(*a, **k))
    first = module.run_layers(tiny, questions, cfg, tmp_path, progress=False)
    assert calls == [1] and (tmp_path / "profiles" / "done.json").exists()  # redone, not read as complete
    again = module.run_layers(tiny, questions, cfg, tmp_path, progress=False)
    assert calls == [1] and again.summary == first.summary  # reused
    module.run_layers(tiny, questions, {"layers": [0, 2]}, tmp_path, progress=False)
    assert calls == [1, 1]  # other settings: recomputed


def test_smol_llava_maps_match_eager_attention(tmp_path_factory):
    """The real 135M backbone (eager, so HF's weights are the reference), 2 questions."""
    bb = lsg.load_backbone("smol-llava", attn_implementation="eager")
    qs = records(tmp_path_factory, 2)
    layers = [0, 10, bb.num_layers - 1]
    obs = observe(bb, qs, None, layers, available_groups(bb), "last", batch_size=2)
    attn, _, seg, _ = eager_reference(bb, qs)
    for b, o in enumerate(obs):
        for layer in layers:
            want = attn[layer, b, :, seg.last_prompt[b]][:, seg.vis[b]].numpy()
            np.testing.assert_allclose(o.maps[layer], want, atol=1e-5, rtol=1e-4)
    assert obs[0].maps[layers[0]].shape == (bb.family.text_config(bb.model).num_attention_heads, 144)


def test_figure_labels_shorten_gate_files_to_their_stem():
    from lsg.analysis.common import stack_label

    assert stack_label("lsg:checkpoints/smol-llava/lsg-L10.safetensors+var") == "lsg:lsg-L10+var"
    assert stack_label("stack:runs/x/stack.json") == "stack:stack"
    for spec in ("none", "oracle@10:0.3", "var@2-3+oracle@1:0.2/0.5/0.9"):
        assert stack_label(spec) == spec
