"""``vlmkit eval``: score a model on a benchmark file or the ShapesWorld suite, batched through the engine."""

from __future__ import annotations

import argparse

from vlmkit.commands.common import add_engine_args, add_model_args, load_model, positive_int


def run(args: argparse.Namespace) -> int:
    from vlmkit.errors import ConfigError
    from vlmkit.evaluation.runner import evaluate, evaluate_suite, format_table

    if (args.suite is None) == (args.task is None):
        raise ConfigError("give either --task (with --data) or --suite shapesworld")
    if args.task and not args.data:
        raise ConfigError(f"--task {args.task} needs --data (a JSONL file, parquet, or a datasets folder)")
    vlm = load_model(args)

    def predictor(conversations):
        results = vlm.generate_batch(conversations, max_new_tokens=args.max_new_tokens, temperature=0)
        return [r.text for r in results]

    common = {"batch_size": args.batch_size, "out_dir": args.out, "model_name": args.model, "progress": not args.quiet}
    if args.suite:
        report = evaluate_suite(
            predictor, n=args.n, seed=args.seed, blank_images=args.blank_images, later_turns=args.later_turns,
            **common,
        )  # fmt: skip
    else:
        if args.later_turns:
            raise ConfigError("--later-turns is for --suite shapesworld (a --task file holds single questions)")
        options = {k: v for k, v in (("prompt_suffix", args.prompt_suffix), ("box_format", args.box_format)) if v}
        options.update(_task_options(args.task_option or []))
        report = evaluate(
            predictor, args.task, args.data, image_root=args.image_root, limit=args.limit,
            blank_images=args.blank_images, task_options=options, split=args.split, **common,
        )  # fmt: skip
    print(format_table(report))
    return 0


def _task_options(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs; a VALUE that is JSON (``false``, ``3``) is read as JSON, anything else as text."""
    import json

    from vlmkit.errors import ConfigError

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--task-option takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def register(parser: argparse.ArgumentParser) -> None:
    from vlmkit.evaluation.tasks import task_names

    add_model_args(parser)
    add_engine_args(parser)
    parser.add_argument("--task", choices=task_names())
    parser.add_argument("--data", help="evaluation data: a JSONL file, a parquet file or folder, or a datasets folder")
    parser.add_argument("--split", help="the split of a datasets DatasetDict folder or of a hub parquet folder")
    parser.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                        help="a task option, e.g. circular=given (mmbench), parse=first_char (seedbench)")  # fmt: skip
    parser.add_argument("--image-root", help="folder that image paths in the data are relative to")
    parser.add_argument("--suite", choices=["shapesworld"], help="every ShapesWorld task on the held-out test split")
    parser.add_argument("--n", type=positive_int, default=500, help="suite: number of test images")
    parser.add_argument("--seed", type=int, default=0, help="suite: test-split seed")
    parser.add_argument("--blank-images", action="store_true", help="also ask with every image blanked (ablation)")
    parser.add_argument(
        "--later-turns", action="store_true", help="suite: also ask every question as the 2nd-5th turn of a chat"
    )
    parser.add_argument("--limit", type=positive_int, help="score only the first N samples")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--prompt-suffix", help="text appended to every question (e.g. 'Answer in one word.')")
    parser.add_argument("--box-format", help="grounding: how boxes in answers are written (default: auto)")
    parser.add_argument("--out", help="output folder: predictions.jsonl + report.json; rerunning resumes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
