"""``vlmkit search``: the images of an index nearest to a text or an image, or its near-duplicates."""

from __future__ import annotations

import argparse
import json
import sys

from vlmkit.commands.common import positive_int
from vlmkit.commands.embed import print_duplicates, threshold


def run(args: argparse.Namespace) -> int:
    from vlmkit.embeddings.search import encoder_for, open_index, search
    from vlmkit.errors import ConfigError

    if args.dedupe is not None:
        if args.text is not None or args.image is not None:
            raise ConfigError("--dedupe lists the index's near-duplicates; it takes no query")
        print_duplicates(args.index, args.dedupe, args.json)
        return 0
    if (args.text is None) == (args.image is None):
        raise ConfigError("give a query TEXT or --image PATH (one of them)")
    index = open_index(args.index)
    if args.image is not None:
        from vlmkit.processing.images import load_image

        load_image(args.image)  # a bad query image fails before the model loads
    from vlmkit.embeddings.encoder import load_encoder

    encoder = encoder_for(index, load_encoder(args.model or index.model, device=args.device, dtype=args.dtype))
    if encoder.notice:
        print(f"note: {encoder.notice}", file=sys.stderr)
    hits = search(index, args.text, image=args.image, k=args.k, encoder=encoder)
    for hit in hits:
        print(json.dumps(hit.to_dict(), ensure_ascii=False) if args.json else f"{hit.score:.4f}\t{hit.image}")
    if not hits:
        print("the index has no images", file=sys.stderr)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    from vlmkit.commands.embed import add_encoder_args

    parser.add_argument("index", metavar="INDEX", help="an index folder made by vlmkit embed")
    parser.add_argument("text", nargs="?", metavar="TEXT", help="the query text, e.g. 'a red sports car'")
    parser.add_argument("--image", metavar="PATH", help="search by this image instead of a text")
    parser.add_argument("-k", "--top", dest="k", type=positive_int, default=10, help="results (default: %(default)s)")
    parser.add_argument("--dedupe", type=threshold, metavar="THRESHOLD",
                        help="list the index's near-duplicates (cosine ≥ THRESHOLD, e.g. 0.95) instead")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="JSON lines (id, image, path, score)")
    add_encoder_args(parser, default=None, what="the model that embeds the query (default: the index's own)")
    parser.set_defaults(func=run)
