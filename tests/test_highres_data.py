"""The ``highres`` ShapesWorld variant: small words on a large canvas, validated, consistent and deterministic."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from vlmkit.data import shapes
from vlmkit.data.shapes import CELLS, VARIANTS
from vlmkit.data.synth import SynthConfig, iter_eval_items, make_record
from vlmkit.errors import ConfigError

SCENES = [shapes.sample_scene("val", 0, i, variant="highres") for i in range(60)]
WORDY = [s for s in SCENES if s.word is not None]


def test_variant_is_validated():
    with pytest.raises(ConfigError, match="unknown ShapesWorld variant 'huge'; expected one of default, highres"):
        shapes.sample_scene("train", 0, 0, variant="huge")
    with pytest.raises(ConfigError, match="unknown ShapesWorld variant"):
        SynthConfig(variant="huge")
    with pytest.raises(ConfigError, match="'highres' images must be at least 256 px, got 192"):
        SynthConfig(variant="highres", image_size=192)
    with pytest.raises(ConfigError, match="at least 64 px"):
        SynthConfig(image_size=32)
    assert SynthConfig().image_size == 128 and SynthConfig(variant="highres").image_size == 384
    assert SynthConfig(variant="highres", image_size=448).image_size == 448


def test_cli_option(run, tmp_path):
    with pytest.raises(SystemExit):
        run("data", "synth", "--out", tmp_path, "--n", 1, "--variant", "huge", "--no-progress")
    code, _, err = run("data", "synth", "--out", tmp_path, "--n", 1, "--variant", "highres", "--image-size", 128,
                       "--no-progress")  # fmt: skip
    assert code == 1 and "at least 256 px" in err
    args = ["data", "synth", "--out", tmp_path, "--split", "val", "--n", 6, "--variant", "highres", "--tasks", "text",
            "--no-progress"]  # fmt: skip
    assert run(*args, "--workers", 1)[0] == 0
    first = (tmp_path / "val.jsonl").read_bytes()
    assert run(*args, "--workers", 2, "--overwrite")[0] == 0
    assert (tmp_path / "val.jsonl").read_bytes() == first, "same output with any number of workers"
    record = json.loads(first.splitlines()[0])
    truth = record["meta"]["truth"]
    assert truth["variant"] == "highres" and truth["image_size"] == 384
    assert Image.open(tmp_path / record["image"]).size == (384, 384)
    # the truth names everything needed to draw the image again
    again = shapes.sample_scene(truth["split"], truth["seed"], truth["index"], truth["image_size"], truth["variant"])
    assert again.to_dict() == truth
    assert shapes.render_png(again) == (tmp_path / record["image"]).read_bytes()


def test_default_data_does_not_mention_the_variant():
    record = make_record(SynthConfig("train", seed=0), 0)
    assert "variant" not in record.meta["truth"] and record.meta["truth"]["image_size"] == 128


def test_words_are_small_relative_to_the_canvas():
    assert len(WORDY) >= 20
    heights = []
    for scene in WORDY:
        x1, y1, x2, y2 = scene.word.bbox
        heights.append((y2 - y1) * 96 / scene.image_size)
        assert y2 - y1 >= 7, "readable at native resolution"
        assert x2 - x1 <= scene.image_size / 9, "within the middle third of its cell"
    assert np.mean(heights) <= 3.25 and max(heights) <= 4.5, "about 3 px tall in a 96-px view"
    default = [shapes.sample_scene("val", 0, s.index).word.bbox for s in WORDY]
    assert (
        np.mean([b[3] - b[1] for b in default]) / 128
        > 2.5 * np.mean([s.word.bbox[3] - s.word.bbox[1] for s in WORDY]) / 384
    )


def test_words_are_drawn_as_default_words_are_at_128px():
    same = 0
    for scene in WORDY:
        base = shapes.sample_scene("val", 0, scene.index).word
        same += scene.word.font_size == base.font_size
        x1, y1, x2, y2 = shapes.cell_bounds(CELLS.index(scene.word.cell), scene.image_size)
        third = (x2 - x1) / 3
        wx1, wy1, wx2, wy2 = scene.word.bbox
        assert x1 + third - 1 <= wx1 and wx2 <= x2 - third + 1 and y1 + third - 1 <= wy1 and wy2 <= y2 - third + 1
    assert same >= 0.9 * len(WORDY), "the default world's font sizes (a third of a cell rounds its own way)"


def test_a_96px_view_blurs_the_word_into_a_few_rows():
    for scene in WORDY[:10]:
        small = np.asarray(shapes.render_scene(scene).convert("L").resize((96, 96), Image.BICUBIC)).astype(int)
        x1, y1, x2, y2 = (v * 96 // scene.image_size for v in scene.word.bbox)
        region = small[max(0, y1 - 1) : y2 + 2, max(0, x1 - 1) : x2 + 2]
        background = int(np.median(small))
        assert (region < background - 40).any(axis=1).sum() <= 4
        assert region.min() > 60, "no pixel of the word stays black"


def test_same_layout_as_the_default_variant_and_boxes_in_their_cells():
    for scene in SCENES:
        base = shapes.sample_scene("val", 0, scene.index)
        assert scene.background == base.background
        assert [(o.shape, o.colour, o.size, o.cell) for o in scene.objects] == [
            (o.shape, o.colour, o.size, o.cell) for o in base.objects
        ]
        assert (scene.word is None) == (base.word is None)
        if scene.word is not None:
            assert (scene.word.text, scene.word.cell) == (base.word.text, base.word.cell)
        for box, cell in [(o.bbox, o.cell) for o in scene.objects] + (
            [(scene.word.bbox, scene.word.cell)] if scene.word else []
        ):
            cx1, cy1, cx2, cy2 = shapes.cell_bounds(CELLS.index(cell), scene.image_size)
            assert 0 <= cx1 <= box[0] < box[2] <= cx2 <= scene.image_size
            assert 0 <= cy1 <= box[1] < box[3] <= cy2 <= scene.image_size


def test_objects_are_small_and_sizes_stay_distinguishable():
    widths: dict[tuple[str, str], list[int]] = {}
    for scene in SCENES:
        for o in scene.objects:
            widths.setdefault((o.shape, o.size), []).append(max(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]))
    assert max(max(w) for w in widths.values()) <= 0.5 * 384 / 3, "at most half a cell"
    for shape in shapes.SHAPES:
        small, large = widths.get((shape, "small"), [0]), widths.get((shape, "large"), [999])
        assert max(small) + 8 <= min(large), shape


def test_boxes_are_the_painted_pixels():
    scene = next(s for s in WORDY if len(s.objects) >= 3)
    image = np.asarray(shapes.render_scene(scene)).astype(int)
    differs = np.abs(image - np.asarray(scene.background)).sum(-1) > 0
    inside = np.zeros_like(differs)
    for x1, y1, x2, y2 in [o.bbox for o in scene.objects] + [scene.word.bbox]:
        inside[y1:y2, x1:x2] = True
    assert not (differs & ~inside).any(), "no paint outside the boxes"
    for o in scene.objects:
        x1, y1, x2, y2 = o.bbox
        box = differs[y1:y2, x1:x2]
        assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any(), "tight boxes"


def test_deterministic_and_scaled_with_the_canvas():
    digest = [hashlib.sha256(shapes.render_png(s)).hexdigest() for s in SCENES[:5]]
    again = [shapes.render_png(shapes.sample_scene("val", 0, i, variant="highres")) for i in range(5)]
    assert digest == [hashlib.sha256(b).hexdigest() for b in again]
    big = shapes.sample_scene("val", 0, WORDY[0].index, 448, "highres")
    assert shapes.render_scene(big).size == (448, 448)
    assert big.word.font_size > WORDY[0].word.font_size
    assert big.to_dict()["variant"] == "highres"
    scene, png, _ = next(iter_eval_items(1, variant="highres"))
    assert scene.variant == "highres" and scene.image_size == 384 and Image.open(io.BytesIO(png)).size == (384, 384)
    assert set(VARIANTS) == {"default", "highres"}
