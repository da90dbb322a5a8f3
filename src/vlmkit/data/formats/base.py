"""What every format implements: a :class:`SampleDataset` reader and a :class:`DatasetWriter`."""

from __future__ import annotations

import logging
import re
import shutil
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from vlmkit.data.formats.records import ParsedRecord, Record, RecordError, count_markers
from vlmkit.data.formats.schemas import DEFAULT_CAPTION_PROMPT, LlavaCompat, ReadOptions, parse_record, place_images
from vlmkit.data.sample import Sample
from vlmkit.errors import DataError, ImageError
from vlmkit.processing.images import DEFAULT_MAX_PIXELS, load_image
from vlmkit.tokens import IMAGE_TOKEN

logger = logging.getLogger(__name__)

DecodeImages = bool | Literal["check", "lazy"]


class ImageHandle(ABC):
    """Where an embedded image lies (a tar member, a parquet cell, a ``datasets`` cell): small and picklable,
    read again when needed (``decode_images="lazy"``), so a dataset's image bytes need not stay in memory."""

    @abstractmethod
    def read(self) -> bytes:
        """The encoded image file."""


def resolve_image(ref: Any) -> Any:
    """An image reference as :func:`~vlmkit.processing.images.load_image` takes it (a handle is read)."""
    return ref.read() if isinstance(ref, ImageHandle) else ref


class SampleDataset(ABC):
    """An iterable of :class:`Sample` read from one dataset, in file order; re-iterable.

    ``len()`` is the number of records in the files (bad ones included); ``problems`` counts, after (or
    during) an iteration with ``skip_bad=True``, the records skipped per reason. A subclass yields raw records
    from :meth:`_entries`; the shared code validates them, resolves and decodes the images.
    """

    format: ClassVar[str]
    """The registered format name (set by :func:`~vlmkit.data.formats.registry.register_format`)."""

    def __init__(
        self,
        path: str | Path,
        *,
        image_root: str | Path | None = None,
        skip_bad: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        decode_images: DecodeImages = True,
        columns: Mapping[str, str] | None = None,
        split: str | None = None,
        llava_compat: LlavaCompat = "auto",
        allow_absolute_paths: bool = False,
        caption_prompt: str = DEFAULT_CAPTION_PROMPT,
    ) -> None:
        self.path = Path(path)
        self.split = split
        self.image_root = Path(image_root) if image_root is not None else self._default_root()
        self.skip_bad = skip_bad
        self.max_pixels = max_pixels
        self.decode_images = decode_images
        self.options = ReadOptions(dict(columns or {}), llava_compat, allow_absolute_paths, caption_prompt)
        self.problems: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def _default_root(self) -> Path:
        return self.path.parent

    @abstractmethod
    def _entries(self) -> Iterator[tuple[str, Any]]:
        """Yield ``(where, payload)``: a raw record (format-specific) or a :class:`RecordError` to report."""

    @abstractmethod
    def __len__(self) -> int: ...

    def _record_of(self, payload: Any) -> Any:
        return payload

    def _default_id(self, payload: Any) -> str | None:
        """The id of a record without one when the format has its own key (else a hash of the record)."""
        return None

    def _image_refs(self, parsed: ParsedRecord, payload: Any) -> list[Any]:
        return parsed.image_refs

    def _load(self, where: str, source: Any, name: str, handle: ImageHandle | None = None) -> Any:
        """Decode (check) an image; gives back the image, or with ``decode_images`` ``"check"`` its source and
        with ``"lazy"`` its ``handle`` (when the format has one) instead of embedded bytes."""
        if not self.decode_images:
            return source  # a path or encoded bytes, unchecked: for readers that only need the text
        try:
            image = load_image(source, max_pixels=self.max_pixels)
        except ImageError as exc:
            raise RecordError(where, "unreadable_image", f"image {name}: {exc}") from exc
        if self.decode_images == "lazy" and handle is not None:
            return handle
        return source if self.decode_images in ("check", "lazy") else image

    def _resolve_path(self, where: str, ref: Any) -> Path:
        """An image path under the data root; rejects paths that escape it (absolute ones too, unless
        ``allow_absolute_paths``) and missing files."""
        if not isinstance(ref, str) or not ref:
            raise RecordError(where, "bad_record", f"image reference must be a non-empty path, got {ref!r}")
        root = self.image_root.resolve()
        path = Path(ref)
        full = (path if path.is_absolute() else root / path).resolve()
        if not (full.is_relative_to(root) or (path.is_absolute() and self.options.allow_absolute_paths)):
            hint = " (absolute paths need allow_absolute_paths)" if path.is_absolute() else ""
            raise RecordError(where, "path_escape", f"image path {ref!r} is outside the data root {root}{hint}")
        if not full.is_file():
            raise RecordError(where, "missing_image", f"image {ref!r} not found (looked for {full})")
        return full

    def _load_image(self, where: str, ref: Any, payload: Any) -> Any:
        """Any reference a record may hold: a path, a ``data:`` URL, bytes or a ``{bytes, path}`` struct."""
        if isinstance(ref, dict):
            if ref.get("bytes") is not None:
                return self._load_image(where, ref["bytes"], payload)
            if ref.get("path") is None:
                raise RecordError(where, "missing_image", "image entry has neither bytes nor a path")
            ref = ref["path"]
        if isinstance(ref, bytes):
            return self._load(where, ref, "(embedded bytes)", self._handle(ref, payload))
        if isinstance(ref, str) and ref.startswith("data:"):
            return self._load(where, ref, "(data URL)")
        if isinstance(ref, str) and ref.split("://", 1)[0] in ("http", "https"):
            raise RecordError(where, "missing_image", f"image {ref!r} is a URL; vlmkit reads local files only")
        return self._load(where, self._resolve_path(where, ref), repr(ref))

    def _handle(self, data: bytes, payload: Any) -> ImageHandle | None:
        """Where embedded image ``data`` of ``payload`` lies, for ``decode_images="lazy"`` (None: keep bytes)."""
        return None

    def _convert(self, where: str, payload: Any) -> Sample:
        parsed = parse_record(where, self._record_of(payload), self.options, default_id=self._default_id(payload))
        where = f"{where} (id {parsed.id!r})"
        refs = self._image_refs(parsed, payload)
        markers = count_markers(parsed.messages)
        messages = parsed.messages
        if markers == 0 and refs and parsed.place_images:
            messages, markers = place_images(messages, len(refs)), len(refs)
        if markers != len(refs):
            raise RecordError(
                where, "image_count_mismatch", f"{markers} {IMAGE_TOKEN} marker(s) but {len(refs)} image(s)"
            )
        images = [self._load_image(where, ref, payload) for ref in refs]
        return Sample(parsed.id, messages, images, parsed.task, parsed.meta)

    def units(self) -> list[Any]:
        """The pieces this dataset reads from independently, in file order: a tar shard, a parquet row group, a
        block of ``datasets`` rows; one (the whole dataset) for formats without any. Streaming training shuffles
        and shares out units and resumes inside one (:meth:`read_unit`)."""
        return [None]

    def _unit_entries(self, unit: Any) -> Iterator[tuple[str, Any]]:
        """The raw entries of one unit of :meth:`units`, as :meth:`_entries` yields them."""
        return self._entries()

    def read_unit(
        self, unit: Any, start: int = 0, keep: Callable[[int], bool] | None = None
    ) -> Iterator[tuple[int, Sample | RecordError | None]]:
        """Entries ``start``, ``start + 1``, ... of ``unit``, each as its index in the unit and its
        :class:`Sample`, or the :class:`RecordError` that makes it bad (whatever ``skip_bad``: the caller counts
        or raises); an entry ``keep(index)`` refuses is not converted (None). Entries before ``start`` are
        passed over unconverted, so resuming inside a unit decodes nothing twice."""
        for index, (where, payload) in enumerate(self._unit_entries(unit)):
            if index < start:
                continue
            if keep is not None and not keep(index):
                yield index, None
                continue
            try:
                if isinstance(payload, RecordError):
                    raise payload
                yield index, self._convert(where, payload)
            except RecordError as exc:
                yield index, exc

    def __iter__(self) -> Iterator[Sample]:
        self.problems = Counter()
        for where, payload in self._entries():
            try:
                if isinstance(payload, RecordError):
                    raise payload
                sample = self._convert(where, payload)
            except RecordError as exc:
                if not self.skip_bad:
                    raise
                self.problems[exc.reason] += 1
                logger.warning("skipped: %s", exc)
                continue
            yield sample
        if self.problems:
            summary = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.problems.items()))
            logger.warning("%s: skipped %d bad record(s) (%s)", self.path, sum(self.problems.values()), summary)


WRITE_SCHEMAS = ("llava", "messages")
"""The record layouts writers of JSON records can write (:func:`~vlmkit.data.formats.records.llava_record`)."""


def check_schema(schema: str) -> str:
    if schema not in WRITE_SCHEMAS:
        raise DataError(f"unknown output schema {schema!r}; expected one of {', '.join(WRITE_SCHEMAS)}")
    return schema


def safe_name(text: str) -> str:
    """A file-name-safe version of an id (no dots, so webdataset keys stay whole)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:120] or "_"


class DatasetWriter(ABC):
    """Writes :class:`Record` objects into one dataset; use as a context manager. ``path`` is what
    :func:`~vlmkit.data.formats.open_dataset` reads back."""

    format: ClassVar[str]
    """The registered format name (set by :func:`~vlmkit.data.formats.registry.register_format`)."""

    def __init__(self, out_dir: str | Path, name: str, *, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.name = name
        self.count = 0
        self._names: set[str] = set()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = self._existing()
        if existing and not overwrite:
            raise DataError(f"{existing[0]} already exists; choose another output or overwrite it")
        for old in existing:
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()

    @classmethod
    def create(
        cls,
        out_dir: str | Path,
        name: str,
        *,
        overwrite: bool = False,
        shard_size: int | None = None,
        schema: str | None = None,
    ) -> DatasetWriter:
        """The writer :func:`~vlmkit.data.formats.open_writer` builds; an option the format has no use for
        (``shard_size`` outside sharded formats, ``schema`` outside JSON records) is refused, not ignored."""
        if shard_size is not None:
            raise DataError(f"shard_size applies to sharded formats (wds), not to {cls.format!r}")
        if schema is not None:
            raise DataError(
                f"schema applies to formats holding JSON records (llava, jsonl, wds), not to {cls.format!r}"
            )
        return cls(out_dir, name, overwrite=overwrite)

    @property
    @abstractmethod
    def path(self) -> Path: ...

    def _existing(self) -> list[Path]:
        return [self.path] if self.path.exists() else []

    def _unique(self, record_id: str) -> str:
        """A file-safe key for a record, unique within this dataset."""
        base = key = safe_name(record_id)
        n = 1
        while key in self._names:
            key, n = f"{base}_{n}", n + 1
        self._names.add(key)
        return key

    @abstractmethod
    def write(self, record: Record) -> None:
        """Append one record."""

    def write_sample(self, sample: Sample) -> None:
        """Append one sample (its images are PNG-encoded)."""
        self.write(Record.from_sample(sample))

    @abstractmethod
    def close(self) -> Path:
        """Finish the dataset; returns :attr:`path`."""

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
