"""``vlmkit data``: generate ShapesWorld datasets, check and convert datasets, export evaluation sets."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from vlmkit.data.formats import FORMATS, PROBLEMS, open_dataset, open_writer
from vlmkit.data.shapes import DEFAULT_IMAGE_SIZE, SPLITS
from vlmkit.data.synth import SynthConfig, export_eval, write_synthetic
from vlmkit.data.tasks import TASKS, parse_tasks
from vlmkit.errors import ConfigError


def parse_turns(text: str) -> tuple[int, int]:
    """``"6-10"`` (or ``"8"``) → (6, 10); ConfigError when it isn't one or two integers."""
    parts = text.split("-")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        low, high = 0, -1
    if not 1 <= low <= high:
        raise ConfigError(f"--turns: expected FEWEST-MOST with 1 <= FEWEST <= MOST (e.g. 6-10), got {text!r}")
    return low, high


def register(parser: argparse.ArgumentParser) -> None:
    """Add ``data`` and its subcommands (synth, check, convert, export-eval) to the CLI."""
    parser.set_defaults(func=lambda args: _help(parser))
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    synth = sub.add_parser("synth", help="generate a ShapesWorld dataset")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--split", choices=tuple(SPLITS), default="train")
    synth.add_argument("--n", type=int, required=True, help="number of samples")
    synth.add_argument("--format", choices=FORMATS, default="jsonl")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    synth.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    synth.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    synth.add_argument("--turns", default="2-4", help="questions per multiturn sample: FEWEST-MOST (e.g. 6-10)")
    synth.add_argument("--shard-size", type=int, help="samples per tar shard (wds only; default 10000)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that split")
    synth.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    synth.set_defaults(func=cmd_synth)

    check = sub.add_parser("check", help="validate a dataset in any format; counts per task and per problem")
    _reader_arguments(check)
    check.set_defaults(func=cmd_check)

    convert = sub.add_parser("convert", help="convert a dataset to another format")
    _reader_arguments(convert)
    convert.add_argument("--out", required=True, help="output folder")
    convert.add_argument("--to", choices=FORMATS, required=True, help="output format")
    convert.add_argument("--name", default=None, help="output dataset name (default: the input's name)")
    convert.add_argument("--skip-bad", action="store_true", help="skip bad records and report them per reason")
    convert.add_argument("--overwrite", action="store_true")
    convert.set_defaults(func=cmd_convert)

    export = sub.add_parser("export-eval", help="write POPE, VQA, grounding and caption exports of the test split")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--n", type=int, default=500, help="number of test images")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    export.add_argument("--overwrite", action="store_true")
    export.add_argument("--no-progress", action="store_true")
    export.set_defaults(func=cmd_export_eval)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _reader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a .json, .jsonl, .tar (or shard folder/pattern) or datasets folder")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: detected")
    parser.add_argument("--image-root", default=None, help="folder image paths are relative to")


@contextmanager
def _progress(total: int, desc: str, disable: bool) -> Any:
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="sample", disable=disable, dynamic_ncols=True) as bar:
        yield bar.update


def _print_counts(
    title: str, counts: Counter[str] | dict[str, int], describe: Callable[[str], Any] | None = None
) -> None:
    print(f"{title}:")
    width = max((len(k) for k in counts), default=0)
    for key, value in sorted(counts.items()):
        note = f"  ({describe(key)})" if describe else ""
        print(f"  {key:<{width}}  {value}{note}")


def cmd_synth(args: argparse.Namespace) -> int:
    config = SynthConfig(
        split=args.split,
        seed=args.seed,
        tasks=parse_tasks(args.tasks),
        image_size=args.image_size,
        turns=parse_turns(args.turns),
    )
    with _progress(args.n, f"synth {args.split}", args.no_progress) as update:
        path = write_synthetic(
            args.out, config, args.n, args.format, workers=args.workers, overwrite=args.overwrite,
            shard_size=args.shard_size, progress=update,
        )  # fmt: skip
    print(f"wrote {args.n} {args.split} samples ({args.format}) to {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    dataset = open_dataset(args.path, args.format, image_root=args.image_root, skip_bad=True)
    tasks: Counter[str] = Counter()
    images = turns = 0
    for sample in dataset:
        tasks[sample.task or "(none)"] += 1
        images += len(sample.images)
        turns += sum(m["role"] == "user" for m in sample.messages)
    good, bad = sum(tasks.values()), sum(dataset.problems.values())
    print(f"{dataset.path} ({dataset.format}): {good + bad} records, {good} valid, {images} images, {turns} questions")
    if tasks:
        _print_counts("tasks", tasks)
    if bad:
        _print_counts("problems", dataset.problems, PROBLEMS.get)
        print(f"{bad} bad record(s)")
        return 1
    print("no problems found")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    dataset = open_dataset(args.path, args.format, image_root=args.image_root, skip_bad=args.skip_bad)
    name = args.name or dataset.path.stem.split("-*")[0] or "data"
    with open_writer(args.out, args.to, name, overwrite=args.overwrite) as writer:
        for sample in dataset:
            writer.write_sample(sample)
    print(f"wrote {writer.count} samples ({args.to}) to {writer.path}")
    if dataset.problems:
        _print_counts("skipped", dataset.problems, PROBLEMS.get)
    return 0


def cmd_export_eval(args: argparse.Namespace) -> int:
    with _progress(args.n, "export-eval", args.no_progress) as update:
        counts = export_eval(args.out, args.n, args.seed, workers=args.workers, overwrite=args.overwrite,
                             progress=update)  # fmt: skip
    print(f"wrote the evaluation exports of {args.n} test images to {args.out}")
    _print_counts("rows", counts)
    return 0
