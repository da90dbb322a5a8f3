"""Image files named on a command line: files, folders (recursive) and globs → unique paths, keyed for resuming.

Shared by ``describe``, ``embed`` and ``classify``: every command finds the same images for the same arguments,
and records each by the same key (its resolved path, written as valid UTF-8).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from vlmkit.errors import ConfigError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def safe_text(text: str) -> str:
    """``text`` as valid UTF-8: each byte of a file name that did not decode (a surrogate escape, as ``os.listdir``
    gives for a name that is not UTF-8) becomes the four characters ``\\xNN``; other text is unchanged."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def image_key(path: str | Path) -> str:
    """The resume key of an image: its resolved absolute path (symlinks followed), written with :func:`safe_text`.

    However a path is spelled (absolute, relative to any folder, through a symlink), the key is the same.
    """
    return safe_text(str(Path(path).expanduser().resolve()))


def collect_keyed(paths: Sequence[str | Path]) -> dict[str, Path]:
    """Resume key → the path as found (as given, or under a given folder), sorted by the path as found.

    A path that is neither an existing file or folder nor a glob matching something is an error.
    """
    found: dict[str, Path] = {}
    for raw in paths:
        text = str(raw)
        path = Path(text).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
            if not matches:
                raise ConfigError(f"{safe_text(text)}: the pattern matches no file")
        else:
            raise ConfigError(f"{safe_text(text)}: no such file or folder")
        for match in matches:
            found.setdefault(image_key(match), match)
    return dict(sorted(found.items(), key=lambda item: str(item[1])))


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files, folders (recursive, by image extension) and globs → sorted unique paths (unique by resolved path).

    A path that is neither an existing file or folder nor a glob matching something is an error.
    """
    return list(collect_keyed(paths).values())
