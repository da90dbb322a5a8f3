"""bench/serve_load.py's bookkeeping: per-request unique images and the figures combined over rounds. No timings
are asserted."""

from __future__ import annotations

import base64
import io

from PIL import Image

BENCH_MODULE = "serve_load"
"""The bench/ script the shared ``bench`` fixture imports."""


def decode(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def test_unique_images_differ_past_24_bits(bench):
    base = Image.new("RGB", (8, 8), (10, 20, 30))
    # counts 2**24 apart: a 24-bit counter would give them the same pixels
    first = decode(next(bench.unique_images(base, 5)))
    far = decode(next(bench.unique_images(base, 5 + (1 << 24))))
    assert first.getpixel((0, 0)) == far.getpixel((0, 0)) == (5, 0, 0)
    assert (first.getpixel((1, 0)), far.getpixel((1, 0))) == ((0, 0, 0), (1, 0, 0))
    assert first.getpixel((2, 0)) == far.getpixel((2, 0)) == (10, 20, 30)  # the rest of the image is the base's
    stream = bench.unique_images(base, 255)
    assert decode(next(stream)).getpixel((0, 0)) == (255, 0, 0)
    assert decode(next(stream)).getpixel((0, 0)) == (0, 1, 0)


def test_combine_takes_medians_and_the_worst_tail(bench):
    rounds = [
        {"clients": 64, "requests": 10, "errors": 0, "ttft_p50_s": 0.5, "ttft_p99_s": 2.0, "tokens_per_s": 900.0,
         "seconds": 20.0},
        {"clients": 64, "requests": 12, "errors": 1, "ttft_p50_s": 0.4, "ttft_p99_s": 3.5, "tokens_per_s": 1100.0,
         "seconds": 20.1},
        {"clients": 64, "requests": 11, "errors": 0, "ttft_p50_s": 0.7, "ttft_p99_s": 2.5, "tokens_per_s": 1000.0,
         "seconds": 20.0},
    ]  # fmt: skip
    assert bench.combine(rounds) == {
        "clients": 64, "requests": 33, "errors": 1, "ttft_p50_s": 0.5, "ttft_p99_s": 3.5, "tokens_per_s": 1000.0,
        "tokens_per_s_rounds": [900.0, 1100.0, 1000.0], "seconds": 60.1,
    }  # fmt: skip
