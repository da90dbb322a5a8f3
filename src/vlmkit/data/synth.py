"""Generate ShapesWorld datasets and evaluation exports, in parallel, streaming, in constant memory.

Sample ``index`` of a split is a pure function of ``(split, seed, index)``: worker processes render chunks of
indices, results come back in index order with a bounded number of chunks in flight, and go straight to a
:class:`~vlmkit.data.formats.DatasetWriter`. The output is therefore identical for any number of workers.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vlmkit.data.formats import Record, open_writer
from vlmkit.data.shapes import (
    Scene,
    check_image_size,
    check_split,
    popularity_ranking,
    render_png,
    sample_scene,
    stream_rng,
)
from vlmkit.data.tasks import (
    MULTITURN_TURNS,
    TASKS,
    EvalItem,
    choose_task,
    conversation,
    eval_items,
    parse_tasks,
)
from vlmkit.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[int], None]
EVAL_FILES = ("pope.jsonl", "vqa.jsonl", "grounding.jsonl", "caption.jsonl")


@dataclass(frozen=True)
class SynthConfig:
    """What to generate: the split's seed stream, the tasks to draw from, the variant and the image size.

    Every record's ``meta["truth"]`` holds its split, seed, index, image size and (when not ``default``) variant,
    so any record can be regenerated exactly.
    """

    split: str = "train"
    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    image_size: int | None = None
    """Canvas side in pixels; None: the variant's (128 px for ``default``), filled in at construction."""
    turns: tuple[int, int] = MULTITURN_TURNS
    """Fewest and most questions of a ``multiturn`` sample."""
    variant: str = "default"
    """The ShapesWorld geometry (:data:`vlmkit.data.shapes.VARIANTS`): ``default`` or ``highres``."""

    def __post_init__(self) -> None:
        check_split(self.split)
        object.__setattr__(self, "image_size", check_image_size(self.image_size, self.variant))
        object.__setattr__(self, "tasks", parse_tasks(self.tasks))
        low, high = self.turns
        if not 1 <= low <= high:
            raise ConfigError(f"turns must be 1 <= fewest <= most, got {low}-{high}")
        object.__setattr__(self, "turns", (int(low), int(high)))
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")


def make_record(config: SynthConfig, index: int) -> Record:
    """Sample ``index``: the rendered PNG, a conversation of one drawn task, and the ground truth in ``meta``."""
    scene = sample_scene(config.split, config.seed, index, config.image_size, config.variant)
    rng = stream_rng(config.split, config.seed, index, stream=2)
    task = choose_task(rng, config.tasks)
    messages, task_meta = conversation(scene, task, rng, config.tasks, config.turns)
    meta = {"source": "shapesworld", **task_meta, "truth": scene.to_dict()}
    return Record(scene.id, messages, [render_png(scene)], task, meta)


def _records_chunk(config: SynthConfig, start: int, stop: int) -> list[Record]:
    return [make_record(config, i) for i in range(start, stop)]


def _eval_chunk(
    split: str, seed: int, image_size: int | None, variant: str, start: int, stop: int
) -> list[tuple[Scene, bytes, list]]:
    out = []
    for index in range(start, stop):
        scene = sample_scene(split, seed, index, image_size, variant)
        items = eval_items(scene, stream_rng(split, seed, index, stream=3))
        out.append((scene, render_png(scene), items))
    return out


def parallel_chunks(
    fn: Callable[..., list[T]], args: tuple, start: int, stop: int, *, workers: int = 1, chunk_size: int = 64
) -> Iterator[T]:
    """``fn(*args, lo, hi)`` over consecutive index chunks in ``[start, stop)``, results flattened in order.

    With ``workers > 1`` a process pool computes the chunks; at most ``2 * workers`` chunks are in flight, so
    memory stays constant however many items there are.
    """
    bounds = [(lo, min(lo + chunk_size, stop)) for lo in range(start, stop, chunk_size)]
    if workers <= 1:
        for lo, hi in bounds:
            yield from fn(*args, lo, hi)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        pending: deque[Any] = deque()
        for lo, hi in bounds:
            pending.append(pool.apply_async(fn, (*args, lo, hi)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def generate(
    config: SynthConfig, n: int, *, start: int = 0, workers: int = 1, chunk_size: int = 64
) -> Iterator[Record]:
    """Records ``start .. start+n-1`` of ``config``'s split, in order."""
    if n < 0 or start < 0:
        raise ConfigError(f"n and start must be non-negative, got n={n}, start={start}")
    if {"exist", "multiturn"} & set(config.tasks):
        popularity_ranking()  # computed once here, inherited by forked workers
    return parallel_chunks(_records_chunk, (config,), start, start + n, workers=workers, chunk_size=chunk_size)


def _report(progress: Progress | None, items: Iterable[T]) -> Iterator[T]:
    for item in items:
        yield item
        if progress is not None:
            progress(1)


def write_synthetic(
    out_dir: str | Path,
    config: SynthConfig,
    n: int,
    format: str = "jsonl",
    *,
    workers: int = 1,
    overwrite: bool = False,
    shard_size: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Generate ``n`` samples of ``config`` straight into a ``format`` dataset named after the split.

    Returns the dataset path (what :func:`vlmkit.data.formats.open_dataset` reads). ``progress(k)`` is called
    as samples are written.
    """
    with open_writer(out_dir, format, config.split, overwrite=overwrite, shard_size=shard_size) as writer:
        for record in _report(progress, generate(config, n, workers=workers)):
            writer.write(record)
    logger.info("wrote %d %s samples to %s", writer.count, config.split, writer.path)
    return writer.path


def iter_eval_items(
    n: int, seed: int = 0, *, image_size: int | None = None, variant: str = "default", workers: int = 1
) -> Iterator[tuple[Scene, bytes, list[EvalItem]]]:
    """For test images ``0 .. n-1``: the scene, its PNG and its evaluation items (see ``tasks.eval_items``).

    ``image_size`` defaults to the variant's canvas.
    """
    check_image_size(image_size, variant)
    popularity_ranking()
    return parallel_chunks(_eval_chunk, ("test", seed, image_size, variant), 0, n, workers=workers)


def _eval_row(item: EvalItem, image: str, size: int) -> tuple[str, dict[str, Any]]:
    """The export file and JSON row of one evaluation item."""
    if item.task == "exist":
        label = item.answer.lower()
        return "pope.jsonl", {"question_id": item.question_id, "image": image, "text": item.question,
                              "label": label, "category": item.category}  # fmt: skip
    if item.task == "grounding":
        return "grounding.jsonl", {"question_id": item.question_id, "image": image, "expression": item.expression,
                                   "bbox": list(item.bbox or ()), "question": item.question,
                                   "width": size, "height": size}  # fmt: skip
    if item.task == "caption":
        return "caption.jsonl", {"question_id": item.question_id, "image": image, "captions": list(item.answers),
                                 "question": item.question}  # fmt: skip
    return "vqa.jsonl", {"question_id": item.question_id, "image": image, "question": item.question,
                         "answers": list(item.answers), "answer": item.answer, "task": item.task,
                         "kind": item.kind}  # fmt: skip


def export_eval(
    out_dir: str | Path,
    n: int = 500,
    seed: int = 0,
    *,
    workers: int = 1,
    image_size: int | None = None,
    variant: str = "default",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Write the evaluation exports of ``n`` test images to ``out_dir``; returns rows per file.

    ``images/<id>.png`` plus ``pope.jsonl`` (question_id, image, text, label yes/no, category),
    ``vqa.jsonl`` (question_id, image, question, answers, answer, task), ``grounding.jsonl`` (question_id,
    image, expression, bbox ``[x1, y1, x2, y2]`` pixels) and ``caption.jsonl`` (image, captions). ``image`` is
    relative to ``out_dir``. ``variant`` and ``image_size`` (default: the variant's canvas) as in
    :class:`SynthConfig`.
    """
    out = Path(out_dir)
    existing = [out / name for name in EVAL_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} already exists; choose another output or overwrite it")
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(EVAL_FILES, 0)
    files = {name: (out / name).open("w", encoding="utf-8") for name in EVAL_FILES}
    try:
        for scene, png, items in _report(
            progress, iter_eval_items(n, seed, image_size=image_size, variant=variant, workers=workers)
        ):
            image = f"images/{scene.id}.png"
            (out / image).write_bytes(png)
            for item in items:
                name, row = _eval_row(item, image, scene.image_size)
                files[name].write(json.dumps(row, ensure_ascii=False) + "\n")
                counts[name] += 1
    finally:
        for f in files.values():
            f.close()
    return counts
