"""The shipped built-in model: its files, the CLI notice, and that it really reads held-out ShapesWorld images."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import vlmkit
from vlmkit.api import BUILTIN_DIR, NOTICES
from vlmkit.cli import main
from vlmkit.data.shapes import render_png, sample_scene
from vlmkit.data.tasks import eval_items
from vlmkit.data.synth import stream_rng
from vlmkit.evaluation.metrics import vqa_normalize_answer
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
    assert default.name == "default" and default.notice == NOTICES["default"]
    assert "synthetic shapes" in default.notice
    counts = default.model.parameter_summary()
    assert sum(c.total for c in counts.values()) < 7_500_000


def test_cli_says_once_that_it_is_a_demo_model(tmp_path, capsys):
    path = tmp_path / "scene.png"
    path.write_bytes(render_png(sample_scene("test", 0, 0)))
    assert main(["chat", "--image", str(path), "--max-new-tokens", "4", "How many objects are there?"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count(NOTICES["default"]) == 1 and captured.out.strip()
