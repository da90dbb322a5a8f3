"""Peak memory of a training stage over a large dataset: streaming (``streaming: true``) vs encoding every sample
first (``streaming: false``), side by side in one run on the same generated files.

Writes ``--records`` caption records (64 px PNGs, captions of 20-60 words) as webdataset shards and as a parquet
file, then trains each one with the built-in ``tiny-random`` model for ``--steps`` steps, once per mode, each in
a fresh process; prints JSON: peak RSS (``ru_maxrss``), RSS after imports, seconds to the first step and in all.

    python bench/stream_memory.py [--records 50000] [--steps 20] [--batch-size 8] [--formats wds,parquet]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_VOCABULARY = (
    "red green blue yellow purple orange circle square triangle star small large top bottom left right center near "
    "beside above below the a of and with two three one word cat dog sun"
)
WORDS = _VOCABULARY.split()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def write_data(root: Path, records: int, formats: list[str]) -> dict[str, str]:
    from PIL import Image

    from vlmkit.data.formats import Record, open_writer

    rng = random.Random(0)
    pngs = []
    for k in range(16):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (16 * k, 255 - 16 * k, 128)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    paths = {}
    for fmt in formats:
        options = {"shard_size": 1000} if fmt == "wds" else {}
        with open_writer(root / fmt, fmt, "train", **options) as writer:
            rng.seed(0)
            for i in range(records):
                caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
                messages = [{"role": "user", "content": "<image>\nDescribe the image."},
                            {"role": "assistant", "content": caption}]  # fmt: skip
                writer.write(Record(f"r{i:07d}", messages, [pngs[i % 16]]))
        paths[fmt] = str(writer.path)
    return paths


def child(path: str, streaming: bool, steps: int, batch_size: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from vlmkit.training import train

    after_imports = _rss_mb()
    started = time.perf_counter()
    first: list[float] = []

    def on_record(record: dict) -> None:
        if record.get("event") == "step" and not first:
            first.append(time.perf_counter() - started)

    stage = {"name": "align", "data": [{"path": path}], "steps": steps, "batch_size": batch_size,
             "streaming": streaming, "lr": 1e-3, "warmup_steps": 1}  # fmt: skip
    config = {"model": {"checkpoint": "tiny-random"}, "stages": [stage], "output_dir": out, "save_every": None,
              "keep_last": 1, "progress": False}  # fmt: skip
    result = train(config, callbacks=[on_record])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": round(peak, 1), "rss_after_imports_mb": round(after_imports, 1),
                      "first_step_s": round(first[0], 2), "total_s": round(time.perf_counter() - started, 2),
                      "steps": result.global_step, "samples": result.stages[0].samples}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--formats", default="wds,parquet")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "STREAMING", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, streaming, out = args.child
        child(path, streaming == "1", args.steps, args.batch_size, out)
        return
    formats = args.formats.split(",")
    root = Path(tempfile.mkdtemp(prefix="stream-memory-"))
    try:
        started = time.perf_counter()
        paths = write_data(root, args.records, formats)
        written = time.perf_counter() - started
        results: dict[str, dict[str, dict]] = {}
        for fmt, path in paths.items():
            results[fmt] = {}
            for streaming in (False, True):
                command = [sys.executable, __file__, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                           "--child", path, str(int(streaming)), str(root / f"run-{fmt}-{int(streaming)}")]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
                if done.returncode:
                    raise SystemExit(done.stderr[-3000:])
                mode = "streaming" if streaming else "in_memory"
                results[fmt][mode] = json.loads(done.stdout.strip().splitlines()[-1])
            in_memory, stream = results[fmt]["in_memory"], results[fmt]["streaming"]
            results[fmt]["peak_rss_saved_mb"] = round(in_memory["peak_rss_mb"] - stream["peak_rss_mb"], 1)
            results[fmt]["data_rss_mb"] = {  # peak minus what the process held after its imports
                mode: round(results[fmt][mode]["peak_rss_mb"] - results[fmt][mode]["rss_after_imports_mb"], 1)
                for mode in ("in_memory", "streaming")
            }
        sizes = {fmt: sum(p.stat().st_size for p in (root / fmt).iterdir()) / 2**20 for fmt in formats}
        print(json.dumps({
            "records": args.records, "steps": args.steps, "batch_size": args.batch_size, "model": "tiny-random",
            "dataset_mb": {k: round(v, 1) for k, v in sizes.items()}, "write_s": round(written, 1),
            "machine": platform.machine(), "python": platform.python_version(), "results": results,
        }, indent=2))  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
