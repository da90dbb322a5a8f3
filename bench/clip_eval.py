"""Measure an embedding model on ShapesWorld (docs/clip-model.md): text→image recall@1/@5 and image→text
recall@1 over 1,000 held-out scenes, zero-shot colour and shape accuracy over 500 one-object scenes; one JSON line.

    python bench/clip_eval.py                       # the built-in clip-shapes, test split
    python bench/clip_eval.py --model runs/clip/final --split val
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from vlmkit.embeddings import shapes_eval
from vlmkit.embeddings.encoder import load_encoder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="clip-shapes")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-single", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    encoder = load_encoder(args.model, device="cpu", dtype="fp32")
    start = time.perf_counter()
    result = {"model": args.model, **shapes_eval.evaluate(encoder, args.n, args.n_single, args.split, args.seed)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
