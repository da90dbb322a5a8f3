"""``teach``: images in, a trainable LLaVA dataset out, through any OpenAI-compatible teacher.

Each image × task is one item with a deterministic id (``STEM-HASH-TASK``, the hash from the image's resolved
path), so a rerun of the same command skips what is done. Images are loaded once (``load_image``), shrunk to
``max_image_side``, stored as PNG in the dataset and sent as data URLs. Items are asked concurrently (the
client's limit) and written in input order, so a run killed and resumed ends with the same file as one that
never stopped.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from vlmkit.data.formats.base import safe_name
from vlmkit.data.formats.records import Record, llava_record
from vlmkit.data.shapes import encode_png
from vlmkit.data.teach.client import (
    BudgetExhausted,
    ClientConfig,
    Sleep,
    TeacherClient,
    TeacherError,
    TeacherRefused,
    TeacherUnavailable,
)
from vlmkit.data.teach.presets import TaskPrompt
from vlmkit.data.teach.store import TeachStore
from vlmkit.data.teach.validate import DEFAULT_MAX_CHARS, Rejection, validate_answer
from vlmkit.errors import ConfigError, ImageError
from vlmkit.processing.image_files import collect_images, image_key, safe_text
from vlmkit.processing.images import load_image

log = logging.getLogger(__name__)


@dataclass
class TeachConfig:
    """What to ask and how to write it."""

    tasks: list[TaskPrompt]
    name: str = "teach"
    """The dataset's name: ``OUT/NAME.jsonl`` (or ``.json``)."""
    format: str = "jsonl"
    """``jsonl``, or ``llava`` (one JSON array)."""
    max_chars: int = DEFAULT_MAX_CHARS
    """Answers longer than this are rejected (``too_long``)."""
    max_image_side: int | None = 1024
    """Images are shrunk to fit this side (None: as they are) before they are stored and sent."""
    max_failures_in_row: int = 5
    """Stop the run when this many items in a row fail after every retry (the teacher is down)."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("no tasks to run")
        if self.max_chars < 1 or (self.max_image_side is not None and self.max_image_side < 1):
            raise ConfigError("max_chars and max_image_side must be positive")


@dataclass
class Outcome:
    """What became of one item: ``record`` or ``reject`` (written), ``failed`` or ``unfinished`` (left to do)."""

    id: str
    task: str
    status: str
    row: dict[str, Any] | None = None
    detail: str = ""


@dataclass
class TeachSummary:
    """A run's counts; ``stopped`` says why it ended early (a budget), None when nothing stopped it."""

    images: int
    items: int
    done_before: int
    written: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    left: int = 0
    stopped: str | None = None
    requests: int = 0
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    waited_s: float = 0.0
    seconds: float = 0.0
    dataset: Path | None = None
    rejects: Path | None = None

    def lines(self) -> list[str]:
        """The summary as the CLI prints it."""
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.rejected.items()))
        out = [
            f"items: {self.items} ({self.images} images × {self.items // max(self.images, 1)} tasks), "
            f"{self.done_before} done before this run",
            f"written: {self.written} to {self.dataset}",
            f"rejected: {sum(self.rejected.values())}" + (f" ({reasons}) to {self.rejects}" if reasons else ""),
            f"failed: {self.failed}, left to do: {self.left}",
            f"requests: {self.requests}, retries: {self.retries} (waited {self.waited_s:.1f} s), "
            f"tokens in/out: {self.tokens_in}/{self.tokens_out}, {self.seconds:.1f} s",
        ]
        if self.stopped:
            out.append(f"stopped early: {self.stopped}; rerun the same command to continue")
        return out


@dataclass
class _Job:
    path: Path
    key: str
    tasks: list[TaskPrompt]


def item_key(path: str | Path) -> str:
    """An image's part of its items' ids: ``STEM-HASH`` (the first 8 hex digits of its resume key's SHA-1)."""
    digest = hashlib.sha1(image_key(path).encode("utf-8")).hexdigest()[:8]
    return f"{safe_name(Path(path).stem)[:60]}-{digest}"


def _png(path: Path, max_side: int | None) -> bytes:
    image = load_image(path)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return encode_png(image)


class _Runner:
    def __init__(self, client: TeacherClient, store: TeachStore, config: TeachConfig) -> None:
        self.client, self.store, self.config = client, store, config
        self.stopped: str | None = None
        self.images = ThreadPoolExecutor(1, thread_name_prefix="teach-images")

    def _messages(self, task: TaskPrompt, url: str) -> list[dict[str, Any]]:
        user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                            {"type": "text", "text": task.prompt}]}  # fmt: skip
        return ([{"role": "system", "content": task.system}] if task.system else []) + [user]

    def _reject(self, job: _Job, task: TaskPrompt, rejection: Rejection, **extra: Any) -> Outcome:
        item = f"{job.key}-{task.name}"
        row = {"id": item, "task": task.name, "source": safe_text(str(job.path)), "reason": rejection.reason,
               "detail": rejection.detail, **extra}  # fmt: skip
        return Outcome(item, task.name, "reject", row, rejection.detail)

    async def _ask(self, job: _Job, task: TaskPrompt, url: str) -> Outcome:
        item = f"{job.key}-{task.name}"
        seed = self.client.config.seed
        if seed is not None:
            seed += int(hashlib.sha1(item.encode()).hexdigest()[:7], 16)
        try:
            answer = await self.client.complete(self._messages(task, url), task.max_tokens, seed)
        except TeacherRefused as exc:
            return self._reject(job, task, Rejection("teacher_refused", str(exc)))
        except TeacherUnavailable as exc:
            return Outcome(item, task.name, "failed", detail=str(exc))
        except BudgetExhausted as exc:
            self.stopped = self.stopped or str(exc)
            return Outcome(item, task.name, "unfinished", detail=str(exc))
        checked = validate_answer(task, answer.text, answer.finish_reason, self.config.max_chars)
        if isinstance(checked, Rejection):
            return self._reject(job, task, checked, answer=answer.text, finish_reason=answer.finish_reason)
        meta = {"source": safe_text(str(job.path)), "teacher": self.client.config.model,
                "finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens}  # fmt: skip
        row = llava_record(Record(item, checked, task=task.name, meta=meta), [self.store.image_ref(job.key)])
        return Outcome(item, task.name, "record", row)

    async def process(self, job: _Job) -> tuple[_Job, list[Outcome], bytes | None]:
        """Every pending task of one image; the image's PNG (None when it can't be read). Images are prepared
        one at a time in input order, so requests queue for the client's slots in input order."""
        try:
            loop = asyncio.get_running_loop()
            png = await loop.run_in_executor(self.images, _png, job.path, self.config.max_image_side)
        except ImageError as exc:
            return job, [self._reject(job, task, Rejection("unreadable_image", str(exc))) for task in job.tasks], None
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        asks = [asyncio.ensure_future(self._ask(job, task, url)) for task in job.tasks]
        try:
            return job, list(await asyncio.gather(*asks)), png
        except BaseException:
            for ask in asks:
                ask.cancel()
            raise


async def _run(
    jobs: list[_Job],
    client: TeacherClient,
    store: TeachStore,
    config: TeachConfig,
    summary: TeachSummary,
    on_item: Callable[[Outcome], None] | None,
    progress: bool,
) -> None:
    from tqdm import tqdm

    runner = _Runner(client, store, config)
    window = 4 * client.config.concurrency
    queue = iter(jobs)
    pending: deque[asyncio.Future[tuple[_Job, list[Outcome], bytes | None]]] = deque()
    in_row = 0
    total = sum(len(job.tasks) for job in jobs)
    async with client:
        with tqdm(total=total, desc="teach", unit="item", disable=not progress, dynamic_ncols=True) as bar:
            try:
                while True:
                    while runner.stopped is None and len(pending) < window and (job := next(queue, None)):
                        pending.append(asyncio.ensure_future(runner.process(job)))
                    if not pending:
                        break
                    job, outcomes, png = await pending.popleft()
                    records = [o.row for o in outcomes if o.status == "record" and o.row is not None]
                    rejects = [o.row for o in outcomes if o.status == "reject" and o.row is not None]
                    if records and png is not None:
                        store.store_image(job.key, png)
                    store.append(records, rejects)
                    for outcome in outcomes:
                        bar.update()
                        if outcome.status == "record":
                            summary.written += 1
                            in_row = 0
                        elif outcome.status == "reject" and outcome.row is not None:
                            summary.rejected[outcome.row["reason"]] += 1
                            in_row = 0
                        elif outcome.status == "failed":
                            summary.failed += 1
                            in_row += 1
                            log.warning("%s: failed: %s", outcome.id, outcome.detail)
                        if on_item is not None:
                            on_item(outcome)
                        if in_row >= config.max_failures_in_row:
                            raise TeacherError(f"{in_row} items in a row failed after every retry (last: "
                                               f"{outcome.detail}); is the teacher up?")  # fmt: skip
            finally:
                for future in pending:
                    future.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                runner.images.shutdown(wait=True, cancel_futures=True)
    summary.stopped = runner.stopped


def teach(
    images: Sequence[str | Path],
    out: str | Path,
    client_config: ClientConfig,
    config: TeachConfig,
    *,
    api_key: str | None = None,
    progress: bool = True,
    on_item: Callable[[Outcome], None] | None = None,
    sleep: Sleep | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> TeachSummary:
    """Ask the teacher every task about every image under ``images`` (files, folders, globs) and write the
    answers that pass validation as a LLaVA dataset in ``out``; rerunning resumes. ``on_item`` is called after
    each item is written (or given up on); ``sleep`` replaces ``asyncio.sleep`` for the retry delays."""
    start = time.monotonic()
    paths = collect_images(images)
    if not paths:
        raise ConfigError(f"no images found in {', '.join(map(str, images))}")
    store = TeachStore(out, config.name, config.format, overwrite=config.overwrite)
    teacher = {"url": client_config.endpoint, "model": client_config.model}
    done = store.open(teacher, {task.name: task.fingerprint() for task in config.tasks})
    jobs = []
    for path in paths:
        key = item_key(path)
        todo = [task for task in config.tasks if f"{key}-{task.name}" not in done]
        if todo:
            jobs.append(_Job(path, key, todo))
    items = len(paths) * len(config.tasks)
    summary = TeachSummary(len(paths), items, items - sum(len(job.tasks) for job in jobs),
                           dataset=store.dataset, rejects=store.rejects)  # fmt: skip
    client = TeacherClient(client_config, api_key, sleep=sleep, transport=transport)
    try:
        if jobs:
            asyncio.run(_run(jobs, client, store, config, summary, on_item, progress))
    finally:
        store.close()
        usage = client.usage
        summary.requests, summary.retries, summary.waited_s = usage.requests, usage.retries, usage.waited_s
        summary.tokens_in, summary.tokens_out = usage.tokens_in, usage.tokens_out
        summary.left = items - summary.done_before - summary.written - sum(summary.rejected.values())
        summary.seconds = time.monotonic() - start
    log.info("teach: %d written, %d rejected, %d failed, %d left; %d requests, %d retries, tokens in/out %d/%d",
             summary.written, sum(summary.rejected.values()), summary.failed, summary.left, summary.requests,
             summary.retries, summary.tokens_in, summary.tokens_out)  # fmt: skip
    return summary
