"""Benchmark ShapesWorld generation: samples/s, projected time for 100,000 samples, peak memory.

Generates ``--n`` train samples (default 5,000) with ``--workers`` processes (default 2) straight into a dataset
of ``--format`` in a temporary folder, and prints one JSON object. ``--full`` runs the whole 100,000. Memory is
sampled along the way (``rss_mb_during``) to show it stays flat while the dataset grows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from vlmkit.data.synth import SynthConfig, write_synthetic

TARGET = 100_000


def _rss_mb() -> float:
    """Current resident memory of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--format", default="wds", choices=("llava", "jsonl", "wds", "hf"))
    parser.add_argument("--full", action="store_true", help=f"generate all {TARGET:,} samples")
    args = parser.parse_args(argv)
    n = TARGET if args.full else args.n

    out = Path(tempfile.mkdtemp(prefix="shapes-bench-"))
    done = 0
    checkpoints: dict[str, float] = {}

    def progress(k: int) -> None:
        nonlocal done
        done += k
        if done % max(1, n // 5) == 0:
            checkpoints[str(done)] = round(_rss_mb(), 1)

    try:
        start = time.perf_counter()
        write_synthetic(out, SynthConfig("train"), n, args.format, workers=args.workers, progress=progress)
        seconds = time.perf_counter() - start
        size = _folder_bytes(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    rate = n / seconds
    result = {
        "n": n,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "format": args.format,
        "seconds": round(seconds, 2),
        "samples_per_s": round(rate, 1),
        "projected_100k_s": round(TARGET / rate, 1),
        "projected_100k_min": round(TARGET / rate / 60, 2),
        "under_10_min": TARGET / rate < 600,
        "peak_rss_mb_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mb_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "rss_mb_during": checkpoints,
        "bytes_per_sample": round(size / n),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
