"""The embedded backbone's build recipe (`lsg.embedded.recipe`), its command line and probes
(`scripts/`): sample formats, caption scoring, bad flags."""

from __future__ import annotations

import pytest

from lsg.data.shapes import Scene, SceneObject, describe, sample_scene
from lsg.embedded import recipe
from scripts import probe_captions, probe_readout, train_embedded


def two_objects():
    return Scene([SceneObject("red", "circle", "large", (0, 0), (8, 8), 7),
                  SceneObject("blue", "square", "small", (5, 5), (88, 88), 4)])


def test_caption_score_reads_count_and_pairs_from_text():
    scene = two_objects()
    assert probe_captions.score(describe(scene), scene) == (True, {("red", "circle"), ("blue", "square")},
                                                   {("red", "circle"), ("blue", "square")})
    ok, named, true = probe_captions.score("3 objects: a large red circle at the top left, a small green square.", scene)
    assert not ok and named == {("red", "circle"), ("green", "square")}
    assert probe_captions.score("The image shows a red circle.", scene)[0] is False  # no count at the start


def test_open_answer_sample_is_the_question_answered_with_the_correct_option_text():
    for i in range(14):
        scene, record = sample_scene("train", i)
        prompt, answer = recipe.open_answer_sample(record)
        human = record["conversations"][0]["value"]
        assert prompt == human.split("\n")[1] + "\n" + recipe.OPEN_ANSWER_SUFFIX
        assert answer == record["options"]["ABCDEFG".index(record["conversations"][1]["value"])]


@pytest.mark.parametrize("argv, message", [
    (["--caption-fraction", "1.5"], "--caption-fraction is a share"),
    (["--open-answer-fraction", "-0.1"], "--open-answer-fraction is a share"),
    (["--caption-fraction", "0.6", "--open-answer-fraction", "0.6"], "keep their sum <= 1"),
    (["--fresh-lora"], "--fresh-lora only applies with --continue-stage-b"),
    (["--stage-b-steps", "-1"], "--stage-b-steps must be >= 0"),
])
def test_bad_stage_b_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_embedded.parse_args(argv)
    assert message in capsys.readouterr().err


def test_dialogue_batch_marks_each_answer_and_its_loss_is_the_per_question_option_cross_entropy(tiny):
    import torch

    from lsg.data.shapes import render, scene_questions

    scenes = [scene_questions("train", i) for i in range(3)]
    dialogues = [records[:k] for k, (_, records) in zip((1, 3, 2), scenes)]
    images = [render(scene) for scene, _ in scenes]
    batch, turns = recipe.dialogue_batch(tiny, images, dialogues)
    assert len(turns) == 6
    letter_id = {c: tiny.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ABCDE"}
    for (row, pos, k, answer), record in zip(turns, [r for d in dialogues for r in d]):
        assert k == len(record["options"]) and "ABCDE"[answer] == record["conversations"][1]["value"]
        assert batch["input_ids"][row, pos + 1] == batch["labels"][row, pos + 1] == letter_id["ABCDE"[answer]]
        assert batch["labels"][row, pos] == -100  # the prompt itself is never a target
    # A one-turn dialogue is exactly the library's single-question batch.
    one, _ = recipe.dialogue_batch(tiny, images[:1], dialogues[:1])
    prompt, letter, _ = recipe.record_to_sample(dialogues[0][0])
    ref = tiny.build_batch(images[:1], [prompt], [letter], padding_side="right")
    assert all(torch.equal(one[key], ref[key]) for key in ref)
    # Options loss = mean over questions of a softmax over that question's own letters.
    with torch.no_grad():
        logits = tiny.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        got = recipe.dialogue_loss(tiny, batch, turns, "options")
    expected = sum(logits[row, pos, [letter_id[c] for c in "ABCDE"[:k]]].log_softmax(0)[answer]
                   for row, pos, k, answer in turns) / -len(turns)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_readout_probe_builds_oracle_tokens_from_the_scene():
    import torch

    scene = two_objects()  # red circle (large) at cell (0, 0), blue square (small) at cell (5, 5)
    d = 4
    tables = random_tables(d)
    red, blue, circle, square, large, small = 1, 3, 1, 2, 2, 1  # label ids: index in COLOUR_NAMES/SHAPES/SIZES + 1
    one = probe_readout.oracle_tokens([scene], tables, "word-sum")
    assert one.shape == (1, 36, d)
    torch.testing.assert_close(one[0, 0], tables["colour"][red] + tables["shape"][circle] + tables["size"][large])
    torch.testing.assert_close(one[0, 35], tables["colour"][blue] + tables["shape"][square] + tables["size"][small])
    torch.testing.assert_close(one[0, 1], tables["colour"][0] + tables["shape"][0] + tables["size"][0])  # empty
    two = probe_readout.oracle_tokens([scene], tables, "two-token")
    assert two.shape == (1, 72, d)
    torch.testing.assert_close(two[0, :2], torch.stack([tables["colour"][red], tables["shape"][circle]]))
    torch.testing.assert_close(two[0, 70:], torch.stack([tables["colour"][blue], tables["shape"][square]]))
    assert probe_readout.oracle_tokens([scene], tables, "text").abs().sum() == 0


def test_stage_b_loss_weights_free_form_and_multiple_choice_rows_per_sample(tiny):
    import torch
    import torch.nn.functional as F

    from lsg.data.shapes import render

    scenes = [sample_scene("train", i) for i in range(4)]
    records = [r for _, r in scenes]
    prompts = [("Describe the image.", "red circle")] + [recipe.record_to_sample(r)[:2] for r in records[1:]]
    batch = tiny.build_batch([render(s) for s, _ in scenes], [p for p, _ in prompts], [a for _, a in prompts],
                             padding_side="right")
    with torch.no_grad():
        got = recipe.stage_b_loss(tiny, batch, records, 1, "options")
        logits = tiny.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    # Row 0: next-token loss over its answer tokens; rows 1-3: softmax over their own letters.
    labels = batch["labels"][0]
    where = labels[1:] != -100
    free = F.cross_entropy(logits[0, :-1][where], labels[1:][where])
    letter_ids = [tiny.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ABCDE"]
    mc = 0.0
    for b in range(1, 4):
        pos = int((batch["labels"][b] != -100).nonzero()[0]) - 1
        _, letter, k = recipe.record_to_sample(records[b])
        mc = mc - logits[b, pos, letter_ids[:k]].log_softmax(0)["ABCDE".index(letter)]
    torch.testing.assert_close(got, (free + mc) / 4, atol=1e-5, rtol=1e-5)


def random_tables(d):
    import torch

    def with_empty_zero(n):  # as `word_tables`: label 0 (empty cell) is the zero vector
        return torch.cat([torch.zeros(1, d), torch.randn(n, d)])

    return {"colour": with_empty_zero(8), "shape": torch.randn(5, d), "size": with_empty_zero(2),
            "column": with_empty_zero(6), "zero": torch.zeros(d)}


def test_quadrant_targets_put_one_word_of_the_cell_in_each_8px_patch():
    import torch

    from lsg.data import patch_labels

    d = 3
    tables = random_tables(d)
    quad = probe_readout.oracle_tokens([two_objects()], tables, "quadrant")  # 12 x 12 patches of 8 px
    assert quad.shape == (1, 144, d)
    # Red circle (large) in cell (0, 0): patches (0, 0), (0, 1), (1, 0), (1, 1) in a 12-wide raster.
    expect = torch.stack([tables["colour"][1], tables["shape"][1], tables["size"][2], tables["column"][1]])
    torch.testing.assert_close(quad[0, [0, 1, 12, 13]], expect)
    # Blue square (small) in cell (5, 5): patches (10, 10), (10, 11), (11, 10), (11, 11).
    expect = torch.stack([tables["colour"][3], tables["shape"][2], tables["size"][1], tables["column"][6]])
    torch.testing.assert_close(quad[0, [130, 131, 142, 143]], expect)
    # An empty cell, (1, 0): E(" empty") top right, zero in its other three patches.
    torch.testing.assert_close(quad[0, 2 * 12 + 1], tables["shape"][0])
    assert quad[0, [2 * 12, 3 * 12, 3 * 12 + 1]].abs().sum() == 0
    with pytest.raises(ValueError, match="1 or 2"):
        recipe.visual_targets(recipe.scene_labels([patch_labels(two_objects())]), tables, 3)


def test_stage_a_patch_labels_copy_each_cell_to_its_patches():
    import torch

    from lsg.data import patch_labels

    labels = recipe.scene_labels([patch_labels(two_objects())])
    assert labels["column"].view(6, 6)[0, 0] == 1 and labels["column"].view(6, 6)[5, 5] == 6
    assert labels["column"].sum() == 7  # empty cells have no column word
    colour = recipe.cell_to_patch(labels["colour"], 6, 2).view(12, 12)
    by_hand = torch.zeros(12, 12, dtype=torch.long)
    by_hand[:2, :2], by_hand[10:, 10:] = 1, 3  # red at cell (0, 0), blue at cell (5, 5)
    assert torch.equal(colour, by_hand)
    quadrant = recipe.quadrant_ids(6, 2).view(12, 12)
    assert quadrant[0, :4].tolist() == [0, 1, 0, 1] and quadrant[1, :4].tolist() == [2, 3, 2, 3]


def test_slot_accuracy_reads_each_word_slot_of_the_8px_targets():
    import torch

    from lsg.data import patch_labels

    torch.manual_seed(0)
    tables = random_tables(8)
    labels = recipe.scene_labels([patch_labels(two_objects())])
    perfect = recipe.visual_targets(labels, tables, 2)
    assert recipe.slot_accuracy(perfect, labels, tables, 2) == {"colour": 1.0, "shape": 1.0, "size": 1.0,
                                                                         "column": 1.0}
    # Give the red circle (cell 0) the blue colour word: colour is right for 1 of 2 objects.
    wrong = perfect.clone()
    wrong[0, 0] = tables["colour"][3]
    assert recipe.slot_accuracy(wrong, labels, tables, 2)["colour"] == 0.5
    with pytest.raises(ValueError, match="factor 2"):
        recipe.slot_accuracy(perfect, labels, tables, 1)


def test_scene_dialogues_keep_only_the_chosen_subtasks():
    from lsg.data.shapes import scene_questions

    # Relation needs two objects a cell apart on the dominant axis: some scenes pose none.
    stream = [scene_questions("train", 100 + i)[1] for i in range(40)]
    expected = [[r["id"] for r in records if r["subtask"] == "relation"] for records in stream]
    expected = [ids for ids in expected if ids][:6]
    kept, read = recipe.scene_dialogues(100, 6, ["relation"])
    assert [[r["id"] for r in records] for _, records in kept] == expected
    assert read > 6  # scenes without a relation question were read and skipped, not returned
    assert read == 1 + [i for i, records in enumerate(stream) if any(r["subtask"] == "relation" for r in records)][5]
    every, read_all = recipe.scene_dialogues(100, 6, list(recipe.SUBTASKS))
    assert read_all == 6 and [len(r) for _, r in every] == [len(records) for records in stream[:6]]


def test_recipe_history_reads_old_and_new_embedded_json():
    first, second = {"stage_a_steps": 1200}, {"stage_a_steps": 1500}
    assert recipe.recipe_history({}) == []  # a run from scratch
    assert recipe.recipe_history({"recipe": first}) == [first]  # written before histories were kept
    assert recipe.recipe_history({"recipe": second, "recipes": [first, second]}) == [first, second]


def test_scene_dialogues_give_up_when_no_scene_poses_the_subtasks(monkeypatch):
    monkeypatch.setattr(recipe, "scene_questions", lambda split, i: (None, [{"subtask": "count"}]))
    with pytest.raises(ValueError, match="choose other --subtasks"):
        recipe.scene_dialogues(0, 2, ["relation"])
