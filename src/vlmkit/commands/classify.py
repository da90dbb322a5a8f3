"""``vlmkit classify``: zero-shot labels for image files and folders, with CLIP's prompt templates."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from vlmkit.commands.common import positive_int


def run(args: argparse.Namespace) -> int:
    from vlmkit.embeddings.classify import classify
    from vlmkit.embeddings.encoder import load_encoder
    from vlmkit.embeddings.templates import resolve_templates
    from vlmkit.embeddings.zeroshot import parse_labels
    from vlmkit.processing.image_files import collect_images

    parse_labels(args.labels)
    if args.templates:
        resolve_templates(args.templates)
    collect_images(args.paths)  # bad arguments fail before the model loads
    encoder = load_encoder(args.model, device=args.device, dtype=args.dtype)
    if encoder.notice:
        print(f"note: {encoder.notice}", file=sys.stderr)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    counts: Counter[str] = Counter()
    errors = 0
    try:
        for row in classify(args.paths, args.labels, model=encoder, templates=args.templates,
                            batch_size=args.batch_size, progress=not args.quiet and bool(args.out)):  # fmt: skip
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            if row["error"] is None:
                counts[row["label"]] += 1
            else:
                errors += 1
    finally:
        if args.out:
            out.close()
    shown = ", ".join(f"{label} {n}" for label, n in counts.most_common())
    print(f"{sum(counts.values())} classified ({shown or 'none'}), {errors} failed"
          + (f" → {args.out}" if args.out else ""), file=sys.stderr)  # fmt: skip
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    from vlmkit.commands.embed import add_encoder_args

    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    parser.add_argument("--labels", required=True, help="comma-separated labels, e.g. 'sedan,suv,hatchback'")
    parser.add_argument(
        "--templates",
        help="prompt templates: 'imagenet' (CLIP's 80), 'simple', 'none', 'shapes', "
        "or a file of one template per line with {} for the label (default: the model's own set)",
    )
    add_encoder_args(parser)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--out", help="write the JSON lines here (default: stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
