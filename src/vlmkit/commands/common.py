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


ENGINE_ARGS = ("image_cache_mb", "prefix_cache_mb", "decode")
"""The engine options of :func:`add_engine_args`, passed on to :func:`vlmkit.load` when given."""


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """``--image-cache-mb`` and ``--prefix-cache-mb`` (the engine's reuse caches, 0: off) and ``--decode`` (how
    decoding steps run): :data:`ENGINE_ARGS`."""
    parser.add_argument("--image-cache-mb", type=non_negative_float,
                        help="image-feature cache size in MB (0: off; default 64)")  # fmt: skip
    parser.add_argument("--prefix-cache-mb", type=non_negative_float,
                        help="KV prefix cache size in MB (0: off; default 256)")  # fmt: skip
    parser.add_argument("--decode", choices=["auto", "compiled", "eager"],
                        help="decoding steps: compiled (static KV cache + torch.compile), eager, or auto (compiled "
                             "on CUDA; the default)")  # fmt: skip


def load_model(args: argparse.Namespace, **kwargs):
    """Load the model named by ``--model`` and tell the user once when it is a demo model."""
    from vlmkit.api import load

    for name in ENGINE_ARGS:
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
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


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number ≥ 0, got {text}")
    return value
