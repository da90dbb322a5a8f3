"""The one home of resumable JSONL files (describe's output, the evaluator's predictions).

Rows are appended a batch at a time and fsync'd, so a killed run loses at most the batch in flight; reading
repairs what a kill can leave (a torn last line) and refuses what it can't (a malformed line elsewhere: the
file is not ours, and it is left untouched).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vlmkit.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One row of a JSONL file: its 1-based line number, its parsed object and its bytes."""

    line: int
    data: dict[str, Any]
    raw: bytes


def read_rows(
    path: str | Path, check: Callable[[dict[str, Any]], object], what: str, where: str = "{path}, line {line}"
) -> list[Row]:
    """Every row of ``path`` in file order (none when it doesn't exist), each an object ``check`` accepts
    (returns without raising ValueError, KeyError or TypeError).

    A bad last line is a torn write and is cut off the file (logged); a complete last row that lost only its
    newline gets it back. A bad line anywhere else raises :class:`DataError` naming the line (as ``where``
    says; ``what`` says what a row should be) and changes nothing.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    rows: list[Row] = []
    offset = 0
    for index, raw in enumerate(lines):
        if raw.strip():
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise TypeError(f"expected a JSON object, got {type(row).__name__}")
                check(row)
            except (ValueError, KeyError, TypeError) as exc:
                if index != last:
                    place = where.format(path=path, line=index + 1)
                    raise DataError(f"{place}: not {what} ({exc}); the file was not changed") from exc
                log.warning("%s: removing a torn last line (%d bytes) left by an interrupted run", path, len(raw))
                with path.open("r+b") as handle:
                    handle.truncate(offset)
                return rows
            rows.append(Row(index + 1, row, raw))
        offset += len(raw) + 1
    if data and not data.endswith(b"\n"):
        with path.open("ab") as handle:  # a complete last row cut before its newline: end the line first
            handle.write(b"\n")
    return rows


def encode_row(row: dict[str, Any]) -> bytes:
    """One row as a UTF-8 JSON line."""
    return json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n"


def append_rows(handle: IO[bytes], rows: Iterable[dict[str, Any]]) -> None:
    """Append rows to a file opened with ``open(path, "ab")`` and make them durable (flush + fsync)."""
    handle.write(b"".join(encode_row(row) for row in rows))
    handle.flush()
    os.fsync(handle.fileno())


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary file, fsync'd, then renamed over it, so a kill at any
    instant leaves either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rewrite(path: str | Path, lines: Iterable[bytes]) -> None:
    """Replace ``path`` with ``lines`` (each without its newline) atomically (:func:`write_atomic`)."""
    write_atomic(path, b"".join(line + b"\n" for line in lines))
