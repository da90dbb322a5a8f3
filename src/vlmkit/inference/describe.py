"""Batch description of image files and folders into a resumable JSONL file."""

from __future__ import annotations

import logging
import os  # noqa: F401  (tests patch describe.os.replace, which jsonl.rewrite uses)
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from vlmkit import jsonl
from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.inference.budget import BudgetCounter, fit_words, trim_to_clause
from vlmkit.inference.options import GenerationOptions
from vlmkit.processing.conversation import prompt_conversation
from vlmkit.processing.image_files import IMAGE_EXTENSIONS, collect_images, collect_keyed, image_key, safe_text
from vlmkit.processing.images import load_image

if TYPE_CHECKING:
    from vlmkit.api import VLM

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image."
_collect = collect_keyed

__all__ = ["IMAGE_EXTENSIONS", "DescribeSummary", "collect_images", "describe", "fit_to_budget", "image_key",
           "read_done", "safe_text"]  # fmt: skip


@dataclass
class _Row:
    key: str
    failed: bool
    line: bytes


def _row_key(row: Any) -> str:
    """The resume key of a row: its ``path``; a row written before ``path`` existed has only ``image``, resolved
    against the current folder (as given then: an absolute path, or one relative to the folder of that run)."""
    if not isinstance(row, dict):
        raise TypeError(f"expected a JSON object, got {type(row).__name__}")
    key = row.get("path")
    if key is None:
        image = row["image"]
        if not isinstance(image, str):
            raise TypeError(f"'image' must be a string, got {type(image).__name__}")
        return image_key(image)
    if not isinstance(key, str):
        raise TypeError(f"'path' must be a string, got {type(key).__name__}")
    return key


def _read_rows(out: Path) -> list[_Row]:
    """Every row of ``out`` in file order; a torn last line (a kill mid-write) is cut off the file first.

    A malformed line anywhere else means the file is not ours: an error, and the file is left untouched.
    """
    return [
        _Row(_row_key(row.data), row.data.get("error") is not None, row.raw)
        for row in jsonl.read_rows(out, _row_key, "a describe record")
    ]


def read_done(out: Path) -> set[str]:
    """The resume keys (:func:`image_key`) of the images already recorded in ``out``; a torn last line (a kill
    mid-write) is cut off the file first.

    A malformed line anywhere else means the file is not ours: an error, and the file is left untouched.
    """
    return {row.key for row in _read_rows(out)}


def _compact(out: Path) -> int:
    """Keep one row per image in ``out``: its last one, in the place of its first. Written to a temporary file
    and renamed over ``out``, so a kill at any instant leaves either file (a reader takes an image's last row
    in both). Returns the number of rows dropped."""
    rows = _read_rows(out)
    last = {row.key: row.line for row in rows}
    dropped = len(rows) - len(last)
    if not dropped:
        return 0
    jsonl.rewrite(out, last.values())  # a dict keeps each key where it was first inserted
    log.info("%s: dropped %d superseded row(s)", out, dropped)
    return dropped


def fit_to_budget(text: str, tokenizer: PreTrainedTokenizerBase, budget: int) -> str:
    """The longest word-boundary prefix of ``text`` whose token count (special tokens included) is ≤ budget."""
    counter = BudgetCounter(tokenizer, budget)
    return text if counter.fits(text) else fit_words(text, counter)


@dataclass
class DescribeSummary:
    total: int
    skipped: int
    described: int
    errors: int
    seconds: float
    retried: int = 0
    """Images whose earlier row was an error, described again (``retry_errors``); counted in described/errors."""

    @property
    def images_per_second(self) -> float:
        return (self.described + self.errors) / self.seconds if self.seconds else 0.0


def _generate_each(vlm: VLM, convs: list, options: GenerationOptions) -> list[Any]:
    """One result per conversation, generated together; when the batch fails, each alone, so a failure is only
    its own image's (its exception in its place)."""
    try:
        return list(vlm.engine.generate(convs, options))
    except Exception as exc:
        if len(convs) == 1:
            return [exc]
        log.warning("a batch of %d images failed (%s); describing them one by one", len(convs), exc)
    results: list[Any] = []
    for conv in convs:
        try:
            results.append(vlm.engine.generate([conv], options)[0])
        except Exception as exc:
            results.append(exc)
    return results


@dataclass
class _Generated:
    text: str
    complete: bool
    """The model ended the text itself (not stopped at the budget nor at ``max_new_tokens``)."""


def _generate_within_budget(vlm: VLM, convs: list, options: GenerationOptions, counter: BudgetCounter) -> list[Any]:
    """One :class:`_Generated` (or exception) per conversation, generated together through the backend's running
    batch; a row is cancelled as soon as its complete words pass the budget (:meth:`BudgetCounter.exhausted`).
    When the batch itself fails, each conversation is generated alone, so a failure is only its own image's."""
    engine = vlm.engine
    results: list[Any] = [None] * len(convs)
    texts: dict[int, str] = {}
    try:
        items = []
        for i, conv in enumerate(convs):
            try:
                items.append((i, engine.encode(conv, name=f"image {i}"), options))
                texts[i] = ""
            except Exception as exc:  # this image's own failure
                results[i] = exc
        batch = engine.new_batch()
        events = batch.add(items) if items else []
        while True:
            for event in events:
                i = int(event.index)  # type: ignore[call-overload]
                if results[i] is not None:
                    continue
                if event.error is not None:
                    results[i] = event.error
                    continue
                texts[i] += event.text
                if event.result is not None:
                    results[i] = _Generated(event.result.text, event.result.finish_reason == "stop")
                elif counter.exhausted(texts[i].strip()):
                    results[i] = _Generated(texts[i], False)
                    batch.cancel({i})
            if not len(batch):
                break
            events = batch.step()
    except Exception as exc:
        if len(convs) == 1:
            return [exc]
        log.warning("a batch of %d images failed (%s); describing them one by one", len(convs), exc)
        return [_generate_within_budget(vlm, [conv], options, counter)[0] for conv in convs]
    return results


def _batches(items: list[tuple[str, Path]], size: int) -> Iterator[list[tuple[str, Path]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def describe(
    vlm: VLM,
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 8,
    max_new_tokens: int = 77,
    token_budget: int | None = None,
    budget_tokenizer: PreTrainedTokenizerBase | None = None,
    retry_errors: bool = False,
    progress: bool = True,
) -> DescribeSummary:
    """Describe every image under ``paths`` into ``out`` (JSONL: image, text, tokens, error, path).

    ``image`` is the path as given (or as found under a given folder), ``path`` its resolved absolute path; both
    are written with :func:`safe_text`, so a file name that is not UTF-8 is recorded (its odd bytes as ``\\xNN``).
    Images already in ``out`` are skipped, matched by resolved path (:func:`image_key`) however they are spelled;
    lines are appended and flushed per batch, so a killed run resumes with nothing lost or duplicated. A bad
    image is recorded with its error and the run goes on; rerunning keeps its error row unless ``retry_errors``,
    which describes it again: the new row is appended (an image's last row is the one that counts), then the
    file is rewritten atomically with one row per image, each in the place of the image's first row.
    ``tokens`` counts the text's tokens with ``budget_tokenizer`` (default: the model's own), special tokens
    included. With ``token_budget``, generation stops once a text can no longer fit, and the text is trimmed back
    to its last complete clause that fits (:func:`vlmkit.inference.budget.trim_to_clause`); rows then also have
    ``cut``: None (the model's whole text fits), ``"clause"``, or ``"word"`` (not even the first clause fits:
    the longest word-boundary prefix that does).
    """
    if not prompt or not prompt.strip():
        raise ConfigError("the prompt is empty")
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    tokenizer = budget_tokenizer or vlm.processor.tokenizer
    budget = BudgetCounter(tokenizer, token_budget) if token_budget is not None else None
    images = _collect(paths)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = _read_rows(out)
    failed = {row.key: row.failed for row in rows}  # the last row of an image counts
    superseded = len(rows) > len(failed)  # a retry was killed before dropping the rows it replaced
    todo = [(key, path) for key, path in images.items() if key not in failed or (retry_errors and failed[key])]
    retried = sum(key in failed for key, _ in todo)
    summary = DescribeSummary(total=len(images), skipped=len(images) - len(todo), described=0, errors=0,
                              seconds=0.0, retried=retried)  # fmt: skip
    del rows
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="describe", disable=not progress, dynamic_ncols=True)
    with out.open("ab") as handle:
        for batch in _batches(todo, batch_size):
            records: list[dict[str, Any]] = []
            convs, slots = [], []
            for key, path in batch:
                record: dict[str, Any] = {"image": safe_text(str(path)), "text": None, "tokens": 0, "error": None,
                                          "path": key}  # fmt: skip
                if budget is not None:
                    record["cut"] = None
                try:
                    image = load_image(path, max_pixels=vlm.processor.max_pixels)
                    convs.append(prompt_conversation(prompt, [image]).to_messages())
                    slots.append(len(records))
                except VlmkitError as exc:
                    record["error"] = safe_text(str(exc))
                records.append(record)
            if convs:
                if budget is None:
                    generated = _generate_each(vlm, convs, options)
                else:
                    generated = _generate_within_budget(vlm, convs, options, budget)
                for slot, result in zip(slots, generated, strict=True):
                    if isinstance(result, Exception):
                        records[slot]["error"] = safe_text(f"generation failed: {result}")
                        continue
                    text = safe_text(result.text.strip())
                    if budget is not None:
                        text, records[slot]["cut"] = trim_to_clause(text, budget, complete=result.complete)
                    records[slot]["text"] = text
                    records[slot]["tokens"] = len(tokenizer(text, verbose=False)["input_ids"])
            for record in records:
                summary.errors += record["error"] is not None
                summary.described += record["error"] is None
            jsonl.append_rows(handle, records)
            bar.update(len(batch))
    bar.close()
    if retried or superseded:
        _compact(out)
    summary.seconds = time.perf_counter() - start
    return summary
