"""The one module that reads images, and the transform that turns them into pixel tensors.

Every command (training data, chat, describe, serve, eval) loads images through :func:`load_image`, so
validation, EXIF orientation, mode conversion and size limits behave the same everywhere.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import ipaddress
import re
import socket
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlmkit.errors import ConfigError, ImageError

DEFAULT_MAX_PIXELS = 50_000_000
"""Default pixel limit (50 MP): larger images are refused as possible decompression bombs."""

ImageSource = str | Path | bytes | bytearray | Image.Image
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S)

# Truncated files must fail loudly, never decode to a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def describe_source(source: Any) -> str:
    """A short, human-readable name for an image source, used in error messages."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    if isinstance(source, bytes | bytearray):
        return f"<{len(source)} bytes>"
    if isinstance(source, str) and source.startswith("data:"):
        return f"<data URL, {len(source)} characters: {source[:30]}...>"
    return str(source)


def _decode_data_url(url: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageError(
            f"image {describe_source(url)}: not a base64 data URL; expected 'data:image/<type>;base64,<data>'"
        )
    mime = match.group("mime") or ""
    if mime and not mime.startswith("image/"):
        raise ImageError(f"image {describe_source(url)}: data URL has media type {mime!r}, not image/*")
    try:
        return base64.b64decode(match.group("data"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image {describe_source(url)}: invalid base64 data ({exc})") from exc


@dataclass(frozen=True)
class ImageAccess:
    """Where images may come from. The defaults suit a local user: any local file, no network.

    A server narrows this: no plain local paths, ``file://`` only under ``local_root``, http(s) only when allowed,
    with a timeout, a size cap and private/loopback addresses refused.
    """

    allow_local: bool = True
    local_root: Path | None = None
    allow_remote: bool = False
    remote_timeout: float = 5.0
    remote_max_bytes: int = 20 * 1024 * 1024
    allow_private_hosts: bool = False


_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5


def _resolve(url: str, access: ImageAccess, name: str) -> tuple[urllib.parse.SplitResult, str]:
    """Split and check an http(s) URL; resolve its host once and return the address to connect to.

    The connection goes to this address (no second lookup that a DNS-rebinding server could answer
    differently), and with ``allow_private_hosts`` off every address the name has must be public.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ImageError(f"image {name}: malformed URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise ImageError(f"image {name}: only http(s) URLs can be downloaded")
    if not host:
        raise ImageError(f"image {name}: URL has no host")
    try:
        host.encode("idna")
        infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except UnicodeError as exc:  # a label over 63 characters, an empty label, ...
        raise ImageError(f"image {name}: invalid host name {host[:80]!r} ({exc})") from exc
    except OSError as exc:
        raise ImageError(f"image {name}: cannot resolve host {host[:80]!r} ({exc})") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not access.allow_private_hosts:
        for address in addresses:
            if not ipaddress.ip_address(address.split("%")[0]).is_global:
                raise ImageError(f"image {name}: host {host!r} resolves to a private or loopback address; refused")
    return parts, addresses[0]


def _connection(
    parts: urllib.parse.SplitResult, address: str, timeout: float, sockets: list[socket.socket]
) -> http.client.HTTPConnection:
    """A connection for ``parts`` that connects to ``address`` (TLS still verifies the URL's host name); the
    sockets it opens are appended to ``sockets``."""
    host = parts.hostname or ""
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = cls(host, parts.port, timeout=timeout)

    def connect_to_checked_address(where, *args, **kwargs):
        sock = socket.create_connection((address, where[1]), *args, **kwargs)
        sockets.append(sock)
        return sock

    connection._create_connection = connect_to_checked_address  # type: ignore[attr-defined]
    return connection


def fetch_remote(url: str, access: ImageAccess) -> bytes:
    """Download an http(s) image within the access policy: public hosts only (each checked address is the one
    connected to, redirects re-checked), ``remote_timeout`` seconds for the whole download, a size cap."""
    name = describe_source(url)
    deadline = time.monotonic() + access.remote_timeout
    too_slow = ImageError(f"image {name}: download took longer than {access.remote_timeout:g} s; refused")
    for _ in range(MAX_REDIRECTS + 1):
        parts, address = _resolve(url, access, name)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise too_slow
        sockets: list[socket.socket] = []
        connection = _connection(parts, address, remaining, sockets)
        # the deadline covers every phase (a server may send its headers a byte at a time): at the deadline,
        # the socket is shut down, which wakes any blocked read
        timer = threading.Timer(remaining, _shut, (sockets,))
        timer.start()
        try:
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            connection.request("GET", target, headers={"User-Agent": "vlmkit", "Accept": "image/*"})
            response = connection.getresponse()
            location = response.getheader("Location")
            if response.status in _REDIRECTS and location:
                url = urllib.parse.urljoin(url, location)
                if not url.startswith(("http://", "https://")):
                    raise ImageError(f"image {name}: redirected to a non-http URL; refused")
                continue
            if response.status != 200:
                raise ImageError(f"image {name}: download failed (HTTP {response.status} {response.reason})")
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > access.remote_max_bytes:
                raise ImageError(f"image {name}: download is over the {access.remote_max_bytes:,}-byte limit")
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read1(65536):
                size += len(chunk)
                if size > access.remote_max_bytes:
                    raise ImageError(f"image {name}: download is over the {access.remote_max_bytes:,}-byte limit")
                chunks.append(chunk)
            if time.monotonic() >= deadline:
                raise too_slow
            return b"".join(chunks)
        except ImageError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise too_slow from exc
            raise ImageError(f"image {name}: download failed ({exc})") from exc
        finally:
            timer.cancel()
            connection.close()
    raise ImageError(f"image {name}: more than {MAX_REDIRECTS} redirects; refused")


def _shut(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _read_source(source: ImageSource, access: ImageAccess) -> tuple[bytes | Path | Image.Image, str]:
    """Resolve a source to bytes, a file path or a PIL image, plus its name for messages."""
    name = describe_source(source)
    if isinstance(source, Image.Image):
        return source, name
    if isinstance(source, bytes | bytearray):
        return bytes(source), name
    if not isinstance(source, Path | str):
        raise ImageError(
            f"unsupported image source type {type(source).__name__}; give a path, bytes, a PIL image or a data URL"
        )
    text = str(source)
    if text.startswith("data:"):
        return _decode_data_url(text), name
    if text.startswith(("http://", "https://")):
        if not access.allow_remote:
            raise ImageError(
                f"image {name}: remote (http/https) images are disabled; download it first or allow remote images"
            )
        return fetch_remote(text, access), name
    if "\x00" in text:
        raise ImageError(f"image {name}: the path contains a NUL byte")
    if text.startswith("file://"):
        unquoted = urllib.parse.unquote(text[len("file://") :])
        if "\x00" in unquoted:
            raise ImageError(f"image {name}: the path contains a NUL byte (%00)")
        path = Path(unquoted)
        if access.local_root is None and not access.allow_local:
            raise ImageError(f"image {name}: file:// URLs are disabled")
    elif _SCHEME.match(text):
        raise ImageError(f"image {name}: unsupported URL scheme; use a path, data:, http(s):// or file://")
    elif not access.allow_local:
        raise ImageError(f"image {name}: local paths are not allowed here; send the image as a data URL")
    else:
        path = Path(text).expanduser()
    try:
        if access.local_root is not None:
            root = Path(access.local_root).resolve()
            if not path.resolve().is_relative_to(root):
                raise ImageError(f"image {name}: outside the allowed media folder {root}")
        if not path.exists():
            raise ImageError(f"image {name}: file not found")
        if not path.is_file():
            raise ImageError(f"image {name}: not a file")
    except (OSError, ValueError) as exc:  # a name too long for the file system, a loop of links, ...
        raise ImageError(f"image {name}: cannot be opened ({exc})") from exc
    return path, name


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"image {name}: cannot convert mode {mode} to RGB ({exc})") from exc


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    access: ImageAccess | None = None,
) -> Image.Image:
    """Load an image as a fully decoded RGB PIL image with EXIF orientation applied.

    ``source`` is a file path (or ``file://`` URL), raw bytes, a ``data:image/...;base64,`` URL, a PIL image, or
    an http(s) URL when ``access`` allows it (default :class:`ImageAccess`: local files, no network).
    Raises :class:`ImageError` naming the source for missing, corrupt, truncated and non-image inputs, and for
    images over ``max_pixels`` (decompression bombs). ``max_pixels=None`` disables the limit.
    """
    data, name = _read_source(source, access or ImageAccess())
    if isinstance(data, Image.Image):
        image = data
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            if max_pixels is None:
                raise ImageError(f"image {name}: refused by Pillow's own decompression-bomb guard ({exc})") from exc
            raise ImageError(
                f"image {name}: too large, over the {max_pixels:,}-pixel limit (possible decompression bomb)"
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"image {name}: not an image file or an unsupported format") from exc
        except Exception as exc:  # Pillow's decoders also raise ValueError, SyntaxError, struct.error, ...
            raise ImageError(f"image {name}: cannot be read ({type(exc).__name__}: {exc})") from exc
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"image {name}: {width}x{height} = {width * height:,} pixels is over the {max_pixels:,}-pixel "
            "limit (possible decompression bomb); raise max_pixels if the image is trusted"
        )
    if width == 0 or height == 0:
        raise ImageError(f"image {name}: empty image ({width}x{height})")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image, name)
    except ImageError:
        raise
    except Exception as exc:  # truncated or corrupt pixel data; any decoder error is this image's alone
        raise ImageError(f"image {name}: corrupt or truncated image data ({type(exc).__name__}: {exc})") from exc


MAX_ASPECT_RATIO = 200
"""Images more than this many times wider than tall (or taller than wide) are refused (Qwen2-VL's bound)."""
MAX_CANVAS_SIDE = 4096
"""``pad`` mode: a longer image side is first shrunk to this, so the square canvas stays ≤ 4096² pixels."""


def checked_rgb(image: Image.Image, name: str) -> Image.Image:
    """``image`` in RGB, after refusing (:class:`ImageError`) an aspect ratio over :data:`MAX_ASPECT_RATIO`: what
    every views strategy checks before it cuts an image."""
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"image {name}: {width}x{height} has an aspect ratio over {MAX_ASPECT_RATIO}:1; crop or pad it first"
        )
    return image if image.mode == "RGB" else _to_rgb(image, name)


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageTransformConfig:
    """How an image becomes a pixel tensor: size, resize mode, normalisation."""

    size: int = 224
    resize_mode: Literal["pad", "resize"] = "pad"
    """``pad``: pad to square with the mean colour, then resize (LLaVA's expand2square); ``resize``: plain resize."""
    mean: tuple[float, float, float] = field(default=OPENAI_CLIP_MEAN)
    std: tuple[float, float, float] = field(default=OPENAI_CLIP_STD)

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if self.resize_mode not in ("pad", "resize"):
            raise ConfigError(f"resize_mode must be 'pad' or 'resize', got {self.resize_mode!r}")
        if self.size <= 0:
            raise ConfigError(f"image size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean and std need 3 values each, std > 0; got mean={self.mean}, std={self.std}")


class ImageTransform:
    """Resize (optionally padding to square) and normalise RGB images into ``(3, size, size)`` tensors."""

    def __init__(self, config: ImageTransformConfig) -> None:
        self.config = config
        self._mean = np.asarray(config.mean, dtype=np.float32) * 255.0
        self._inv_std = 1.0 / (np.asarray(config.std, dtype=np.float32) * 255.0)

    def _square(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        if side > MAX_CANVAS_SIDE:  # the canvas grows with side²; shrink before allocating it
            scale = MAX_CANVAS_SIDE / side
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            side = max(width, height)
        fill = tuple(int(m * 255) for m in self.config.mean)  # as LLaVA's expand2square
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas

    def __call__(self, image: Image.Image, name: str | None = None) -> torch.Tensor:
        """One RGB PIL image to a float32 ``(3, size, size)`` tensor; ``name`` names it in errors.

        Raises :class:`ImageError` for an aspect ratio over :data:`MAX_ASPECT_RATIO`."""
        name = name or describe_source(image)
        image = checked_rgb(image, name)
        if self.config.resize_mode == "pad":
            image = self._square(image)
        size = self.config.size
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        array = (np.asarray(image, dtype=np.float32) - self._mean) * self._inv_std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
