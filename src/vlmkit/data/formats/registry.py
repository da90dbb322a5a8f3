"""The format registry (:data:`FORMATS`) and what dispatches on it: detection, :func:`open_dataset`,
:func:`open_writer`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vlmkit.data.formats.base import DatasetWriter, DecodeImages, SampleDataset
from vlmkit.data.formats.schemas import DEFAULT_CAPTION_PROMPT, LlavaCompat, check_llava_compat, parse_columns
from vlmkit.errors import DataError
from vlmkit.processing.images import DEFAULT_MAX_PIXELS
from vlmkit.registry import Registry


def _never(path: Path) -> bool:
    return False


def _none_inside(folder: Path) -> list[Path]:
    return []


@dataclass(frozen=True)
class FormatSpec:
    """One dataset format: its reader and writer, and how a dataset of it is recognised on disk."""

    name: str
    reader: type[SampleDataset]
    writer: type[DatasetWriter]
    layout: str
    """What one dataset of the format is on disk, for messages (e.g. ``"a .jsonl file"``)."""
    matches: Callable[[Path], bool] = _never
    """Whether a path (a file, a folder or a shard pattern, not necessarily existing) is one dataset of it."""
    find: Callable[[Path], list[Path]] = _none_inside
    """The datasets of the format directly inside a folder, as the paths to read."""


FORMATS: Registry[FormatSpec] = Registry("dataset format")
"""Dataset formats by name; iterating gives the names, ``in`` checks one."""


def single_file(name: str, reader: type[SampleDataset], writer: type[DatasetWriter], suffix: str) -> FormatSpec:
    """The spec of a format whose dataset is one file with ``suffix`` (e.g. ``.jsonl``)."""
    return FormatSpec(
        name, reader, writer, layout=f"a {suffix} file",
        matches=lambda path: path.suffix.lower() == suffix and path.is_file(),
        find=lambda folder: sorted(folder.glob(f"*{suffix}")),
    )  # fmt: skip


def register_format(spec: FormatSpec) -> FormatSpec:
    """Register ``spec`` under its name; its reader and writer then report that name as ``format``."""
    FORMATS.add(spec.name, spec)
    spec.reader.format = spec.writer.format = spec.name
    return spec


def get_format(name: str) -> FormatSpec:
    """The format registered as ``name``; an unknown name raises DataError listing the valid ones."""
    if name not in FORMATS:
        raise DataError(f"unknown dataset format {name!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS.get(name)


def _layouts() -> str:
    layouts = [f"{spec.layout} ({name})" for name, spec in FORMATS.items()]
    return " or ".join([", ".join(layouts[:-1]), layouts[-1]] if len(layouts) > 1 else layouts)


def detect_format(path: str | Path) -> tuple[str, Path]:
    """The format of ``path`` and the exact path to read; raises DataError when unknown or ambiguous.

    ``path`` is one dataset (each format's ``matches``), or a folder holding exactly one (each format's
    ``find``), e.g. one ``.json``, one ``.jsonl``, one group of ``name-NNNNNN.tar`` shards or one ``datasets``
    sub-folder.
    """
    path = Path(path)
    matched = [name for name, spec in FORMATS.items() if spec.matches(path)]
    if len(matched) > 1:
        raise DataError(f"{path}: could be any of the formats {', '.join(matched)}; give the format")
    if matched:
        return matched[0], path
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        raise DataError(f"{path}: unknown dataset format; expected {_layouts()}")
    candidates = sorted(
        ((name, found) for name, spec in FORMATS.items() for found in spec.find(path)),
        key=lambda candidate: str(candidate[1].relative_to(path)),
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DataError(f"{path}: no dataset found (looked for {_layouts()})")
    names = ", ".join(str(found.relative_to(path)) for _, found in candidates)
    raise DataError(f"{path}: holds several datasets ({names}); give the path of one")


def open_dataset(
    path: str | Path,
    format: str | None = None,
    *,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    decode_images: DecodeImages = True,
    columns: Mapping[str, str] | str | None = None,
    split: str | None = None,
    llava_compat: LlavaCompat | bool = "auto",
    allow_absolute_paths: bool = False,
    caption_prompt: str = DEFAULT_CAPTION_PROMPT,
) -> SampleDataset:
    """Open a dataset in any registered format (auto-detected when ``format`` is None) for reading Samples.

    ``image_root`` is the folder image paths are relative to (and must stay inside); by default the folder of
    the JSON/JSONL file, the shard folder, or the datasets folder. ``skip_bad`` skips bad records, counting them
    in ``dataset.problems``, instead of raising :class:`~vlmkit.data.formats.RecordError`.
    ``decode_images=False`` leaves each image as its path or encoded bytes, unchecked (much faster when only the
    text is needed); ``"check"`` decodes each image to check it but still gives back its path or bytes;
    ``"lazy"`` is ``"check"`` giving back, for images embedded in tars, parquet or ``datasets`` files, an
    :class:`~vlmkit.data.formats.base.ImageHandle` instead of the bytes (constant memory for large training
    sets: read and decode again when the pixels are needed).

    Records may have any schema of :mod:`~vlmkit.data.formats.schemas`: ``columns`` renames fields
    (``"old=new,..."``, JSON or a dict), ``llava_compat`` (``auto``, ``on``, ``off``) applies LLaVA's
    preprocessing, ``allow_absolute_paths`` accepts absolute image paths anywhere, ``caption_prompt`` is the
    question of caption records; ``split`` picks one split of a ``DatasetDict`` folder or of hub-style parquet
    files (``train-00000-of-00002.parquet``).
    """
    if format is None:
        format, path = detect_format(path)
    reader = get_format(format).reader
    return reader(
        path, image_root=image_root, skip_bad=skip_bad, max_pixels=max_pixels, decode_images=decode_images,
        columns=parse_columns(columns), split=split, llava_compat=check_llava_compat(llava_compat),
        allow_absolute_paths=allow_absolute_paths, caption_prompt=caption_prompt,
    )  # fmt: skip


def open_writer(
    out_dir: str | Path,
    format: str,
    name: str = "data",
    *,
    overwrite: bool = False,
    shard_size: int | None = None,
    schema: str | None = None,
) -> DatasetWriter:
    """A writer for dataset ``name`` in ``out_dir`` in a registered ``format`` (see each format's module for its
    layout). Refuses to replace an existing dataset unless ``overwrite``; ``shard_size`` (samples per shard,
    default 10,000) only for sharded formats; ``schema`` (``llava``, the default, or ``messages``) only for
    formats holding JSON records."""
    kwargs = {} if schema is None else {"schema": schema}
    return get_format(format).writer.create(out_dir, name, overwrite=overwrite, shard_size=shard_size, **kwargs)
