"""Helpers for the training tests (no tests here): a tiny saved model, tiny datasets, run configs."""

from __future__ import annotations

import argparse
import copy
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from conftest import compose_tiny
from vlmkit.data.formats import Record, open_writer
from vlmkit.data.synth import SynthConfig, generate
from vlmkit.models.compose import save_pretrained


@dataclass
class Assets:
    base: Path  # a tiny vlmkit checkpoint (CLIP 32 px + Llama width 48)
    captions: Path  # caption samples
    mixed: Path  # short QA samples, text-only samples and two-image samples
    empty: Path  # a dataset with no record


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_assets(root: Path, n: int = 24) -> Assets:
    """Write the tiny model and datasets under ``root``."""
    model, processor = compose_tiny()
    base = save_pretrained(model, processor, root / "base")
    with open_writer(root / "captions", "jsonl", "train") as writer:
        for record in generate(SynthConfig(tasks=("caption",), image_size=64), n):
            writer.write(record)
    with open_writer(root / "mixed", "jsonl", "train") as writer:
        for record in generate(SynthConfig(tasks=("exist", "attribute", "count"), image_size=64, seed=1), n):
            writer.write(record)
        for i in range(4):
            messages = [{"role": "user", "content": f"Say the word {i}."}, {"role": "assistant", "content": "hello"}]
            writer.write(Record(f"text-{i}", messages))
            messages = [
                {"role": "user", "content": "<image>\n<image>\nAre the two images the same colour?"},
                {"role": "assistant", "content": "No" if i % 2 else "Yes"},
            ]
            writer.write(Record(f"pair-{i}", messages, [_png((200, 30, 30)), _png((30, 30, 200 * (i % 2)))]))
    with open_writer(root / "empty", "jsonl", "train"):
        pass
    return Assets(
        base, root / "captions" / "train.jsonl", root / "mixed" / "train.jsonl", root / "empty" / "train.jsonl"
    )


def run_config(assets: Assets, out: Path, *stages: dict[str, Any], **run: Any) -> dict[str, Any]:
    """A config dict starting from the tiny checkpoint; stages default to one short align stage."""
    default_stage = {
        "name": "align",
        "data": [{"path": str(assets.captions)}],
        "policy": {"vision": "frozen", "projector": "full", "language_model": "frozen"},
        "lr": 1e-2,
        "steps": 3,
        "batch_size": 4,
        "warmup_steps": 1,
    }
    config = {
        "model": {"checkpoint": str(assets.base)},
        "stages": [{**copy.deepcopy(default_stage), **s} for s in stages] or [default_stage],
        "output_dir": str(out),
        "seed": 0,
        "save_every": None,
        "keep_last": None,
        "progress": False,
    }
    config.update(run)
    return config


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") == "step"]


def cli_command(*args: str) -> list[str]:
    """A subprocess command running ``vlmkit train``."""
    return [sys.executable, "-m", "vlmkit", "train", *args]


def parse_cli(*args: str) -> argparse.Namespace:
    from vlmkit.cli import build_parser

    return build_parser(["train", *args]).parse_args(["train", *args])
