"""``vlmkit demo``: describe the example images shipped with vlmkit (ShapesWorld scenes) with the built-in model."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib import resources
from pathlib import Path

EXAMPLES = "assets/examples"
EXAMPLE_SCENES = (("val", 0, 0), ("val", 0, 1), ("val", 0, 4), ("val", 0, 7))
"""The ShapesWorld scenes ``shapes-<k>.png`` show (held-out validation split): their ground truth, for tests."""


def example_images() -> list[Path]:
    """The example images shipped inside the package."""
    folder = resources.files("vlmkit").joinpath(EXAMPLES)
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".png"))


def run(args: argparse.Namespace) -> int:
    from vlmkit.api import load
    from vlmkit.inference.describe import describe

    vlm = load("default")
    if vlm.notice:
        print(f"note: {vlm.notice}", file=sys.stderr)
    images = example_images()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptions.jsonl"
        summary = describe(vlm, images, out, batch_size=len(images), max_new_tokens=96, progress=False)
        for line in out.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            print(f"{Path(record['image']).name}: {record['text']!r} ({record['tokens']} tokens)")
    print(f"\n{summary.described} images described in {summary.seconds:.2f} s with model 'default'", file=sys.stderr)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=run)
