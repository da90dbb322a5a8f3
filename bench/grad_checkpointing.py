"""Gradient checkpointing: peak memory and step time of a training step with and without, side by side.

Prints JSON. Each mode runs in a fresh process (so one mode's peak can't hide the other's) on the same random VLM
(SigLIP 128 px + a Llama of ``--layers`` × ``--hidden``) and the same batch; the step is the trainer's (summed
token loss on the assistant turns, backward, AdamW; projector + LM trained, tower frozen unless
``--train-vision``), with the stage's ``gradient_checkpointing`` set through ``set_gradient_checkpointing`` as
training does. The reference is the same step without checkpointing; the first step's losses must agree (1e-6)
before anything is reported. Peak memory: the process's peak RSS on the CPU (``ru_maxrss``, and its rise over the
RSS once model and batch are built), ``torch.cuda.max_memory_allocated`` on a GPU.

    python bench/grad_checkpointing.py [--batch-size 4] [--tokens 256] [--layers 8] [--hidden 384] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> dict:
    """One mode in this process: build, step ``--steps`` times, measure."""
    from transformers import LlamaConfig, SiglipVisionConfig

    import vlmkit
    from vlmkit.processing.tokenizer_training import train_bpe_tokenizer
    from vlmkit.training.config import PolicySpec, StageConfig
    from vlmkit.training.model import apply_policy, param_groups, set_gradient_checkpointing
    from vlmkit.training.optim import build_optimizer

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    words = ["there", "is", "a", "red", "circle", "in", "the", "top", "left", "and", "a", "small", "blue", "square"]
    words += ["in", "the", "center"]
    tokenizer = train_bpe_tokenizer([" ".join(words)] * 50, vocab_size=1000)
    vision = SiglipVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                                image_size=128, patch_size=16)  # fmt: skip
    heads = max(1, args.hidden // 64)
    lm = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                     num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                     max_position_embeddings=4 * args.tokens)  # fmt: skip
    torch.manual_seed(0)
    model, processor = vlmkit.compose(vision, lm, "mlp2x_gelu", tokenizer=tokenizer)
    from PIL import Image

    image = Image.new("RGB", (128, 128), (200, 30, 30))
    answer = " ".join(words[i % len(words)] for i in range(args.tokens))
    samples = [processor.encode([{"role": "user", "content": f"<image>\nDescribe the image ({i})."},
                                 {"role": "assistant", "content": answer}], [image], train=True)
               for i in range(args.batch_size)]  # fmt: skip
    batch = processor.collate(samples)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values")}
    labels = batch["labels"].to(device)
    targets = int((labels[:, 1:] != -100).sum())

    policy = PolicySpec(vision="full" if args.train_vision else "frozen", projector="full", language_model="full")
    stage = StageConfig(policy=policy, gradient_checkpointing=args.mode == "on", lr=1e-4)
    apply_policy(model, stage)
    set_gradient_checkpointing(model, stage)
    model.to(device).train()
    optimizer, _ = build_optimizer(param_groups(model, stage), stage, args.steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_mib()
    losses, times = [], []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = model(**inputs, labels=labels, supervised_loss=True)["loss_sum"] / targets
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    out = {
        "mode": args.mode,
        "losses": losses,
        "step_time_s": statistics.median(times[1:] if len(times) > 1 else times),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "rss_before_steps_mib": round(baseline, 1),
        "peak_rss_rise_mib": round(_peak_rss_mib() - baseline, 1),
        "sequence_length": int(batch["input_ids"].shape[1]),
        "device": str(device),
    }
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="words in each sample's answer (about its length)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-vision", action="store_true", help="train (and checkpoint) the tower too")
    parser.add_argument("--mode", choices=["off", "on"], help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return

    results = {}
    for mode in ("off", "on"):
        command = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the {mode!r} run failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    off, on = results["off"], results["on"]
    if abs(off["losses"][0] - on["losses"][0]) > 1e-6:
        sys.exit(f"the first losses differ: {off['losses'][0]} without, {on['losses'][0]} with checkpointing")
    report = {
        "bench": "grad_checkpointing",
        "reference": "the same training step without gradient checkpointing",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads()},
        "model": {
            "lm_layers": args.layers,
            "lm_hidden": args.hidden,
            "tower": "siglip 128 px, 4 x 192",
            "trained": "projector + LM" + (" + tower" if args.train_vision else ""),
        },
        "batch": {"batch_size": args.batch_size, "sequence_length": off["sequence_length"]},
        "without": off,
        "with": on,
        "first_loss_difference": abs(off["losses"][0] - on["losses"][0]),
        "peak_rss_rise_ratio": round(on["peak_rss_rise_mib"] / off["peak_rss_rise_mib"], 3),
        "step_time_ratio": round(on["step_time_s"] / off["step_time_s"], 3),
    }
    if "cuda_peak_allocated_mib" in off:
        report["cuda_peak_ratio"] = round(on["cuda_peak_allocated_mib"] / off["cuda_peak_allocated_mib"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
