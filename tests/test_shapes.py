"""ShapesWorld scenes, rendering, tasks and determinism."""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlmkit.data import shapes, tasks
from vlmkit.data.shapes import CELLS, COLOURS, SHAPE_PLURALS, SHAPES, WORDS, Scene
from vlmkit.data.synth import SynthConfig, generate, iter_eval_items, make_record
from vlmkit.errors import ConfigError

SCENES = [shapes.sample_scene("train", 0, i) for i in range(300)]


def _pixels(scene: Scene) -> np.ndarray:
    return np.asarray(shapes.render_scene(scene)).astype(int)


def _alone(scene: Scene, objects=(), word=None) -> Scene:
    return Scene(scene.split, scene.seed, scene.index, scene.image_size, scene.background, tuple(objects), word)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


# ------------------------------------------------------------------------------------------------ ground truth


def test_scene_ground_truth_is_consistent():
    for scene in SCENES:
        assert 1 <= len(scene.objects) <= 6
        cells = [CELLS.index(o.cell) for o in scene.objects]
        assert cells == sorted(set(cells)), "one object per cell, in grid order"
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
        boxes = [(o.cell, o.bbox) for o in scene.objects]
        if scene.word is not None:
            assert scene.word.text in WORDS and 3 <= len(scene.word.text) <= 8
            assert scene.word.cell not in [o.cell for o in scene.objects], "the word sits in a free cell"
            boxes.append((scene.word.cell, scene.word.bbox))
        for o in scene.objects:
            assert o.shape in SHAPES and o.colour in COLOURS and o.size in ("small", "large")
        for cell, (x1, y1, x2, y2) in boxes:
            cx1, cy1, cx2, cy2 = shapes.cell_bounds(CELLS.index(cell), scene.image_size)
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128, "box inside the image"
            assert cx1 <= x1 and x2 <= cx2 and cy1 <= y1 and y2 <= cy2, f"box {(x1, y1, x2, y2)} inside {cell}"
    assert any(s.word is not None for s in SCENES) and any(s.word is None for s in SCENES)
    assert {len(s.objects) for s in SCENES} == set(range(1, 7))


def test_boxes_are_the_painted_pixels():
    for scene in SCENES[:40]:
        image = _pixels(scene)
        background = np.array(scene.background)
        covered = np.zeros(image.shape[:2], bool)
        for obj in scene.objects:
            alone = _pixels(_alone(scene, [obj]))
            assert _tight_box(np.any(alone != background, -1)) == obj.bbox, "box is exactly the painted pixels"
            x1, y1, x2, y2 = obj.bbox
            covered[y1:y2, x1:x2] = True
            cx, cy = (c // shapes.SUPERSAMPLE for c in obj.center)
            assert tuple(image[cy, cx]) == COLOURS[obj.colour], "the object's centre has its colour"
        if scene.word is not None:
            alone = _pixels(_alone(scene, word=scene.word))
            ink = _tight_box(np.any(alone != background, -1))
            x1, y1, x2, y2 = scene.word.bbox
            assert x1 <= ink[0] and y1 <= ink[1] and ink[2] <= x2 and ink[3] <= y2
            assert (ink[2] - ink[0]) >= (x2 - x1) - 2 and (ink[3] - ink[1]) >= (y2 - y1) - 2
            covered[y1:y2, x1:x2] = True
        assert (image[~covered] == background).all(), "outside every box there is only background"


def test_small_and_large_objects_are_distinguishable():
    widths: dict[tuple[str, str], list[int]] = {}
    for scene in SCENES:
        for o in scene.objects:
            widths.setdefault((o.shape, o.size), []).append(max(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]))
    cell = 128 / 3
    for shape in SHAPES:
        small, large = widths[(shape, "small")], widths[(shape, "large")]
        assert max(small) + 6 <= min(large), shape
        assert 0.35 * cell <= min(small) and max(large) <= 0.95 * cell


def test_word_is_black_text():
    scene = next(s for s in SCENES if s.word is not None)
    x1, y1, x2, y2 = scene.word.bbox
    patch = _pixels(_alone(scene, word=scene.word))[y1:y2, x1:x2]
    assert patch.sum(-1).min() < 150, "the word has (near) black pixels"


def test_other_image_sizes_keep_boxes_in_cells():
    for i in range(20):
        scene = shapes.sample_scene("val", 3, i, image_size=192)
        assert shapes.render_scene(scene).size == (192, 192)
        for o in scene.objects:
            cx1, cy1, cx2, cy2 = shapes.cell_bounds(CELLS.index(o.cell), 192)
            assert cx1 <= o.bbox[0] and o.bbox[2] <= cx2 and cy1 <= o.bbox[1] and o.bbox[3] <= cy2


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown split"):
        shapes.sample_scene("dev", 0, 0)
    with pytest.raises(ConfigError, match="seed"):
        shapes.sample_scene("train", -1, 0)
    with pytest.raises(ConfigError, match="64 px"):
        shapes.sample_scene("train", 0, 0, image_size=32)
    with pytest.raises(ConfigError, match="unknown task"):
        tasks.parse_tasks("caption,colour")


# ------------------------------------------------------------------------------------------------ determinism


def _digest(records) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(repr((r.id, r.messages, r.task, r.meta)).encode())
        for image in r.images:
            h.update(image)
    return h.hexdigest()


def test_same_bytes_and_conversations_on_every_call():
    config = SynthConfig("train", seed=7)
    first = [make_record(config, i) for i in range(20)]
    assert _digest(first) == _digest([make_record(config, i) for i in range(20)])
    assert _digest(first) == _digest(generate(config, 20, workers=2, chunk_size=3))
    assert _digest(first[5:]) == _digest(generate(config, 15, start=5))
    assert _digest(first) != _digest(generate(SynthConfig("train", seed=8), 20))


def test_pinned_pixels_and_conversation():
    """Guards the world against silent changes: a change here changes every dataset and benchmark."""
    scene = shapes.sample_scene("train", 0, 0)
    assert [(o.description, o.cell, o.bbox) for o in scene.objects] == [
        ("small black hexagon", "right", (94, 53, 116, 72)),
        ("small black circle", "bottom", (55, 101, 75, 121)),
        ("large red star", "bottom right", (88, 89, 125, 124)),
    ]
    assert scene.word is None
    pixels = hashlib.sha256(shapes.render_scene(scene).tobytes()).hexdigest()
    assert pixels == PINNED_PIXELS
    records = [make_record(SynthConfig("val", seed=3), i) for i in range(8)]
    digest = hashlib.sha256()
    for r in records:
        digest.update(repr((r.id, r.messages, r.task, r.meta)).encode())
        digest.update(Image.open(io.BytesIO(r.images[0])).tobytes())
    assert digest.hexdigest() == PINNED_RECORDS
    record = make_record(SynthConfig("train"), 0)
    assert record.messages == [
        {"role": "user", "content": "<image>\nIs a black hexagon shown in the image?"},
        {"role": "assistant", "content": "Yes"},
    ]


PINNED_RECORDS = "642f99ccbfc90a5dc5ccd11e203352cb812ab74cbad65651daa3b2cd3f7d6130"
PINNED_PIXELS = "69e709350515905e754101dd523e7e66544f7a633427b083476edf48c4506d5e"


def test_splits_are_disjoint():
    train = {hashlib.sha256(shapes.render_png(shapes.sample_scene("train", 0, i))).digest() for i in range(800)}
    for split in ("val", "test"):
        for i in range(200):
            image_bytes = shapes.render_png(shapes.sample_scene(split, 0, i))
            assert hashlib.sha256(image_bytes).digest() not in train
            assert shapes.split_of_image(Image.open(io.BytesIO(image_bytes))) == split
    assert all(shapes.split_of_image(shapes.render_scene(s)) == "train" for s in SCENES[:50])
    same_layout = [i for i in range(200) if shapes.sample_scene("test", 0, i).objects == SCENES[i].objects]
    assert not same_layout, "split streams are independent"


def test_popularity_ranking_is_fixed_and_follows_the_weights():
    ranking = shapes.popularity_ranking()
    assert len(ranking) == 60 and len(set(ranking)) == 60
    counts = Counter()
    split, seed, n = shapes.POPULARITY_REFERENCE
    for i in range(n):
        counts.update((o.colour, o.shape) for o in shapes.sample_scene(split, seed, i).objects)
    assert [counts[c] for c in ranking] == sorted((counts[c] for c in ranking), reverse=True)
    assert ranking[0][1] == "circle", "the most weighted shape leads"


def test_gallery_images_are_small(tmp_path):
    paths = shapes.save_gallery(tmp_path, n=3)
    assert [p.name for p in paths] == ["shapes-0.png", "shapes-1.png", "shapes-2.png"]
    assert all(p.stat().st_size <= 20_000 for p in paths)


# ------------------------------------------------------------------------------------------------ tasks

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_PLURAL = "|".join(SHAPE_PLURALS.values())
_CELL = "|".join(sorted(CELLS, key=len, reverse=True))


def _expected(scene: Scene, qa: tasks.QA) -> str:
    """The answer recomputed from the ground truth and the question text alone."""
    q = qa.question
    objects = scene.objects
    if qa.task == "exist":
        colour, shape = re.search(rf"\b({_COLOUR}) ({_SHAPE})\b", q).groups()
        return "Yes" if scene.find(colour, shape) else "No"
    if qa.task in ("position", "grounding"):
        colour, shape = re.search(rf"\b({_COLOUR}) ({_SHAPE})\b", q).groups()
        obj = scene.find(colour, shape)
        return obj.cell if qa.task == "position" else tasks.format_bbox(obj.bbox)
    if qa.task == "text":
        return scene.word.text if scene.word else "none"
    if qa.task == "count":
        if m := re.search(rf"\b({_PLURAL})\b", q):
            return str(sum(SHAPE_PLURALS[o.shape] == m.group(1) for o in objects))
        if m := re.search(rf"\b({_COLOUR})\b", q):
            return str(sum(o.colour == m.group(1) for o in objects))
        return str(len(objects))
    if qa.task == "attribute":
        if m := re.search(rf"\b({_CELL}) cell\b", q):
            obj = scene.object_at(m.group(1))
            assert scene.word is None or scene.word.cell != m.group(1)
            return obj.description if obj else "nothing"
        if m := re.search(rf"\b({_COLOUR})\b", q):
            (obj,) = [o for o in objects if o.colour == m.group(1)]
            return obj.shape
        (obj,) = [o for o in objects if o.shape == re.search(rf"\b({_SHAPE})\b", q).group(1)]
        return obj.colour
    raise AssertionError(qa.task)


def test_answers_match_the_ground_truth():
    rng = np.random.default_rng(0)
    seen = Counter()
    for scene in SCENES:
        for task in ("exist", "attribute", "position", "count", "grounding", "text"):
            for canonical in (True, False):
                qa = tasks.ask(task, scene, rng, canonical=canonical)
                assert qa.answer == _expected(scene, qa), (scene.to_dict(), qa)
                assert qa.answer == qa.answers[0]
                seen[(task, qa.kind)] += 1
    assert {k for t, k in seen if t == "attribute"} == {"colour_of", "shape_of", "cell"}
    assert {k for t, k in seen if t == "count"} == {"count_shape", "count_colour", "count_all"}


def test_captions_name_every_object():
    rng = np.random.default_rng(1)
    for scene in SCENES[:100]:
        canonical, *paraphrases = tasks.caption_variants(scene, rng)
        assert canonical == tasks.caption(scene)
        for text in [canonical, *paraphrases]:
            for obj in scene.objects:
                assert obj.description in text
            assert (scene.word is None) == ("word" not in text)
            if scene.word is not None:
                assert f'"{scene.word.text}"' in text
    scene = SCENES[0]
    assert tasks.caption(scene) == (
        "There are three objects: a small black hexagon on the right, a small black circle at the bottom "
        "and a large red star at the bottom right."
    )


def test_pope_negatives_follow_their_categories():
    rng = np.random.default_rng(2)
    ranking = shapes.popularity_ranking()
    for scene in SCENES:
        present = {(o.colour, o.shape) for o in scene.objects}
        absent_ranked = [c for c in ranking if c not in present]
        for category in tasks.POPE_CATEGORIES:
            for _ in range(3):
                qa = tasks.ask_exist(scene, rng, positive=False, category=category)
                combo = re.search(rf"\b({_COLOUR}) ({_SHAPE})\b", qa.question).groups()
                assert qa.answer == "No" and combo not in present
                if category == "popular":
                    assert absent_ranked.index(combo) < tasks.POPULAR_TOP_K
                if category == "adversarial":
                    assert any(combo[0] == c or combo[1] == s for c, s in present)
        qa = tasks.ask_exist(scene, rng, positive=True, category="random")
        assert qa.answer == "Yes" and re.search(rf"\b({_COLOUR}) ({_SHAPE})\b", qa.question).groups() in present


def test_existence_questions_are_half_positive():
    rng = np.random.default_rng(3)
    answers = [tasks.ask("exist", s, rng) for s in SCENES for _ in range(4)]
    share = sum(qa.answer == "Yes" for qa in answers) / len(answers)
    assert 0.45 <= share <= 0.55
    categories = Counter(qa.category for qa in answers if qa.answer == "No")
    assert set(categories) == set(tasks.POPE_CATEGORIES)


def test_conversations_and_task_mix():
    config = SynthConfig("train", seed=1)
    records = list(generate(config, 300))
    counts = Counter(r.task for r in records)
    assert set(counts) == set(tasks.TASKS)
    for r in records:
        roles = [m["role"] for m in r.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert r.messages[0]["content"].startswith("<image>\n")
        assert sum(m["content"].count("<image>") for m in r.messages) == 1 == len(r.images)
        assert r.meta["truth"]["id"] == r.id
        if r.task == "multiturn":
            assert 2 <= len(roles) // 2 <= 4 and len(r.meta["turns"]) == len(roles) // 2
        else:
            assert len(roles) == 2
    only = list(generate(SynthConfig("train", tasks=("count", "multiturn")), 60))
    assert {r.task for r in only} == {"count", "multiturn"}
    assert all(set(r.meta["turns"]) == {"count"} for r in only if r.task == "multiturn")
    long = list(generate(SynthConfig("train", tasks=("multiturn",), turns=(6, 8)), 30))
    turns = [len(r.messages) // 2 for r in long]
    assert min(turns) >= 6 and max(turns) <= 8 and len(set(turns)) > 1
    assert all(len({m["content"] for m in r.messages[::2]}) == len(r.messages) // 2 for r in long)  # distinct


def test_turns_must_be_an_ordered_positive_range():
    for bad in ((0, 2), (5, 3)):
        with pytest.raises(ConfigError, match="turns must be 1 <= fewest <= most"):
            SynthConfig("train", turns=bad)


def test_eval_items_of_the_test_split():
    items = [(scene, item) for scene, _png, batch in iter_eval_items(30) for item in batch]
    assert all(scene.split == "test" for scene, _ in items)
    ids = [item.question_id for _, item in items]
    assert len(ids) == len(set(ids))
    pope = [item for _, item in items if item.task == "exist"]
    assert len(pope) == 30 * 6
    for category in tasks.POPE_CATEGORIES:
        labels = [item.answer for item in pope if item.category == category]
        assert labels.count("Yes") == labels.count("No") == 30
    for scene, item in items:
        if item.task in ("attribute", "position", "count", "grounding", "text"):
            qa = tasks.QA(item.task, item.question, item.answer, item.answers)
            assert item.answer == _expected(scene, qa)
        if item.task == "grounding":
            assert tasks.format_bbox(item.bbox) == item.answer and item.expression.startswith("the ")
    assert Counter(item.task for _, item in items)["caption"] == 30
