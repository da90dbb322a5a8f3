"""Image files and folders → an embedding index, batched and resumable; a rerun embeds only new or changed files.

A file is unchanged when its size and modification time equal its last row's (no read), or else when its
SHA-256 does. Images are read by :func:`vlmkit.processing.images.load_image` (its errors and limits); a file that
fails is recorded with its error and the run goes on (an unchanged failed file is not tried again). The next
batch's files are read, decoded and preprocessed in a worker thread while the model embeds the current one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vlmkit.embeddings.encoder import DualEncoder, load_encoder
from vlmkit.embeddings.index import META, EmbeddingIndex, writing
from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.processing.image_files import collect_keyed, safe_text
from vlmkit.processing.images import DEFAULT_MAX_PIXELS, load_image

log = logging.getLogger(__name__)

DEFAULT_MODEL = "clip-shapes"


@dataclass
class EmbedSummary:
    total: int
    """Image files found under the paths."""
    embedded: int
    skipped: int
    """Files whose content was already in the index."""
    errors: int
    removed: int = 0
    """Rows of files that no longer exist, pruned (``prune=True``)."""
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return (self.embedded + self.errors) / self.seconds if self.seconds else 0.0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_model(out: str | Path) -> str | None:
    """The model an existing index was built with (None when ``out`` is no index yet)."""
    if not (Path(out) / META).is_file():
        return None
    return EmbeddingIndex._read_meta(Path(out))["model"]


def model_id(name: str) -> str:
    """How an index records a model: a built-in name or hub id as is, a folder as its resolved path."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _unchanged(row: dict[str, Any] | None, size: int, mtime_ns: int) -> bool:
    return row is not None and not row.get("removed") and row.get("size") == size and row.get("mtime_ns") == mtime_ns


@dataclass
class _Prepared:
    row: dict[str, Any]
    image: Any = None
    """The decoded image, or None (an error, or content already in the index)."""
    same_content: bool = False


def _prepare(key: str, path: Path, latest: dict[str, Any] | None, max_pixels: int | None) -> _Prepared:
    """Hash and decode one file (in the worker thread); a failure is its row's error."""
    row: dict[str, Any] = {"id": None, "path": key, "image": safe_text(str(path))}
    try:
        stat = path.stat()
        row.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        row["sha256"] = sha256_file(path)
    except OSError as exc:
        row["error"] = safe_text(f"{path}: cannot read ({exc.strerror or exc})")
        return _Prepared(row)
    if latest is not None and not latest.get("removed") and latest.get("sha256") == row["sha256"]:
        return _Prepared(row, same_content=True)
    try:
        return _Prepared(row, load_image(path, max_pixels=max_pixels))
    except VlmkitError as exc:
        row["error"] = safe_text(str(exc))
        return _Prepared(row)


@dataclass
class _Batch:
    items: list[_Prepared]
    inputs: dict[str, Any] | None = None
    """The image processor's tensors for the decoded images (computed in the worker thread too), or None."""


def _embed_each(encoder: DualEncoder, images: list[Any], inputs: dict[str, Any] | None) -> list[np.ndarray | Exception]:
    """One vector per image, embedded together; when the batch fails, each alone, so a failure is only its own."""
    try:
        if inputs is None:
            raise ValueError("the batch's images could not be processed together")
        return list(encoder.embed_pixels(inputs))
    except Exception as exc:
        if len(images) == 1:
            return [exc]
        log.warning("a batch of %d images failed (%s); embedding them one by one", len(images), exc)
    results: list[np.ndarray | Exception] = []
    for image in images:
        try:
            results.append(encoder.embed_images([image])[0])
        except Exception as exc:
            results.append(exc)
    return results


def embed(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    model: str | DualEncoder | None = None,
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "auto",
    prune: bool = False,
    rehash: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> EmbedSummary:
    """Embed every image under ``paths`` into the index folder ``out`` (created when new; see
    :mod:`vlmkit.embeddings.index`), skipping files whose content it already has.

    ``model``: a built-in name, folder or hub id, or a loaded :class:`DualEncoder`; default: the index's own model,
    or ``clip-shapes`` for a new index. ``prune`` also records as removed the indexed files that no longer exist.
    ``rehash`` hashes every file even when its size and modification time are unchanged.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    images = collect_keyed(paths)  # a bad path fails before the model loads
    existing = index_model(out)
    if isinstance(model, DualEncoder):
        encoder = model
    else:
        name = model or existing or DEFAULT_MODEL
        if existing is not None and model_id(name) != existing:
            raise ConfigError(
                f"{out}: this index holds embeddings of model {existing!r}, not of {name!r}; omit --model (the "
                "index's own is used) or pick another --out"
            )
        encoder = load_encoder(name, device=device, dtype=dtype)
    started = time.perf_counter()
    summary = EmbedSummary(total=len(images), embedded=0, skipped=0, errors=0)
    with writing(out, model_id(encoder.name), encoder.dim) as index:
        todo: list[tuple[str, Path]] = []
        for key, path in images.items():
            latest = index.latest.get(key)
            try:
                stat = path.stat()
            except OSError:
                todo.append((key, path))  # _prepare records the error
                continue
            if not rehash and _unchanged(latest, stat.st_size, stat.st_mtime_ns):
                summary.skipped += 1
            else:
                todo.append((key, path))
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        bar = tqdm(total=len(todo), unit="img", desc="embed", disable=not progress, dynamic_ncols=True)

        def prepare(batch: list[tuple[str, Path]]) -> _Batch:
            items = [_prepare(key, path, index.latest.get(key), max_pixels) for key, path in batch]
            images = [p.image for p in items if p.image is not None]
            try:
                inputs = encoder.image_inputs(images) if images else None
            except Exception:  # _embed_each finds the image that fails, one by one
                inputs = None
            return _Batch(items, inputs)

        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead: Future[_Batch] | None = pool.submit(prepare, batches[0]) if batches else None
            for number in range(len(batches)):
                prepared = ahead.result()  # type: ignore[union-attr]
                ahead = pool.submit(prepare, batches[number + 1]) if number + 1 < len(batches) else None
                _embed_batch(encoder, index, prepared, summary)
                bar.update(len(prepared.items))
        bar.close()
        if prune:
            gone = [key for key, row in index.latest.items() if not row.get("removed") and not Path(key).exists()]
            index.append([({"path": key, "image": index.latest[key].get("image", key), "removed": True}, None)
                          for key in gone])  # fmt: skip
            summary.removed = len(gone)
    summary.seconds = time.perf_counter() - started
    return summary


def _embed_batch(encoder: DualEncoder, index: EmbeddingIndex, batch: _Batch, summary: EmbedSummary) -> None:
    """Embed one prepared batch and append its rows (unchanged content only counts as skipped)."""
    fresh = [p for p in batch.items if not p.same_content]
    summary.skipped += len(batch.items) - len(fresh)
    decoded = [p for p in batch.items if p.image is not None]
    vectors = _embed_each(encoder, [p.image for p in decoded], batch.inputs) if decoded else []
    found = {id(p): v for p, v in zip(decoded, vectors, strict=True)}
    entries: list[tuple[dict[str, Any], np.ndarray | None]] = []
    for item in fresh:
        vector = found.get(id(item))
        if isinstance(vector, Exception):
            item.row["error"] = safe_text(f"embedding failed: {vector}")
            vector = None
        summary.embedded += vector is not None
        summary.errors += vector is None
        entries.append((item.row, vector))
    if entries:
        index.append(entries)
