"""``vlmkit export``: write a model in another ecosystem's format."""

from __future__ import annotations

import argparse
import sys

from vlmkit.commands.common import add_model_args, load_model

FORMATS = ("hf-llava",)


def run(args: argparse.Namespace) -> int:
    from vlmkit.backends import EXPORT
    from vlmkit.errors import ConfigError
    from vlmkit.interop.hf_llava import check_expressible, export_hf_llava

    vlm = load_model(args)
    if EXPORT not in vlm.engine.capabilities:
        raise ConfigError(
            f"model {args.model!r} runs on the {type(vlm.engine).__name__} backend, which can't be exported: it is "
            "a transformers model already, so transformers, vLLM and lmms-eval can load its folder as it is"
        )
    check_expressible(vlm.model)
    path = export_hf_llava(vlm.model, vlm.processor, args.out)
    print(f"exported {args.model!r} to {path} (transformers LLaVA format)", file=sys.stderr)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--to", choices=FORMATS, required=True, help="target format")
    parser.add_argument("out", metavar="OUT", help="output folder")
    parser.set_defaults(func=run)
