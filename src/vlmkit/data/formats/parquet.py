"""``parquet``: ``DIR/name.parquet``, or the hub's layout ``DIR/train-00000-of-00002.parquet``, ...

Read: one file, a glob, or a folder of files (a folder holding several splits, ``train-00000-of-00002.parquet``
... ``test-...`` or ``train.parquet``, ``test.parquet``, needs ``split``), streamed row group by row group in
batches of 64 rows (a big file is never loaded whole). Rows are records of any schema
(:mod:`~vlmkit.data.formats.schemas`); images are ``{bytes, path}`` structs (the ``datasets`` ``Image``
feature), bytes or paths. Written: the columns of the ``hf`` format (``id``, ``images``, ``messages``, ``task``,
``meta``) with the ``datasets`` features in the schema metadata, so ``datasets.load_dataset("parquet", ...)``
decodes the images; row groups of 100 rows. img2dataset's ``NNNNN.parquet`` files beside its tars (download
status, no images) are not datasets.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.data.formats.base import DatasetWriter, ImageHandle, SampleDataset
from vlmkit.data.formats.hf import cell_image, find_embedded
from vlmkit.data.formats.records import Record, RecordError
from vlmkit.data.formats.registry import FormatSpec, register_format
from vlmkit.errors import DataError

ROW_GROUP_SIZE = 100
BATCH_SIZE = 64
_HUB_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?$")


def split_of(file: Path) -> str:
    """The split a file belongs to: ``train`` for the hub's ``train-00000-of-00002[-hash].parquet`` and for
    ``train.parquet``."""
    match = _HUB_SHARD.match(file.stem)
    return match.group("split") if match else file.stem


def is_sidecar(file: Path) -> bool:
    """img2dataset's per-shard metadata file (``00000.parquet`` beside ``00000.tar`` or ``00000_stats.json``)."""
    return file.with_suffix(".tar").exists() or file.with_name(f"{file.stem}_stats.json").exists()


def _files(path: Path, split: str | None) -> list[Path]:
    text = str(path)
    if any(ch in text for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(text))]
    elif path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if not is_sidecar(p))
    else:
        files = [path]
    if not files:
        raise DataError(f"{path}: no .parquet files found")
    if path.is_file():
        return files
    splits = sorted(set(map(split_of, files)))
    if split is not None:
        chosen = [f for f in files if split_of(f) == split]
        if not chosen:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(splits)})")
        return chosen
    if len(splits) > 1:
        raise DataError(f"{path}: holds several splits ({', '.join(splits)}); pick one with split (--split)")
    return files


@functools.lru_cache(maxsize=4)
def _row_group(file: str, stamp: int, group: int, column: str) -> list[Any]:
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).read_row_group(group, columns=[column]).column(0).to_pylist()


@dataclass(frozen=True)
class ParquetCell(ImageHandle):
    """An image in a parquet file: its row group's column is read again (the last few stay cached)."""

    file: str
    stamp: int
    """The file's modification time (ns): a rewritten file is read again, not taken from the cache."""
    group: int
    row: int
    column: str
    index: int | None

    def read(self) -> bytes:
        return cell_image(_row_group(self.file, self.stamp, self.group, self.column)[self.row], self.index)


class ParquetDataset(SampleDataset):
    """Parquet files of records (the hub's layout, img2dataset's ``output_format=parquet``, vlmkit's own)."""

    def _default_root(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def _files(self) -> list[Path]:
        return _files(self.path, self.split)

    def __len__(self) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        total = 0
        for file in self._files():
            with contextlib.suppress(OSError, pa.ArrowException):  # a corrupt file counts nothing; iterating says why
                total += pq.ParquetFile(file).metadata.num_rows
        return total

    def units(self) -> list[Any]:
        """Every file's row groups, in order, as ``(file, group)``; a file that can't be opened is one unit
        (reading it reports the problem)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out: list[Any] = []
        for file in self._files():
            try:
                groups = pq.ParquetFile(file).num_row_groups
            except (OSError, pa.ArrowException):
                groups = 1
            out += [(str(file), group) for group in range(groups)]
        return out

    def _entries(self) -> Iterator[tuple[str, Any]]:
        for unit in self.units():
            yield from self._unit_entries(unit)

    def _unit_entries(self, unit: Any) -> Iterator[tuple[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        file, group = Path(unit[0]), unit[1]
        row = in_group = 0
        try:
            parquet = pq.ParquetFile(file)
            row = sum(parquet.metadata.row_group(g).num_rows for g in range(group))
            for batch in parquet.iter_batches(batch_size=BATCH_SIZE, row_groups=[group]):
                for record in batch.to_pylist():
                    yield f"{file}: row {row}", (str(file), group, in_group, record)
                    row, in_group = row + 1, in_group + 1
        except (OSError, pa.ArrowException) as exc:
            where = f"{file}: row {row}"
            yield where, RecordError(where, "bad_shard", f"truncated or corrupt parquet file ({exc})")

    def _record_of(self, payload: Any) -> Any:
        return payload[3]

    def _handle(self, data: bytes, payload: Any) -> ImageHandle | None:
        found = find_embedded(payload[3], data)
        if found is None:
            return None
        file = Path(payload[0]).resolve()
        return ParquetCell(str(file), file.stat().st_mtime_ns, payload[1], payload[2], *found)


class ParquetWriter(DatasetWriter):
    """``DIR/name.parquet``: vlmkit's columns, streamed in row groups of :data:`ROW_GROUP_SIZE` rows."""

    def __init__(self, out_dir: str | Path, name: str, *, overwrite: bool = False) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from vlmkit.data.formats.hf import hf_features

        super().__init__(out_dir, name, overwrite=overwrite)
        struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        turn = pa.struct([("role", pa.string()), ("content", pa.string())])
        metadata = {"huggingface": json.dumps({"info": {"features": hf_features().to_dict()}})}
        self._schema = pa.schema(
            [("id", pa.string()), ("images", pa.list_(struct)), ("messages", pa.list_(turn)),
             ("task", pa.string()), ("meta", pa.string())],
            metadata=metadata,
        )  # fmt: skip
        self._tmp = self.out_dir / f".{name}.parquet.tmp"
        self._writer = pq.ParquetWriter(str(self._tmp), self._schema)
        self._rows: list[dict[str, Any]] = []
        self._closed = False

    @property
    def path(self) -> Path:
        return self.out_dir / f"{self.name}.parquet"

    def write(self, record: Record) -> None:
        self._rows.append(
            {
                "id": record.id,
                "images": [{"bytes": data, "path": None} for data in record.images],
                "messages": [{"role": m["role"], "content": m["content"]} for m in record.messages],
                "task": record.task,
                "meta": json.dumps(record.meta, ensure_ascii=False),
            }
        )
        self.count += 1
        if len(self._rows) >= ROW_GROUP_SIZE:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def close(self) -> Path:
        if not self._closed:
            self._flush()
            self._writer.close()
            self._tmp.replace(self.path)
            self._closed = True
        return self.path


def _is_parquet(path: Path) -> bool:
    text = str(path)
    if text.endswith(".parquet") and any(ch in text for ch in "*?["):
        return True
    return path.suffix.lower() == ".parquet" and path.is_file()


def _parquet_folders(folder: Path) -> list[Path]:
    """The folder itself when it holds parquet files, else its sub-folders that do (the hub's ``data/``,
    the_cauldron's ``ai2d/``, ...)."""

    def holds(candidate: Path) -> bool:
        return any(not is_sidecar(p) for p in candidate.glob("*.parquet"))

    if holds(folder):
        return [folder]
    return [p for p in sorted(folder.iterdir()) if p.is_dir() and holds(p)]


register_format(
    FormatSpec(
        "parquet", ParquetDataset, ParquetWriter, layout="parquet files", matches=_is_parquet, find=_parquet_folders
    )
)
