"""Generation speed: vlmkit's engine vs transformers' own generate() on the identical model and prompts.

Prints JSON. Greedy, fixed length (no early stop), outputs compared token by token; vlmkit's engine both with
eager decoding (transformers' DynamicCache) and with the compiled decode step (static KV cache, torch.compile),
the compile (the first call at each batch size) timed apart and excluded. Wall-clock seconds and this process's
CPU seconds are both reported (the CPU figures hold on a shared machine), and the CPU time of one decoding step
(a 1-token run subtracted). The engine's image and prefix caches are off unless --reuse-caches. Also times `describe`
(batched) against the per-image loop of seed 000 (one image at a time through generate(), cache cleared after
each). The model is a random-weight SigLIP + Llama composite sized like the built-in model, unless --model names
a vlmkit checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from common import bench_model, shapes_images
from PIL import Image

from vlmkit.api import VLM
from vlmkit.inference.describe import describe
from vlmkit.inference.options import GenerationOptions

PROMPTS = ["Describe the image.", "What colour is the large shape?", "How many objects are there?",
           "Where is the red circle?", "Is there a blue square in the image?", "What word is written?"]  # fmt: skip


def turn(image, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]


def conversations(n: int, pics: list[Image.Image]) -> list[list[dict]]:
    return [turn(pics[i % len(pics)], PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def hf_generate(vlm: VLM, convs: list[list[dict]], new_tokens: int) -> list[list[int]]:
    """transformers' generate() on the same LM, fed the same spliced embeddings (left-padded batch)."""
    batch = vlm.processor(convs, padding_side="left")
    with torch.inference_mode():
        embeds = vlm.model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        out = vlm.model.language_model.generate(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=vlm.processor.pad_token_id,
        )  # fmt: skip
    return [row.tolist() for row in out]


def vlmkit_generate(vlm: VLM, convs: list[list[dict]], new_tokens: int, decode: str = "eager") -> list[list[int]]:
    vlm.engine.set_decode(decode)
    results = vlm.engine.generate(convs, GenerationOptions(max_new_tokens=new_tokens))
    return [r.token_ids for r in results]


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Best wall and CPU seconds of ``repeats`` calls after a warm-up call."""
    fn()  # warm-up
    best, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu)
    return best, best_cpu, result


def per_image_loop(vlm: VLM, paths: list[Path], prompt: str, new_tokens: int) -> list[list[int]]:
    """Seed 000's loop: one image at a time through generate(), memory cleared after each."""
    outputs = []
    for path in paths:
        outputs += hf_generate(vlm, [turn(str(path), prompt)], new_tokens)
        gc.collect()
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a vlmkit checkpoint folder (default: the random bench model)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--describe-images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reuse-caches", action="store_true",
                        help="keep the engine's image and prefix caches on (repeats then hit them)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    vlm = bench_model(args.model)
    vlm.engine.stop_ids = set()  # fixed-length generation for both sides
    if not args.reuse_caches:  # repeats would reuse the image features and prompt KV: measure decoding alone
        vlm.configure_caches(image_cache_mb=0, prefix_cache_mb=0)
    vlm.model.language_model.generation_config.eos_token_id = None
    pics = shapes_images(32)
    report: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average": os.getloadavg()[0],
                    "reuse_caches": args.reuse_caches, "new_tokens": args.new_tokens, "generate": []}  # fmt: skip
    vlm.engine.set_decode("compiled")
    decoder = vlm.engine.decoder()
    for size in (int(b) for b in args.batches.split(",")):
        convs = conversations(size, pics)
        compiled_before = decoder.compile_seconds
        start = time.perf_counter()
        vlmkit_generate(vlm, convs, args.new_tokens, "compiled")  # compiles this batch's shape
        first_call = time.perf_counter() - start
        t_hf, c_hf, out_hf = timed(lambda c=convs: hf_generate(vlm, c, args.new_tokens), args.repeats)
        t_eager, c_eager, out_eager = timed(lambda c=convs: vlmkit_generate(vlm, c, args.new_tokens), args.repeats)
        t_comp, c_comp, out_comp = timed(
            lambda c=convs: vlmkit_generate(vlm, c, args.new_tokens, "compiled"), args.repeats
        )
        # the same with one new token (prefill + first token): the difference is the decoding steps alone
        one = {name: timed(lambda c=convs, f=fn: f(c), args.repeats)[1] for name, fn in (
            ("hf", lambda c: hf_generate(vlm, c, 1)), ("eager", lambda c: vlmkit_generate(vlm, c, 1)),
            ("compiled", lambda c: vlmkit_generate(vlm, c, 1, "compiled")))}  # fmt: skip
        step = {name: max(cpu - one[name], 1e-9) / (args.new_tokens - 1) for name, cpu in
                (("hf", c_hf), ("eager", c_eager), ("compiled", c_comp))}  # fmt: skip
        tokens = size * args.new_tokens
        print(size, t_hf, t_eager, t_comp, file=sys.stderr)
        report["generate"].append({
            "batch": size, "eager_outputs_match": out_hf == out_eager, "compiled_outputs_match": out_hf == out_comp,
            "transformers_tokens_per_s": round(tokens / t_hf, 1),
            "eager_tokens_per_s": round(tokens / t_eager, 1), "compiled_tokens_per_s": round(tokens / t_comp, 1),
            "eager_speedup": round(t_hf / t_eager, 2), "compiled_speedup": round(t_hf / t_comp, 2),
            "eager_speedup_cpu": round(c_hf / c_eager, 2), "compiled_speedup_cpu": round(c_hf / c_comp, 2),
            "step_cpu_ms": {name: round(value * 1e3, 2) for name, value in step.items()},
            "compiled_step_speedup_cpu": round(step["hf"] / step["compiled"], 2),
            "compile_s": round(decoder.compile_seconds - compiled_before, 1), "first_call_s": round(first_call, 1),
            "compile_failed": None if decoder.error is None else repr(decoder.error),
        })  # fmt: skip
    vlm.engine.set_decode("eager")
    if not args.describe_images:
        print(json.dumps(report, indent=2))
        return
    folder = Path(sys.argv[0]).resolve().parent / ".bench_images"
    folder.mkdir(exist_ok=True)
    paths = []
    for i, pic in enumerate(pics[: args.describe_images]):
        paths.append(folder / f"{i:03d}.png")
        pic.save(paths[-1])
    prompt = "Describe the image."
    start = time.perf_counter()
    loop_out = per_image_loop(vlm, paths, prompt, args.new_tokens)
    t_loop = time.perf_counter() - start
    out = folder / "descriptions.jsonl"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    describe(vlm, paths, out, prompt=prompt, batch_size=32, max_new_tokens=args.new_tokens, progress=False)
    t_describe = time.perf_counter() - start
    batched_out = vlmkit_generate(vlm, conversations_for(paths, prompt), args.new_tokens)
    report["describe"] = {
        "images": len(paths), "outputs_match": loop_out == batched_out,
        "per_image_loop_images_per_s": round(len(paths) / t_loop, 2),
        "describe_images_per_s": round(len(paths) / t_describe, 2), "speedup": round(t_loop / t_describe, 2),
    }  # fmt: skip
    print(json.dumps(report, indent=2))


def conversations_for(paths: list[Path], prompt: str) -> list[list[dict]]:
    return [turn(str(p), prompt) for p in paths]


if __name__ == "__main__":
    main()
