"""The ``vlmkit`` command line. Each command group lives in ``vlmkit.commands.<name>`` and registers itself here.

Only the CLI prints; library code raises :class:`vlmkit.errors.VlmkitError` and logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vlmkit.errors import VlmkitError

# Modules under vlmkit.commands, each with ``register(subparsers)`` that adds its parser(s) and sets ``func``.
COMMAND_MODULES = ("demo", "describe", "chat", "eval", "export", "serve", "train", "data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description="Build, train, run, serve and evaluate VLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"vlmkit.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
