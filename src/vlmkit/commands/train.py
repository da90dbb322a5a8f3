"""``vlmkit train CONFIG``: run a training config (stages, LoRA, resume; under torchrun, DDP)."""

from __future__ import annotations

import argparse
import os
import sys


def register(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``train``."""
    parser.add_argument("config", help="a .yaml, .yml, .toml or .json training config (see docs/training.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value; dotted keys, list indices for stages (--set stages.0.lr=1e-3)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help="resume from the latest checkpoint of the output folder, or of DIR (a run or checkpoint folder)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from vlmkit.training import train

    overrides = list(args.overrides)
    if args.no_progress:
        overrides.append("progress=false")
    result = train(args.config, overrides, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 130 if result.signal == "SIGINT" else 0
    if result.interrupted:
        print(
            f"stopped by {result.signal} at step {result.global_step}; checkpoint {result.checkpoint}; "
            f"continue with: vlmkit train {args.config} --resume",
            file=sys.stderr,
        )
        return 130 if result.signal == "SIGINT" else 0
    for stage in result.stages:
        print(
            f"stage {stage.name}: {stage.steps} steps, padding {100 * stage.padding_before:.1f}% → "
            f"{100 * stage.padding_after:.1f}%" + (f", curves {stage.plot}" if stage.plot else "")
        )
    if result.final_dir is not None:
        loss = f" (last loss {result.losses[-1]:.4f})" if result.losses else ""
        print(f"trained model: {result.final_dir}{loss}")
    return 0
