"""``llava``: ``DIR/name.json``, a JSON array of ``{"id", "image", "conversations", "task", "meta"}``.

The images are in ``DIR/images/name/``; ``image`` is a path relative to the data root (default: the JSON file's
folder), or a list of paths for several images. Read, the array holds records of any schema
(:mod:`~vlmkit.data.formats.schemas`: LLaMA-Factory's ``mllm_demo.json`` is one); written, LLaVA's or, with
``schema="messages"``, ``{"messages", "images"}`` (ms-swift, LLaMA-Factory).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from vlmkit.data.formats.base import DatasetWriter, SampleDataset, check_schema, safe_name
from vlmkit.data.formats.records import Record, llava_record
from vlmkit.data.formats.registry import register_format, single_file
from vlmkit.errors import DataError


class LlavaJsonDataset(SampleDataset):
    """A LLaVA JSON file: one array of records."""

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


class JsonFileWriter(DatasetWriter):
    """One JSON file ``DIR/name<suffix>`` of LLaVA records, the images as PNG files in ``DIR/images/name/``."""

    suffix: ClassVar[str]

    def __init__(self, out_dir: str | Path, name: str, *, overwrite: bool = False, schema: str = "llava") -> None:
        super().__init__(out_dir, name, overwrite=overwrite)
        self.schema = check_schema(schema)
        self.image_dir = self.out_dir / "images" / safe_name(name)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
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
        if shard_size is not None:
            raise DataError(f"shard_size applies to sharded formats (wds), not to {cls.format!r}")
        return cls(out_dir, name, overwrite=overwrite, schema=schema or "llava")

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

    def _text(self, record: Record) -> str:
        """The record as one line of JSON, its images stored."""
        return json.dumps(llava_record(record, self._store_images(record), self.schema), ensure_ascii=False)

    def close(self) -> Path:
        if not self._closed:
            self._finish()
            self._file.close()
            self._closed = True
        return self.path

    def _finish(self) -> None:
        pass


class LlavaJsonWriter(JsonFileWriter):
    """LLaVA JSON: the array is streamed out record by record."""

    suffix = ".json"

    def write(self, record: Record) -> None:
        self._file.write(("[\n" if self.count == 0 else ",\n") + self._text(record))
        self.count += 1

    def _finish(self) -> None:
        self._file.write("\n]\n" if self.count else "[]\n")


def _json_files(folder: Path) -> list[Path]:
    """The ``.json`` files of a folder but img2dataset's ``NNNNN_stats.json`` (beside ``NNNNN.tar``)."""
    return [p for p in sorted(folder.glob("*.json")) if not _is_stats(p)]


def _is_stats(path: Path) -> bool:
    return path.name.endswith("_stats.json") and path.with_name(f"{path.name[: -len('_stats.json')]}.tar").exists()


register_format(replace(single_file("llava", LlavaJsonDataset, LlavaJsonWriter, ".json"), find=_json_files))
