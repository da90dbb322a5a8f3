"""``vlmkit export``: write a model in another ecosystem's format."""

from __future__ import annotations

import argparse
import sys

from vlmkit.commands.common import add_model_args, load_model

FORMATS = ("hf-llava",)


def run(args: argparse.Namespace) -> int:
    from vlmkit.interop.hf_llava import check_expressible, export_hf_llava

    vlm = load_model(args)
    check_expressible(vlm.model)
    path = export_hf_llava(vlm.model, vlm.processor, args.out)
    print(f"exported {args.model!r} to {path} (transformers LLaVA format)", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a model (transformers LLaVA format)")
    add_model_args(parser)
    parser.add_argument("--to", choices=FORMATS, required=True, help="target format")
    parser.add_argument("out", metavar="OUT", help="output folder")
    parser.set_defaults(func=run)
