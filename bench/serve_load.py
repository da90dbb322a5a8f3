"""Server load test: 1, 8, 32 and 64 concurrent streaming clients on loopback, each for a bounded time.

Prints JSON: per concurrency level the errors (must be 0), p50/p99 time to first token and aggregate tokens/s, plus
the ratio of aggregate tokens/s at the highest level to one client's. Every request asks for a fixed number of
tokens (the model's stop tokens are disabled), with a ShapesWorld image as a data URL. Half the clients share one
image and a system prompt (their questions vary); every request of the other half sends an image no other request
sends. The highest level runs again with the engine's caches off (``caches_off``), and the caches' figures of the
run are reported. ``--rounds N`` runs the levels N times in turn (1, 8, 32, 64, 1, 8, ...) and reports each level's
median, so that a drift in the machine's speed falls on every level alike. ``--engine-alone`` first times the engine
without the server (one ``generate()`` batch at the lowest and the highest level): the ceiling the server's batching
works under. The clients run in a process of their own, as a load generator on another machine would
(``--clients-in-process``: in the server's process, sharing its interpreter).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import multiprocessing
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import torch
import uvicorn
from common import bench_model, shapes_images

from vlmkit.serving.server import ServerSettings, create_app


def image_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def client(url: str, bodies, until: float, stats: dict) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        while time.perf_counter() < until:
            body = next(bodies)
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


def bodies_for(client_index: int, shared: dict, unique) -> Iterator[dict]:
    """Even clients: the shared image and system prompt, questions in turn; odd ones: an image of their own each
    request."""
    if client_index % 2 == 0:
        return (body(shared["image"], QUESTIONS[i % len(QUESTIONS)], SYSTEM) for i in itertools.count(client_index))
    return (body(next(unique), QUESTIONS[client_index % len(QUESTIONS)], None) for _ in itertools.count())


async def level(url: str, shared: dict, unique, clients: int, seconds: float) -> dict:
    stats = {"errors": 0, "tokens": 0, "requests": 0, "ttft": []}
    start = time.perf_counter()
    await asyncio.gather(*(client(url, bodies_for(i, shared, unique), start + seconds, stats)
                           for i in range(clients)))  # fmt: skip
    elapsed = time.perf_counter() - start
    ttft = sorted(stats["ttft"]) or [float("nan")]
    p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
    return {
        "clients": clients, "requests": stats["requests"], "errors": stats["errors"],
        "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p99_s": round(p99, 3),
        "tokens_per_s": round(stats["tokens"] / elapsed, 1), "seconds": round(elapsed, 1),
    }  # fmt: skip


SYSTEM = "You are a careful assistant that describes pictures of shapes. Answer briefly and precisely."
QUESTIONS = ["Describe it.", "What colour is the large shape?", "How many objects are there?",
             "Where is the red circle?"]  # fmt: skip
MAX_TOKENS = 32


def body(url: str, question: str, system: str | None) -> dict:
    picture = {"type": "image_url", "image_url": {"url": url}}
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [picture, {"type": "text", "text": question}]})
    return {"model": "bench", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "messages": messages}  # fmt: skip


def unique_images(base, start: int = 0) -> Iterator[str]:
    """Data URLs of ``base`` with its two top-left pixels set to a 48-bit count (from ``start`` on): no two alike."""
    for i in itertools.count(start):
        image = base.copy()
        for x, value in enumerate((i & 0xFFFFFF, i >> 24)):
            image.putpixel((x, 0), (value & 255, (value >> 8) & 255, (value >> 16) & 255))
        yield image_url(image)


def combine(rounds: list[dict]) -> dict:
    """One level's figures over its rounds: median tokens/s and p50 TTFT, the worst p99, requests and errors
    summed, each round's tokens/s kept."""
    return {
        "clients": rounds[0]["clients"], "requests": sum(r["requests"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in rounds),
        "ttft_p99_s": max(r["ttft_p99_s"] for r in rounds),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rounds), 1),
        "tokens_per_s_rounds": [r["tokens_per_s"] for r in rounds],
        "seconds": round(sum(r["seconds"] for r in rounds), 1),
    }  # fmt: skip


def run_clients(url: str, shared: dict, base, start: int, clients: int, seconds: float) -> dict:
    """:func:`level` with its own event loop and unique images from ``start`` (picklable: a child process runs it)."""
    return asyncio.run(level(url, shared, unique_images(base, start), clients, seconds))


def run_level(url: str, shared: dict, base, start: int, clients: int, seconds: float, apart: bool) -> dict:
    """One concurrency level; ``apart``: the clients run in a child process, so that they do not share the
    server's interpreter (its GIL) as a real load does not."""
    if not apart:
        return run_clients(url, shared, base, start, clients, seconds)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_clients, (url, shared, base, start, clients, seconds))


def engine_alone(vlm, pictures, levels: list[int]) -> dict:
    """The engine without the server: one ``generate()`` batch of ``n`` prompts (distinct images, caches off),
    tokens/s at the lowest and the highest level: the ceiling the server's batching works under."""
    from vlmkit.inference.options import GenerationOptions

    before = vlm.engine.cache_config
    vlm.configure_caches(image_cache_mb=0, prefix_cache_mb=0)
    out = {}
    for n in (levels[0], levels[-1]):
        convs = [[{"role": "user", "content": [{"type": "image", "image": pictures[i % len(pictures)]},
                                               {"type": "text", "text": QUESTIONS[0]}]}] for i in range(n)]  # fmt: skip
        start = time.perf_counter()
        vlm.engine.generate(convs, GenerationOptions(max_new_tokens=MAX_TOKENS))
        out[f"batch_{n}_tokens_per_s"] = round(n * MAX_TOKENS / (time.perf_counter() - start), 1)
    vlm.engine.configure_caches(before)  # as they were, empty
    return out


def main() -> None:
    global MAX_TOKENS
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a vlmkit checkpoint (default: the random bench model)")
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=20.0, help="time per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--no-compare", action="store_true", help="skip the caches-off run of the highest level")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--decode", choices=("auto", "compiled", "eager"), default="auto",
                        help="the engine's decoding steps (as `vlmkit serve --decode`)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="run all the levels this many times in turn")
    parser.add_argument("--warmup-seconds", type=float, default=0.0,
                        help="an untimed run of each level first (compiles the decode step's shapes)")  # fmt: skip
    parser.add_argument("--clients-in-process", action="store_true",
                        help="run the clients in the server's process (default: a process of their own)")  # fmt: skip
    parser.add_argument("--engine-alone", action="store_true",
                        help="also time the engine without the server at the lowest and highest level")  # fmt: skip
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    MAX_TOKENS = args.max_tokens
    vlm = bench_model(args.model)
    vlm.engine.stop_ids = set()
    vlm.engine.set_decode(args.decode)
    levels = [int(n) for n in args.levels.split(",")]
    alone = engine_alone(vlm, shapes_images(levels[-1]), levels) if args.engine_alone else None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServerSettings(model_name="bench", max_batch=max(64, max(levels)))
    server = uvicorn.Server(uvicorn.Config(create_app(vlm, settings), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    pictures = shapes_images(2)
    shared = {"image": image_url(pictures[0])}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    apart = not args.clients_in_process
    # each run's unique images start where no other run's could reach (a million requests apart)
    rounds: list[list[dict]] = [[] for _ in levels]
    for r in range(args.rounds):
        for k, n in enumerate(levels):
            offset = (r * len(levels) + k) << 20
            if args.warmup_seconds:  # its own images (half-way), so the timed run does not hit them
                run_level(url, shared, pictures[1], offset + (1 << 19), n, args.warmup_seconds, apart)
            rounds[k].append(run_level(url, shared, pictures[1], offset, n, args.seconds, apart))
    results = [combine(level_rounds) for level_rounds in rounds]
    report = {"model": vlm.name, "max_tokens": args.max_tokens, "threads": torch.get_num_threads(),
              "clients_in_process": args.clients_in_process, "decode": args.decode,
              "warmup_seconds": args.warmup_seconds, "rounds": args.rounds, "levels": results,
              "scaling": round(results[-1]["tokens_per_s"] / results[0]["tokens_per_s"], 2),
              "scaling_rounds": [round(top["tokens_per_s"] / one["tokens_per_s"], 2)
                                 for one, top in zip(rounds[0], rounds[-1], strict=True)],
              "caches": vlm.cache_stats()}  # fmt: skip
    if not args.no_compare:
        vlm.configure_caches(image_cache_mb=0, prefix_cache_mb=0)  # between levels: nothing in flight
        off = run_level(url, shared, pictures[1].transpose(0), 0, levels[-1], args.seconds, apart)
        report["caches_off"] = {**off, "scaling": round(off["tokens_per_s"] / results[0]["tokens_per_s"], 2)}
        results = [*results, off]
    if alone is not None:
        report["engine_alone"] = alone
    report["errors"] = sum(r["errors"] for r in results)
    server.should_exit = True
    thread.join(10)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
