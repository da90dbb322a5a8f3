"""Matrix-vector read rates: how fast one decoding step's kind of matmul (one row of activations against a weight
matrix too large for the caches) streams its weights, against the machine's copy bandwidth.

Prints JSON. For the SmolVLM-256M-shaped LM of ``bench/realistic.py`` (576 wide, MLP 1,536, vocabulary 49,152):
its 30 layers' MLP projections stacked (so that they do not fit in the caches, as in a real step) and its LM head,
in fp32 and bf16, each as ATen's eager ``linear`` and as the compiled decode step compiles it (inductor with
:data:`vlmkit.inference.compiled.CPU_OPTIONS` on CPU). Reported: milliseconds, weight bytes read per second, and
that rate as a fraction of the copy bandwidth (read + written bytes, the convention of ``bench/realistic.py``'s
limit) and of a plain read (``sum``). A fraction well under the read's says the matmul is bound by its arithmetic
(on a CPU without bf16 instructions, converting bf16 to fp32), not by memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
from realistic import copy_bandwidth
from torch._inductor import config as inductor_config

from vlmkit.inference.compiled import CPU_OPTIONS

SHAPES = {"mlp_stack": (30 * 1536, 576), "lm_head": (49152, 576)}
"""(output rows, input width) of each weight matrix measured."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Median bytes/s of summing a ``nbytes`` fp32 tensor (read only)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / timed(lambda: src.sum(), repeats)


def measure(rows: int, width: int, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    layer = torch.nn.Linear(width, rows, bias=False).to(dtype).eval()
    x = torch.randn(1, width, dtype=dtype)
    nbytes = rows * width * layer.weight.element_size()
    out: dict[str, Any] = {"weight_bytes": nbytes}
    with torch.inference_mode():
        eager = timed(lambda: layer(x), repeats)
        with inductor_config.patch(CPU_OPTIONS):
            compiled = torch.compile(layer, fullgraph=True, dynamic=False)
            compiled(x)
        fast = timed(lambda: compiled(x), repeats)
    for name, seconds in (("eager", eager), ("compiled", fast)):
        out[name] = {"ms": round(seconds * 1e3, 3), "read_gb_per_s": round(nbytes / seconds / 1e9, 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = 256 << 20
    copy, read = copy_bandwidth(size), read_bandwidth(size)
    report: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_average": os.getloadavg()[0],
        "copy_bandwidth_gb_per_s": round(copy / 1e9, 2), "read_bandwidth_gb_per_s": round(read / 1e9, 2),
        "results": [],
    }  # fmt: skip
    for dtype_name in args.dtypes.split(","):
        for shape_name, (rows, width) in SHAPES.items():
            cell = {"dtype": dtype_name, "matrix": shape_name, "rows": rows, "width": width,
                    **measure(rows, width, DTYPES[dtype_name], args.repeats)}  # fmt: skip
            for side in ("eager", "compiled"):
                rate = cell[side]["read_gb_per_s"] * 1e9
                cell[side]["of_copy"] = round(rate / copy, 2)
                cell[side]["of_read"] = round(rate / read, 2)
            report["results"].append(cell)
            print(dtype_name, shape_name, cell["eager"], cell["compiled"], file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
