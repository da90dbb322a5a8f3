import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.errors import ImageError
from vlmkit.processing.images import ImageAccess, ImageTransform, ImageTransformConfig, load_image


def png_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_sources_path_bytes_pil_data_url(tmp_path):
    image = Image.new("RGB", (7, 5), (10, 20, 30))
    path = tmp_path / "a.png"
    image.save(path)
    data = png_bytes(image)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (path, str(path), f"file://{path}", data, image, url):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (7, 5)
        assert loaded.getpixel((3, 2)) == (10, 20, 30)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png.*not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)


def test_non_image_and_corrupt(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not an image")
    with pytest.raises(ImageError, match=r"notes\.txt.*not an image"):
        load_image(text)
    with pytest.raises(ImageError, match="bytes"):
        load_image(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = png_bytes(image, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=rf"cut\.{fmt.lower()}.*(truncated|corrupt|cannot be read)"):
        load_image(path)


def test_pixel_limit_decompression_bomb(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    with pytest.raises(ImageError, match=r"big\.png.*20,000 pixels.*over the 10,000-pixel limit.*bomb"):
        load_image(path, max_pixels=10_000)
    assert load_image(path, max_pixels=20_000).size == (200, 100)
    assert load_image(path, max_pixels=None).size == (200, 100)


def test_pil_bomb_guard_is_a_vlmkit_error():
    # A PNG header claiming 30000 x 30000 pixels: Pillow's own guard fires before our limit is consulted.
    header = Image.new("1", (30000, 30000))
    data = png_bytes(header, optimize=True)
    with pytest.raises(ImageError, match="too large|limit|bomb"):
        load_image(data)


def test_data_url_errors():
    with pytest.raises(ImageError, match="invalid base64"):
        load_image("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(ImageError, match="media type 'text/plain'"):
        load_image("data:text/plain;base64," + base64.b64encode(b"hi").decode())
    with pytest.raises(ImageError, match="not a base64 data URL"):
        load_image("data:image/png,rawdata")
    with pytest.raises(ImageError, match="not an image"):
        load_image("data:image/png;base64," + base64.b64encode(b"plain text").decode())


def test_remote_refused_by_default():
    with pytest.raises(ImageError, match="remote .* disabled"):
        load_image("https://example.com/cat.png")


def test_exif_orientation_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    loaded = load_image(png_bytes(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert loaded.size == (20, 40)
    r, _g, b = loaded.getpixel((10, 3))  # the left stripe is now at the top
    assert b > 200 and r < 60


def test_modes_converted_to_rgb():
    gray = Image.new("L", (4, 4), 128)
    assert load_image(gray).getpixel((0, 0)) == (128, 128, 128)
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(png_bytes(transparent)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert load_image(png_bytes(palette)).getpixel((0, 0)) == (0, 255, 0)
    palette.info["transparency"] = 1
    assert load_image(png_bytes(palette, transparency=1)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert load_image(png_bytes(cmyk, "JPEG")).getpixel((0, 0))[0] > 200
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    assert load_image(png_bytes(deep)).getpixel((0, 0)) == (255, 255, 255)
    mid = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))
    assert load_image(mid).getpixel((0, 0)) == (128, 128, 128)


def test_transform_pad_resize_normalise():
    config = ImageTransformConfig(size=8, resize_mode="pad", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    wide = Image.new("RGB", (16, 8), (255, 255, 255))
    out = ImageTransform(config)(wide)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    # middle rows are the image (white → +1), top and bottom rows the mean-colour padding (≈ 0)
    assert torch.allclose(out[:, 4, 4], torch.ones(3))
    assert out[:, 0, 4].abs().max() < 0.05
    stretched = ImageTransform(ImageTransformConfig(size=8, resize_mode="resize", mean=(0.5,) * 3, std=(0.5,) * 3))(
        wide
    )
    assert torch.allclose(stretched, torch.ones(3, 8, 8))


def test_access_policy_local_and_file_urls(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    Image.new("RGB", (3, 3)).save(media / "ok.png")
    Image.new("RGB", (3, 3)).save(tmp_path / "secret.png")
    server = ImageAccess(allow_local=False, local_root=media)
    assert load_image(f"file://{media / 'ok.png'}", access=server).size == (3, 3)
    with pytest.raises(ImageError, match="outside the allowed media folder"):
        load_image(f"file://{tmp_path / 'secret.png'}", access=server)
    with pytest.raises(ImageError, match="outside the allowed media folder"):
        load_image(f"file://{media}/../secret.png", access=server)
    with pytest.raises(ImageError, match="local paths are not allowed"):
        load_image(str(media / "ok.png"), access=server)
    with pytest.raises(ImageError, match="file:// URLs are disabled"):
        load_image(f"file://{media / 'ok.png'}", access=ImageAccess(allow_local=False))
    with pytest.raises(ImageError, match="unsupported URL scheme"):
        load_image("ftp://example.com/a.png")


def test_remote_private_hosts_refused_and_fetch_works_when_allowed(tmp_path):
    import functools
    import http.server
    import threading

    Image.new("RGB", (5, 4), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(ImageError, match="private or loopback address; refused"):
            load_image(f"{base}/a.png", access=ImageAccess(allow_remote=True))
        trusting = ImageAccess(allow_remote=True, allow_private_hosts=True, remote_max_bytes=4000)
        assert load_image(f"{base}/a.png", access=trusting).getpixel((0, 0)) == (1, 2, 3)
        with pytest.raises(ImageError, match="over the 4,000-byte limit"):
            load_image(f"{base}/big.bin", access=trusting)
        with pytest.raises(ImageError, match="download failed"):
            load_image(f"{base}/missing.png", access=trusting)
    finally:
        httpd.shutdown()
