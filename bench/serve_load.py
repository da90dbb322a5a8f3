"""Server load test: 1, 8 and 32 concurrent streaming clients on loopback, each for a bounded time.

Prints JSON: per concurrency level the errors (must be 0), p50/p99 time to first token and aggregate tokens/s,
plus the ratio of aggregate tokens/s at the highest level to one client's. Every request asks for a fixed number
of tokens (the model's stop tokens are disabled), with a ShapesWorld image as a data URL.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import statistics
import threading
import time

import httpx
import uvicorn
from common import bench_model, shapes_images

from vlmkit.serving.server import ServerSettings, create_app


def image_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def client(url: str, body: dict, until: float, stats: dict) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        while time.perf_counter() < until:
            start = time.perf_counter()
            first = None
            try:
                async with http.stream("POST", url, json=body) as response:
                    if response.status_code != 200:
                        stats["errors"] += 1
                        await response.aread()
                        continue
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            stats["errors"] += 1
                        if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - start
                        if chunk.get("usage"):
                            stats["tokens"] += chunk["usage"]["completion_tokens"]
            except httpx.HTTPError:
                stats["errors"] += 1
                continue
            stats["requests"] += 1
            if first is not None:
                stats["ttft"].append(first)


async def level(url: str, body: dict, clients: int, seconds: float) -> dict:
    stats = {"errors": 0, "tokens": 0, "requests": 0, "ttft": []}
    start = time.perf_counter()
    await asyncio.gather(*(client(url, body, start + seconds, stats) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    ttft = sorted(stats["ttft"]) or [float("nan")]
    p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
    return {
        "clients": clients, "requests": stats["requests"], "errors": stats["errors"],
        "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p99_s": round(p99, 3),
        "tokens_per_s": round(stats["tokens"] / elapsed, 1), "seconds": round(elapsed, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a vlmkit checkpoint (default: the random bench model)")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=20.0, help="time per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    vlm = bench_model(args.model)
    vlm.engine.stop_ids = set()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(vlm, ServerSettings(model_name="bench", max_batch=64)),
                                           host="127.0.0.1", port=port, log_level="error"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    picture = {"type": "image_url", "image_url": {"url": image_url(shapes_images(1)[0])}}
    body = {"model": "bench", "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [picture, {"type": "text", "text": "Describe it."}]}]}  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results = [asyncio.run(level(url, body, int(n), args.seconds)) for n in args.levels.split(",")]
    server.should_exit = True
    thread.join(10)
    report = {"model": vlm.name, "max_tokens": args.max_tokens, "levels": results,
              "scaling": round(results[-1]["tokens_per_s"] / results[0]["tokens_per_s"], 2),
              "errors": sum(r["errors"] for r in results)}  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
