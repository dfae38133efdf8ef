"""Tests for lsg.data: answers are re-derived independently from the Scene / pixels."""
import hashlib
import io
import json
import math
import re
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lsg.data import (
    COLOUR_NAMES, COLOURS, SHAPES, SUBTASKS, ShapesConfig, VQARecord, generate_scene_sample,
    generate_split, load_llava_json, patch_labels, render, sample_scene,
)
from lsg.data.shapes import describe, scene_questions

CFG = ShapesConfig()
N = 700  # 100 per sub-task


@pytest.fixture(scope="module")
def samples():
    return [sample_scene("test", i, CFG) for i in range(N)]


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def answer_text(rec):
    letter = rec["conversations"][1]["value"]
    return rec["options"]["ABCDEFGHIJ".index(letter)]


def by_ref(scene):
    return {f"the {o.colour} {o.shape}": o for o in scene.objects}


def dist(a, b):
    return math.dist(a.centre, b.centre)


# --- determinism and splits -------------------------------------------------------------

def test_deterministic():
    for i in (0, 3, 6, 123):
        img1, rec1, lab1 = generate_scene_sample("train", i)
        img2, rec2, lab2 = generate_scene_sample("train", i)
        assert png_bytes(img1) == png_bytes(img2)
        assert rec1 == rec2
        assert all(np.array_equal(lab1[k], lab2[k]) for k in ("colour", "shape", "size"))


def test_golden_hash():
    # Guards reproducibility across runs/machines: Python's string seeding is SHA-512 based.
    h = hashlib.sha256()
    for i in range(7):
        img, rec, _ = generate_scene_sample("test", i)
        h.update(img.tobytes())
        h.update(json.dumps(rec, sort_keys=True).encode())
    assert h.hexdigest()[:16] == GOLDEN


def test_splits_disjoint():
    train = {generate_scene_sample("train", i)[0].tobytes() for i in range(200)}
    val = {generate_scene_sample("val", i)[0].tobytes() for i in range(200)}
    assert len(train) == 200 and not train & val


# --- scene and labels -------------------------------------------------------------------

def test_scene_invariants_and_patch_labels(samples):
    for scene, _ in samples[:200]:
        img = np.asarray(render(scene, CFG))
        assert img.shape == (CFG.image_size, CFG.image_size, 3)
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
        lab = patch_labels(scene, CFG)
        assert lab["count"] == len(scene.objects)
        assert (lab["colour"] > 0).sum() == len(scene.objects)
        for o in scene.objects:
            x, y = o.centre
            assert tuple(img[y, x]) == COLOURS[o.colour]
            # object's bounding box lies inside its cell, i.e. inside one ViT patch
            r0, c0 = o.cell[0] * CFG.cell, o.cell[1] * CFG.cell
            assert c0 <= x - o.radius and x + o.radius < c0 + CFG.cell
            assert r0 <= y - o.radius and y + o.radius < r0 + CFG.cell
            idx = (y // CFG.cell) * CFG.grid + x // CFG.cell  # from pixels, not from o.cell
            assert COLOUR_NAMES[lab["colour"][idx] - 1] == o.colour
            assert SHAPES[lab["shape"][idx] - 1] == o.shape
            assert lab["size"][idx] == (2 if o.size == "large" else 1)
        # every painted pixel belongs to some object's cell; empty cells are pure background
        for idx in np.flatnonzero(lab["colour"] == 0):
            r, c = divmod(idx, CFG.grid)
            patch = img[r * CFG.cell:(r + 1) * CFG.cell, c * CFG.cell:(c + 1) * CFG.cell]
            assert (patch == CFG.background).all()


def test_caption_lists_every_object_with_its_place_read_from_pixel_centres(samples):
    for scene, _ in samples[:100]:
        caption = describe(scene, CFG)
        head, body = caption.rstrip(".").split(": ")
        assert int(head.split()[0]) == len(scene.objects)
        parts = body.split(", ")
        assert len(parts) == len(scene.objects)
        for o in scene.objects:
            x, y = o.centre  # thirds of the image in pixels, independent of the grid cell
            row = ("top", "middle", "bottom")[3 * y // CFG.image_size]
            col = ("left", "centre", "right")[3 * x // CFG.image_size]
            assert f"a {o.size} {o.colour} {o.shape} at the {row} {col}" in parts


# --- answers are correct ----------------------------------------------------------------

def test_prompt_format(samples):
    for _, rec in samples[:14]:
        human = rec["conversations"][0]["value"]
        lines = human.split("\n")
        assert lines[0] == "<image>" and lines[2] == "Options:"
        assert lines[3:-1] == [f"({'ABCDEFGHIJ'[k]}) {o}" for k, o in enumerate(rec["options"])]
        assert lines[-1] == "Answer with the option's letter from the given choices directly."
        assert rec["image"].startswith("images/test_")


def test_answers_correct(samples):
    for scene, rec in samples:
        check_answer(scene, rec)


def test_multi_question_scenes_pose_every_possible_subtask_with_correct_answers():
    counts = Counter()
    for i in range(200):
        scene, records = scene_questions("train", i, CFG)
        assert [r["subtask"] for r in records] == [t for t in SUBTASKS if t in {r["subtask"] for r in records}]
        for rec in records:
            check_answer(scene, rec)
        counts.update(r["subtask"] for r in records)
        counts["objects", len(scene.objects)] += 1
    assert counts["count"] == 200  # every scene can be counted
    assert counts["existence"] >= 190 and counts["relation"] > 100 and counts["distance"] > 50
    assert {k[1] for k in counts if isinstance(k, tuple)} == set(range(1, 7))  # object counts span 1..6
    multi = {json.dumps(scene_questions("val", i, CFG)[1]) for i in range(20)}
    single = {json.dumps(sample_scene("val", i, CFG)[1]) for i in range(20)}
    assert not multi & single


def check_answer(scene, rec):
    """Re-derive the record's answer from the scene (pixels for colour)."""
    q = rec["conversations"][0]["value"].split("\n")[1]
    ans, objs, refs = answer_text(rec), scene.objects, by_ref(scene)
    task = rec["subtask"]
    if task == "count":
        assert int(ans) == len(objs) and len(rec["options"]) == 5 == len(set(rec["options"]))
    elif task == "relation":
        a, b = (refs[m] for m in re.fullmatch(r"Where is (.+) relative to (.+)\?", q).groups())
        dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
        if ans in ("left of", "right of"):
            assert abs(dx) >= CFG.cell and abs(dy) < abs(dx) and (dx < 0) == (ans == "left of")
        else:
            assert abs(dy) >= CFG.cell and abs(dx) < abs(dy) and (dy < 0) == (ans == "above")
    elif task == "distance":
        x = refs[re.fullmatch(r"Which object is closer to (.+)\?", q).group(1)]
        p, o = (refs[r] for r in rec["options"])
        d = {p.ref: dist(x, p), o.ref: dist(x, o)}
        assert len(objs) >= 3 and x not in (p, o)
        assert d[ans] == min(d.values()) and abs(d[p.ref] - d[o.ref]) >= CFG.cell
    elif task == "depth":
        sizes = {r: refs[r].size for r in rec["options"]}
        assert sorted(sizes.values()) == ["large", "small"] and sizes[ans] == "large"
    elif task == "colour":
        shape = re.fullmatch(r"What colour is the (\w+)\?", q).group(1)
        (o,) = [o for o in objs if o.shape == shape]
        img = render(scene, CFG)
        assert img.getpixel(o.centre) == COLOURS[ans] and len(rec["options"]) == 4
    elif task == "shape":
        colour = re.fullmatch(r"What shape is the (\w+) object\?", q).group(1)
        (o,) = [o for o in objs if o.colour == colour]
        assert ans == o.shape
    elif task == "existence":
        c, s = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q).groups()
        present = {(o.colour, o.shape) for o in objs}
        assert rec["options"] == ["Yes", "No"]
        assert (ans == "Yes") == ((c, s) in present) == (rec["pope"] == "positive")
        if rec["pope"] in ("popular", "adversarial"):
            assert c in {o.colour for o in objs}
        if rec["pope"] == "adversarial":
            assert s in {o.shape for o in objs}
    else:
        pytest.fail(f"unknown subtask {task}")


def test_balance(samples):
    recs = [r for _, r in samples]
    assert Counter(r["subtask"] for r in recs) == {t: N // len(SUBTASKS) for t in SUBTASKS}
    for task in SUBTASKS:
        sub = [r for r in recs if r["subtask"] == task]
        k = len(sub[0]["options"])
        letters = Counter(r["conversations"][1]["value"] for r in sub)
        for letter in "ABCDEFGHIJ"[:k]:  # every letter within +-50% of uniform
            assert 0.5 / k <= letters[letter] / len(sub) <= 1.5 / k, (task, letters)
    pope = Counter(r["pope"] for r in recs if r["subtask"] == "existence")
    assert pope["positive"] == 50 and all(15 <= pope[k] <= 18 for k in ("random", "popular", "adversarial"))
    rel = Counter(answer_text(r) for r in recs if r["subtask"] == "relation")
    assert set(rel.values()) == {25}


# --- generate_split + llava_json round trip ---------------------------------------------

def test_generate_split_roundtrip(tmp_path):
    path = generate_split("val", 14, tmp_path)
    assert path == tmp_path / "val.json" and len(list((tmp_path / "images").glob("*.png"))) == 14
    mtime = path.stat().st_mtime_ns
    assert generate_split("val", 14, tmp_path) == path and path.stat().st_mtime_ns == mtime  # cached
    generate_split("val", 7, tmp_path)  # different n -> regenerated
    assert len(json.loads(path.read_text())) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean data must not warn
        recs = load_llava_json(path)
    assert len(recs) == 7 and isinstance(recs[0], VQARecord)
    for i, r in enumerate(recs):
        _, raw, _ = generate_scene_sample("val", i)
        assert r.id == raw["id"] and r.subtask == raw["subtask"] and r.image_path.is_file()
        assert r.options == tuple(raw["options"]) and r.answer_letter == r.answer == raw["conversations"][1]["value"]
        assert not r.question.startswith("<image>") and r.question.startswith(raw["conversations"][0]["value"][8:])


def _rec(i, image, human="<image>\nWhat is it?", answer="A", **extra):
    return {"id": f"r{i}", "image": image,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}], **extra}


def test_llava_json_skips_bad_records(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    data = [
        _rec(0, "ok.png", options=["cat", "dog"], category="animals"),
        _rec(1, "ok.png", human="What is it?\n<image>", answer=" a cat "),
        _rec(2, "missing.png"),
        _rec(3, "bad.png"),
        _rec(4, "ok.png", answer="  "),
        _rec(5, "ok.png", human="no tag here"),
        {"id": "r6", "image": "ok.png"},
        _rec(7, "ok.png", answer="C", options=["x", "y"]),  # letter beyond options -> no answer_letter
        {"id": "r8", "conversations": _rec(8, "")["conversations"]},  # text-only record
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning) as w:
        recs = load_llava_json(path)
    msg = str(w[0].message)
    assert len(w) == 1 and "skipped 6 of 9" in msg
    for reason in ("missing_image=1", "corrupt_image=1", "empty_answer=1", "no_image_tag=1", "malformed=1",
                   "no_image_field=1"):
        assert reason in msg
    assert [r.id for r in recs] == ["r0", "r1", "r7"]
    r0, r1, r7 = recs
    assert r0.question == "What is it?" and r0.answer_letter == "A" and r0.subtask == "animals"
    assert r1.question == "What is it?" and r1.answer == "a cat" and r1.answer_letter is None
    assert r1.subtask == "all" and r1.options == () and r1.image_path == tmp_path / "ok.png"
    assert r7.answer_letter is None
    # without image verification the corrupt file is accepted
    with pytest.warns(UserWarning):
        assert len(load_llava_json(path, check_images=False)) == 4


def test_llava_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_llava_json(tmp_path / "nope.json")
    path = tmp_path / "empty.json"
    path.write_text(json.dumps([_rec(0, "missing.png"), _rec(1, "missing2.png")]))
    with pytest.raises(ValueError, match=r"empty\.json.*missing_image=2.*image_folder"):
        load_llava_json(path)
    path.write_text("{}")
    with pytest.raises(ValueError, match="list"):
        load_llava_json(path)


GOLDEN = "318440d937ac7727"  # update deliberately when generation changes (bump GENERATOR_VERSION)
