"""``hf``: ``DIR/name/``, a ``datasets`` ``save_to_disk`` folder (or a ``DatasetDict`` folder, read one split).

Written: columns ``id``, ``images`` (a list of :class:`datasets.Image`), ``messages`` (``role``/``content``),
``task`` and ``meta`` (a JSON string). Read: rows of any record schema, e.g. LLaVA-OneVision's ``id``, ``image``,
``conversations`` (also the old ``Sequence({from, value})`` feature), ``data_source``; the_cauldron's ``images``,
``texts``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.data.formats.base import DatasetWriter, ImageHandle, SampleDataset
from vlmkit.data.formats.records import Record
from vlmkit.data.formats.registry import FormatSpec, register_format
from vlmkit.errors import DataError

_HF_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
UNIT_ROWS = 256
"""Rows per unit of a ``datasets`` folder (what streaming training shuffles and shares out)."""


def find_embedded(record: dict[str, Any], data: bytes) -> tuple[str, int | None] | None:
    """The column (and list index) of a row whose image struct holds exactly ``data``."""
    for column, value in record.items():
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            if isinstance(item, dict) and item.get("bytes") is data:
                return column, index if isinstance(value, list) else None
    return None


def cell_image(value: Any, index: int | None) -> bytes:
    """The image bytes of a cell (an image struct, or a list of them at ``index``)."""
    item = value if index is None else value[index]
    return bytes(item["bytes"])


@functools.lru_cache(maxsize=8)
def _open_split(folder: str, stamp: int, split: str | None) -> Any:
    import datasets

    loaded = datasets.load_from_disk(folder)
    return (loaded[split] if split is not None else loaded).with_format("arrow")


@dataclass(frozen=True)
class ArrowCell(ImageHandle):
    """An image in a ``datasets`` folder (memory-mapped Arrow: reading one row is cheap)."""

    folder: str
    stamp: int
    """The folder's modification time (ns): a folder written again is opened again."""
    split: str | None
    row: int
    column: str
    index: int | None

    def read(self) -> bytes:
        table = _open_split(self.folder, self.stamp, self.split)[self.row]
        return cell_image(table.column(self.column)[0].as_py(), self.index)


class HfDataset(SampleDataset):
    """A ``datasets`` folder written by ``save_to_disk``, of records of any schema (vlmkit's own: ``id``,
    ``images``, ``messages``, ``task``, ``meta``); a ``DatasetDict`` folder needs ``split``. Image structs
    ``{bytes, path}`` are read raw and decoded by ``load_image``; path-only images resolve under the data root
    (default: the dataset folder). Rows stream from the memory-mapped Arrow files in batches of 64."""

    def _default_root(self) -> Path:
        return self.path

    def _dataset(self) -> Any:
        if not hasattr(self, "_cache"):
            import datasets

            try:
                loaded = datasets.load_from_disk(str(self.path))
            except (FileNotFoundError, ValueError, OSError) as exc:
                raise DataError(f"{self.path}: not a datasets save_to_disk folder ({exc})") from exc
            self._split = None
            if isinstance(loaded, datasets.DatasetDict):
                if self.split is None or self.split not in loaded:
                    wanted = "holds several splits" if self.split is None else f"has no split {self.split!r}"
                    raise DataError(f"{self.path}: {wanted} ({', '.join(loaded)}); pick one with split (--split)")
                loaded, self._split = loaded[self.split], self.split
            elif self.split is not None:
                raise DataError(f"{self.path}: a single dataset, not a DatasetDict; drop split {self.split!r}")
            self._cache = loaded
        return self._cache

    def __len__(self) -> int:
        return len(self._dataset())

    def _entries(self) -> Iterator[tuple[str, Any]]:
        row = 0
        for table in self._dataset().with_format("arrow").iter(batch_size=64):
            for record in table.to_pylist():
                yield f"{self.path}: row {row}", (row, record)
                row += 1

    def units(self) -> list[Any]:
        """Blocks of :data:`UNIT_ROWS` rows, as ``(first row, end)``."""
        n = len(self)
        return [(a, min(a + UNIT_ROWS, n)) for a in range(0, n, UNIT_ROWS)] or [(0, 0)]

    def _unit_entries(self, unit: Any) -> Iterator[tuple[str, Any]]:
        arrow = self._dataset().with_format("arrow")
        for a in range(unit[0], unit[1], 64):
            for k, record in enumerate(arrow[a : min(a + 64, unit[1])].to_pylist()):
                yield f"{self.path}: row {a + k}", (a + k, record)

    def _record_of(self, payload: Any) -> Any:
        return payload[1]

    def _handle(self, data: bytes, payload: Any) -> ImageHandle | None:
        found = find_embedded(payload[1], data)
        if found is None:
            return None
        folder = self.path.resolve()
        return ArrowCell(str(folder), folder.stat().st_mtime_ns, self._split, payload[0], *found)


def hf_features() -> Any:
    """The ``datasets`` features of vlmkit's columns (``hf`` and ``parquet`` writers)."""
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "images": datasets.List(datasets.Image()),
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "task": datasets.Value("string"),
            "meta": datasets.Value("string"),
        }
    )


class HfWriter(DatasetWriter):
    """A ``datasets`` folder: rows stream into an Arrow file, then ``save_to_disk`` writes ``DIR/name/``."""

    def __init__(self, out_dir: str | Path, name: str, *, overwrite: bool = False) -> None:
        from datasets.arrow_writer import ArrowWriter

        super().__init__(out_dir, name, overwrite=overwrite)
        self.features = hf_features()
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


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a ``datasets`` ``save_to_disk`` folder."""
    return path.is_dir() and any((path / marker).is_file() for marker in _HF_MARKERS)


register_format(
    FormatSpec(
        "hf",
        HfDataset,
        HfWriter,
        layout="a datasets folder",
        matches=is_hf_folder,
        find=lambda folder: [p for p in sorted(folder.iterdir()) if is_hf_folder(p)],
    )
)
