"""OpenVINO export vs PyTorch, side by side in one run, printed as JSON.

For each model — the built-in ``default`` and a SmolVLM-256M-sized random composite (SigLIP-B/16 at 512 px with a
4× pixel shuffle, 64 image tokens, + a SmolLM2-135M-shaped Llama: 30 × 576, vocabulary 49,152) — the PyTorch model
(fp32) and its OpenVINO exports (fp32, int8, int4) each run in a fresh process: time to first token (encode +
prefill of one ShapesWorld prompt), decode tokens/s at batch 1 (fixed length, stop tokens off), peak RSS, size on
disk, and greedy tokens on N ShapesWorld prompts (a rendered scene + one of its questions). fp32 must give the
PyTorch tokens exactly; int8/int4 report their agreement. The built-in model's int8 export (and the PyTorch model)
are also scored on the ShapesWorld suite (``vlmkit eval --suite shapesworld``).

    python bench/openvino_bench.py                       # everything (about 15-20 minutes on 2 cores)
    python bench/openvino_bench.py --models default --n 20 --eval-n 20   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RUNTIMES = ("pytorch", "openvino-fp32", "openvino-int8", "openvino-int4")
REFERENCE = {
    "model": "SmolVLM2-256M-Video-Instruct",
    "hardware": "a desktop CPU (published figures)",
    "openvino_tok_s": 47,
    "openvino_int8_tok_s": 64,
    "pytorch_tok_s": "well under 1",
}


def log(message: str) -> None:
    print(f"[openvino_bench] {message}", file=sys.stderr, flush=True)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb() -> float:
    return _status_mb("VmRSS:")


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; ``ru_maxrss`` would carry the parent's peak over ``fork`` + ``exec``)."""
    return _status_mb("VmHWM:")


# -- models ---------------------------------------------------------------------------------------------------
def build_smolvlm_sized(folder: Path) -> None:
    """A random SigLIP-B/16 (512 px) + pixel_shuffle4x + SmolLM2-135M-shaped Llama, saved as a vlmkit checkpoint."""
    import torch
    from transformers import LlamaConfig, SiglipVisionConfig

    import vlmkit
    from vlmkit.processing.tokenizer_training import train_bpe_tokenizer

    corpus = ["there is a red circle in the top left and a small blue square in the center"] * 50
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=1000)
    vision = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=512, patch_size=16)  # fmt: skip
    lm = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model, processor = vlmkit.compose(vision, lm, "pixel_shuffle4x", tokenizer=tokenizer, feature_layer=-1)
    vlmkit.save_pretrained(model, processor, folder)


def disk_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    files = [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.xml")]
    return sum(f.stat().st_size for f in files) / 2**20


# -- prompts --------------------------------------------------------------------------------------------------
def prompts(n: int) -> list[list[dict[str, Any]]]:
    """``n`` ShapesWorld prompts: a rendered validation scene and one question about it (tasks in turn)."""
    import numpy as np

    from vlmkit.data.shapes import render_scene, sample_scene
    from vlmkit.data.tasks import ask

    tasks = ("caption", "exist", "attribute", "count", "position", "text")
    out = []
    for i in range(n):
        scene = sample_scene("val", 7, i)
        qa = ask(tasks[i % len(tasks)], scene, np.random.default_rng(i), canonical=True)
        image = render_scene(scene)
        out.append([{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": qa.question}]}])  # fmt: skip
    return out


# -- one measurement (child process) --------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    import torch

    import vlmkit
    from vlmkit.inference.options import GenerationOptions

    torch.set_num_threads(args.threads)
    import openvino  # noqa: F401  - what both runtimes import, so that the deltas are the model's own
    import transformers  # noqa: F401

    import vlmkit.api

    base = rss_mb()
    start = time.perf_counter()
    vlm = vlmkit.load(args.child, device="cpu", dtype="fp32")
    load_s = time.perf_counter() - start
    convs = prompts(max(args.n, 1))
    engine = vlm.engine

    # speed: TTFT = encode + prefill (the first token is then known); decode = the following steps, batch 1
    def one(tokens: int) -> tuple[float, float]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            encoded = engine.encode(convs[0])
            batch = engine.new_batch()
            batch.add([(0, encoded, GenerationOptions(max_new_tokens=tokens))])
            t1 = time.perf_counter()
            steps = 0
            while batch:
                batch.step()
                steps += 1
            t2 = time.perf_counter()
        return t1 - t0, (steps - 1) / (t2 - t1) if steps > 1 else float("nan")

    stops = set(engine.stop_ids)
    engine.stop_ids.clear()  # fixed length: no early stop while timing
    try:
        one(4)  # warm-up
        runs = [one(args.speed_tokens) for _ in range(args.repeats)]
    finally:
        engine.stop_ids.update(stops)
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)

    start = time.perf_counter()
    tokens: list[list[int]] = []
    options = GenerationOptions(max_new_tokens=args.new_tokens)
    for at in range(0, args.n, 10):
        tokens += [r.token_ids for r in engine.generate(convs[at : at + 10], options)]
    generate_s = time.perf_counter() - start
    result = {
        "load_s": round(load_s, 2),
        "ttft_s": round(ttft, 4),
        "decode_tok_s": round(decode, 1),
        "base_rss_mb": round(base),
        "peak_rss_mb": round(peak_rss_mb()),
        "model_rss_mb": round(peak_rss_mb() - base),
        "generate_s": round(generate_s, 1),
        "prompt_tokens": len(engine.encode(convs[0]).input_ids),
        "tokens": tokens,
    }
    Path(args.out).write_text(json.dumps(result))


def measure(model: str, n: int, threads: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One fresh process: ``n`` = 0 measures speed and memory only."""
    out = work / f"measure-{time.monotonic_ns()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--child", model, "--out", str(out), "--n", str(n),
               "--new-tokens", str(args.new_tokens), "--speed-tokens", str(args.speed_tokens),
               "--repeats", str(args.repeats), "--threads", str(threads)]  # fmt: skip
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text())


# -- comparisons ----------------------------------------------------------------------------------------------
def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """Exact answers, the mean matched prefix (tokens before the first difference, over the reference's
    length), and position-wise agreement."""
    exact = sum(a == b for a, b in zip(reference, other, strict=True)) / len(reference)
    prefixes, same, total = [], 0, 0
    for a, b in zip(reference, other, strict=True):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefixes.append(k / max(len(a), 1))
        same += sum(x == y for x, y in zip(a, b, strict=False))
        total += max(len(a), len(b))
    return {"exact_answers": round(exact, 3), "matched_prefix": round(sum(prefixes) / len(prefixes), 3),
            "positionwise": round(same / max(total, 1), 3)}  # fmt: skip


def suite_scores(model: str, n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / f"eval-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlmkit", "eval", "--model", model, "--suite", "shapesworld", "--n", str(n),
                    "--quiet", "--out", str(out)], check=True, env=env, stdout=subprocess.DEVNULL)  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    summary = report.get("summary", report)
    return {"seconds": round(time.perf_counter() - start, 1),
            "scores": {k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}}  # fmt: skip


def run_model(name: str, source: str, source_size: float, n: int, args: argparse.Namespace, work: Path) -> dict:
    import vlmkit
    from vlmkit.interop.openvino_export import check_export, convert, write_openvino

    entry: dict[str, Any] = {"prompts": n}
    folders = {"pytorch": source}
    sizes = {"pytorch": round(source_size, 1)}
    vlm = vlmkit.load(source, device="cpu", dtype="fp32")
    entry["parameters_m"] = round(sum(p.numel() for p in vlm.model.parameters()) / 1e6, 1)
    # export_openvino(model, processor, out, weights) = check + convert + compress and write; the conversion
    # (tracing) is shared by the three exports here
    check_export(vlm.model)
    log(f"{name}: converting to OpenVINO")
    start = time.perf_counter()
    converted = convert(vlm.model, vlm.processor)
    exports = {"convert": round(time.perf_counter() - start, 1)}
    for weights in ("fp32", "int8", "int4"):
        folder = work / f"{name}-openvino-{weights}"
        log(f"{name}: compressing and writing OpenVINO {weights}")
        start = time.perf_counter()
        models = {key: value.clone() for key, value in converted.items()}
        write_openvino(models, vlm.model, vlm.processor, folder, weights)  # type: ignore[arg-type]
        exports[f"{weights}_compress_and_write"] = round(time.perf_counter() - start, 1)
        folders[f"openvino-{weights}"] = str(folder)
        sizes[f"openvino-{weights}"] = round(disk_mb(folder), 1)
    del converted, models
    vlm.close()
    entry["export_s"] = exports
    measured, more = {}, {}
    for runtime in RUNTIMES:
        log(f"{name}: measuring {runtime} ({n} prompts, {args.threads} thread(s))")
        measured[runtime] = measure(folders[runtime], n, args.threads, args, work)
    for threads in args.speed_threads:
        for runtime in RUNTIMES:
            log(f"{name}: timing {runtime} with {threads} threads")
            m = measure(folders[runtime], 0, threads, args, work)
            more.setdefault(f"{threads}_threads", {})[runtime] = {k: m[k] for k in ("ttft_s", "decode_tok_s")}
    reference = measured["pytorch"]["tokens"]
    table = {}
    for runtime in RUNTIMES:
        m = measured[runtime]
        keys = ("ttft_s", "decode_tok_s", "peak_rss_mb", "model_rss_mb", "base_rss_mb", "load_s", "generate_s")
        row = {k: m[k] for k in keys}
        row["disk_mb"] = sizes[runtime]
        if runtime != "pytorch":
            row["vs_pytorch"] = agreement(reference, m["tokens"])
            row["decode_speedup"] = round(m["decode_tok_s"] / measured["pytorch"]["decode_tok_s"], 2)
        table[runtime] = row
    entry["prompt_tokens"] = measured["pytorch"]["prompt_tokens"]
    entry["greedy_fp32_identical"] = measured["openvino-fp32"]["tokens"] == reference
    entry["results"] = table
    if more:
        entry["speed_with_more_threads"] = more
    if name == "default" and args.eval_n:
        log(f"default: ShapesWorld suite, n={args.eval_n} (PyTorch and OpenVINO int8)")
        entry["suite"] = {
            "n": args.eval_n,
            "pytorch": suite_scores(source, args.eval_n, args, work),
            "openvino-int8": suite_scores(folders["openvino-int8"], args.eval_n, args, work),
        }
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default,smolvlm-256m", help="comma-separated: default, smolvlm-256m")
    parser.add_argument("--n", type=int, default=100, help="ShapesWorld prompts for the built-in model")
    parser.add_argument("--smol-n", type=int, default=100, help="ShapesWorld prompts for the SmolVLM-sized model")
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per prompt (agreement)")
    parser.add_argument("--speed-tokens", type=int, default=64, help="decode tokens timed at batch 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-n", type=int, default=100, help="ShapesWorld suite images (0: skip)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of the full measurement (torch and OpenVINO alike; default 1: the cores are "
        "shared, and torch's spinning OpenMP threads lose badly to other processes)",
    )
    parser.add_argument(
        "--speed-threads",
        default=str(os.cpu_count() or 2),
        help="comma-separated thread counts timed again (speed only); '' for none",
    )
    parser.add_argument("--work", help="keep exports and measurements here (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if isinstance(args.speed_threads, str):
        args.speed_threads = [int(t) for t in args.speed_threads.split(",") if t.strip()]
    if args.child:
        child(args)
        return
    import openvino
    import torch

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vlmkit-openvino-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "speed_threads": args.speed_threads, "torch": torch.__version__,
                    "openvino": openvino.__version__},
        "settings": {"new_tokens": args.new_tokens, "speed_tokens": args.speed_tokens, "repeats": args.repeats},
        "reference": REFERENCE,
        "models": {},
    }  # fmt: skip
    try:
        for name in args.models.split(","):
            if name == "default":
                from vlmkit.models.builtin import BUILTIN_DIR

                report["models"][name] = run_model(name, "default", disk_mb(BUILTIN_DIR), args.n, args, work)
            elif name == "smolvlm-256m":
                source = work / "smolvlm-256m-pytorch"
                if not (source / "config.json").is_file():
                    log("building the SmolVLM-256M-sized random model")
                    build_smolvlm_sized(source)
                report["models"][name] = run_model(name, str(source), disk_mb(source), args.smol_n, args, work)
            else:
                raise SystemExit(f"unknown model {name!r}: default or smolvlm-256m")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
