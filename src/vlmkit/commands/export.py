"""``vlmkit export``: write a model in another ecosystem's format."""

from __future__ import annotations

import argparse
import sys

from vlmkit.commands.common import add_model_args, load_model

FORMATS = ("hf-llava", "hf-llava-next")
DESCRIPTIONS = {"hf-llava": "transformers LLaVA format", "hf-llava-next": "transformers LLaVA-NeXT format"}


def run(args: argparse.Namespace) -> int:
    from vlmkit.backends import EXPORT
    from vlmkit.errors import ConfigError
    from vlmkit.interop import hf_llava, hf_llava_next

    vlm = load_model(args)
    if EXPORT not in vlm.engine.capabilities:
        raise ConfigError(
            f"model {args.model!r} runs on the {type(vlm.engine).__name__} backend, which can't be exported: it is "
            "a transformers model already, so transformers, vLLM and lmms-eval can load its folder as it is"
        )
    export = {"hf-llava": hf_llava.export_hf_llava, "hf-llava-next": hf_llava_next.export_hf_llava_next}[args.to]
    path = export(vlm.model, vlm.processor, args.out)  # checks first; a model of other views is told its format
    print(f"exported {args.model!r} to {path} ({DESCRIPTIONS[args.to]})", file=sys.stderr)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument(
        "--to",
        choices=FORMATS,
        required=True,
        help="target format: hf-llava (one view per image) or hf-llava-next (anyres views)",
    )
    parser.add_argument("out", metavar="OUT", help="output folder")
    parser.set_defaults(func=run)
