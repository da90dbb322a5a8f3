"""The binding proxy: how fast the built-in model's LM learns to bind question words to image tokens.

The LM side of the built-in model alone, in minutes on one core: a frozen tower's features are computed once
(``--features real``: the recipe's ``vision`` stage output cached by ``bench/default_model_proxy.py``; or
``perfect``: a fixed random projection of each cell's one-hot attributes plus noise, as in
shared/design/DEFAULT_MODEL_NOTES.md), then a new ``mlp2x_gelu`` projector and the recipe's Llama (4 × 256) learn
short single-turn questions (existence with adversarial negatives, colour of a shape, shape of a colour, object
in a cell, position, count) in the ChatML layout of the built-in model: question, then image (``qfirst``) or image,
then question (``ifirst``). Answer-only loss, AdamW (0.9, 0.98), 100 warmup steps, constant lr, batch 64. Every
``--eval-every`` steps: exact-match accuracy per question kind on 600 held-out test scenes, one JSON line.

    python bench/binding_proxy.py --lr 5e-4 --steps 2000
    python bench/binding_proxy.py --features perfect --layout ifirst

``--phase1 grid:300`` first trains 300 steps on a read-out of all nine cells in order (a perception curriculum);
``--only KIND`` trains one question kind alone.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from vlmkit.data.shapes import CELLS, COLOURS, SHAPES, SIZES, render_scene, sample_scene
from vlmkit.data.tasks import _ask_attribute, ask, ask_exist
from vlmkit.models.compose import load_pretrained
from vlmkit.models.projector import build_projector

KINDS = ("exist", "attribute", "position", "count", "cellobj", "grid")
MIX = ("exist", "attribute", "attribute", "position", "count")


def tower_features(model, processor, scenes, kind: str) -> torch.Tensor:
    """``(N, 9, 192)`` features of the scenes: the real tower's, or perfect one-hot projections."""
    if kind == "real":
        with torch.no_grad():
            return torch.cat([
                model.vision_tower(processor.load_images([render_scene(s) for s in scenes[i : i + 256]]))
                for i in range(0, len(scenes), 256)
            ])  # fmt: skip
    g = torch.Generator().manual_seed(123)
    offsets = np.cumsum([0, 3, len(COLOURS), len(SHAPES), len(SIZES)])
    projection = torch.randn(int(offsets[-1]) + 9, 192, generator=g)
    onehot = torch.zeros(len(scenes), 9, projection.shape[0])
    for k, scene in enumerate(scenes):
        for c in range(9):
            onehot[k, c, offsets[-1] + c] = 1
            onehot[k, c, 0] = 1
        for o in scene.objects:
            c = CELLS.index(o.cell)
            onehot[k, c, 0] = 0
            onehot[k, c, 1] = 1
            onehot[k, c, offsets[1] + list(COLOURS).index(o.colour)] = 1
            onehot[k, c, offsets[2] + SHAPES.index(o.shape)] = 1
            onehot[k, c, offsets[3] + SIZES.index(o.size)] = 1
        if scene.word is not None:
            c = CELLS.index(scene.word.cell)
            onehot[k, c, 0] = 0
            onehot[k, c, 2] = 1
    return onehot @ projection + 0.05 * torch.randn(len(scenes), 9, 192, generator=g)


def question(scene, rng, kind: str) -> tuple[str, str, str]:
    """(question, answer, kind) of one drawn question of ``kind`` ("mix": any of the first four)."""
    if kind == "mix":  # as the notes' probe: attribute questions twice as often
        kind = MIX[int(rng.integers(len(MIX)))]
    if kind == "exist":
        positive = bool(rng.random() < 0.5)
        qa = ask_exist(scene, rng, positive=positive, category=None if positive else "adversarial")
        return qa.question, qa.answer, "exist"
    if kind == "attribute":
        qa = _ask_attribute(scene, rng, rng)
        return qa.question, qa.answer, str(qa.kind)
    if kind in ("position", "count"):
        qa = ask(kind, scene, rng)
        return qa.question, qa.answer, kind
    if kind == "cellobj":
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        return f"What is in the {o.cell} cell?", o.description, "cellobj"
    parts = []
    for c in CELLS:
        o = scene.object_at(c)
        word = scene.word.text if scene.word is not None and scene.word.cell == c else None
        parts.append(f"{c}: " + (o.description if o else (f"the word {word}" if word else "nothing")))
    return "List what is in each cell.", "; ".join(parts), "grid"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", choices=["real", "perfect"], default="real")
    parser.add_argument("--layout", choices=["qfirst", "ifirst"], default="qfirst")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--only", choices=KINDS, help="train one question kind alone")
    parser.add_argument("--phase1", help="KIND:STEPS trained first, e.g. grid:300")
    parser.add_argument("--fscale", type=float, default=1.0, help="multiply the features (scale A/B)")
    parser.add_argument("--tower", help="checkpoint whose tower gives the features (default: the proxy's cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tower = args.tower or sorted(glob.glob("runs/proxy/tower-*/final"))[0]
    model, processor = load_pretrained(tower)
    tok, image_id = processor.tokenizer, processor.image_token_id

    def encode(q: str, a: str) -> tuple[list[int], list[int]]:
        def ids(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        if args.layout == "qfirst":
            pre, post = ids(f"<|im_start|>user\n{q}\n"), ids("<|im_end|>\n<|im_start|>assistant\n")
        else:
            pre, post = ids("<|im_start|>user\n"), ids(f"\n{q}<|im_end|>\n<|im_start|>assistant\n")
        answer = ids(a + "<|im_end|>")
        seq = pre + [image_id] * 9 + post + answer
        return seq, [-100] * (len(seq) - len(answer)) + answer

    def make(split: str, n: int, seed: int, kind: str):
        scenes = [sample_scene(split, seed, i) for i in range(n)]
        rng = np.random.default_rng(seed)
        items = [(k, *question(s, rng, kind)) for k, s in enumerate(scenes)]
        features = tower_features(model, processor, scenes, args.features) * args.fscale
        return features, items, [encode(q, a) for _, q, a, _ in items]

    train = make("train", 20000, 11, args.only or "mix")
    test = make("test", 600, 3, args.only or "mix")
    kind1, steps1 = (args.phase1.split(":")[0], int(args.phase1.split(":")[1])) if args.phase1 else ("", 0)
    first = make("train", 20000, 12, kind1) if steps1 else None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)  # fmt: skip
    lm = LlamaForCausalLM(config)
    projector = build_projector("mlp2x_gelu", 192, 256)
    params = [*lm.parameters(), *projector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))

    def batch(data, idx):
        features, items, encoded = data
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id or 0)
        labels = torch.full((len(idx), width), -100)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            seq, lab = encoded[i]
            ids[r, : len(seq)], labels[r, : len(lab)], mask[r, : len(seq)] = torch.tensor(seq), torch.tensor(lab), 1
        embeds = lm.get_input_embeddings()(ids)
        images = projector(features[[items[i][0] for i in idx]])
        return embeds.masked_scatter((ids == image_id)[..., None], images.to(embeds.dtype)), mask, labels

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        lm.eval()
        correct: dict[str, list[bool]] = {}
        for lo in range(0, len(test[1]), 200):
            idx = list(range(lo, min(len(test[1]), lo + 200)))
            embeds, mask, labels = batch(test, idx)
            logits = lm(inputs_embeds=embeds, attention_mask=mask).logits
            for r, i in enumerate(idx):
                pos = (labels[r] != -100).nonzero().squeeze(1)
                ok = bool((logits[r, pos - 1].argmax(-1) == labels[r, pos]).all())
                correct.setdefault(test[1][i][3], []).append(ok)
        lm.train()
        return {k: round(sum(v) / len(v), 3) for k, v in sorted(correct.items())}

    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        data = first if step <= steps1 else train
        embeds, mask, labels = batch(data, rng.choice(len(data[1]), args.batch, replace=False))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = lm(inputs_embeds=embeds, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % args.eval_every == 0:
            point = {"step": step, "s": round(time.perf_counter() - started), "loss": round(float(loss.detach()), 3)}
            print(json.dumps({**point, **evaluate()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
