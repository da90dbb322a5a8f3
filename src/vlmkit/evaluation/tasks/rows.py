"""Validation of data rows: typed fields, answer lists, ids, image paths and sizes, boxes (errors name the row)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlmkit.errors import DataError


def get_field(row: dict[str, Any], keys: Sequence[str], where: str, kind: type | tuple[type, ...] = str) -> Any:
    """The first of ``keys`` present in ``row``, checked to be a ``kind``."""
    for key in keys:
        if row.get(key) is not None:
            value = row[key]
            if not isinstance(value, kind):
                raise DataError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
            return value
    raise DataError(f"{where}: missing field {' or '.join(repr(k) for k in keys)}")


def answer_list(row: dict[str, Any], where: str, keys: Sequence[str] = ("answers",)) -> list[str]:
    """A non-empty list of answer strings; VQAv2-style ``{"answer": ...}`` dicts are accepted."""
    raw = get_field(row, keys, where, (list, tuple, str))
    items = [raw] if isinstance(raw, str) else list(raw)
    out = [a.get("answer") if isinstance(a, dict) else a for a in items]
    answers = [a for a in out if isinstance(a, str)]
    if not out or len(answers) != len(out):
        raise DataError(f"{where}: {keys[0]!r} must be a non-empty list of strings")
    return answers


def sample_id(
    row: dict[str, Any], where: str, fallback: str | None = None, keys: Sequence[str] = ("question_id", "id")
) -> str:
    """``question_id`` (or ``id``, or the first of ``keys``) as a string, else ``fallback``."""
    for key in keys:
        value = row.get(key)
        if value is not None and not isinstance(value, dict | list):
            return str(value)
    if fallback is not None:
        return fallback
    raise DataError(f"{where}: missing field 'question_id'")


def image_path(row: dict[str, Any], where: str, root: Path, key: str = "image") -> Any:
    """The row's ``image``: an existing file (relative paths under ``root``), a data or http(s) URL, None, or —
    from parquet and datasets sources — the image itself (``{"bytes", "path"}``: its bytes; a PIL image; a list
    holding one image)."""
    value = row.get(key)
    if isinstance(value, list | tuple):
        if len(value) > 1:
            raise DataError(f"{where}: {len(value)} images in {key!r}; this task takes one image per question")
        value = value[0] if value else None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if value is None:
        return None
    if isinstance(value, Image.Image | bytes):
        return value
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: field {key!r} must be a path string or an image")
    if value.startswith(("data:", "http://", "https://")):
        return value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"{where}: image {path} not found")
    return str(path)


def image_size(row: dict[str, Any], image: Any, where: str) -> tuple[int, int]:
    """``(width, height)`` from the row, the image, or the image file's header."""
    if isinstance(row.get("width"), int | float) and isinstance(row.get("height"), int | float):
        return int(row["width"]), int(row["height"])
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, bytes):
        try:
            with Image.open(io.BytesIO(image)) as img:
                return img.size
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{where}: cannot read the size of the image ({exc})") from exc
    if not isinstance(image, str) or image.startswith(("data:", "http://", "https://")):
        raise DataError(f"{where}: grounding needs the image size; give 'width' and 'height'")
    try:
        with Image.open(image) as img:  # header only: no decoding
            return img.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{where}: cannot read the size of image {image} ({exc})") from exc


def box_of(value: Any, where: str) -> list[float]:
    """An ``[x1, y1, x2, y2]`` box of numbers."""
    if not isinstance(value, list | tuple) or len(value) != 4 or not all(isinstance(v, int | float) for v in value):
        raise DataError(f"{where}: 'bbox' must be [x1, y1, x2, y2] numbers, got {value!r}")
    return [float(v) for v in value]
