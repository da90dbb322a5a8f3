"""``vlmkit embed``: embed image files, folders and globs into an on-disk index (resumable; only new or changed
files are embedded on a rerun)."""

from __future__ import annotations

import argparse
import sys

from vlmkit.commands.common import positive_int


def add_encoder_args(parser: argparse.ArgumentParser, default: str | None = "clip-shapes", what: str = "") -> None:
    """``--model``, ``--device`` and ``--dtype`` of the commands that load a dual encoder."""
    parser.add_argument("--model", default=default, help=what or "a CLIP / SigLIP / SigLIP2 folder or hub id, or "
                        "'clip-shapes' (built in) (default: %(default)s)")  # fmt: skip
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])


def threshold(text: str) -> float:
    value = float(text)
    if not -1.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a cosine similarity in (-1, 1], got {text}")
    return value


def print_duplicates(index: str, cutoff: float, as_json: bool) -> None:
    """Near-duplicate pairs on stdout (highest first), their groups counted on stderr."""
    import json

    from vlmkit.embeddings.dedupe import duplicate_groups, near_duplicates

    pairs = near_duplicates(index, cutoff, progress=True)
    for pair in pairs:
        print(json.dumps(pair.to_dict(), ensure_ascii=False) if as_json else f"{pair.score:.4f}\t{pair.a}\t{pair.b}")
    groups = duplicate_groups(pairs)
    extra = sum(len(g) - 1 for g in groups)
    print(f"{len(pairs)} near-duplicate pair(s) at cosine ≥ {cutoff}: {len(groups)} group(s); keeping one image of "
          f"each leaves out {extra}", file=sys.stderr)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from vlmkit.embeddings.embed import DEFAULT_MODEL, embed, index_model, model_id
    from vlmkit.embeddings.encoder import load_encoder
    from vlmkit.errors import ConfigError
    from vlmkit.processing.image_files import collect_images

    collect_images(args.paths)  # a bad path fails before the model loads
    existing = index_model(args.out)
    name = args.model or existing or DEFAULT_MODEL
    if existing is not None and model_id(name) != existing:  # before the model loads
        raise ConfigError(f"{args.out}: this index holds embeddings of model {existing!r}, not of {name!r}; omit "
                          "--model (the index's own is used) or pick another --out")  # fmt: skip
    encoder = load_encoder(name, device=args.device, dtype=args.dtype)
    if encoder.notice:
        print(f"note: {encoder.notice}", file=sys.stderr)
    summary = embed(args.paths, args.out, model=encoder, batch_size=args.batch_size, prune=args.prune,
                    rehash=args.rehash, progress=not args.quiet)  # fmt: skip
    removed = f", {summary.removed} removed" if args.prune else ""
    print(f"{summary.embedded} embedded, {summary.errors} failed, {summary.skipped} unchanged{removed} "
          f"({summary.images_per_second:.1f} images/s) → {args.out}", file=sys.stderr)  # fmt: skip
    if args.dedupe is not None:
        print_duplicates(args.out, args.dedupe, args.json)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    parser.add_argument("--out", required=True, metavar="INDEX", help="the index folder (created, or appended to)")
    add_encoder_args(parser, default=None, what="a CLIP / SigLIP / SigLIP2 folder or hub id, or 'clip-shapes' "
                     "(built in); default: the index's own model, 'clip-shapes' for a new index")  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--prune", action="store_true", help="also drop indexed files that no longer exist")
    parser.add_argument("--rehash", action="store_true",
                        help="hash every file, even when its size and modification time are unchanged")  # fmt: skip
    parser.add_argument("--dedupe", type=threshold, metavar="THRESHOLD",
                        help="then list near-duplicate pairs (cosine ≥ THRESHOLD, e.g. 0.95)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="--dedupe pairs as JSON lines")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
