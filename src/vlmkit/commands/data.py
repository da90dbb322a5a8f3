"""``vlmkit data``: generate ShapesWorld datasets, check and convert datasets, export evaluation sets."""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from vlmkit.data.formats import FORMATS, PROBLEMS, open_dataset, open_writer
from vlmkit.data.formats.schemas import DEFAULT_CAPTION_PROMPT
from vlmkit.data.shapes import SPLITS, VARIANTS
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
    """Add ``data`` and its subcommands (synth, check, convert, export-eval, teach) to the CLI."""
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
    synth.add_argument(
        "--variant",
        choices=tuple(VARIANTS),
        default="default",
        help="scene geometry: default (128 px) or highres (384 px, small objects and small words)",
    )
    synth.add_argument("--image-size", type=int, default=None, help="canvas side in pixels (default: the variant's)")
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
    convert.add_argument("--schema", choices=("llava", "messages"), default=None,
                         help="JSON record layout: llava (default) or messages (ms-swift, LLaMA-Factory)")  # fmt: skip
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

    _register_teach(sub)


def _register_teach(sub: Any) -> None:
    from vlmkit.data.teach.presets import DEFAULT_TASKS, PRESETS

    teach = sub.add_parser(
        "teach",
        help="ask an OpenAI-compatible teacher about images; write its checked answers as a LLaVA dataset",
        description="Ask a teacher model each task about each image and write the answers that pass validation "
        "as a LLaVA dataset (rejects and why in OUT/NAME.teach/rejects.jsonl). Rerunning the same command "
        f"resumes. The API key is read from ${API_KEY_ENV[0]} (or ${API_KEY_ENV[1]}), never from a flag.",
    )
    teach.add_argument("images", nargs="+", help="image files, folders (recursive) or globs")
    teach.add_argument("--teacher-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    teach.add_argument("--teacher-model", required=True, help="the model name the teacher serves")
    teach.add_argument("--tasks", default=None, help=f"comma-separated: {', '.join(PRESETS)} or tasks of --prompts "
                       f"files (default: {','.join(DEFAULT_TASKS)}, or the files' tasks)")  # fmt: skip
    teach.add_argument("--prompts", action="append", default=[], metavar="FILE",
                       help="a prompt file (.txt: one task named by the file; .yaml/.json: name → prompt or "
                       "{prompt, question, kind, system, max_tokens}); repeatable")  # fmt: skip
    teach.add_argument("--out", required=True, help="output folder")
    teach.add_argument("--name", default="teach", help="dataset name: OUT/NAME.jsonl (default: teach)")
    teach.add_argument("--format", choices=("jsonl", "llava"), default="jsonl")
    teach.add_argument("--api-key-env", default=None, metavar="VAR",
                       help=f"the variable holding the API key (default: {' or '.join(API_KEY_ENV)})")  # fmt: skip
    teach.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    teach.add_argument("--max-retries", type=int, default=5, help="retries per request (429, 5xx, timeouts)")
    teach.add_argument("--timeout", type=float, default=120.0, help="seconds per connect / read (default 120)")
    teach.add_argument("--temperature", type=float, default=0.2)
    teach.add_argument("--seed", type=int, default=None, help="send a per-item seed (reproducible teachers)")
    teach.add_argument("--stream", action="store_true", help="stream the answers (SSE)")
    teach.add_argument("--max-requests", type=int, default=None, help="budget: requests in this run")
    teach.add_argument("--max-total-tokens", type=int, default=None, help="budget: tokens in + out in this run")
    teach.add_argument("--max-chars", type=int, default=4000, help="reject longer answers (default 4000)")
    teach.add_argument("--max-image-side", type=int, default=1024, help="shrink larger images (0: never)")
    teach.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    teach.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    teach.set_defaults(func=cmd_teach)


API_KEY_ENV = ("VLMKIT_TEACHER_API_KEY", "OPENAI_API_KEY")


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _reader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a .json, .jsonl, .tar (or shard folder/pattern), .parquet or datasets folder")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: detected")
    parser.add_argument("--image-root", default=None, help="folder image paths are relative to")
    parser.add_argument("--split", default=None, help="the split of a DatasetDict folder or of hub parquet files")
    parser.add_argument("--columns", default=None, help="rename fields: OLD=NEW[,OLD=NEW...] or a JSON object")
    parser.add_argument("--llava-compat", choices=("auto", "on", "off"), default="auto",
                        help="LLaVA's preprocessing (move a trailing <image>, drop a leading assistant turn); "
                             "auto: for LLaVA-format records")  # fmt: skip
    parser.add_argument("--allow-absolute-paths", action="store_true", help="accept absolute image paths")
    parser.add_argument("--caption-prompt", default=None, help="the question of caption records (img2dataset)")


def _open(args: argparse.Namespace, skip_bad: bool) -> Any:
    return open_dataset(
        args.path, args.format, image_root=args.image_root, skip_bad=skip_bad, split=args.split,
        columns=args.columns, llava_compat=args.llava_compat, allow_absolute_paths=args.allow_absolute_paths,
        caption_prompt=args.caption_prompt or DEFAULT_CAPTION_PROMPT,
    )  # fmt: skip


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
        variant=args.variant,
    )
    with _progress(args.n, f"synth {args.split}", args.no_progress) as update:
        path = write_synthetic(
            args.out, config, args.n, args.format, workers=args.workers, overwrite=args.overwrite,
            shard_size=args.shard_size, progress=update,
        )  # fmt: skip
    print(f"wrote {args.n} {args.split} samples ({args.format}) to {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    dataset = _open(args, skip_bad=True)
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
    dataset = _open(args, skip_bad=args.skip_bad)
    name = args.name or re.sub(r"-\*$|^[^A-Za-z0-9]+$", "", dataset.path.stem) or "data"
    with open_writer(args.out, args.to, name, overwrite=args.overwrite, schema=args.schema) as writer:
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


def cmd_teach(args: argparse.Namespace) -> int:
    from vlmkit.data.teach import ClientConfig, TeachConfig, resolve_tasks, teach

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    names = [name.strip() for name in args.tasks.split(",") if name.strip()] if args.tasks else None
    if args.api_key_env is not None and args.api_key_env not in os.environ:
        raise ConfigError(f"--api-key-env: ${args.api_key_env} is not set")
    api_key = next((os.environ[var] for var in [args.api_key_env, *API_KEY_ENV] if var and os.environ.get(var)), None)
    client = ClientConfig(
        url=args.teacher_url, model=args.teacher_model, concurrency=args.concurrency, timeout=args.timeout,
        max_retries=args.max_retries, stream=args.stream, temperature=args.temperature, seed=args.seed,
        max_requests=args.max_requests, max_tokens=args.max_total_tokens,
    )  # fmt: skip
    config = TeachConfig(
        resolve_tasks(names, args.prompts), name=args.name, format=args.format, max_chars=args.max_chars,
        max_image_side=args.max_image_side or None, overwrite=args.overwrite,
    )  # fmt: skip
    summary = teach(args.images, args.out, client, config, api_key=api_key, progress=not args.no_progress)
    print("\n".join(summary.lines()))
    if summary.failed:
        print(f"{summary.failed} item(s) failed after every retry; rerun the same command to try them again")
        return 1
    return 0
