"""The files of a teacher run, and what resuming needs from them.

In ``OUT``: the dataset ``NAME.jsonl`` (or, with the ``llava`` format, ``NAME.json``, rewritten from the progress
file at the end of every run), the images ``images/NAME/*.png``, and ``NAME.teach/``: ``rejects.jsonl`` (the
rejected items and why), ``run.json`` (the teacher and the tasks' fingerprints) and, for ``llava``,
``records.jsonl`` (the records appended so far). Records and rejects are appended with fsync
(:mod:`vlmkit.jsonl`); an image is written (temporary file, fsync, rename) before the first record that points
at it. An item is done when its id is in either file, so a run killed at any instant resumes with nothing lost
and nothing twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from vlmkit import jsonl
from vlmkit.data.formats.base import safe_name
from vlmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "llava")


def _row_id(row: dict[str, Any]) -> str:
    if not isinstance(row["id"], str):
        raise TypeError(f"'id' must be a string, got {type(row['id']).__name__}")
    return row["id"]


class TeachStore:
    """The dataset, rejects, images and manifest of one teacher run in ``out_dir``."""

    def __init__(self, out_dir: str | Path, name: str = "teach", format: str = "jsonl", *, overwrite: bool = False):
        if format not in FORMATS:
            raise ConfigError(f"teacher data is written as {' or '.join(FORMATS)}, not {format!r}")
        if not name or safe_name(name) != name:
            raise ConfigError(f"dataset name {name!r}: use letters, digits, '_' and '-' only")
        self.out_dir = Path(out_dir)
        self.name = name
        self.format = format
        self.state_dir = self.out_dir / f"{name}.teach"
        self.image_dir = self.out_dir / "images" / name
        self.dataset = self.out_dir / f"{name}{'.jsonl' if format == 'jsonl' else '.json'}"
        self.progress = self.dataset if format == "jsonl" else self.state_dir / "records.jsonl"
        self.rejects = self.state_dir / "rejects.jsonl"
        self.manifest = self.state_dir / "run.json"
        if overwrite:
            self._remove()
        self._handles: list[IO[bytes]] = []

    def _remove(self) -> None:
        for path in (self.out_dir / f"{self.name}.jsonl", self.out_dir / f"{self.name}.json"):
            if path.exists() and (self.state_dir.exists() or path == self.dataset):
                path.unlink()
        for folder in (self.state_dir, self.image_dir):
            if folder.exists():
                shutil.rmtree(folder)

    def open(self, teacher: dict[str, Any], tasks: dict[str, str]) -> set[str]:
        """Start (or resume) the run; returns the ids already done. ``tasks`` maps names to fingerprints: a task
        whose prompt changed since the run began is refused, a new one is added."""
        old = self._read_manifest()
        if old is None and self.dataset.exists():
            raise DataError(f"{self.dataset} already exists and is not a teacher run's; choose another --out or "
                            "--name, or --overwrite")  # fmt: skip
        if old is not None:
            if old.get("format") != self.format:
                raise ConfigError(f"{self.state_dir}: this run writes {old.get('format')!r}, not {self.format!r}")
            changed = [name for name, print_ in tasks.items() if old["tasks"].get(name, print_) != print_]
            if changed:
                raise ConfigError(f"task(s) {', '.join(changed)} changed since this run began in {self.out_dir}; "
                                  "use another --out or --name, or --overwrite")  # fmt: skip
            if old.get("teacher") != teacher:
                log.warning("%s: resuming with another teacher (%s, was %s)", self.out_dir, teacher, old["teacher"])
            tasks = {**old["tasks"], **tasks}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"format": self.format, "teacher": teacher, "tasks": tasks}
        jsonl.rewrite(self.manifest, [json.dumps(manifest, indent=2, ensure_ascii=False).encode()])
        done = {row.data["id"] for row in jsonl.read_rows(self.progress, _row_id, "a teacher record")}
        rejected = {row.data["id"] for row in jsonl.read_rows(self.rejects, _row_id, "a rejected item")}
        self._data = self.progress.open("ab")
        self._rejected = self.rejects.open("ab")
        self._handles = [self._data, self._rejected]
        return done | rejected

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest.exists():
            return None
        try:
            data = json.loads(self.manifest.read_text(encoding="utf-8"))
            if not isinstance(data.get("tasks"), dict):
                raise TypeError("no tasks")
        except (ValueError, TypeError, AttributeError) as exc:
            raise DataError(
                f"{self.manifest}: not a teacher run's manifest ({exc}); --overwrite to start over"
            ) from exc
        return data

    def image_ref(self, key: str) -> str:
        """The record's ``image`` for an image key: relative to the dataset's folder (its default image root)."""
        return f"images/{self.name}/{key}.png"

    def store_image(self, key: str, png: bytes) -> None:
        """Write the image once, durably, before a record points at it."""
        path = self.out_dir / self.image_ref(key)
        if path.exists() and path.stat().st_size == len(png):
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as handle:
            handle.write(png)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def append(self, records: Iterable[dict[str, Any]], rejects: Iterable[dict[str, Any]]) -> None:
        records, rejects = list(records), list(rejects)
        if records:
            jsonl.append_rows(self._data, records)
        if rejects:
            jsonl.append_rows(self._rejected, rejects)

    def close(self) -> None:
        """Close the files; with ``llava``, (re)write ``NAME.json`` from the records so far (atomically)."""
        for handle in self._handles:
            handle.close()
        self._handles = []
        if self.format == "llava" and self.progress.exists():
            rows = [row.raw for row in jsonl.read_rows(self.progress, _row_id, "a teacher record")]
            lines = [b"["] + [raw + b"," for raw in rows[:-1]] + rows[-1:] + [b"]"]
            jsonl.rewrite(self.dataset, lines)
