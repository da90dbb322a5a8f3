"""Training throughput: a vlmkit training step vs the same step through transformers' LlavaForConditionalGeneration.

Prints JSON. Both sides start from identical weights (``vlmkit.interop.hf_llava.to_transformers_llava``), train
the same components (vision tower frozen, projector + LM trained: the ``instruct`` stage) with AdamW on the same
right-padded ShapesWorld batches, and must compute the same loss on the first batch (checked to 1e-5) before
anything is timed. Also reports the padding that length grouping and packing remove on a ShapesWorld mix.

    python bench/train_throughput.py [--batch-size 8] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from common import bench_model

from vlmkit.data.synth import SynthConfig, generate
from vlmkit.interop.hf_llava import to_transformers_llava
from vlmkit.training.data import BatchPlan, Collator, TrainSample, padding_fraction


def shapes_samples(processor, n: int, seed: int = 0) -> list[TrainSample]:
    """``n`` encoded ShapesWorld training samples (every task, 128 px)."""
    out = []
    for record in generate(SynthConfig(seed=seed, image_size=128), n):
        sample = record.to_sample()
        enc = processor.encode(sample.messages, sample.images, train=True, name=sample.id)
        out.append(TrainSample(enc.input_ids, enc.labels or [], enc.image_token_counts, sample.images))
    return out


def freeze_vision(module: torch.nn.Module, vision: torch.nn.Module) -> list[torch.nn.Parameter]:
    module.requires_grad_(True)
    vision.requires_grad_(False)
    return [p for p in module.parameters() if p.requires_grad]


def vlmkit_step(model, batch: dict) -> Callable[[], float]:
    """The trainer's micro-step: summed token CE (LM head on supervised positions only) / target tokens, backward."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    targets = batch["num_targets"]

    def step() -> float:
        loss = model(**inputs, labels=batch["labels"], supervised_loss=True)["loss_sum"] / targets
        loss.backward()
        return float(loss.detach())

    return step


def llava_step(llava, batch: dict) -> Callable[[], float]:
    """The same step the transformers way: Llava's own forward and loss (mean CE over labels != -100)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}

    def step() -> float:
        out = llava(**inputs, use_cache=False)
        out.loss.backward()
        return float(out.loss.detach())

    return step


def timed_interleaved(sides: dict[str, tuple[Callable[[], float], torch.optim.Optimizer]], steps: int) -> dict:
    """Median seconds of a full training step (forward, backward, AdamW) per side, the sides taking turns step by
    step so that load from other processes hits both alike; 2 warm-up steps each."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(steps + 2):
        for name, (step, optimizer) in sides.items():
            start = time.perf_counter()
            step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def padding_report(lengths: list[int], batch_size: int, steps: int) -> dict[str, float]:
    plain = BatchPlan([lengths], [1.0], batch_size, seed=0, stage_index=0, group_by_length=False)
    grouped = BatchPlan([lengths], [1.0], batch_size, seed=0, stage_index=0, group_by_length=True)
    return {
        "random_batches": padding_fraction(plain, steps, 1, 1, packing=False),
        "group_by_length": padding_fraction(grouped, steps, 1, 1, packing=False),
        "packing": padding_fraction(plain, steps, 1, 1, packing=True),
        "group_by_length+packing": padding_fraction(grouped, steps, 1, 1, packing=True),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side (after 2 warm-up steps each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--padding-samples", type=int, default=2048, help="ShapesWorld samples for the padding figures")
    parser.add_argument("--model", default=None, help="a vlmkit checkpoint (default: a random SigLIP + Llama)")
    parser.add_argument("--lm-vocab", type=int, default=None, help="widen the random LM's vocabulary (e.g. 32000)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    vlm = bench_model(args.model, args.lm_vocab)
    vocab = vlm.model.language_model.config.vocab_size
    model, processor = vlm.model.float().train(), vlm.processor
    llava = to_transformers_llava(model).float().train()
    samples = shapes_samples(processor, args.batch_size * 4)
    batches = [Collator(processor)(samples[i : i + args.batch_size]) for i in range(0, len(samples), args.batch_size)]
    batch = max(batches, key=lambda b: b["input_ids"].numel())  # the widest: the least favourable to vlmkit

    ours = vlmkit_step(model, batch)
    theirs = llava_step(llava, batch)
    params_ours = freeze_vision(model, model.vision_tower)
    params_theirs = freeze_vision(llava, llava.model.vision_tower)
    assert sum(p.numel() for p in params_ours) == sum(p.numel() for p in params_theirs)
    loss_ours, loss_theirs = ours(), theirs()
    if abs(loss_ours - loss_theirs) > 1e-5:
        print(json.dumps({"error": "losses differ", "vlmkit": loss_ours, "llava": loss_theirs}))
        return 1
    opt_ours = torch.optim.AdamW(params_ours, lr=1e-4)
    opt_theirs = torch.optim.AdamW(params_theirs, lr=1e-4)
    opt_ours.zero_grad(set_to_none=True)
    opt_theirs.zero_grad(set_to_none=True)

    rows, width = batch["input_ids"].shape
    real_tokens = int(batch["attention_mask"].sum())
    medians = timed_interleaved({"vlmkit": (ours, opt_ours), "transformers_llava": (theirs, opt_theirs)}, args.steps)
    results = {
        name: {
            "samples_per_s": round(rows / seconds, 2),
            "tokens_per_s": round(real_tokens / seconds, 1),
            "median_step_s": round(seconds, 4),
        }
        for name, seconds in medians.items()
    }
    ratio = medians["transformers_llava"] / medians["vlmkit"]

    pad_samples = shapes_samples(processor, args.padding_samples, seed=1)
    steps = args.padding_samples // args.batch_size
    report = {
        "benchmark": "train_throughput",
        "device": "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": args.model or f"random SigLIP 128px/64 tokens + Llama 4x256, vocab {vocab}",
        "stage": "instruct (vision frozen; projector + LM trained; AdamW)",
        "batch": {"rows": rows, "width": width, "real_tokens": real_tokens},
        "loss_check": {
            "vlmkit": loss_ours,
            "transformers_llava": loss_theirs,
            "abs_diff": abs(loss_ours - loss_theirs),
        },
        **results,
        "ratio_samples_per_s": round(ratio, 3),
        "padding_fraction": {
            "samples": args.padding_samples,
            "batch_size": args.batch_size,
            **{
                k: round(v, 4)
                for k, v in padding_report([s.length for s in pad_samples], args.batch_size, steps).items()
            },
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
