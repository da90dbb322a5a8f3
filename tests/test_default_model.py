"""The shipped built-in model: its files, the CLI notice, and that it really reads held-out ShapesWorld images."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import vlmkit
from vlmkit.cli import main
from vlmkit.data.shapes import WORDS, render_png, sample_scene
from vlmkit.models.builtin import BUILTIN_DIR, BUILTIN_MODELS
from vlmkit.processing.images import load_image


@pytest.fixture(scope="module")
def default():
    return vlmkit.load("default")


def test_weights_are_shipped_small_and_self_described():
    weights = BUILTIN_DIR / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 30 * 2**20
    config = json.loads((BUILTIN_DIR / "config.json").read_text())
    assert config["format_version"] == 1 and config["projector"]["name"] == "mlp2x_gelu"
    assert config["vision"]["hf_config"]["model_type"] == "siglip_vision_model"
    assert config["lm"]["hf_config"]["model_type"] == "llama"
    assert (BUILTIN_DIR / "tokenizer.json").is_file() and (BUILTIN_DIR / "chat_template.jinja").is_file()


def test_loads_offline_with_its_notice(default):
    assert default.name == "default" and default.notice == BUILTIN_MODELS.get("default").notice
    assert "synthetic shapes" in default.notice
    counts = default.model.parameter_summary()
    assert sum(c.total for c in counts.values()) < 7_500_000


def test_cli_says_once_that_it_is_a_demo_model(tmp_path, capsys):
    path = tmp_path / "scene.png"
    path.write_bytes(render_png(sample_scene("test", 0, 0)))
    assert main(["chat", "--image", str(path), "--max-new-tokens", "4", "How many objects are there?"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count(BUILTIN_MODELS.get("default").notice) == 1 and captured.out.strip()


def _ask(vlm, images, question: str, max_new_tokens: int = 8) -> list[str]:
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        for image in images
    ]
    return [r.text for r in vlm.generate_batch(conversations, max_new_tokens=max_new_tokens)]


def test_it_reads_words_and_counts_objects_from_the_image(default):
    # held-out test scenes of another seed than the evaluation's; docs/default-model.md has the full table
    scenes = [sample_scene("test", 1, i) for i in range(40)]
    with_word = [s for s in scenes if s.word is not None][:20]
    images = [load_image(render_png(s)) for s in with_word]
    words = _ask(default, images, "What word is written in the image?")
    assert sum(a == s.word.text for a, s in zip(words, with_word, strict=True)) >= 16  # 18 / 20 measured
    counts = _ask(default, [load_image(render_png(s)) for s in scenes[:20]], "How many objects are there?")
    assert sum(a == str(len(s.objects)) for a, s in zip(counts, scenes, strict=False)) >= 18  # 20 / 20 measured
    # blank images (same size and background): the answers no longer follow the scenes
    blank = [Image.new("RGB", (s.image_size, s.image_size), s.background) for s in with_word]
    assert set(_ask(default, blank, "What word is written in the image?")) == {"none"}


def test_it_tells_which_objects_are_there(default):
    """Existence with adversarial negatives (another colour of a shape that is there): 20 present, 20 absent."""
    from vlmkit.data.shapes import COLOURS

    scenes = [sample_scene("test", 1, i) for i in range(20)]
    questions, truth, images = [], [], []
    for scene in scenes:
        first = scene.objects[0]
        there = {(o.colour, o.shape) for o in scene.objects}
        absent = next(c for c in COLOURS if (c, first.shape) not in there)
        image = load_image(render_png(scene))
        for (colour, shape), answer in (((first.colour, first.shape), "Yes"), ((absent, first.shape), "No")):
            questions.append(f"Is a {colour} {shape} shown in the image?")
            truth.append(answer)
            images.append(image)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]}]
        for im, q in zip(images, questions, strict=True)
    ]
    answers = [r.text for r in default.generate_batch(conversations, max_new_tokens=4)]
    assert sum(a == t for a, t in zip(answers, truth, strict=True)) >= 34  # 36 / 40 measured


def _demo_lines(capsys) -> dict[str, str]:
    assert main(["demo"]) == 0
    return dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if line.startswith("shapes-"))


def test_demo_reads_the_word_of_every_example_image(capsys):
    """``make demo``'s output names each example's printed word, and no word where there is none."""
    from vlmkit.commands.demo import EXAMPLE_SCENES, example_images

    paths = example_images()
    assert [p.name for p in paths] == [f"shapes-{k}.png" for k in range(len(EXAMPLE_SCENES))]
    lines = _demo_lines(capsys)
    for path, (split, seed, index) in zip(paths, EXAMPLE_SCENES, strict=True):
        scene = sample_scene(split, seed, index)
        assert path.read_bytes() == render_png(scene)  # the shipped image is the scene the truth comes from
        words = [w for w in WORDS if f'"{w}"' in lines[path.name]]
        assert words == ([scene.word.text] if scene.word else []), f"{path.name}: {lines[path.name]}"


@pytest.mark.xfail(
    strict=True,
    reason="the built-in model names exactly the right objects in 36% of captions (docs/default-model.md): "
    "shapes-0 and shapes-1 are still described wrongly; this turns into a failure (XPASS) once all four are right",
)
def test_demo_names_every_object_of_every_example_image(capsys):
    """Every object (size, colour, shape) of each example image, nothing else."""
    from vlmkit.commands.demo import EXAMPLE_SCENES, example_images
    from vlmkit.evaluation.shapesworld import caption_objects

    lines = _demo_lines(capsys)
    wrong = []
    for path, (split, seed, index) in zip(example_images(), EXAMPLE_SCENES, strict=True):
        truth = sorted((o.size, o.colour, o.shape) for o in sample_scene(split, seed, index).objects)
        if sorted(caption_objects(lines[path.name])) != truth:
            wrong.append(path.name)
    assert not wrong, f"described wrongly: {wrong}"
