"""``jsonl``: ``DIR/name.jsonl``, the records of the ``llava`` format one per line (blank lines are ignored)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from vlmkit.data.formats.base import SampleDataset
from vlmkit.data.formats.llava import JsonFileWriter
from vlmkit.data.formats.records import Record, RecordError
from vlmkit.data.formats.registry import register_format, single_file
from vlmkit.errors import DataError


class JsonlDataset(SampleDataset):
    """A JSON Lines file: one LLaVA record per line; blank lines are ignored."""

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


class JsonlWriter(JsonFileWriter):
    """JSON Lines: one LLaVA record per line."""

    suffix = ".jsonl"

    def write(self, record: Record) -> None:
        self._file.write(self._text(record) + "\n")
        self.count += 1


register_format(single_file("jsonl", JsonlDataset, JsonlWriter, ".jsonl"))
