"""Where evaluation rows come from: a JSONL file, a parquet file or a folder of them (the hub's layout), or a
``datasets`` folder (``save_to_disk``: a Dataset, or a DatasetDict with its splits). Every source yields plain
dicts; images stay undecoded (``{"bytes", "path"}`` from parquet and datasets), so reading is cheap."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmkit.errors import DataError

Row = tuple[str, dict[str, Any]]
"""``(where, row)``: where names the file and line (or row) for error messages."""


def _is_datasets_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _parquet_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.parquet") if p.is_file())


def _split_of(file: Path, root: Path) -> str:
    """The hub's split of a parquet file: ``test-00000-of-00002.parquet`` or ``test/xxx.parquet`` → ``test``."""
    if "-" in file.name:
        return file.name.split("-")[0]
    parent = file.parent.relative_to(root)
    return parent.parts[-1] if parent.parts else file.stem


def describe_source(path: str | Path, split: str | None = None) -> str:
    return f"{path}[{split}]" if split else str(path)


def iter_rows(path: str | Path, split: str | None = None) -> Iterator[Row]:
    """Every row of an evaluation source, in order (``split`` picks a DatasetDict split or the hub's parquet
    files of that split)."""
    path = Path(path)
    if path.is_dir():
        if _is_datasets_folder(path):
            yield from _datasets_rows(path, split)
            return
        files = _parquet_files(path)
        if not files:
            raise DataError(
                f"evaluation data {path} is a folder with neither a datasets dataset (save_to_disk) nor parquet files"
            )
        splits = sorted({_split_of(f, path) for f in files})
        if split is None and len(splits) > 1:
            raise DataError(f"{path} holds the splits {', '.join(splits)}; choose one with --split")
        if split is not None:
            files = [f for f in files if _split_of(f, path) == split]
            if not files:
                raise DataError(f"{path} has no split {split!r}; its splits: {', '.join(splits)}")
        for file in files:
            yield from _parquet_rows(file)
        return
    if not path.is_file():
        raise DataError(f"evaluation data {path} not found")
    if split is not None:
        raise DataError(f"--split {split} is for datasets folders and parquet folders; {path} is one file")
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        yield from _jsonl_rows(path)


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    n = 0
    for batch in table.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield f"{path} row {n}", row
            n += 1


def _undecoded(dataset: Any) -> Any:
    """The dataset with its image columns (and lists of images) read as ``{"bytes", "path"}`` dicts."""
    from datasets import Image, List, Sequence

    for name, feature in dataset.features.items():
        if isinstance(feature, Image):
            dataset = dataset.cast_column(name, Image(decode=False))
        elif isinstance(feature, List | Sequence) and isinstance(feature.feature, Image):
            dataset = dataset.cast_column(name, List(Image(decode=False)))
    return dataset


def _datasets_rows(path: Path, split: str | None) -> Iterator[Row]:
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise DataError(f"{path}: not a readable datasets folder ({exc})") from exc
    if isinstance(loaded, DatasetDict):
        names = list(loaded)
        if split is None and len(names) == 1:
            split = names[0]
        if split is None or split not in loaded:
            wanted = "choose one with --split" if split is None else f"no split {split!r}"
            raise DataError(f"{path} holds the splits {', '.join(names)}; {wanted}")
        dataset = loaded[split]
    else:
        if split is not None:
            raise DataError(f"{path} is a single dataset with no splits; leave --split out")
        dataset = loaded
    for n, row in enumerate(_undecoded(dataset)):
        yield f"{describe_source(path, split)} row {n}", dict(row)


def source_digest(path: str | Path, split: str | None = None) -> str:
    """sha256 of a source's bytes (a folder: every file's relative path and bytes, in order), and its split."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    if split is not None:
        digest.update(b"\0split=" + split.encode())
    return digest.hexdigest()
