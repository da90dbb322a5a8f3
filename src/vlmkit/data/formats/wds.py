"""``wds``: webdataset shards ``DIR/name-000000.tar``, ... with ``key.png`` and ``key.json`` per sample.

Several images are ``key.0.png``, ``key.1.png``, ...; ``key.json`` is the ``llava`` record, whose ``image`` names
the tar members. img2dataset's shards (``00000.tar``, ... with ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` per sample
and ``00000.parquet``, ``00000_stats.json`` beside each) read as captions: the ``.txt`` is the answer.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.data.formats.base import DatasetWriter, ImageHandle, SampleDataset, check_schema
from vlmkit.data.formats.records import ParsedRecord, Record, RecordError, llava_record
from vlmkit.data.formats.registry import FormatSpec, register_format
from vlmkit.errors import DataError

_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif")


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


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


@dataclass(frozen=True)
class TarMember(ImageHandle):
    """An image member of an uncompressed tar shard, read again by offset."""

    shard: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def _compressed(shard: Path) -> bool:
    with shard.open("rb") as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))


def _samples(shard: Path) -> Iterator[dict[str, Any]]:
    """The samples of a shard as webdataset groups them: consecutive members with the same key; each sample
    maps extensions to bytes, plus ``__key__`` and ``__members__`` (extension → offset and size)."""
    plain = not _compressed(shard)
    current: dict[str, Any] | None = None
    with shard.open("rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            parts = _tar_key(member.name) if member.isreg() else None
            if parts is None or re.match(r"__[^/]*__($|/)", member.name):
                continue
            key, ext = parts
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__members__": {}}
            if ext in current:
                raise ValueError(f"{member.name}: duplicate file name in tar file")
            file = tar.extractfile(member)
            current[ext] = file.read() if file is not None else b""
            if plain:
                current["__members__"][ext] = (member.offset_data, member.size)
    if current is not None:
        yield current


def _stats_count(shard: Path) -> int | None:
    """The samples img2dataset wrote to a shard, from its ``_stats.json`` (None when there is none)."""
    stats = shard.with_name(f"{shard.stem}_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class WebDataset(SampleDataset):
    """webdataset tar shards: ``key.json`` (a record of any schema) plus ``key.png`` or ``key.<i>.png`` per sample.

    ``path`` is one shard, a folder of shards, a glob or a brace pattern (``name-{000000..000009}.tar``). When
    the JSON has no ``image`` field, the sample's image members (``png``, ``jpg``, ...) are used in name order. A
    ``key.txt`` is the caption of a JSON without a conversation (or of a sample without JSON), as img2dataset
    writes them; a record without ``id`` takes the sample key.
    """

    def _default_root(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def __len__(self) -> int:
        if not hasattr(self, "_length"):
            shards = _wds_shards(self.path)
            counts = [_stats_count(shard) for shard in shards]
            if all(count is not None for count in counts):
                self._length = sum(c for c in counts if c is not None)
                return self._length
            keys = 0
            for shard in shards:
                names = []
                try:
                    with tarfile.open(shard) as tar:
                        names += [member.name for member in tar if member.isreg()]
                except (tarfile.TarError, OSError):
                    pass  # a corrupt shard counts what is readable; iterating reports the problem
                keys += len({k[0] for k in map(_tar_key, names) if k is not None})
            self._length = keys
        return self._length

    def units(self) -> list[Any]:
        """The shards, in order."""
        return [str(shard) for shard in _wds_shards(self.path)]

    def _entries(self) -> Iterator[tuple[str, Any]]:
        for shard in _wds_shards(self.path):
            yield from self._unit_entries(str(shard))

    def _unit_entries(self, unit: Any) -> Iterator[tuple[str, Any]]:
        shard = Path(unit)
        try:
            for sample in _samples(shard):
                sample["__shard__"] = str(shard)
                where = f"{shard}: sample {sample['__key__']!r}"
                record: Any = {}
                if "json" in sample:
                    try:
                        record = json.loads(sample["json"].decode("utf-8"))
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        error = RecordError(where, "bad_json", f"{sample['__key__']}.json is malformed ({exc})")
                        yield where, error
                        continue
                elif "txt" not in sample:
                    yield where, RecordError(where, "missing_field", "no .json member")
                    continue
                if isinstance(record, dict) and "txt" in sample and not _has_text(record):
                    record = {**record, "caption": sample["txt"].decode("utf-8", errors="replace")}
                yield where, (record, sample)
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
            yield str(shard), RecordError(str(shard), "bad_shard", f"truncated or corrupt tar shard ({exc})")

    def _default_id(self, payload: Any) -> str | None:
        return str(payload[1]["__key__"])

    def _record_of(self, payload: Any) -> Any:
        return payload[0]

    def _image_refs(self, parsed: ParsedRecord, payload: Any) -> list[Any]:
        if parsed.image_refs:
            return parsed.image_refs
        members = payload[1]
        exts = [k for k in members if not k.startswith("__") and k.rsplit(".", 1)[-1] in _IMAGE_EXTENSIONS]
        return [f"{members['__key__']}.{ext}" for ext in sorted(exts, key=_natural_key)]

    def _load_image(self, where: str, ref: Any, payload: Any) -> Any:
        if not isinstance(ref, str) or ref.startswith("data:"):
            return super()._load_image(where, ref, payload)
        members = payload[1]
        key = members["__key__"]
        name = ref
        if name.startswith("/") or ".." in name.split("/"):
            raise RecordError(where, "path_escape", f"image reference {name!r} must name a member of the sample")
        ext = name[len(key) + 1 :].lower() if name.startswith(f"{key}.") else None
        if ext is None or ext not in members or ext in ("json", "txt") or ext.startswith("__"):
            raise RecordError(where, "missing_image", f"image member {name!r} is not in the shard")
        located = members["__members__"].get(ext)
        handle = TarMember(members["__shard__"], *located) if located else None
        return self._load(where, members[ext], repr(name), handle)


class WdsWriter(DatasetWriter):
    """webdataset shards ``name-000000.tar``, ... of at most ``shard_size`` samples (reproducible: mtime 0)."""

    def __init__(
        self,
        out_dir: str | Path,
        name: str,
        *,
        overwrite: bool = False,
        shard_size: int = 10_000,
        schema: str = "llava",
    ) -> None:
        import webdataset

        super().__init__(out_dir, name, overwrite=overwrite)
        self.schema = check_schema(schema)
        pattern = str(self.out_dir / f"{name}-%06d.tar")
        self._writer = webdataset.ShardWriter(pattern, maxcount=shard_size, verbose=0, encoder=False, mtime=0)
        self._closed = False

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
        return cls(out_dir, name, overwrite=overwrite, shard_size=10_000 if shard_size is None else shard_size,
                   schema=schema or "llava")  # fmt: skip

    @property
    def path(self) -> Path:
        return self.out_dir / f"{self.name}-*.tar"

    def _existing(self) -> list[Path]:
        return sorted(self.out_dir.glob(f"{glob.escape(self.name)}-[0-9]*.tar"))

    def write(self, record: Record) -> None:
        key = self._unique(record.id)
        exts = ["png"] if len(record.images) == 1 else [f"{i}.png" for i in range(len(record.images))]
        llava = llava_record(record, [f"{key}.{ext}" for ext in exts], self.schema)
        sample: dict[str, Any] = {"__key__": key, "json": json.dumps(llava, ensure_ascii=False).encode("utf-8")}
        sample.update(zip(exts, record.images, strict=True))
        self._writer.write(sample)
        self.count += 1

    def close(self) -> Path:
        if not self._closed:
            self._writer.close()
            self._closed = True
        return self.path


def _has_text(record: dict[str, Any]) -> bool:
    return any(record.get(k) is not None for k in ("conversations", "messages", "texts", "caption"))


def _is_shards(path: Path) -> bool:
    """One ``.tar`` shard, or a glob or brace pattern of shards (which need not exist yet)."""
    text = str(path)
    if text.endswith(".tar") and any(ch in text for ch in "{*?["):
        return True
    return path.suffix.lower() == ".tar" and path.is_file()


def _shard_groups(folder: Path) -> list[Path]:
    """Each group of ``name-NNNNNN.tar`` shards in ``folder`` as a ``name-*.tar`` pattern, img2dataset's
    ``NNNNN.tar`` shards as one ``[0-9]...[0-9].tar`` pattern (other tars as is)."""
    groups = set()
    for shard in folder.glob("*.tar"):
        if shard.stem.isdigit():
            groups.add("[0-9]" * len(shard.stem) + ".tar")
        else:
            name = re.sub(r"-\d+\.tar$", "", shard.name)
            groups.add(name if name.endswith(".tar") else f"{name}-*.tar")
    return [folder / group for group in sorted(groups)]


register_format(FormatSpec("wds", WebDataset, WdsWriter, layout=".tar shards", matches=_is_shards, find=_shard_groups))
