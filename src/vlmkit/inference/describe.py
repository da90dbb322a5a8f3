"""Batch description of image files and folders into a resumable JSONL file."""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from vlmkit.errors import ConfigError, DataError, VlmkitError
from vlmkit.inference.options import GenerationOptions
from vlmkit.processing.images import load_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_PROMPT = "Describe the image."


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files, folders (recursive, by image extension) and globs → sorted unique paths.

    A path that is neither an existing file or folder nor a glob matching something is an error.
    """
    found: dict[str, Path] = {}
    for raw in paths:
        text = str(raw)
        path = Path(text).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
            if not matches:
                raise ConfigError(f"{text}: the pattern matches no file")
        else:
            raise ConfigError(f"{text}: no such file or folder")
        for match in matches:
            found.setdefault(str(match.resolve()), match)
    return sorted(found.values(), key=lambda p: str(p))


def read_done(out: Path) -> set[str]:
    """Images already recorded in ``out``; a torn last line (a kill mid-write) is cut off the file first.

    A malformed line anywhere else means the file is not ours: an error, and the file is left untouched.
    """
    if not out.exists():
        return set()
    lines = out.read_bytes().split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    done: set[str] = set()
    for number, line in enumerate(lines, start=1):
        try:
            done.add(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{out}, line {number}: not a describe record ({exc}); the file was not changed") from exc
    if torn:
        log.warning("%s: removing a torn last line (%d bytes) left by an interrupted run", out, len(torn))
        with out.open("r+b") as handle:
            handle.truncate(out.stat().st_size - len(torn))
    return done


def fit_to_budget(text: str, tokenizer: PreTrainedTokenizerBase, budget: int) -> str:
    """The longest word-boundary prefix of ``text`` whose token count (special tokens included) is ≤ budget."""

    def count(candidate: str) -> int:
        return len(tokenizer(candidate)["input_ids"])

    if count(text) <= budget:
        return text
    words = text.split()
    low, high = 0, len(words)  # words[:low] fits; words[:high+1] doesn't
    while low < high:
        mid = (low + high + 1) // 2
        if count(" ".join(words[:mid])) <= budget:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low]).rstrip(",;:-")


@dataclass
class DescribeSummary:
    total: int
    skipped: int
    described: int
    errors: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return (self.described + self.errors) / self.seconds if self.seconds else 0.0


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def describe(
    vlm: Any,
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 8,
    max_new_tokens: int = 77,
    token_budget: int | None = None,
    budget_tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> DescribeSummary:
    """Describe every image under ``paths`` into ``out`` (JSONL: image, text, tokens, error).

    Images already in ``out`` are skipped; lines are appended and flushed per batch, so a killed run resumes
    with nothing lost or duplicated. A bad image is recorded with its error and the run goes on.
    ``tokens`` counts the text's tokens with ``budget_tokenizer`` (default: the model's own).
    """
    if not prompt or not prompt.strip():
        raise ConfigError("the prompt is empty")
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if token_budget is not None and token_budget <= 2:
        raise ConfigError(f"token budget must be more than 2 tokens, got {token_budget}")
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    counter = budget_tokenizer or vlm.processor.tokenizer
    images = collect_images(paths)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    todo = [p for p in images if str(p) not in done]
    summary = DescribeSummary(total=len(images), skipped=len(images) - len(todo), described=0, errors=0, seconds=0.0)
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="describe", disable=not progress, dynamic_ncols=True)
    with out.open("a", encoding="utf-8") as handle:
        for batch in _batches(todo, batch_size):
            records: list[dict[str, Any]] = []
            convs, slots = [], []
            for path in batch:
                try:
                    image = load_image(path, max_pixels=vlm.processor.max_pixels)
                    convs.append(vlm._conversation(prompt, [image]))
                    slots.append(len(records))
                    records.append({"image": str(path), "text": None, "tokens": 0, "error": None})
                except VlmkitError as exc:
                    records.append({"image": str(path), "text": None, "tokens": 0, "error": str(exc)})
            if convs:
                for slot, result in zip(slots, vlm.engine.generate(convs, options), strict=True):
                    text = result.text.strip()
                    if token_budget is not None:
                        text = fit_to_budget(text, counter, token_budget)
                    records[slot]["text"] = text
                    records[slot]["tokens"] = len(counter(text)["input_ids"])
            for record in records:
                summary.errors += record["error"] is not None
                summary.described += record["error"] is None
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(batch))
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary
