"""The fast proxy of the ``clip-shapes`` recipe (docs/clip-model.md): one A/B arm in 2-4 minutes.

It runs recipes/clip.yaml with fewer steps (the learning-rate schedule compressed to them) on fewer training
scenes, measured on the validation split (never the test split the model card reports), and prints one JSON line.
An arm is one ``--set key=value`` change from the base::

    OMP_NUM_THREADS=1 python bench/clip_proxy.py --name base
    OMP_NUM_THREADS=1 python bench/clip_proxy.py --name lr3e-3 --set lr=3e-3
"""

from __future__ import annotations

import argparse
import json
import sys

from vlmkit.embeddings.training import load_recipe, train

PROXY = ["steps=200", "train_scenes=20000", "eval_split=val", "eval_scenes=1000", "eval_single=500", "log_every=25"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="the arm's name: runs/clip-proxy/NAME")
    parser.add_argument("--recipe", default="recipes/clip.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the arm's change(s)")
    args = parser.parse_args()
    overrides = [*PROXY, f"output_dir=runs/clip-proxy/{args.name}", *args.set]
    summary = train(load_recipe(args.recipe, overrides), progress=False)
    print(json.dumps({"arm": args.name, "set": args.set, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
