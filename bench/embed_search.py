"""Embedding benchmarks (docs/embeddings.md), one JSON object on stdout:

- ``search``: an index of 100,000 random unit 512-d vectors built through vlmkit's index (rows + FAISS), then
  single queries (k=10, text-style: one vector each): p50 / p99 latency in ms, against the 50 ms target;
- ``throughput``: images/s embedding the same PNG files with ``vlmkit embed`` (batched, decoding one batch ahead
  in a thread, index writes included) and with a plain transformers loop (``PIL.Image.open`` → processor →
  ``get_image_features``, one image at a time), side by side on the same model (default: the built-in
  ``clip-shapes``), plus the same plain loop batched, for reference.

    OMP_NUM_THREADS=2 python bench/embed_search.py [--n 100000] [--images 512] [--model clip-shapes]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def bench_search(n: int, dim: int, queries: int, folder: Path) -> dict:
    from vlmkit.embeddings.index import EmbeddingIndex, writing

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with writing(folder, "random", dim) as index:
        for first in range(0, n, 10_000):
            block = rng.standard_normal((min(10_000, n - first), dim)).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            index.append([({"path": f"/bench/{first + i:06d}.png", "image": f"{first + i:06d}.png", "sha256": "",
                            "size": 0, "mtime_ns": 0}, v) for i, v in enumerate(block)])  # fmt: skip
    build = time.perf_counter() - start
    start = time.perf_counter()
    opened = EmbeddingIndex.open(folder)
    load = time.perf_counter() - start
    probe = rng.standard_normal((queries, dim)).astype(np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    opened.search(probe[:5], 10)  # warm-up
    times = []
    for query in probe:
        tick = time.perf_counter()
        hits = opened.search(query[None], 10)[0]
        times.append((time.perf_counter() - tick) * 1000)
    assert len(hits) == 10
    return {"vectors": n, "dim": dim, "queries": queries, "k": 10, "p50_ms": round(float(np.percentile(times, 50)), 2),
            "p99_ms": round(float(np.percentile(times, 99)), 2), "build_s": round(build, 1), "open_s": round(load, 2),
            "target_ms": 50}  # fmt: skip


def bench_throughput(model: str, count: int, folder: Path, batch_size: int) -> dict:
    from PIL import Image

    from vlmkit.data.shapes import render_scene, sample_scene
    from vlmkit.embeddings.embed import embed
    from vlmkit.embeddings.encoder import load_encoder

    images = folder / "images"
    images.mkdir()
    for i in range(count):
        render_scene(sample_scene("val", 5, i)).save(images / f"{i:05d}.png")
    paths = sorted(images.iterdir())
    encoder = load_encoder(model, device="cpu", dtype="fp32")
    hf_model, processor = encoder.model, encoder.image_processor
    with torch.inference_mode():  # warm-up of both paths
        hf_model.get_image_features(**processor(images=[Image.open(paths[0]).convert("RGB")], return_tensors="pt"))

    start = time.perf_counter()
    summary = embed([images], folder / "index", model=encoder, batch_size=batch_size, progress=False)
    vlmkit_s = time.perf_counter() - start
    assert summary.embedded == count

    start = time.perf_counter()
    plain = []
    with torch.inference_mode():
        for path in paths:
            inputs = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")
            out = hf_model.get_image_features(**inputs)
            plain.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
    loop_s = time.perf_counter() - start

    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, count, batch_size):
            batch = [Image.open(p).convert("RGB") for p in paths[first : first + batch_size]]
            hf_model.get_image_features(**processor(images=batch, return_tensors="pt"))
    batched_s = time.perf_counter() - start

    from vlmkit.embeddings.index import EmbeddingIndex

    index = EmbeddingIndex.open(folder / "index")
    ours = index.vectors.reconstruct_n(0, count)
    theirs = torch.nn.functional.normalize(torch.cat(plain).float(), dim=-1).numpy()
    return {"model": model, "images": count, "batch_size": batch_size,
            "vlmkit_embed_images_per_s": round(count / vlmkit_s, 1),
            "plain_loop_images_per_s": round(count / loop_s, 1),
            "plain_batched_images_per_s": round(count / batched_s, 1),
            "speedup_vs_plain_loop": round(loop_s / vlmkit_s, 2),
            "max_abs_difference": float(np.abs(ours - theirs).max())}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="clip-shapes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"threads": torch.get_num_threads(),
                  "search": bench_search(args.n, args.dim, args.queries, Path(tmp) / "search"),
                  "throughput": bench_throughput(args.model, args.images, Path(tmp), args.batch_size)}  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
