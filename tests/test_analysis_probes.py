"""Linear probes (LSG paper Figure 4, `lsg.analysis.probes`) on the tiny random backbone: the
accuracies equal those of the same sklearn probe fitted on features extracted by hand (a plain
forward, V-sinks / L-sinks flagged by hand, the mean by hand); every layer comes from one forward
per batch; a backbone without V-sinks reports that group empty; bad options are refused by name;
an interrupted run leaves nothing a re-run takes as complete."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from lsg.analysis import probes
from lsg.data import generate_scene_sample
from lsg.sinks import SinkConfig

N_IMAGES, BATCH, FOLDS = 30, 8, 3  # 4 batches, the last one short
CFG = {"n_images": N_IMAGES, "batch_size": BATCH, "folds": FOLDS, "bootstrap_samples": 200, "progress": False}


def hand_scene_batches(bb, n=N_IMAGES, batch_size=BATCH):
    """Per batch: (model inputs, targets {name: (B,)}) of shapes val scenes 0..n-1; targets from
    the patch labels: count, and the first object's colour / shape / size in row-major cell order."""
    out = []
    for start in range(0, n, batch_size):
        scenes = [generate_scene_sample("val", i) for i in range(start, min(n, start + batch_size))]
        batch = bb.build_batch([s[0] for s in scenes],
                               [s[1]["conversations"][0]["value"].replace("<image>\n", "", 1) for s in scenes])
        targets = {"count": [s[2]["count"] for s in scenes]}
        for name in ("colour", "shape", "size"):
            targets[name] = [int(s[2][name][s[2]["colour"] > 0][0]) for s in scenes]
        out.append((batch, targets))
    return out


@torch.no_grad()
def hand_features(bb):
    """{group: (L, N, D)} mean hidden state entering each layer over the group's tokens (NaN when
    none) and {target: (N,)}: a plain forward, the ViT feature layer read from the vision tower
    itself, V-sinks = phi_rms over vit_dims >= tau_vit, L-sinks = visual non-V-sinks with
    phi_rms(x^l) >= tau_llm (tiny-random: scope `layer`), ordinary = the other visual tokens."""
    cfg = bb.sinks
    assert cfg.normalisation == "rms" and cfg.lsink_scope == "layer"
    phi = lambda x, dims: x[..., dims].abs().amax(-1) / x.pow(2).mean(-1).sqrt()  # noqa: E731
    feats, targets = {g: [] for g in probes.GROUPS}, {t: [] for t in probes.TARGETS}
    for batch, batch_targets in hand_scene_batches(bb):
        hidden = bb.model(**batch, output_hidden_states=True).hidden_states
        vit = bb.model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        vis = batch["input_ids"] == bb.image_token_id
        vsink = torch.zeros_like(vis)
        vsink[vis] = (phi(vit, cfg.vit_dims) >= cfg.tau_vit).flatten()
        per_layer = {g: [] for g in probes.GROUPS}
        for layer in range(bb.num_layers):
            x = hidden[layer]
            lsink = (phi(x, cfg.llm_dims) >= cfg.tau_llm) & vis & ~vsink
            for g, mask in {"vsink": vsink, "lsink": lsink, "ordinary": vis & ~vsink & ~lsink}.items():
                n = mask.sum(1, keepdim=True)
                mean = (x * mask[..., None]).sum(1) / n
                per_layer[g].append(torch.where(n > 0, mean, torch.nan))
        for g in probes.GROUPS:
            feats[g].append(torch.stack(per_layer[g]))
        for t in probes.TARGETS:
            targets[t] += batch_targets[t]
    return {g: torch.cat(f, 1) for g, f in feats.items()}, {t: np.array(v) for t, v in targets.items()}


def sklearn_accuracy(x, y, folds=FOLDS, seed=0):
    """Held-out accuracy (%) of StandardScaler + LogisticRegression under stratified k-fold, on
    the images with group tokens whose class has >= `folds` of them; None when fewer than 2
    classes or 2 * folds images are left."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = ~np.isnan(x).any(1)
    keep &= np.array([(y[keep] == c).sum() >= folds for c in y])
    if len(set(y[keep])) < 2 or keep.sum() < 2 * folds:
        return None
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    predicted = cross_val_predict(pipe, x[keep], y[keep], cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return 100 * float((predicted == y[keep]).mean())


def test_probe_accuracy_matches_a_probe_fitted_on_hand_extracted_features(tiny, tmp_path):
    result = probes.run(tiny, None, CFG, tmp_path)
    report = json.loads((tmp_path / "probes.json").read_text())
    feats, targets = hand_features(tiny)
    # the test proves something only if every group has tokens in some images
    assert all(torch.isfinite(feats[g]).any() for g in probes.GROUPS)
    assert torch.isnan(feats["lsink"]).any(), "some image without an L-sink at some layer"
    fitted = 0
    for target in probes.TARGETS:
        assert report["targets"][target]["chance_pct"] == pytest.approx(
            100 * np.bincount(targets[target]).max() / N_IMAGES)
        for group in probes.GROUPS:
            for layer in range(tiny.num_layers):
                x = feats[group][layer].double().numpy()
                expected, cell = sklearn_accuracy(x, targets[target]), report["probes"][target][group][str(layer)]
                if expected is None:
                    assert "skipped" in cell
                else:
                    fitted += 1
                    assert cell["acc_pct"] == pytest.approx(expected, abs=1e-9), (target, group, layer)
                    assert cell["ci_low_pct"] <= cell["acc_pct"] <= cell["ci_high_pct"]
    assert fitted >= 40  # of 4 targets x 3 groups x 4 layers
    # the pieces: pooled features equal the hand ones, and the figure draws every group and chance
    scenes = probes.load_scenes(None, "val", N_IMAGES)
    pooled = probes.pooled_features(tiny, scenes.images, scenes.prompts, range(tiny.num_layers), batch_size=BATCH)
    for g in probes.GROUPS:
        torch.testing.assert_close(pooled.features[g], feats[g], equal_nan=True, atol=1e-5, rtol=1e-5)
    alone = probes.pooled_features(tiny, scenes.images, scenes.prompts, [1], ["ordinary"], batch_size=BATCH)
    assert list(alone.features) == ["ordinary"]  # ordinary excludes the sinks even when they are not asked for
    torch.testing.assert_close(alone.features["ordinary"][0], feats["ordinary"][1], atol=1e-5, rtol=1e-5)
    names = {trace.name for trace in result.figures[0].data}
    assert {"V-sinks", "L-sinks", "ordinary"} <= names
    assert [f.name for f in result.files] == ["probes.png", "probes.json"] and all(f.exists() for f in result.files)


def test_every_layer_is_read_from_one_forward_per_batch(tiny):
    calls = []
    handle = tiny.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        scenes = probes.load_scenes(None, "val", N_IMAGES)
        pooled = probes.pooled_features(tiny, scenes.images, scenes.prompts, [0, 2, 3], batch_size=BATCH)
    finally:
        handle.remove()
    assert len(calls) == math.ceil(N_IMAGES / BATCH)
    assert pooled.features["ordinary"].shape == (3, N_IMAGES, tiny.hidden_size)


def without_vsinks(bb):
    """The same backbone (shared model) with no ViT sink dims configured."""
    return dataclasses.replace(bb, sinks=SinkConfig(**{**bb.sinks.to_dict(), "vit_dims": [], "tau_vit": None}))


def test_a_backbone_without_vsinks_reports_that_group_empty_not_faked(tiny, tmp_path):
    bb = without_vsinks(tiny)
    result = probes.run(bb, None, {**CFG, "targets": ["count"]}, tmp_path)
    report = json.loads((tmp_path / "probes.json").read_text())
    assert "no V-sinks" in report["groups"]["vsink"] and report["groups"]["lsink"] is None
    assert report["probes"]["count"]["vsink"] == {} and "vsink" not in report["tokens_per_image"]
    assert all(row[1] != "vsink" for row in report["rows"])
    assert result.summary["empty_groups"] == ["vsink"] and "vsink" not in result.summary["best"]["count"]
    assert "V-sinks" not in {trace.name for trace in result.figures[0].data}
    assert "V-sinks: none" in result.figures[0].layout.title.text
    # every visual token is an L-sink or ordinary (16 per image on tiny-random)
    per_image = [report["tokens_per_image"]["lsink"][l] + report["tokens_per_image"]["ordinary"][l] for l in "0123"]
    assert per_image == pytest.approx([16.0] * 4)


@pytest.mark.parametrize("option, words", [
    ({"layers": [1, 4]}, ["layers=[1, 4]", "[4]", "0..3"]),
    ({"layers": -1}, ["layers=-1", "0..3"]),
    ({"layers": "every:x"}, ["'every:x'", "0..3"]),
    ({"groups": ["sinks"]}, ["'sinks'", "vsink, lsink, ordinary"]),
    ({"targets": ["area"]}, ["area", "count, colour, shape, size"]),
    ({"fold": 3}, ["fold", "folds"]),
    ({"folds": 1}, ["folds=1", ">= 2"]),
])
def test_bad_options_are_refused_naming_the_value_and_the_allowed_ones(tiny, tmp_path, option, words):
    with pytest.raises(ValueError) as error:
        probes.run(tiny, None, {**CFG, **option}, tmp_path)
    assert all(w in str(error.value) for w in words), str(error.value)
    assert not (tmp_path / "probes.json").exists()


def test_asking_for_vsinks_on_a_backbone_without_them_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"asks for 'vsink'.*no V-sinks.*its groups: lsink, ordinary"):
        probes.run(without_vsinks(tiny), None, {**CFG, "groups": ["vsink", "ordinary"]}, tmp_path)


def test_the_callers_questions_are_probed_when_asked_and_must_be_shapes_scenes(tiny, tmp_path):
    from lsg.data.record import VQARecord

    cfg = {**CFG, "use_records": True, "targets": ["count"], "layers": [3]}
    records = [VQARecord(id=f"shapes_val_{i:06d}", question="?", answer="A") for i in range(N_IMAGES)]
    probes.run(tiny, records, cfg, tmp_path / "records")
    probes.run(tiny, None, {**cfg, "use_records": False}, tmp_path / "split")
    read = lambda name: json.loads((tmp_path / name / "probes.json").read_text())  # noqa: E731
    assert read("records")["probes"] == read("split")["probes"]  # the same scenes, val 0..N-1
    assert probes.run(tiny, [VQARecord(id="mmstar_12", question="?", answer="A")], {**cfg, "use_records": False},
                      tmp_path / "ignored").summary["n_images"] == N_IMAGES
    with pytest.raises(ValueError, match="'mmstar_12'.*shapes_<split>_<index>"):
        probes.run(tiny, [VQARecord(id="mmstar_12", question="?", answer="A")], cfg, tmp_path)


def test_an_interrupted_run_leaves_nothing_a_rerun_reads_as_complete(tiny, tmp_path, monkeypatch):
    cfg = {**CFG, "targets": ["size"], "layers": [3]}
    real_save_png = probes.save_png

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(probes, "save_png", killed)
    with pytest.raises(KeyboardInterrupt):
        probes.run(tiny, None, cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(probes, "save_png", real_save_png)
    first = probes.run(tiny, None, cfg, tmp_path)
    # complete: a re-run reuses it without a forward ...
    real_pooled = probes.pooled_features
    monkeypatch.setattr(probes, "pooled_features", lambda *a, **k: pytest.fail("recomputed a complete run"))
    assert probes.run(tiny, None, cfg, tmp_path).summary == first.summary
    # ... but a torn JSON, or other options, are computed again
    forwards = []
    monkeypatch.setattr(probes, "pooled_features", lambda *a, **k: forwards.append(1) or real_pooled(*a, **k))
    text = (tmp_path / "probes.json").read_text()
    (tmp_path / "probes.json").write_text(text[: len(text) // 2])
    assert probes.run(tiny, None, cfg, tmp_path).summary == first.summary
    probes.run(tiny, None, {**cfg, "seed": 1}, tmp_path)
    assert len(forwards) == 2
