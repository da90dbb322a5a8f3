"""The built-in model's fast proxy: the first steps of ``recipes/default.yaml``'s ``instruct`` stage, with curves.

An idea for the built-in model becomes an A/B in minutes: each arm trains from the same pretrained tower (the
recipe's ``vision`` stage, run once and cached), on the recipe's data, with the recipe's full learning-rate
schedule, and stops after ``--steps``; so an arm's curve *is* the beginning of the full run's curve with that
change. Every ``--eval-every`` steps it scores held-out ShapesWorld questions (first turn and later turns), and
prints one JSON line per evaluation, then a JSON summary. Arms differ only by ``--set`` overrides of the recipe.

    make default-model-data                                  # the recipe's data, once (data/default)
    python bench/default_model_proxy.py --name base --steps 500
    python bench/default_model_proxy.py --name lr1e-3 --steps 500 --set stages.1.lr=1e-3
    python bench/default_model_proxy.py --name restart --stage 2 --start runs/proxy/recipe/final --steps 1000

Overrides whose key starts with ``stages.0`` or ``model.vision`` change the tower: it is retrained (and cached
under its own name) for that arm. ``--tower-steps`` shortens the tower stage for quick tower A/Bs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from vlmkit.api import VLM
from vlmkit.evaluation.runner import evaluate_suite
from vlmkit.training.config import apply_overrides, read_config_file
from vlmkit.training.trainer import Trainer, load_config

HEADLINES = {
    "existence F1 (random)": "exist_random",
    "existence F1 (popular)": "exist_popular",
    "existence F1 (adversarial)": "exist_adv",
    "attribute: colour": "colour",
    "attribute: shape": "shape",
    "attribute: cell": "cell",
    "position accuracy": "position",
    "counting accuracy": "count",
    "text reading accuracy": "text",
    "grounding acc@0.5": "grounding",
    "caption: exact object set": "caption",
}


def _short(summary: dict[str, Any]) -> dict[str, float]:
    return {short: round(float(summary[name]), 3) for name, short in HEADLINES.items() if name in summary}


def tower_checkpoint(raw: dict[str, Any], root: Path, tower_steps: int | None) -> Path:
    """The recipe's model after its ``vision`` stage, trained once per tower config and cached under ``root``."""
    tower = {"model": raw["model"], "seed": raw.get("seed", 0), "stages": [dict(raw["stages"][0])]}
    if tower_steps:
        tower["stages"][0]["steps"] = tower_steps
    key = hashlib.sha256(json.dumps(tower, sort_keys=True).encode()).hexdigest()[:10]
    out = root / f"tower-{key}"
    if not (out / "final" / "config.json").is_file():
        logging.info("training the tower once for this config (%s)", out)
        Trainer(load_config({**tower, "output_dir": str(out), "save_every": None, "keep_last": 1})).run()
    return out / "final"


def run_arm(args: argparse.Namespace) -> dict[str, Any]:
    raw = apply_overrides(read_config_file(args.recipe), args.set)
    root = Path(args.out)
    tower = Path(args.start) if args.start else tower_checkpoint(raw, root, args.tower_steps)
    stage = dict(raw["stages"][args.stage])
    schedule = int(stage.get("steps") or args.steps)
    stage["steps"] = schedule
    model = {"checkpoint": str(tower)}
    for key in ("image_layout",):
        if raw["model"].get(key) is not None:
            model[key] = raw["model"][key]
    out = root / args.name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    config = load_config({"model": model, "stages": [stage], "output_dir": str(out), "seed": raw.get("seed", 0),
                          "save_every": None, "keep_last": 1, "log_every": 10, "progress": False})  # fmt: skip
    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    started = time.perf_counter()
    trainer: Trainer

    def evaluate(step: int) -> None:
        vlm = VLM(trainer.model, trainer.processor)
        trainer.model.eval()

        def predictor(conversations):
            return [r.text for r in vlm.generate_batch(conversations, max_new_tokens=96, temperature=0)]

        t0 = time.perf_counter()
        report = evaluate_suite(predictor, n=args.eval_n, seed=args.eval_seed, batch_size=64, later_turns=True,
                                progress=False)  # fmt: skip
        trainer.model.train()
        point = {
            "step": step,
            "minutes": round((time.perf_counter() - started) / 60, 2),
            "loss": round(statistics.fmean(losses[-args.eval_every :]), 4) if losses else None,
            "first": _short(report["summary"]),
            "later": _short(report["later_turns"]["summary"]),
            "eval_s": round(time.perf_counter() - t0, 1),
        }
        curve.append(point)
        print(json.dumps(point), flush=True)

    def callback(record: dict[str, Any]) -> bool:
        if record.get("event") != "step":
            return False
        losses.append(record["loss"])
        step = record["stage_step"]
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
        return step >= args.steps and args.steps < schedule  # a full schedule ends (and exports final) itself

    trainer = Trainer(config, callbacks=[callback])
    trainer.config.log_every = 1
    trainer.run()
    result = {"name": args.name, "overrides": args.set, "steps": args.steps, "schedule_steps": schedule,
              "minutes": round((time.perf_counter() - started) / 60, 2), "curve": curve}  # fmt: skip
    (out / "curve.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="this arm's name (its folder under --out)")
    parser.add_argument("--recipe", default="recipes/default.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument("--steps", type=int, default=500, help="instruct steps to run (of the recipe's schedule)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-n", type=int, default=60, help="held-out test images per evaluation")
    parser.add_argument("--eval-seed", type=int, default=7, help="test-split seed (the model card's table uses 0)")
    parser.add_argument("--tower-steps", type=int, help="shorten the tower stage (tower A/Bs)")
    parser.add_argument("--start", help="start the stage from this checkpoint instead of the cached tower")
    parser.add_argument("--stage", type=int, default=1, help="the recipe's stage to run (2: the restart, with --start)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/proxy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    result = run_arm(args)
    print(yaml.safe_dump({k: v for k, v in result.items() if k != "curve"}, sort_keys=False), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
