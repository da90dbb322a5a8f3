"""Images from strangers: every decoder failure is an ImageError naming the image, sizes are bounded before
allocation, paths and URLs that would crash the standard library are refused, downloads keep their deadline."""

from __future__ import annotations

import http.server
import io
import random
import socket
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from vlmkit.errors import ImageError
from vlmkit.processing import images as images_module
from vlmkit.processing.images import ImageAccess, ImageTransform, ImageTransformConfig, load_image


def encoded(fmt: str) -> bytes:
    image = Image.new("RGB", (16, 12))
    image.putdata([(x * 16 % 256, y * 20 % 256, (x * y) % 256) for y in range(12) for x in range(16)])
    buffer = io.BytesIO()
    if fmt == "GIF":
        image = image.convert("P")
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def mutations(data: bytes, rng: random.Random, n: int):
    for _ in range(n):
        mutated = bytearray(data)
        kind = rng.randrange(4)
        if kind == 0:  # flip a few bytes
            for _ in range(rng.randint(1, 8)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        elif kind == 1:  # truncate
            del mutated[rng.randrange(1, len(mutated)) :]
        elif kind == 2:  # insert junk
            at = rng.randrange(len(mutated))
            mutated[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:  # overwrite a 4-byte field (lengths, sizes) with an extreme value
            at = rng.randrange(max(1, len(mutated) - 4))
            mutated[at : at + 4] = struct.pack(">I", rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF]))
        yield bytes(mutated)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_fuzzed_images_give_only_image_errors(fmt):
    rng = random.Random(f"vlmkit-fuzz-{fmt}")
    errors = 0
    for i, data in enumerate(mutations(encoded(fmt), rng, 700)):
        try:
            image = load_image(data)
        except ImageError as exc:
            assert str(exc).startswith(f"image <{len(data)} bytes>"), exc
            errors += 1
        except Exception as exc:  # the bug this test is for
            pytest.fail(f"{fmt} mutation {i}: {type(exc).__name__} escaped load_image: {exc}")
        else:
            assert image.mode == "RGB" and image.width > 0 and image.height > 0
    assert errors > 50  # the mutations do break images (a fuzz test that decodes everything tests nothing)


def png_with_zero_ihdr_length() -> bytes:
    data = bytearray(encoded("PNG"))
    data[8:12] = b"\x00\x00\x00\x00"  # IHDR's length field
    return bytes(data)


def test_known_decoder_crashes_are_image_errors(tmp_path):
    bad_ppm = tmp_path / "bad.ppm"
    bad_ppm.write_bytes(b"P6\n4 4\n70000\n" + b"\x00" * 96)  # maxval over 65535: Pillow raises ValueError
    for source, name in [(png_with_zero_ihdr_length(), "<"), (str(bad_ppm), str(bad_ppm))]:
        with pytest.raises(ImageError, match=f"^image {name}"):
            load_image(source)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(width: int, height: int) -> bytes:
    """A valid PNG of any size in a few hundred bytes (rows of zeros compress to nothing)."""
    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * width * 3 for _ in range(height)), 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", raw) + _chunk(b"IEND", b"")


def test_extreme_aspect_ratio_is_refused_before_the_canvas_is_built():
    data = png_bytes(30000, 1)
    assert len(data) < 400
    transform = ImageTransform(ImageTransformConfig(size=32, resize_mode="pad"))
    with pytest.raises(ImageError, match="30000x1 has an aspect ratio over 200:1"):
        transform(load_image(data), "wide.png")


def test_pad_mode_canvas_is_bounded(monkeypatch):
    allocated = []
    real_new = Image.new

    def spy(mode, size, *args, **kwargs):
        allocated.append(size[0] * size[1])
        return real_new(mode, size, *args, **kwargs)

    monkeypatch.setattr(images_module.Image, "new", spy)
    transform = ImageTransform(ImageTransformConfig(size=32, resize_mode="pad"))
    pixels = transform(Image.frombytes("RGB", (20000, 200), b"\x80" * 20000 * 200 * 3))
    assert pixels.shape == (3, 32, 32)
    assert max(allocated) <= images_module.MAX_CANVAS_SIDE**2  # not 20000² (1.2 GB)


def test_nul_bytes_in_paths_and_file_urls(tmp_path):
    access = ImageAccess(allow_local=False, local_root=tmp_path)
    with pytest.raises(ImageError, match="NUL byte"):
        load_image(f"file://{tmp_path}/a%00.png", access=access)
    with pytest.raises(ImageError, match="NUL byte"):
        load_image(f"{tmp_path}/a\x00.png")


def test_over_long_host_labels_are_image_errors():
    access = ImageAccess(allow_remote=True)
    for url in [f"http://{'a' * 100}.example/x.png", "http://a..b/x.png", "http://[::1/x.png"]:
        with pytest.raises(ImageError, match="invalid host name|malformed URL"):
            load_image(url, access=access)


class _Handler(http.server.BaseHTTPRequestHandler):
    png = png_bytes(4, 3)

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/slow":  # headers, then the body at one byte per 0.2 s
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            for byte in self.png:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
            return
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", f"http://rebound.test:{self.server.server_address[1]}/ok")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)


@pytest.fixture
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_download_has_a_total_deadline(web):
    access = ImageAccess(allow_remote=True, allow_private_hosts=True, remote_timeout=1.0)
    start = time.monotonic()
    with pytest.raises(ImageError, match="longer than 1 s"):
        load_image(f"http://127.0.0.1:{web}/slow", access=access)
    assert time.monotonic() - start < 5  # each byte came within the timeout; the whole (14 s) did not


def test_the_connection_goes_to_the_address_that_was_checked(web, monkeypatch):
    """DNS rebinding: the name resolves to a public address when checked, then to loopback. The download
    must connect to the checked address (and so fail here), never ask DNS again."""
    lookups = []
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.test":
            lookups.append(host)
            answer = "93.184.215.14" if len(lookups) == 1 else "127.0.0.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, port))]
        return real(host, port, *args, **kwargs)

    connected = []
    real_connect = socket.create_connection

    def record(address, *args, **kwargs):
        connected.append(address[0])
        raise OSError("unreachable in the test")

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(socket, "create_connection", record)
    with pytest.raises(ImageError, match="download failed"):
        load_image(f"http://rebind.test:{web}/ok", access=ImageAccess(allow_remote=True, remote_timeout=2))
    assert lookups == ["rebind.test"] and connected == ["93.184.215.14"]
    monkeypatch.setattr(socket, "create_connection", real_connect)


def test_redirects_are_checked_again(web, monkeypatch):
    real = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):
        if host == "rebound.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    trusting_first_hop = ImageAccess(allow_remote=True, allow_private_hosts=True, remote_timeout=2)
    assert load_image(f"http://127.0.0.1:{web}/ok", access=trusting_first_hop).size == (4, 3)
    with pytest.raises(ImageError, match="private or loopback address"):
        load_image(f"http://127.0.0.1:{web}/redirect", access=ImageAccess(allow_remote=True, remote_timeout=2))
