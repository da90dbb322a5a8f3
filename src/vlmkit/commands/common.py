"""Arguments and helpers shared by the commands that load a model."""

from __future__ import annotations

import argparse
import sys


def add_model_args(parser: argparse.ArgumentParser, default: str = "default") -> None:
    parser.add_argument(
        "--model", default=default, help="'default', 'tiny-random', a vlmkit checkpoint folder or a hub id"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])


def load_model(args: argparse.Namespace, **kwargs):
    """Load the model named by ``--model`` and tell the user once when it is a demo model."""
    from vlmkit.api import load

    vlm = load(args.model, device=args.device, dtype=args.dtype, **kwargs)
    if vlm.notice:
        print(f"note: {vlm.notice}", file=sys.stderr)
    return vlm


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
