"""Generation at a realistic size: a SmolVLM-256M-shaped composite, vlmkit's engine vs transformers' generate().

The model is SmolVLM-256M's shape with random weights built from configs (nothing downloaded): SigLIP-B/16 at
512 px (SmolVLM-256M's vision config: 768 wide, 12 layers, 12 heads, no pooling head) → ``pixel_shuffle4x``
(1,024 patches → 64 tokens per image, one bias-free Linear 12,288 → 576) → a SmolLM2-135M-shaped Llama (30 × 576,
9 heads / 3 KV heads, MLP 1,536, vocabulary 49,152, tied embeddings). Both sides run the same model on the same
prompts: "transformers" is ``generate()`` of the same LM fed the same spliced embeddings (as bench/generate.py),
"vlmkit" is the engine's running batch (``Engine.new_batch``: encode, ``add`` = prefill, ``step`` until done).

Per dtype and batch size: TTFT (prompt encoding + vision + prefill, until the first token is known), decode
tokens/s (first token to last), peak RSS of the run (VmHWM, reset before it), greedy outputs compared token by
token, and decode as a fraction of this machine's memory-bandwidth limit: the LM's weight bytes read per decoding
step ÷ the copy bandwidth measured here (a large tensor copy, read + write bytes, timed between runs so it sees the
same load). Sides alternate, repeats interleaved; medians are reported with the load average. Prints JSON.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import statistics
import sys
import time
import typing
from collections.abc import Callable
from typing import Any

import torch
from common import shapes_images
from generate import PROMPTS, turn
from transformers import LlamaConfig, SiglipVisionConfig
from transformers.generation.streamers import BaseStreamer

import vlmkit
from vlmkit.api import VLM
from vlmkit.inference.engine import Engine
from vlmkit.inference.options import GenerationOptions
from vlmkit.processing.tokenizer_training import train_bpe_tokenizer

VISION: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 512, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    "vision_use_head": False,
}  # fmt: skip
"""SmolVLM-256M's vision tower (google/siglip-base-patch16-512's shape, as Idefics3 uses it: no pooling head)."""

LM: dict[str, Any] = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
}  # fmt: skip
"""SmolLM2-135M's Llama config (as SmolVLM-256M's text model: 8,192 positions, RoPE θ 100,000)."""

SCALE = 4
"""SmolVLM-256M's pixel-shuffle scale factor: 32 × 32 patches → 8 × 8 = 64 tokens per 512-px image."""

TINY_VISION = {**VISION, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
TINY_LM = {**LM, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
"""The same composite at toy width (same image size, patch grid, scale and vocabulary): ``--tiny``, the tests."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(vision: dict[str, Any] = VISION, lm: dict[str, Any] = LM, scale: int = SCALE, seed: int = 0) -> VLM:
    """The composite, fp32, random weights (seeded): tower's last hidden state → pixel_shuffle{scale}x → LM."""
    corpus = ["there is a red circle in the top left and a small blue square in the center"] * 50
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=1000)  # the LM keeps its own 49,152-row vocabulary
    torch.manual_seed(seed)
    model, processor = vlmkit.compose(
        SiglipVisionConfig(**vision), LlamaConfig(**lm), f"pixel_shuffle{scale}x", tokenizer=tokenizer,
        feature_layer=-1,
    )  # fmt: skip
    return VLM(model, processor, name="smolvlm-256m-shaped")


def weight_bytes_per_step(lm: torch.nn.Module, batch: int) -> int:
    """Bytes of LM weights one decoding step reads: every parameter once (a tied embedding is the LM head, read
    whole); an untied input embedding only reads its ``batch`` looked-up rows."""
    embed = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    total = 0
    for param in lm.parameters():  # shared (tied) tensors come once
        if param is embed and embed.data_ptr() != head.data_ptr():
            total += batch * param.shape[1] * param.element_size()
        else:
            total += param.numel() * param.element_size()
    return total


def kv_bytes_per_step(config: Any, batch: int, context: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache one decoding step reads (keys and values of every layer over ``context`` positions)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return per_token * context * batch * torch.empty(0, dtype=dtype).element_size()


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Median bytes/s of a ``nbytes`` tensor copy, counting read + write (STREAM's copy convention)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where Linux's clear_refs is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        found = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    return round(int(found.group(1)) / 1024, 1) if found else float("nan")


class _StepClock(BaseStreamer):
    """A streamer for ``generate()`` that only records when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.puts = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


Run = dict[str, Any]


def run_transformers(vlm: VLM, convs: list[list[dict]], new_tokens: int) -> Run:
    """transformers' ``generate()`` on the same LM fed the same spliced embeddings (left-padded batch)."""
    clock = _StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        batch = vlm.processor(convs, padding_side="left")
        embeds = vlm.model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        out = vlm.model.language_model.generate(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=vlm.processor.pad_token_id,
            streamer=clock,
        )  # fmt: skip
    end = time.perf_counter()
    if len(clock.times) != new_tokens:
        raise RuntimeError(f"generate() streamed {len(clock.times)} tokens, expected {new_tokens}")
    return {"ttft": clock.times[0] - start, "decode": clock.times[-1] - clock.times[0], "total": end - start,
            "tokens": [row.tolist() for row in out], "prompt": int(batch["attention_mask"].shape[1])}  # fmt: skip


def run_vlmkit(vlm: VLM, convs: list[list[dict]], new_tokens: int) -> Run:
    """The engine's running batch: encode, prefill (``add``: the first token's logits), then ``step`` until done."""
    engine = vlm.engine
    options = GenerationOptions(max_new_tokens=new_tokens)
    start = time.perf_counter()
    with torch.inference_mode():
        encoded = [engine.encode(c, f"conversation {i}") for i, c in enumerate(convs)]
        batch = engine.new_batch()
        failed = batch.add([(i, e, options) for i, e in enumerate(encoded)], stream=False)
        first = time.perf_counter()
        if failed:
            raise RuntimeError(f"prefill failed: {failed[0].error}")
        results: dict[Any, list[int]] = {}
        while len(batch):
            for event in batch.step():
                if event.error is not None:
                    raise event.error
                if event.result is not None:
                    results[event.index] = event.result.token_ids
    end = time.perf_counter()
    tokens = [results[i] for i in range(len(convs))]
    prompt = max(len(e.input_ids) for e in encoded)
    return {"ttft": first - start, "decode": end - first, "total": end - start, "tokens": tokens, "prompt": prompt}


def warm_decode(vlm: VLM, rows: int, columns: int) -> None:
    """Decode ``rows`` text-only prompts (no vision: cheap) until the cache is ``columns`` long, untimed: the
    shapes a compiled decode step meets in the timed runs are compiled before them."""
    conv = [{"role": "user", "content": "Describe the image."}]
    prompt = len(vlm.engine.encode(conv).input_ids)
    run_vlmkit(vlm, [conv] * rows, max(2, columns - prompt))


def engine_modes(extra: list[str]) -> dict[str, dict[str, Any]]:
    """vlmkit's engine settings to compare: the default, every value but ``auto`` of an Engine ``decode`` argument
    when the engine has one, and each ``--engine-option NAME=VALUE`` given. The engine's reuse caches are
    off in every mode where it has them: repeats of the same images and prompts would hit them, and transformers'
    side recomputes everything."""
    base: dict[str, Any] = {}
    if "caches" in inspect.signature(Engine.__init__).parameters:
        from vlmkit.inference.caches import CacheConfig

        base["caches"] = CacheConfig.off()
    modes: dict[str, dict[str, Any]] = {"default": dict(base)}
    try:
        hints = typing.get_type_hints(Engine.__init__)
    except Exception:  # an annotation this Python cannot resolve: only the default and the given options
        hints = {}
    decode = hints.get("decode")
    values: tuple[Any, ...] = ()
    if typing.get_origin(decode) is typing.Literal:
        values = typing.get_args(decode)
    elif "decode" in inspect.signature(Engine.__init__).parameters:
        try:
            from vlmkit.inference.compiled import DECODE_MODES

            values = tuple(DECODE_MODES)
        except ImportError:
            values = ()
    for value in values:
        if value != "auto":  # the default already runs what "auto" picks
            modes[f"decode={value}"] = {**base, "decode": value}
    for item in extra:
        name, _, value = item.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        modes[item] = {**base, name: parsed}
    return modes


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure_cell(
    sides: dict[str, Callable[[], Run]], repeats: int, bandwidth_bytes: int
) -> tuple[dict[str, list[Run]], list[float]]:
    """Every side ``repeats`` times, the order rotated each repeat, with a copy-bandwidth reading after each run."""
    runs: dict[str, list[Run]] = {name: [] for name in sides}
    bandwidths: list[float] = []
    names = list(sides)
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # each side first in turn
        for name in order:
            reset_peak_rss()
            run = sides[name]()
            run["peak_rss_mb"] = peak_rss_mb()
            runs[name].append(run)
            bandwidths.append(copy_bandwidth(bandwidth_bytes))
            print(f"  {name}: ttft {run['ttft']:.2f} s, decode {run['decode']:.2f} s", file=sys.stderr, flush=True)
    return runs, bandwidths


def summarise(runs: list[Run], batch: int, new_tokens: int, limit_steps_per_s: float) -> dict[str, Any]:
    decode = median([r["decode"] for r in runs])
    steps_per_s = (new_tokens - 1) / decode if decode > 0 else float("nan")
    return {
        "ttft_s": round(median([r["ttft"] for r in runs]), 3),
        "decode_tokens_per_s": round(batch * steps_per_s, 2),
        "decode_steps_per_s": round(steps_per_s, 3),
        "fraction_of_bandwidth_limit": round(steps_per_s / limit_steps_per_s, 3),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "runs": len(runs),
    }


def compare(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """Greedy outputs side by side: rows identical, and the first differing position of each row that differs."""
    first = []
    for a, b in zip(reference, other, strict=True):
        differ = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
        first.append(differ[0] if differ else (None if len(a) == len(b) else min(len(a), len(b))))
    return {"rows_identical": sum(f is None for f in first), "rows": len(first),
            "first_difference": [f for f in first if f is not None]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side and cell (medians reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bandwidth-mb", type=int, default=256, help="size of the copy that measures bandwidth")
    parser.add_argument("--engine-option", action="append", default=[], metavar="NAME=VALUE",
                        help="also run vlmkit with Engine(model, processor, NAME=VALUE) (repeatable)")  # fmt: skip
    parser.add_argument("--modes", help="only these of vlmkit's engine modes (comma-separated names, as reported)")
    parser.add_argument("--quick", action="store_true", help="a short run: batch 1, 8 new tokens, 1 repeat")
    parser.add_argument("--tiny", action="store_true", help="the same composite at toy width (checks the script)")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.new_tokens, args.repeats = "1", 8, 1
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is measured from the first token to the last)")
    torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    for name in dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    batches = [int(b) for b in args.batches.split(",")]
    modes = engine_modes(args.engine_option)
    if args.modes:
        chosen = [m.strip() for m in args.modes.split(",")]
        unknown = [m for m in chosen if m not in modes]
        if unknown:
            parser.error(f"unknown engine mode(s) {', '.join(unknown)}; this engine has {', '.join(modes)}")
        modes = {m: modes[m] for m in chosen}
    bandwidth_bytes = args.bandwidth_mb << 20

    started = time.time()
    vlm = build(TINY_VISION, TINY_LM) if args.tiny else build()
    vlm.model.language_model.generation_config.eos_token_id = None  # fixed-length generation on both sides
    pics = shapes_images(max(batches))
    lm = vlm.model.language_model
    report: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
        "torch": torch.__version__, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "model": {"shape": "tiny" if args.tiny else "SmolVLM-256M",
            "vision_params": sum(p.numel() for p in vlm.model.vision_tower.parameters()),
            "projector_params": sum(p.numel() for p in vlm.model.projector.parameters()),
            "lm_params": sum(p.numel() for p in lm.parameters()),
            "tokens_per_image": vlm.processor.tokens_per_image,
        },
        "engine_modes": {name: {k: repr(v) for k, v in options.items()} for name, options in modes.items()},
        "bandwidth_convention": "copy of a large fp32 tensor, (read + written bytes) / time, median per run",
        "results": [],
    }  # fmt: skip
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        vlm.model.to(dtype)
        engines = {name: Engine(vlm.model, vlm.processor, **options) for name, options in modes.items()}
        for engine in engines.values():
            engine.stop_ids = set()
        warm = [turn(pics[0], PROMPTS[0])]
        run_transformers(vlm, warm, 2)  # warm-up, not timed: allocator, kernels, lazy imports
        for engine in engines.values():
            run_vlmkit(VLM(vlm.model, vlm.processor, name=vlm.name, engine=engine), warm, 2)
        for size in batches:
            convs = [turn(pics[i % len(pics)], PROMPTS[i % len(PROMPTS)]) for i in range(size)]
            sides: dict[str, Callable[[], Run]] = {
                "transformers": lambda c=convs: run_transformers(vlm, c, args.new_tokens)
            }
            print(f"{dtype_name} batch {size}", file=sys.stderr, flush=True)
            encoder = next(iter(engines.values()))
            columns = max(len(encoder.encode(c).input_ids) for c in convs) + args.new_tokens
            for name, engine in engines.items():
                as_vlm = VLM(vlm.model, vlm.processor, name=vlm.name, engine=engine)
                warm_decode(as_vlm, size, columns)
                sides[f"vlmkit:{name}"] = lambda c=convs, v=as_vlm: run_vlmkit(v, c, args.new_tokens)
            runs, bandwidths = measure_cell(sides, args.repeats, bandwidth_bytes)
            bandwidth = median(bandwidths)
            weights = weight_bytes_per_step(lm, size)
            prompt = runs["transformers"][0]["prompt"]
            kv = kv_bytes_per_step(lm.config, size, prompt + args.new_tokens // 2, dtype)
            limit = bandwidth / weights  # decoding steps per second if reading the weights were all a step did
            cell: dict[str, Any] = {
                "dtype": dtype_name, "batch": size, "prompt_tokens": prompt,
                "weight_bytes_per_step": weights, "kv_bytes_per_step_mean": kv,
                "copy_bandwidth_gb_per_s": round(bandwidth / 1e9, 2),
                "bandwidth_limit_steps_per_s": round(limit, 2),
                "bandwidth_limit_tokens_per_s": round(limit * size, 1),
                "load_average": [round(x, 2) for x in os.getloadavg()],
            }  # fmt: skip
            reference = runs["transformers"][-1]["tokens"]
            for name, side_runs in runs.items():
                cell[name] = summarise(side_runs, size, args.new_tokens, limit)
                if name != "transformers":
                    cell[name]["outputs_vs_transformers"] = compare(reference, side_runs[-1]["tokens"])
                    ref = cell["transformers"]
                    cell[name]["decode_speedup"] = round(
                        cell[name]["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 2
                    )
                    cell[name]["ttft_ratio"] = round(cell[name]["ttft_s"] / ref["ttft_s"], 2)
            report["results"].append(cell)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.time() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
