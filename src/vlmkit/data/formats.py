"""Dataset formats: LLaVA JSON, JSONL, webdataset tar shards and HF ``datasets``, behind one reader interface.

Reading: :func:`open_dataset` auto-detects the format and returns a :class:`SampleDataset`, an iterable of
:class:`~vlmkit.data.sample.Sample`. Every image goes through :func:`vlmkit.processing.images.load_image`.
A bad record raises :class:`RecordError` (a :class:`~vlmkit.errors.DataError`) naming the file and the line,
record, sample or row; with ``skip_bad=True`` it is skipped, logged and counted in ``dataset.problems`` by reason
(:data:`PROBLEMS`).

Writing: :func:`open_writer` returns a :class:`DatasetWriter` taking :class:`Record` objects (a sample with its
images already PNG-encoded), so a generator can stream straight into any format.

Layouts, for a dataset called ``name`` in ``DIR``:

* ``llava``: ``DIR/name.json``, a JSON array of ``{"id", "image", "conversations", "task", "meta"}``, with the
  images in ``DIR/images/name/``; ``image`` is a path relative to the data root (default: the JSON file's
  folder), or a list of paths for several images.
* ``jsonl``: ``DIR/name.jsonl``, the same records, one per line.
* ``wds``: ``DIR/name-000000.tar``, ... with ``key.png`` (``key.0.png``, ``key.1.png``, ... for several images)
  and ``key.json`` (the same record; ``image`` names the tar members).
* ``hf``: ``DIR/name/``, a ``datasets`` ``save_to_disk`` folder with columns ``id``, ``images`` (a list of
  :class:`datasets.Image`), ``messages`` (``role``/``content``), ``task`` and ``meta`` (a JSON string).
"""

from __future__ import annotations

import glob
import json
import logging
import re
import shutil
import tarfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from PIL import Image

from vlmkit.data.sample import IMAGE_TOKEN, Sample, reply_problem
from vlmkit.data.shapes import encode_png
from vlmkit.errors import DataError, ImageError
from vlmkit.processing.images import DEFAULT_MAX_PIXELS, load_image

logger = logging.getLogger(__name__)

FORMATS = ("llava", "jsonl", "wds", "hf")
PROBLEMS = {
    "bad_json": "malformed JSON",
    "bad_record": "a record or field of the wrong type",
    "missing_field": "a required field is missing",
    "bad_role": "a conversation turn has an unknown role",
    "empty_conversation": "the conversation has no turns or no text",
    "no_reply": "no assistant turn, or an empty one: nothing to train on",
    "image_count_mismatch": "the number of <image> markers differs from the number of images",
    "missing_image": "an image file or tar member is missing",
    "unreadable_image": "an image cannot be decoded",
    "path_escape": "an image path escapes the data root",
    "bad_shard": "a tar shard is truncated or corrupt",
}
"""Reason codes of :class:`RecordError`, as counted in ``SampleDataset.problems``."""

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_LLAVA_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}
_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif")
_HF_MARKERS = ("state.json", "dataset_info.json")


class RecordError(DataError):
    """One bad record; ``reason`` is a key of :data:`PROBLEMS`, ``where`` names the file and record."""

    def __init__(self, where: str, reason: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = reason


@dataclass
class Record:
    """A sample ready to write: ``images`` are encoded image files (PNG bytes)."""

    id: str
    messages: list[dict[str, Any]]
    images: list[bytes] = field(default_factory=list)
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sample(cls, sample: Sample) -> Record:
        """Encode a sample's images as PNG."""
        images = [encode_png(image) for image in sample.images]
        return cls(sample.id, sample.messages, images, sample.task, dict(sample.meta))

    def to_sample(self) -> Sample:
        """Decode the images (through ``load_image``) into a :class:`Sample`."""
        return Sample(self.id, self.messages, [load_image(b) for b in self.images], self.task, dict(self.meta))


def _count_markers(messages: list[dict[str, Any]]) -> int:
    return sum(str(m.get("content", "")).count(IMAGE_TOKEN) for m in messages)


def _llava_record(record: Record, image_refs: list[str]) -> dict[str, Any]:
    """The LLaVA JSON object of a record whose images are stored at ``image_refs``."""
    conversations = []
    for turn in record.messages:
        role = turn.get("role")
        if role not in _LLAVA_ROLES or not isinstance(turn.get("content"), str):
            raise DataError(f"record {record.id!r}: cannot write a turn with role {role!r} and non-text content")
        conversations.append({"from": _LLAVA_ROLES[role], "value": turn["content"]})
    out: dict[str, Any] = {"id": record.id}
    if image_refs:
        out["image"] = image_refs[0] if len(image_refs) == 1 else image_refs
    out["conversations"] = conversations
    if record.task is not None:
        out["task"] = record.task
    if record.meta:
        out["meta"] = record.meta
    return out


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class _Parsed:
    id: str
    messages: list[dict[str, str]]
    image_refs: list[Any]
    task: str | None
    meta: dict[str, Any]


def _parse_record(where: str, record: Any) -> _Parsed:
    """Validate a LLaVA-style record (``conversations`` with from/value, or ``messages`` with role/content)."""
    if not isinstance(record, dict):
        raise RecordError(where, "bad_record", f"expected a JSON object, got {type(record).__name__}")
    if record.get("id") is None:
        raise RecordError(where, "missing_field", "missing field 'id'")
    if not isinstance(record["id"], str | int):
        raise RecordError(where, "bad_record", f"'id' must be a string or an integer, got {record['id']!r}")
    where = f"{where} (id {record['id']!r})"
    key = "conversations" if "conversations" in record else "messages"
    turns = record.get(key)
    if turns is None:
        raise RecordError(where, "missing_field", "missing field 'conversations' (or 'messages')")
    if not isinstance(turns, list):
        raise RecordError(where, "bad_record", f"'{key}' must be a list, got {type(turns).__name__}")
    if not turns:
        raise RecordError(where, "empty_conversation", "empty conversation")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(where, "bad_record", f"turn {i} must be an object, got {type(turn).__name__}")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role is None or text is None:
            raise RecordError(where, "missing_field", f"turn {i} needs 'from' and 'value' (or 'role' and 'content')")
        if role not in _ROLES:
            raise RecordError(where, "bad_role", f"turn {i} has unknown role {role!r}; expected {', '.join(_ROLES)}")
        if not isinstance(text, str):
            raise RecordError(where, "bad_record", f"turn {i} text must be a string, got {type(text).__name__}")
        messages.append({"role": _ROLES[role], "content": text})
    if not any(m["content"].strip() for m in messages):
        raise RecordError(where, "empty_conversation", "every turn of the conversation is empty")
    problem = reply_problem(messages)
    if problem is not None:
        raise RecordError(where, "no_reply", problem)
    refs = record.get("image", record.get("images"))
    refs = [] if refs is None else refs if isinstance(refs, list) else [refs]
    task = record.get("task")
    meta = record.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as exc:
            raise RecordError(where, "bad_json", f"'meta' is malformed JSON ({exc.msg})") from exc
    if not isinstance(meta, dict) or not (task is None or isinstance(task, str)):
        raise RecordError(where, "bad_record", "'meta' must be an object and 'task' a string")
    return _Parsed(str(record["id"]), messages, refs, task, meta)


class SampleDataset(ABC):
    """An iterable of :class:`Sample` read from one dataset, in file order; re-iterable.

    ``len()`` is the number of records in the files (bad ones included); ``problems`` counts, after (or
    during) an iteration with ``skip_bad=True``, the records skipped per reason.
    """

    format: ClassVar[str]

    def __init__(
        self,
        path: str | Path,
        *,
        image_root: str | Path | None = None,
        skip_bad: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        decode_images: bool | Literal["check"] = True,
    ) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self._default_root()
        self.skip_bad = skip_bad
        self.max_pixels = max_pixels
        self.decode_images = decode_images
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

    def _image_refs(self, parsed: _Parsed, payload: Any) -> list[Any]:
        return parsed.image_refs

    def _load(self, where: str, source: Any, name: str) -> Any:
        if not self.decode_images:
            return source  # a path or encoded bytes, unchecked: for readers that only need the text
        try:
            image = load_image(source, max_pixels=self.max_pixels)
        except ImageError as exc:
            raise RecordError(where, "unreadable_image", f"image {name}: {exc}") from exc
        return source if self.decode_images == "check" else image

    def _resolve_path(self, where: str, ref: Any) -> Path:
        """An image path under the data root; rejects paths that escape it and missing files."""
        if not isinstance(ref, str) or not ref:
            raise RecordError(where, "bad_record", f"image reference must be a non-empty path, got {ref!r}")
        root = self.image_root.resolve()
        path = Path(ref)
        full = (path if path.is_absolute() else root / path).resolve()
        if not full.is_relative_to(root):
            raise RecordError(where, "path_escape", f"image path {ref!r} is outside the data root {root}")
        if not full.is_file():
            raise RecordError(where, "missing_image", f"image {ref!r} not found (looked for {full})")
        return full

    def _load_image(self, where: str, ref: Any, payload: Any) -> Image.Image:
        return self._load(where, self._resolve_path(where, ref), repr(ref))

    def _convert(self, where: str, payload: Any) -> Sample:
        parsed = _parse_record(where, self._record_of(payload))
        where = f"{where} (id {parsed.id!r})"
        refs = self._image_refs(parsed, payload)
        markers = _count_markers(parsed.messages)
        if markers != len(refs):
            raise RecordError(
                where, "image_count_mismatch", f"{markers} {IMAGE_TOKEN} marker(s) but {len(refs)} image(s)"
            )
        images = [self._load_image(where, ref, payload) for ref in refs]
        return Sample(parsed.id, parsed.messages, images, parsed.task, parsed.meta)

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


class LlavaJsonDataset(SampleDataset):
    """A LLaVA JSON file: one array of records."""

    format = "llava"

    def _records(self) -> list[Any]:
        if not hasattr(self, "_cache"):
            try:
                with self.path.open("rb") as f:
                    data = json.load(f)
            except OSError as exc:
                raise DataError(f"{self.path}: cannot be read ({exc})") from exc
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{self.path}: line {exc.lineno}, column {exc.colno}: malformed JSON ({exc.msg})"
                ) from exc
            except UnicodeDecodeError as exc:
                raise DataError(f"{self.path}: not UTF-8 text ({exc})") from exc
            if not isinstance(data, list):
                raise DataError(
                    f"{self.path}: a LLaVA JSON file must hold a list of records, not {type(data).__name__}"
                )
            self._cache = data
        return self._cache

    def __len__(self) -> int:
        return len(self._records())

    def _entries(self) -> Iterator[tuple[str, Any]]:
        for i, record in enumerate(self._records()):
            yield f"{self.path}: record {i}", record


class JsonlDataset(SampleDataset):
    """A JSON Lines file: one LLaVA record per line; blank lines are ignored."""

    format = "jsonl"

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            with self.path.open("rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield lineno, line
        except OSError as exc:
            raise DataError(f"{self.path}: cannot be read ({exc})") from exc

    def __len__(self) -> int:
        if not hasattr(self, "_length"):
            self._length = sum(1 for _ in self._lines())
        return self._length

    def _entries(self) -> Iterator[tuple[str, Any]]:
        for lineno, line in self._lines():
            where = f"{self.path}: line {lineno}"
            try:
                yield where, json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
                yield where, RecordError(where, "bad_json", f"malformed JSON ({reason})")


def _wds_shards(path: Path) -> list[Path]:
    import braceexpand  # a webdataset dependency

    text = str(path)
    if "{" in text:
        shards = [Path(p) for p in braceexpand.braceexpand(text)]
    elif any(ch in text for ch in "*?["):
        shards = [Path(p) for p in sorted(glob.glob(text))]
    elif path.is_dir():
        shards = sorted(path.glob("*.tar"))
    else:
        shards = [path]
    if not shards:
        raise DataError(f"{path}: no .tar shards found")
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise DataError(f"{path}: shard(s) not found: {', '.join(missing[:5])}")
    return shards


def _tar_key(name: str) -> tuple[str, str] | None:
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return None if key is None else (key, ext.lower())


class WebDataset(SampleDataset):
    """webdataset tar shards: ``key.json`` (a LLaVA record) plus ``key.png`` or ``key.<i>.png`` per sample.

    ``path`` is one shard, a folder of shards, a glob or a brace pattern (``name-{000000..000009}.tar``). When
    the JSON has no ``image`` field, the sample's image members (``png``, ``jpg``, ...) are used in name order.
    """

    format = "wds"

    def _default_root(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def __len__(self) -> int:
        if not hasattr(self, "_length"):
            keys = 0
            for shard in _wds_shards(self.path):
                names = []
                try:
                    with tarfile.open(shard) as tar:
                        names += [member.name for member in tar if member.isreg()]
                except (tarfile.TarError, OSError):
                    pass  # a corrupt shard counts what is readable; iterating reports the problem
                keys += len({k[0] for k in map(_tar_key, names) if k is not None})
            self._length = keys
        return self._length

    def _entries(self) -> Iterator[tuple[str, Any]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        for shard in _wds_shards(self.path):
            try:
                with shard.open("rb") as stream:
                    for sample in group_by_keys(tar_file_expander([{"url": str(shard), "stream": stream}])):
                        where = f"{shard}: sample {sample['__key__']!r}"
                        if "json" not in sample:
                            yield where, RecordError(where, "missing_field", "no .json member")
                            continue
                        try:
                            record = json.loads(sample["json"].decode("utf-8"))
                        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                            yield (
                                where,
                                RecordError(where, "bad_json", f"{sample['__key__']}.json is malformed ({exc})"),
                            )
                            continue
                        yield where, (record, sample)
            except (tarfile.TarError, OSError, ValueError) as exc:
                yield str(shard), RecordError(str(shard), "bad_shard", f"truncated or corrupt tar shard ({exc})")

    def _record_of(self, payload: Any) -> Any:
        return payload[0]

    def _image_refs(self, parsed: _Parsed, payload: Any) -> list[Any]:
        if parsed.image_refs:
            return parsed.image_refs
        members = payload[1]
        exts = [k for k in members if not k.startswith("__") and k.rsplit(".", 1)[-1] in _IMAGE_EXTENSIONS]
        return [f"{members['__key__']}.{ext}" for ext in sorted(exts, key=_natural_key)]

    def _load_image(self, where: str, ref: Any, payload: Any) -> Image.Image:
        members = payload[1]
        key = members["__key__"]
        name = str(ref)
        if name.startswith("/") or ".." in name.split("/"):
            raise RecordError(where, "path_escape", f"image reference {name!r} must name a member of the sample")
        ext = name[len(key) + 1 :].lower() if name.startswith(f"{key}.") else None
        if ext is None or ext not in members or ext == "json":
            raise RecordError(where, "missing_image", f"image member {name!r} is not in the shard")
        return self._load(where, members[ext], repr(name))


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class HfDataset(SampleDataset):
    """A ``datasets`` folder written by ``save_to_disk``: columns ``id``, ``images`` (or ``image``), ``messages``
    (or LLaVA ``conversations``), optional ``task`` and ``meta``. Image bytes are read raw and decoded by
    ``load_image``; path-only images resolve under the data root (default: the dataset folder)."""

    format = "hf"

    def _default_root(self) -> Path:
        return self.path

    def _dataset(self) -> Any:
        if not hasattr(self, "_cache"):
            import datasets

            try:
                loaded = datasets.load_from_disk(str(self.path))
            except (FileNotFoundError, ValueError, OSError) as exc:
                raise DataError(f"{self.path}: not a datasets save_to_disk folder ({exc})") from exc
            if isinstance(loaded, datasets.DatasetDict):
                raise DataError(
                    f"{self.path}: holds several splits ({', '.join(loaded)}); give the folder of one split"
                )
            self._cache = loaded
        return self._cache

    def __len__(self) -> int:
        return len(self._dataset())

    def _entries(self) -> Iterator[tuple[str, Any]]:
        row = 0
        for table in self._dataset().with_format("arrow").iter(batch_size=64):
            for record in table.to_pylist():
                yield f"{self.path}: row {row}", record
                row += 1

    def _load_image(self, where: str, ref: Any, payload: Any) -> Image.Image:
        if isinstance(ref, dict) and ref.get("bytes") is not None:
            return self._load(where, ref["bytes"], "(embedded bytes)")
        path = ref.get("path") if isinstance(ref, dict) else ref
        if path is None:
            raise RecordError(where, "missing_image", "image entry has neither bytes nor a path")
        return super()._load_image(where, path, payload)


_READERS: dict[str, type[SampleDataset]] = {
    "llava": LlavaJsonDataset,
    "jsonl": JsonlDataset,
    "wds": WebDataset,
    "hf": HfDataset,
}


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _HF_MARKERS)


def detect_format(path: str | Path) -> tuple[str, Path]:
    """The format of ``path`` and the exact path to read; raises DataError when unknown or ambiguous.

    A folder is a ``datasets`` folder, or holds exactly one dataset (a ``.json``, a ``.jsonl``, one group of
    ``name-NNNNNN.tar`` shards or one ``datasets`` sub-folder).
    """
    path = Path(path)
    text = str(path)
    if text.endswith(".tar") and ("{" in text or "*" in text):
        return "wds", path
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        by_suffix = {".json": "llava", ".jsonl": "jsonl", ".tar": "wds"}
        if path.suffix.lower() in by_suffix:
            return by_suffix[path.suffix.lower()], path
        raise DataError(f"{path}: unknown dataset format; expected .json, .jsonl, .tar or a datasets folder")
    if _is_hf_folder(path):
        return "hf", path
    candidates: list[tuple[str, Path]] = []
    candidates += [("llava", p) for p in sorted(path.glob("*.json"))]
    candidates += [("jsonl", p) for p in sorted(path.glob("*.jsonl"))]
    groups = sorted({re.sub(r"-\d+\.tar$", "", p.name) for p in path.glob("*.tar")})
    candidates += [("wds", path / f"{g}-*.tar" if not g.endswith(".tar") else path / g) for g in groups]
    candidates += [("hf", p) for p in sorted(path.iterdir()) if _is_hf_folder(p)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DataError(f"{path}: no dataset found (no .json, .jsonl, .tar shards or datasets folder)")
    names = ", ".join(str(p.relative_to(path)) for _, p in candidates)
    raise DataError(f"{path}: holds several datasets ({names}); give the path of one")


def open_dataset(
    path: str | Path,
    format: str | None = None,
    *,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    decode_images: bool | Literal["check"] = True,
) -> SampleDataset:
    """Open a dataset in any supported format (auto-detected when ``format`` is None) for reading Samples.

    ``image_root`` is the folder image paths are relative to (and must stay inside); by default the folder of
    the JSON/JSONL file, the shard folder, or the datasets folder. ``skip_bad`` skips bad records, counting them
    in ``dataset.problems``, instead of raising :class:`RecordError`. ``decode_images=False`` leaves each image
    as its path or encoded bytes, unchecked (much faster when only the text is needed); ``"check"`` decodes each
    image to check it but still gives back its path or bytes (constant memory for large training sets: decode
    again when the pixels are needed).
    """
    if format is None:
        format, path = detect_format(path)
    elif format not in _READERS:
        raise DataError(f"unknown dataset format {format!r}; expected one of {', '.join(FORMATS)}")
    return _READERS[format](
        path, image_root=image_root, skip_bad=skip_bad, max_pixels=max_pixels, decode_images=decode_images
    )


# ---------------------------------------------------------------------------------------------------- writing


def _safe_name(text: str) -> str:
    """A file-name-safe version of an id (no dots, so webdataset keys stay whole)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:120] or "_"


class DatasetWriter(ABC):
    """Writes :class:`Record` objects into one dataset; use as a context manager. ``path`` is what
    :func:`open_dataset` reads back."""

    format: ClassVar[str]

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

    @property
    @abstractmethod
    def path(self) -> Path: ...

    def _existing(self) -> list[Path]:
        return [self.path] if self.path.exists() else []

    def _unique(self, record_id: str) -> str:
        """A file-safe key for a record, unique within this dataset."""
        base = key = _safe_name(record_id)
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


class _JsonWriter(DatasetWriter):
    suffix: ClassVar[str]

    def __init__(self, out_dir: str | Path, name: str, *, overwrite: bool = False) -> None:
        super().__init__(out_dir, name, overwrite=overwrite)
        self.image_dir = self.out_dir / "images" / _safe_name(name)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        self._closed = False

    @property
    def path(self) -> Path:
        return self.out_dir / f"{self.name}{self.suffix}"

    def _store_images(self, record: Record) -> list[str]:
        key = self._unique(record.id)
        refs = []
        for i, data in enumerate(record.images):
            filename = f"{key}.png" if len(record.images) == 1 else f"{key}-{i}.png"
            (self.image_dir / filename).write_bytes(data)
            refs.append((self.image_dir / filename).relative_to(self.out_dir).as_posix())
        return refs

    def close(self) -> Path:
        if not self._closed:
            self._finish()
            self._file.close()
            self._closed = True
        return self.path

    def _finish(self) -> None:
        pass


class LlavaJsonWriter(_JsonWriter):
    """LLaVA JSON: the array is streamed out record by record."""

    format = "llava"
    suffix = ".json"

    def write(self, record: Record) -> None:
        text = json.dumps(_llava_record(record, self._store_images(record)), ensure_ascii=False)
        self._file.write(("[\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    def _finish(self) -> None:
        self._file.write("\n]\n" if self.count else "[]\n")


class JsonlWriter(_JsonWriter):
    """JSON Lines: one LLaVA record per line."""

    format = "jsonl"
    suffix = ".jsonl"

    def write(self, record: Record) -> None:
        self._file.write(json.dumps(_llava_record(record, self._store_images(record)), ensure_ascii=False) + "\n")
        self.count += 1


class WdsWriter(DatasetWriter):
    """webdataset shards ``name-000000.tar``, ... of at most ``shard_size`` samples (reproducible: mtime 0)."""

    format = "wds"

    def __init__(self, out_dir: str | Path, name: str, *, overwrite: bool = False, shard_size: int = 10_000) -> None:
        import webdataset

        super().__init__(out_dir, name, overwrite=overwrite)
        pattern = str(self.out_dir / f"{name}-%06d.tar")
        self._writer = webdataset.ShardWriter(pattern, maxcount=shard_size, verbose=0, encoder=False, mtime=0)
        self._closed = False

    @property
    def path(self) -> Path:
        return self.out_dir / f"{self.name}-*.tar"

    def _existing(self) -> list[Path]:
        return sorted(self.out_dir.glob(f"{glob.escape(self.name)}-[0-9]*.tar"))

    def write(self, record: Record) -> None:
        key = self._unique(record.id)
        exts = ["png"] if len(record.images) == 1 else [f"{i}.png" for i in range(len(record.images))]
        llava = _llava_record(record, [f"{key}.{ext}" for ext in exts])
        sample: dict[str, Any] = {"__key__": key, "json": json.dumps(llava, ensure_ascii=False).encode("utf-8")}
        sample.update(zip(exts, record.images, strict=True))
        self._writer.write(sample)
        self.count += 1

    def close(self) -> Path:
        if not self._closed:
            self._writer.close()
            self._closed = True
        return self.path


class HfWriter(DatasetWriter):
    """A ``datasets`` folder: rows stream into an Arrow file, then ``save_to_disk`` writes ``DIR/name/``."""

    format = "hf"

    def __init__(self, out_dir: str | Path, name: str, *, overwrite: bool = False) -> None:
        import datasets
        from datasets.arrow_writer import ArrowWriter

        super().__init__(out_dir, name, overwrite=overwrite)
        self.features = datasets.Features(
            {
                "id": datasets.Value("string"),
                "images": datasets.List(datasets.Image()),
                "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
                "task": datasets.Value("string"),
                "meta": datasets.Value("string"),
            }
        )
        self._tmp = self.out_dir / f".{name}.arrow.tmp"
        self._writer = ArrowWriter(features=self.features, path=str(self._tmp))
        self._closed = False

    @property
    def path(self) -> Path:
        return self.out_dir / self.name

    def write(self, record: Record) -> None:
        self._writer.write(
            {
                "id": record.id,
                "images": [{"bytes": data, "path": None} for data in record.images],
                "messages": [{"role": m["role"], "content": m["content"]} for m in record.messages],
                "task": record.task,
                "meta": json.dumps(record.meta, ensure_ascii=False),
            }
        )
        self.count += 1

    def close(self) -> Path:
        if self._closed:
            return self.path
        import datasets

        self._writer.finalize()
        self._writer.close()
        quiet = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            dataset = datasets.Dataset.from_file(str(self._tmp))
            # an empty dataset needs one explicit shard, or it cannot be loaded back
            dataset.save_to_disk(str(self.path), num_shards=None if self.count else 1)
            del dataset
        finally:
            if not quiet:
                datasets.enable_progress_bars()
            self._tmp.unlink(missing_ok=True)
            self._closed = True
        return self.path


_WRITERS: dict[str, type[DatasetWriter]] = {
    "llava": LlavaJsonWriter,
    "jsonl": JsonlWriter,
    "wds": WdsWriter,
    "hf": HfWriter,
}


def open_writer(
    out_dir: str | Path, format: str, name: str = "data", *, overwrite: bool = False, shard_size: int = 10_000
) -> DatasetWriter:
    """A writer for dataset ``name`` in ``out_dir`` in ``format`` (llava, jsonl, wds, hf); see the module doc
    for the layouts. Refuses to replace an existing dataset unless ``overwrite``."""
    if format not in _WRITERS:
        raise DataError(f"unknown dataset format {format!r}; expected one of {', '.join(FORMATS)}")
    if format == "wds":
        return WdsWriter(out_dir, name, overwrite=overwrite, shard_size=shard_size)
    return _WRITERS[format](out_dir, name, overwrite=overwrite)
