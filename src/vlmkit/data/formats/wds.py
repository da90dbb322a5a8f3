"""``wds``: webdataset shards ``DIR/name-000000.tar``, ... with ``key.png`` and ``key.json`` per sample.

Several images are ``key.0.png``, ``key.1.png``, ...; ``key.json`` is the ``llava`` record, whose ``image`` names
the tar members.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.data.formats.base import DatasetWriter, SampleDataset
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


class WebDataset(SampleDataset):
    """webdataset tar shards: ``key.json`` (a LLaVA record) plus ``key.png`` or ``key.<i>.png`` per sample.

    ``path`` is one shard, a folder of shards, a glob or a brace pattern (``name-{000000..000009}.tar``). When
    the JSON has no ``image`` field, the sample's image members (``png``, ``jpg``, ...) are used in name order.
    """

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

    def _image_refs(self, parsed: ParsedRecord, payload: Any) -> list[Any]:
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


class WdsWriter(DatasetWriter):
    """webdataset shards ``name-000000.tar``, ... of at most ``shard_size`` samples (reproducible: mtime 0)."""

    def __init__(self, out_dir: str | Path, name: str, *, overwrite: bool = False, shard_size: int = 10_000) -> None:
        import webdataset

        super().__init__(out_dir, name, overwrite=overwrite)
        pattern = str(self.out_dir / f"{name}-%06d.tar")
        self._writer = webdataset.ShardWriter(pattern, maxcount=shard_size, verbose=0, encoder=False, mtime=0)
        self._closed = False

    @classmethod
    def create(
        cls, out_dir: str | Path, name: str, *, overwrite: bool = False, shard_size: int | None = None
    ) -> DatasetWriter:
        return cls(out_dir, name, overwrite=overwrite, shard_size=10_000 if shard_size is None else shard_size)

    @property
    def path(self) -> Path:
        return self.out_dir / f"{self.name}-*.tar"

    def _existing(self) -> list[Path]:
        return sorted(self.out_dir.glob(f"{glob.escape(self.name)}-[0-9]*.tar"))

    def write(self, record: Record) -> None:
        key = self._unique(record.id)
        exts = ["png"] if len(record.images) == 1 else [f"{i}.png" for i in range(len(record.images))]
        llava = llava_record(record, [f"{key}.{ext}" for ext in exts])
        sample: dict[str, Any] = {"__key__": key, "json": json.dumps(llava, ensure_ascii=False).encode("utf-8")}
        sample.update(zip(exts, record.images, strict=True))
        self._writer.write(sample)
        self.count += 1

    def close(self) -> Path:
        if not self._closed:
            self._writer.close()
            self._closed = True
        return self.path


def _is_shards(path: Path) -> bool:
    """One ``.tar`` shard, or a glob or brace pattern of shards (which need not exist yet)."""
    text = str(path)
    if text.endswith(".tar") and ("{" in text or "*" in text):
        return True
    return path.suffix.lower() == ".tar" and path.is_file()


def _shard_groups(folder: Path) -> list[Path]:
    """Each group of ``name-NNNNNN.tar`` shards in ``folder`` as a ``name-*.tar`` pattern (other tars as is)."""
    groups = sorted({re.sub(r"-\d+\.tar$", "", p.name) for p in folder.glob("*.tar")})
    return [folder / g if g.endswith(".tar") else folder / f"{g}-*.tar" for g in groups]


register_format(FormatSpec("wds", WebDataset, WdsWriter, layout=".tar shards", matches=_is_shards, find=_shard_groups))
