"""Dataset formats: LLaVA JSON, JSONL, webdataset tar shards, HF ``datasets`` and parquet, behind one reader
interface; the records in them may have any schema of :mod:`~vlmkit.data.formats.schemas`.

Reading: :func:`open_dataset` auto-detects the format and returns a :class:`SampleDataset`, an iterable of
:class:`~vlmkit.data.sample.Sample`. Every image goes through :func:`vlmkit.processing.images.load_image`.
A bad record raises :class:`RecordError` (a :class:`~vlmkit.errors.DataError`) naming the file and the line,
record, sample or row; with ``skip_bad=True`` it is skipped, logged and counted in ``dataset.problems`` by reason
(:data:`PROBLEMS`).

Writing: :func:`open_writer` returns a :class:`DatasetWriter` taking :class:`Record` objects (a sample with its
images already PNG-encoded), so a generator can stream straight into any format.

Each format is one module (its layout in its docstring: :mod:`~vlmkit.data.formats.llava`,
:mod:`~vlmkit.data.formats.jsonl`, :mod:`~vlmkit.data.formats.wds`, :mod:`~vlmkit.data.formats.hf`,
:mod:`~vlmkit.data.formats.parquet`) holding a
reader, a writer and a :func:`register_format` call that adds its :class:`FormatSpec` to :data:`FORMATS`;
importing this package imports, and so registers, the built-in ones.
"""

from vlmkit.data.formats.base import DatasetWriter, ImageHandle, SampleDataset, resolve_image
from vlmkit.data.formats.hf import HfDataset, HfWriter
from vlmkit.data.formats.jsonl import JsonlDataset, JsonlWriter
from vlmkit.data.formats.llava import LlavaJsonDataset, LlavaJsonWriter
from vlmkit.data.formats.parquet import ParquetDataset, ParquetWriter
from vlmkit.data.formats.records import PROBLEMS, ParsedRecord, Record, RecordError, llava_preprocess
from vlmkit.data.formats.registry import (
    FORMATS,
    FormatSpec,
    detect_format,
    get_format,
    open_dataset,
    open_writer,
    register_format,
)
from vlmkit.data.formats.schemas import SCHEMAS, ReadOptions, derive_id, parse_columns, parse_record
from vlmkit.data.formats.wds import WdsWriter, WebDataset

__all__ = [
    "FORMATS",
    "PROBLEMS",
    "SCHEMAS",
    "DatasetWriter",
    "FormatSpec",
    "HfDataset",
    "HfWriter",
    "ImageHandle",
    "JsonlDataset",
    "JsonlWriter",
    "LlavaJsonDataset",
    "LlavaJsonWriter",
    "ParquetDataset",
    "ParquetWriter",
    "ParsedRecord",
    "ReadOptions",
    "Record",
    "RecordError",
    "SampleDataset",
    "WdsWriter",
    "WebDataset",
    "derive_id",
    "detect_format",
    "get_format",
    "llava_preprocess",
    "open_dataset",
    "open_writer",
    "parse_columns",
    "parse_record",
    "register_format",
    "resolve_image",
]
