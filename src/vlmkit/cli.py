"""The ``vlmkit`` command line. Each command lives in ``vlmkit.commands.<name>``, imported only when it runs.

``vlmkit --help`` lists the commands from :data:`COMMANDS` alone, so it imports neither torch nor transformers;
``vlmkit NAME ...`` imports that one command's module, whose ``register(parser)`` adds its arguments and sets
``func``. Only the CLI prints; library code raises :class:`vlmkit.errors.VlmkitError` and logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vlmkit.errors import VlmkitError

COMMANDS: dict[str, tuple[str, str | None]] = {
    "demo": ("describe the example images shipped with vlmkit", None),
    "describe": ("describe images (files, folders, globs) into a JSONL file", None),
    "chat": ("chat with a model about images (one answer, or interactive)", None),
    "eval": ("evaluate a model (POPE, VQA, GQA, ANLS, grounding, captions, MCQ)", None),
    "export": ("export a model (transformers LLaVA format)", None),
    "serve": ("serve a model behind an OpenAI-compatible API", None),
    "train": (
        "train a VLM from a YAML/TOML config (align, instruct, LoRA, resume, torchrun)",
        "Train as CONFIG says. Under torchrun (--nproc_per_node=N -m vlmkit train ...) it runs DDP.",
    ),
    "data": ("generate, check, convert and export datasets", None),
    "embed": ("embed images (files, folders, globs) into a searchable index (CLIP, SigLIP; resumable)", None),
    "search": ("search an index by text or image, or list its near-duplicates (--dedupe)", None),
    "classify": ("zero-shot labels for images with CLIP's prompt templates", None),
}
"""Command name → (one-line help, longer description or None)."""
COMMAND_MODULES = tuple(COMMANDS)
"""The commands this CLI offers (tests narrow it)."""


def _chosen(argv: list[str]) -> str | None:
    """The command named on the command line (its first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; of the commands, only the one ``argv`` names (all, when ``argv`` is None) gets its arguments."""
    parser = argparse.ArgumentParser(prog="vlmkit", description="Build, train, run, serve and evaluate VLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None if argv is None else _chosen(argv)
    for name in COMMAND_MODULES:
        help_text, description = COMMANDS[name]
        sub = subparsers.add_parser(name, help=help_text, description=description or help_text)
        if argv is None or name == chosen:
            importlib.import_module(f"vlmkit.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except VlmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
