"""The embedding index: a folder with a FAISS index of normalised vectors and a JSONL sidecar of their rows.

Layout (``format_version`` 1)::

    INDEX/meta.json          model, dim, metric (cosine: inner product of unit vectors), format_version
    INDEX/rows.jsonl         one row per line, append-only (vlmkit.jsonl): the last row of a path is its state
    INDEX/vectors.faiss      faiss.IndexFlatIP of the committed vectors; vector k is the row with "id": k
    INDEX/pending-F.f32      raw float32 vectors for ids F, F+1, ... written by a run since its last commit

A row is ``{"id", "path", "image", "sha256", "size", "mtime_ns"}``; a file that failed has ``"id": null`` and
``"error"``; a file that was pruned has ``"id": null`` and ``"removed": true``. Ids are 0, 1, 2, ... in file
order. A vector is live when its row is the last row of its path (a changed file's new row supersedes the old).

**Crash safety.** A batch's vectors are appended to the pending file and fsync'd before its rows are appended and
fsync'd, so every row's vector is on disk. A commit writes ``vectors.faiss`` to a temporary file, fsyncs it and
renames it over the old one, then deletes the pending file. Opening for writing repairs what a kill leaves: a
torn last row is cut (vlmkit.jsonl), vectors without rows are dropped, and pending vectors are committed, so a
killed run loses at most its batch in flight and duplicates nothing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from vlmkit import jsonl
from vlmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META, ROWS, VECTORS, LOCK = "meta.json", "rows.jsonl", "vectors.faiss", ".lock"
_PENDING = re.compile(r"^pending-(\d+)\.f32$")


def _faiss() -> Any:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines list every SIMD build it tries
    try:
        import faiss
    except ImportError as exc:  # a declared dependency; missing only in a broken install
        raise ConfigError("the embedding index needs faiss-cpu: pip install faiss-cpu") from exc
    return faiss


def _check_row(row: dict[str, Any]) -> None:
    if not isinstance(row.get("path"), str):
        raise TypeError("'path' must be a string")
    if row.get("id") is not None and not isinstance(row["id"], int):
        raise TypeError("'id' must be an integer or null")


@dataclass
class Hit:
    """One search result: the row's id, its image (as given when embedded), resolved path and cosine score."""

    id: int
    path: str
    image: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "image": self.image, "path": self.path, "score": round(self.score, 6)}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    jsonl.write_atomic(path, data)
    _fsync_dir(path.parent)


class EmbeddingIndex:
    """An index folder opened for reading (:meth:`open`) or for appending (:meth:`create_or_append`)."""

    def __init__(self, folder: Path, meta: dict[str, Any], rows: list[dict[str, Any]], vectors: Any) -> None:
        self.folder = folder
        self.meta = meta
        self.rows = rows
        """Every row, in file order (superseded ones included)."""
        self.vectors = vectors
        """A faiss.IndexFlatIP with one vector per id (in memory: committed plus pending)."""
        self._pending: IO[bytes] | None = None
        self._lock: IO[bytes] | None = None
        self._refresh()

    # -------------------------------------------------------------------------------------------- state

    def _refresh(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        """Path → its last row (its current state)."""
        self._live: set[int] = set()
        self._by_id: dict[int, dict[str, Any]] = {}
        self._track(self.rows)

    def _track(self, rows: list[dict[str, Any]]) -> None:
        """Take new rows into the state (each supersedes its path's previous row): O(len(rows))."""
        for row in rows:
            previous = self.latest.get(row["path"])
            if previous is not None and previous.get("id") is not None:
                self._live.discard(previous["id"])
            self.latest[row["path"]] = row
            if row.get("id") is not None:
                self._live.add(row["id"])
                self._by_id[row["id"]] = row

    @property
    def live_ids(self) -> list[int]:
        """The ids of live vectors (one per path that has one), ascending."""
        return sorted(self._live)

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def ntotal(self) -> int:
        """Vectors stored (superseded ones included)."""
        return int(self.vectors.ntotal)

    def __len__(self) -> int:
        """Live vectors: one per path that has one."""
        return len(self._live)

    def row(self, id: int) -> dict[str, Any]:
        return self._by_id[id]

    def vector(self, id: int) -> np.ndarray:
        return np.asarray(self.vectors.reconstruct(int(id)), dtype=np.float32)

    def live_vectors(self) -> tuple[list[int], np.ndarray]:
        """The live ids (ascending) and their vectors ``(n, dim)``."""
        ids = self.live_ids
        if not ids:
            return [], np.zeros((0, self.dim), np.float32)
        every = self.vectors.reconstruct_n(0, self.ntotal)
        return ids, np.ascontiguousarray(every[ids], dtype=np.float32)

    # -------------------------------------------------------------------------------------------- opening

    @staticmethod
    def _read_meta(folder: Path) -> dict[str, Any]:
        path = folder / META
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{folder}: not an embedding index (no {META}); create one with vlmkit embed") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not readable JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{path}: index format_version {meta.get('format_version') if isinstance(meta, dict) else None!r}; "
                f"this vlmkit reads version {FORMAT_VERSION}"
            )
        return meta

    @staticmethod
    def _load(folder: Path, meta: dict[str, Any], repair: bool) -> tuple[list[dict[str, Any]], Any, list[Path]]:
        """Rows, the vectors (committed + the pending ones that have rows) and the pending files found."""
        faiss = _faiss()
        dim = int(meta["dim"])
        if repair:
            rows = [r.data for r in jsonl.read_rows(folder / ROWS, _check_row, "an index row")]
        else:
            rows = _read_rows_readonly(folder / ROWS)
        ids = [row["id"] for row in rows if row.get("id") is not None]
        if ids != list(range(len(ids))):
            raise DataError(f"{folder / ROWS}: row ids are not 0, 1, 2, ... in order; the index folder is damaged")
        vectors_path = folder / VECTORS
        vectors = faiss.read_index(str(vectors_path)) if vectors_path.is_file() else faiss.IndexFlatIP(dim)
        if vectors.d != dim:
            raise DataError(f"{vectors_path}: vectors of {vectors.d} dimensions, {META} says {dim}")
        committed, needed = int(vectors.ntotal), len(ids)
        if committed > needed:
            raise DataError(f"{vectors_path}: {committed} vectors but {needed} rows; the index folder is damaged")
        pending = sorted(p for p in folder.iterdir() if _PENDING.match(p.name))
        if committed < needed:
            for path in pending:
                base = int(_PENDING.match(path.name).group(1))  # type: ignore[union-attr]
                count = path.stat().st_size // (4 * dim)
                if base <= committed and base + count >= needed:
                    data = np.fromfile(path, dtype=np.float32, count=(needed - base) * dim).reshape(-1, dim)
                    vectors.add(np.ascontiguousarray(data[committed - base :]))
                    break
            else:
                raise DataError(
                    f"{folder}: rows {committed}..{needed - 1} have no vectors (no pending file covers them); the "
                    "index folder is damaged"
                )
        return rows, vectors, pending

    @classmethod
    def open(cls, folder: str | Path) -> EmbeddingIndex:
        """Open for reading (search, dedupe): changes nothing on disk, sees the rows an unfinished run wrote."""
        folder = Path(folder)
        meta = cls._read_meta(folder)
        for attempt in range(3):
            try:
                rows, vectors, _ = cls._load(folder, meta, repair=False)
                break
            except DataError:  # a writer committing between our reads of the rows and of the vectors: read again
                if attempt == 2:
                    raise
        return cls(folder, meta, rows, vectors)

    @classmethod
    def create_or_append(cls, folder: str | Path, model: str, dim: int) -> EmbeddingIndex:
        """Open for appending (creating the folder for ``model``'s ``dim``-vectors when new), holding its lock;
        repairs and commits what a killed run left. An index of another model is an error."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder}: exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        lock = (folder / LOCK).open("ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise ConfigError(f"{folder}: another vlmkit embed is writing this index") from None
        try:
            if not (folder / META).is_file():
                if any(p.name not in (LOCK,) for p in folder.iterdir()):
                    raise ConfigError(f"{folder}: a folder that is not an embedding index (no {META}); pick a new one")
                fresh = {"format_version": FORMAT_VERSION, "model": model, "dim": int(dim), "faiss": "IndexFlatIP",
                         "metric": "cosine (inner product of L2-normalised vectors)"}  # fmt: skip
                _write_atomic(folder / META, (json.dumps(fresh, indent=2) + "\n").encode())
            meta = cls._read_meta(folder)
            if meta["model"] != model or int(meta["dim"]) != int(dim):
                raise ConfigError(
                    f"{folder}: this index holds embeddings of model {meta['model']!r} ({meta['dim']} dimensions), "
                    f"not of {model!r}; pass --model {meta['model']} or another --out"
                )
            rows, vectors, pending = cls._load(folder, meta, repair=True)
            index = cls(folder, meta, rows, vectors)
            index._lock = lock
            index._commit(pending)
        except BaseException:
            lock.close()
            raise
        return index

    # -------------------------------------------------------------------------------------------- writing

    def _commit(self, pending: Sequence[Path]) -> None:
        """Write the in-memory vectors to ``vectors.faiss`` (atomically) when pending ones exist, then drop them."""
        faiss = _faiss()
        on_disk = self.folder / VECTORS
        committed = faiss.read_index(str(on_disk)).ntotal if on_disk.is_file() else 0
        if self.ntotal != committed or (not on_disk.is_file() and self.ntotal):
            _write_atomic(on_disk, faiss.serialize_index(self.vectors).tobytes())
            log.debug("%s: committed %d vectors", self.folder, self.ntotal - committed)
        for path in pending:
            path.unlink(missing_ok=True)
        if pending:
            _fsync_dir(self.folder)

    def append(self, entries: Sequence[tuple[dict[str, Any], np.ndarray | None]]) -> None:
        """Append a batch of ``(row, vector or None)``: each vector gets the next id (ntotal, ntotal+1, ...) in its
        row's ``id``; a row without one (an error, a removal) gets ``id`` None. Durable on return (vectors first,
        then rows; see the module docstring)."""
        if self._lock is None:
            raise ConfigError("this index was opened for reading")
        rows = [row for row, _ in entries]
        with_vectors = [(row, vector) for row, vector in entries if vector is not None]
        for row in rows:
            row["id"] = None
        if with_vectors:
            data = np.ascontiguousarray(np.stack([v for _, v in with_vectors]), dtype=np.float32)
            if data.shape[1] != self.dim:
                raise ValueError(f"vectors of {data.shape[1]} dimensions, the index holds {self.dim}")
            if self._pending is None:
                self._pending = (self.folder / f"pending-{self.ntotal}.f32").open("ab")
            self._pending.write(data.tobytes())
            self._pending.flush()
            os.fsync(self._pending.fileno())
            for offset, (row, _) in enumerate(with_vectors):
                row["id"] = self.ntotal + offset
            self.vectors.add(data)
        with (self.folder / ROWS).open("ab") as handle:
            jsonl.append_rows(handle, rows)
        self.rows.extend(rows)
        self._track(rows)

    def close(self) -> None:
        """Commit the run's vectors and release the lock (reading needs no close)."""
        if self._lock is None:
            return
        if self._pending is not None:
            self._pending.close()
            self._pending = None
        self._commit(sorted(p for p in self.folder.iterdir() if _PENDING.match(p.name)))
        self._lock.close()
        self._lock = None

    # -------------------------------------------------------------------------------------------- searching

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` live rows most similar (cosine) to each normalised query vector, best first."""
        if k <= 0:
            raise ConfigError(f"k must be positive, got {k}")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ConfigError(f"queries of {queries.shape[1]} dimensions; the index holds {self.dim}")
        if not self._live:
            return [[] for _ in queries]
        dead = self.ntotal - len(self._live)
        scores, ids = self.vectors.search(queries, min(self.ntotal, k + dead))
        hits: list[list[Hit]] = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            found = []
            for score, id in zip(row_scores, row_ids, strict=True):
                if id >= 0 and int(id) in self._live:
                    row = self._by_id[int(id)]
                    found.append(Hit(int(id), row["path"], row.get("image", row["path"]), float(score)))
                    if len(found) == k:
                        break
            hits.append(found)
        return hits


def _read_rows_readonly(path: Path) -> list[dict[str, Any]]:
    """The rows of ``path`` without repairing anything: a torn last line (a run in progress or killed) is skipped."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise TypeError("not an object")
            _check_row(row)
        except (ValueError, TypeError, KeyError) as exc:
            if number == len(lines) - 1:
                break  # torn last line
            raise DataError(f"{path}, line {number + 1}: not an index row ({exc})") from exc
        rows.append(row)
    return rows


@contextmanager
def writing(folder: str | Path, model: str, dim: int) -> Iterator[EmbeddingIndex]:
    """:meth:`EmbeddingIndex.create_or_append` as a context manager that commits and unlocks on exit (also when
    the block raises: what was appended stays)."""
    index = EmbeddingIndex.create_or_append(folder, model, dim)
    try:
        yield index
    finally:
        index.close()
