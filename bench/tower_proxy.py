"""The built-in model's tower A/B: the recipe's ``vision`` stage (grid_labels) with held-out accuracy curves.

Trains the tower of ``recipes/default.yaml`` (after ``--set`` overrides) with the ``grid_labels`` objective on the
recipe's data, exactly as its ``vision`` stage does, and every ``--eval-every`` steps scores the temporary heads on
held-out test-split scenes: per-cell kind, shape, colour, size, word and box error. A cell the heads can't read
is a cell the LM can't either, so this bounds what the built-in model can reach. Prints one JSON line per
evaluation and writes ``OUT/NAME.json``.

    python bench/tower_proxy.py --name base
    python bench/tower_proxy.py --name wide --set model.vision.hidden_size=256
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmkit.data.shapes import render_scene, sample_scene
from vlmkit.training.config import apply_overrides, read_config_file
from vlmkit.training.grid_labels import GridLabelObjective, cell_labels, grid_loss, pool_to_grid, stack_targets
from vlmkit.training.model import build_model
from vlmkit.training.optim import build_optimizer
from vlmkit.training.trainer import load_config, read_samples, resolve_precision


@torch.no_grad()
def held_out(objective: GridLabelObjective, processor: Any, n: int, seed: int) -> dict[str, float]:
    """Per-head accuracy (and box error) of the heads on ``n`` test-split scenes."""
    objective.eval()
    totals: dict[str, list[float]] = {}
    for lo in range(0, n, 128):
        scenes = [sample_scene("test", seed, i) for i in range(lo, min(n, lo + 128))]
        pixels = processor.load_images([render_scene(s) for s in scenes])
        targets = stack_targets(cell_labels(s.to_dict()) for s in scenes)
        logits, boxes = objective.heads(pool_to_grid(objective.tower(pixels)))
        _, accuracy = grid_loss(logits, boxes, targets)
        for name, value in accuracy.items():
            totals.setdefault(name, []).append(value * len(scenes))
    objective.train()
    return {name: round(sum(v) / n, 4) for name, v in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--recipe", default="recipes/default.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-n", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/tower-proxy")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    raw = apply_overrides(read_config_file(args.recipe), args.set)
    model_spec = {k: v for k, v in raw["model"].items() if k != "train_tokenizer"}
    model_spec["tokenizer"] = str(Path(__file__).parent.parent / "src/vlmkit/assets/default")
    config = load_config({"model": model_spec, "stages": [raw["stages"][0]], "seed": raw.get("seed", 0)})
    stage = config.stages[0]
    torch.manual_seed(config.seed)
    model, processor = build_model(config.model)
    pool = []
    for source in stage.data:
        pool += [s for s, _ in zip(read_samples(source), range(source.limit or 2**62), strict=False) if s.images]
    labels = [cell_labels(s.meta["truth"]) for s in pool]
    total = stage.steps or math.ceil((stage.epochs or 1.0) * len(pool) / stage.batch_size)
    objective = GridLabelObjective(model.vision_tower).train()
    params = [p for p in objective.parameters()]
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": params, "lr": stage.lr, "weight_decay": stage.weight_decay, "name": "vision"}]
    optimizer, scheduler = build_optimizer(groups, stage, total)
    amp = resolve_precision(stage.precision, torch.device("cpu"))
    rng = np.random.default_rng([config.seed, 0])
    curve = []
    started = time.perf_counter()
    for step in range(1, total + 1):
        batch = rng.choice(len(pool), size=stage.batch_size, replace=False)
        pixels = processor.load_images([pool[i].images[0] for i in batch])
        targets = stack_targets(labels[i] for i in batch)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = objective(pixels, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == total:
            minutes = round((time.perf_counter() - started) / 60, 2)
            point = {"step": step, "minutes": minutes, "loss": round(loss.item(), 4),
                     **held_out(objective, processor, args.eval_n, 5)}  # fmt: skip
            curve.append(point)
            print(json.dumps(point), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"name": args.name, "overrides": args.set, "steps": total, "curve": curve}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
