"""``vlmkit export``: write a model in another ecosystem's format."""

from __future__ import annotations

import argparse
import sys

from vlmkit.commands.common import add_model_args, load_model

FORMATS = ("hf-llava", "hf-llava-next", "openvino")
DESCRIPTIONS = {"hf-llava": "transformers LLaVA format", "hf-llava-next": "transformers LLaVA-NeXT format",
                "openvino": "OpenVINO, {weights} weights"}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from vlmkit.backends import EXPORT
    from vlmkit.errors import ConfigError
    from vlmkit.interop import hf_llava, hf_llava_next

    if args.weights != "fp32" and args.to != "openvino":
        raise ConfigError(f"--weights {args.weights} is for --to openvino; {args.to} keeps the model's own weights")
    if args.to == "openvino":  # traced on the CPU in float32, whatever device would run the model
        args.device = "cpu" if args.device == "auto" else args.device
        args.dtype = "fp32" if args.dtype == "auto" else args.dtype
    vlm = load_model(args)
    if EXPORT not in vlm.engine.capabilities:
        engine = type(vlm.engine).__name__
        why = (
            "it is an OpenVINO export already; export its source model"
            if engine == "OpenVINOEngine"
            else "it is a transformers model already, so transformers, vLLM and lmms-eval can load its folder as it is"
        )
        raise ConfigError(f"model {args.model!r} runs on the {engine} backend, which can't be exported: {why}")
    if args.to == "openvino":
        from vlmkit.interop.openvino_export import export_openvino

        path = export_openvino(vlm.model, vlm.processor, args.out, weights=args.weights)
    else:
        export = {"hf-llava": hf_llava.export_hf_llava, "hf-llava-next": hf_llava_next.export_hf_llava_next}[args.to]
        path = export(vlm.model, vlm.processor, args.out)  # checks first; a model of other views is told its format
    print(f"exported {args.model!r} to {path} ({DESCRIPTIONS[args.to].format(weights=args.weights)})", file=sys.stderr)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument(
        "--to",
        choices=FORMATS,
        required=True,
        help="target format: hf-llava (one view per image), hf-llava-next (anyres views) or openvino (a compiled "
        "runtime for CPU/GPU; one view per image)",
    )
    parser.add_argument(
        "--weights",
        choices=("fp32", "int8", "int4"),
        default="fp32",
        help="openvino only: fp32, or weights compressed by NNCF to 8 or 4 bits (default fp32)",
    )
    parser.add_argument("out", metavar="OUT", help="output folder")
    parser.set_defaults(func=run)
