"""Chat under the caches: time to first token of each turn of a 10-turn conversation about one image, with the
engine's image-feature and KV prefix caches on and off, on the identical model in the same run.

Prints JSON: per side the median TTFT of every turn (over ``--repeats`` conversations, each about another
ShapesWorld image), turn 10 ÷ turn 1 (target ≤ 1.5 with the caches), the prompt length of the last turn, whether
the answers of the two sides are the same text, and the caches' figures. TTFT is what a caller of
``VLM.stream`` waits for its first piece: encoding (the image decoded and transformed), prefill, the first token.
Every answer has a fixed length (the model's stop tokens are disabled), so both sides see the same prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import bench_model, shapes_images

from vlmkit.api import VLM
from vlmkit.inference.caches import CacheConfig
from vlmkit.inference.engine import Engine

QUESTIONS = ["Describe the image.", "What colour is the large shape?", "How many objects are there?",
             "Where is the red circle?", "Is there a blue square in the image?", "What word is written?",
             "Which shape is the smallest?", "What is in the top left?", "Are any shapes touching?",
             "Describe it again in one sentence."]  # fmt: skip


def conversation(vlm: VLM, image, turns: int, new_tokens: int) -> tuple[list[float], list[str], int]:
    """TTFT of every turn, the answers, and the last prompt's length in tokens."""
    history: list[dict] = []
    ttfts, answers = [], []
    length = 0
    for t in range(turns):
        content: list[dict] = [{"type": "text", "text": QUESTIONS[t % len(QUESTIONS)]}]
        if t == 0:
            content.insert(0, {"type": "image", "image": image})
        messages = [*history, {"role": "user", "content": content}]
        start = time.perf_counter()
        pieces = vlm.stream(messages, max_new_tokens=new_tokens, temperature=0)
        first = next(pieces)
        ttfts.append(time.perf_counter() - start)
        text = first + "".join(pieces)
        encoded = vlm.engine.encode(messages)
        length = len(encoded.input_ids)
        answers.append(text)
        history = [*messages, {"role": "assistant", "content": text}]
    return ttfts, answers, length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a vlmkit checkpoint (default: the random bench model)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="conversations per side (another image each)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = bench_model(args.model)
    sides = {
        "caches_off": VLM(base.model, base.processor, "off", Engine(base.model, base.processor, CacheConfig.off())),
        "caches_on": VLM(base.model, base.processor, "on", Engine(base.model, base.processor, CacheConfig())),
    }
    for vlm in sides.values():
        vlm.engine.stop_ids = set()
    images = shapes_images(args.repeats + 1)
    for vlm in sides.values():  # warm-up, on an image the measured conversations do not show
        conversation(vlm, images[-1], 2, 4)
    ttfts: dict[str, list[list[float]]] = {name: [] for name in sides}
    answers: dict[str, list] = {name: [] for name in sides}
    length = 0
    for r in range(args.repeats):
        for name, vlm in sides.items():  # sides alternate conversation by conversation
            times, said, length = conversation(vlm, images[r], args.turns, args.new_tokens)
            ttfts[name].append(times)
            answers[name].append(said)
    report: dict = {"model": base.name, "turns": args.turns, "repeats": args.repeats, "new_tokens": args.new_tokens,
                    "threads": args.threads, "last_prompt_tokens": length,
                    "answers_match": answers["caches_off"] == answers["caches_on"]}  # fmt: skip
    for name, runs in ttfts.items():
        per_turn = [statistics.median(run[t] for run in runs) for t in range(args.turns)]
        report[name] = {
            "ttft_s": [round(x, 4) for x in per_turn],
            "last_over_first": round(per_turn[-1] / per_turn[0], 2),
            "caches": sides[name].cache_stats(),
        }
    report["turn_10_speedup"] = round(report["caches_off"]["ttft_s"][-1] / report["caches_on"]["ttft_s"][-1], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
