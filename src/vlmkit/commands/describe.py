"""``vlmkit describe``: describe image files, folders and globs into a resumable JSONL file."""

from __future__ import annotations

import argparse
import sys

from vlmkit.commands.common import add_engine_args, add_model_args, load_model, positive_int
from vlmkit.inference.describe import DEFAULT_PROMPT


def run(args: argparse.Namespace) -> int:
    from vlmkit.inference.budget import resolve_budget_tokenizer
    from vlmkit.inference.describe import collect_images, describe

    collect_images(args.paths)  # fail on a bad path or tokenizer before loading the model
    counter = resolve_budget_tokenizer(args.budget_tokenizer) if args.budget_tokenizer else None
    vlm = load_model(args)
    summary = describe(
        vlm,
        args.paths,
        args.out,
        prompt=args.prompt,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        token_budget=args.token_budget,
        budget_tokenizer=counter,
        retry_errors=args.retry_errors,
        progress=not args.quiet,
    )
    retried = f", {summary.retried} retried" if args.retry_errors else ""
    print(
        f"{summary.described} described, {summary.errors} failed, {summary.skipped} already done{retried} "
        f"({summary.images_per_second:.1f} images/s) → {args.out}",
        file=sys.stderr,
    )
    if args.print:
        from pathlib import Path

        sys.stdout.write(Path(args.out).read_text(encoding="utf-8"))
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    add_model_args(parser)
    add_engine_args(parser)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument(
        "--out", default="descriptions.jsonl", help="JSONL output; rerunning resumes (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=positive_int, default=77)
    parser.add_argument(
        "--token-budget",
        type=positive_int,
        help="stop each description once it can't fit in N tokens, then trim it back to its last complete clause "
        "that fits (special tokens counted)",
    )
    parser.add_argument(
        "--budget-tokenizer",
        help="what counts the budget: 'clip' (CLIP's tokenizer, shipped: what Stable Diffusion 1.x/2.x's text "
        "encoder counts, start and end tokens included), a tokenizer folder or hub id; default: the model's own",
    )
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        help="on a rerun, describe again the images whose row is an error (default: keep their error rows)",
    )
    parser.add_argument("--print", action="store_true", help="print the JSONL file when done")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
