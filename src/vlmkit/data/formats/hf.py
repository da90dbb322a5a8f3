"""``hf``: ``DIR/name/``, a ``datasets`` ``save_to_disk`` folder.

Columns ``id``, ``images`` (a list of :class:`datasets.Image`), ``messages`` (``role``/``content``), ``task`` and
``meta`` (a JSON string).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.data.formats.base import DatasetWriter, SampleDataset
from vlmkit.data.formats.records import Record, RecordError
from vlmkit.data.formats.registry import FormatSpec, register_format
from vlmkit.errors import DataError

_HF_MARKERS = ("state.json", "dataset_info.json")


class HfDataset(SampleDataset):
    """A ``datasets`` folder written by ``save_to_disk``: columns ``id``, ``images`` (or ``image``), ``messages``
    (or LLaVA ``conversations``), optional ``task`` and ``meta``. Image bytes are read raw and decoded by
    ``load_image``; path-only images resolve under the data root (default: the dataset folder)."""

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


class HfWriter(DatasetWriter):
    """A ``datasets`` folder: rows stream into an Arrow file, then ``save_to_disk`` writes ``DIR/name/``."""

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
