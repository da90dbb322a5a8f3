"""Does high resolution pay? The same small VLM learns to read ShapesWorld's small words with one view or tiles.

Data: ``vlmkit data synth --variant highres --tasks text`` records (384-px canvas, 9-16-px words: about 3 px
tall once shrunk to one 96-px view), only those that show a word, made in memory with
:func:`vlmkit.data.synth.make_record`.
Model, the same in every mode: the built-in ``default`` model's tower (``src/vlmkit/assets/default``: SigLIP-style,
96 px, 32-px patches, so 9 tokens a view, 3 × 192, trained on default ShapesWorld where it reads the words),
frozen; a new ``mlp2x_gelu`` projector and a new Llama (2 × 128), with a byte-level BPE tokenizer trained on the
data's texts. A linear probe of the tower's features first says what each kind of view lets it read: the whole
canvas in one 96-px view, or the 3 × 3 tile holding the word (the word's cell at 96 px, drawn as a default cell
is: the tower's own text size).

Modes differ only by the views strategy (and the projector for ``anyres_ps``):

- ``single``: the canvas shrunk to one 96-px view;
- ``anyres_2x2``: LLaVA-NeXT tiles, 2 × 2 of the canvas at 192 px, plus the base view;
- ``anyres``: LLaVA-NeXT tiles (pinpoints up to ``--grid`` × 96 px, so 3 × 3 tiles of the canvas at 288 px) plus
  the base view;
- ``hd``: Phi-3-vision crops (``max_crops = grid²``) plus the global view, 2×2-merged (needs an even patch grid);
- ``anyres_ps``: ``anyres`` with a ``pixel_shuffle{s}x`` projector (s = 2 on an even patch grid, else 3).

Each mode trains with the same tower, steps, batch, learning rate, schedule and seed (projector and LM, answer-only
loss, AdamW, warmup then cosine), is scored every ``--eval-every`` steps by exact match of the word on held-out
test-split images (teacher-forced argmax, which is what greedy decoding returns), at the end also on the same
images blanked (their background colour only). Then the prefill cost of every mode is timed side by side,
interleaved, one image at a time: the views (processing) and the forward pass over the prompt (tower + LM).
Prints JSON lines, then the summary; writes ``--out``.

    python bench/highres_proxy.py                                   # every mode, ~25 min on one thread
    python bench/highres_proxy.py --modes anyres --steps 300        # one curve
    python bench/highres_proxy.py --figure docs/images/highres_views.png   # the picture of the views only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import LlamaConfig

import vlmkit
from vlmkit.config import ViewsConfig, VLMConfig
from vlmkit.data.shapes import WORDS, render_scene, sample_scene
from vlmkit.data.synth import SynthConfig, make_record
from vlmkit.models.compose import load_pretrained
from vlmkit.models.projector import PROJECTORS
from vlmkit.processing.processor import EncodedSample
from vlmkit.processing.tokenizer_training import train_bpe_tokenizer
from vlmkit.views import VIEWS

QUESTION = "What word is written in the image?"
BUILTIN = Path(vlmkit.__file__).parent / "assets" / "default"
VISION: dict[str, Any] = {}
"""The tower's transformers config: the built-in model's (set by ``main``)."""
LM = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 4, "max_position_embeddings": 1024}  # fmt: skip


def builtin_tower() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The built-in model's tower: its transformers config and weights."""
    config = VLMConfig.load(BUILTIN).vision.hf_config or {}
    model, _ = load_pretrained(BUILTIN)
    return dict(config), {k: v.detach().clone() for k, v in model.vision_tower.state_dict().items()}


def modes(grid: int) -> dict[str, tuple[ViewsConfig, str]]:
    """Mode name → (views, projector); ``anyres_ps`` shuffles by 2 when the tower's patch grid allows, else 3."""
    pinpoints = [[96 * k, 96 * k] for k in range(2, grid + 1)]
    side = VISION["image_size"] // VISION["patch_size"]
    shuffle = 2 if side % 2 == 0 else 3
    anyres = ViewsConfig("anyres", {"grid_pinpoints": pinpoints})
    return {
        "single": (ViewsConfig("single"), "mlp2x_gelu"),
        "anyres_2x2": (ViewsConfig("anyres", {"grid_pinpoints": [[192, 192]]}), "mlp2x_gelu"),
        "anyres": (anyres, "mlp2x_gelu"),
        "hd": (ViewsConfig("hd", {"max_crops": grid * grid}), "mlp2x_gelu"),
        "anyres_ps": (anyres, f"pixel_shuffle{shuffle}x"),
    }


def available(views: ViewsConfig, projector: str) -> bool:
    try:
        VIEWS.get(views.name)
        PROJECTORS.get(projector)
    except Exception:
        return False
    return True


def word_records(split: str, seed: int, n: int) -> list[Any]:
    """The first ``n`` ``text`` records of the highres variant that show a word."""
    config = SynthConfig(split, seed, tasks=("text",), variant="highres")
    out, index = [], 0
    while len(out) < n:
        record = make_record(config, index)
        index += 1
        if record.messages[-1]["content"] != "none":
            out.append(record)
    return out


def eval_set(records: list[Any], seed: int) -> list[tuple[list[dict[str, str]], bytes, Image.Image]]:
    """(canonical conversation, PNG, blanked image) of test records."""
    out = []
    for record in records:
        truth = record.meta["truth"]
        scene = sample_scene("test", seed, truth["index"], truth["image_size"], "highres")
        messages = [{"role": "user", "content": f"<image>\n{QUESTION}"},
                    {"role": "assistant", "content": truth["word"]["text"]}]  # fmt: skip
        out.append((messages, record.images[0], Image.new("RGB", (scene.image_size,) * 2, scene.background)))
    return out


def compact(sample: EncodedSample) -> EncodedSample:
    """The sample with its pixels stored in bf16 (halves the cache)."""
    if sample.pixel_values is not None:
        sample.pixel_values = sample.pixel_values.to(torch.bfloat16)
    return sample


def forward_batch(model: Any, processor: Any, samples: list[EncodedSample]) -> dict[str, torch.Tensor]:
    batch = processor.collate(samples)
    batch["pixel_values"] = batch["pixel_values"].float()
    batch.pop("image_counts", None)
    return batch


@torch.no_grad()
def accuracy(model: Any, processor: Any, samples: list[EncodedSample], batch_size: int = 32) -> float:
    """Exact match of every answer token (and the end of turn) under teacher forcing."""
    model.eval()
    right = 0
    for lo in range(0, len(samples), batch_size):
        batch = forward_batch(model, processor, samples[lo : lo + batch_size])
        labels = batch.pop("labels")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**batch).logits
        predicted, targets = logits[:, :-1].argmax(-1), labels[:, 1:]
        mask = targets != -100
        right += int(((predicted == targets) | ~mask).all(dim=1).sum())
    model.train()
    return right / len(samples)


def compose(tokenizer: Any, views: ViewsConfig, projector: str = "mlp2x_gelu") -> tuple[Any, Any]:
    """The benchmark's model under ``views`` (the tower's last layer feeds the projector)."""
    return vlmkit.compose(dict(VISION), LlamaConfig(vocab_size=len(tokenizer), **LM), projector,
                          tokenizer=tokenizer, views=views, resize_mode="resize", feature_layer=-1)  # fmt: skip


def word_tiles(box: tuple[int, int, int, int], canvas: int, grid: int) -> list[int]:
    """The tiles of a ``grid × grid`` cut of the canvas that the word box touches (row-major)."""
    cut = canvas / grid
    x1, y1, x2, y2 = box
    cols = range(int(x1 // cut), int((x2 - 1) // cut) + 1)
    rows = range(int(y1 // cut), int((y2 - 1) // cut) + 1)
    return [r * grid + c for r in rows for c in cols]


def reading_views(split: str, seed: int, n: int, processor: Any, grid: int, none_tiles: int = 0):
    """(views, labels, kinds) of the first ``n`` scenes of ``split`` that show a word: per scene the whole-canvas
    view (kind 1), the tile holding the word (kind 2; none when a cut goes through it) and ``none_tiles`` tiles
    without it (kind 0, label "none"), all the registered views' own pixels."""
    rng = torch.Generator().manual_seed(seed)
    views, labels, kinds = [], [], []
    index = found = 0
    while found < n:
        scene = sample_scene(split, seed, index, variant="highres")
        index += 1
        if scene.word is None:
            continue
        found += 1
        pixels = processor.views.pixels(render_scene(scene), scene.id)  # base view, then the tiles row by row
        word = WORDS.index(scene.word.text)
        touched = word_tiles(scene.word.bbox, scene.image_size, grid)
        picked = [(0, word, 1)] + ([(1 + touched[0], word, 2)] if len(touched) == 1 else [])
        empty = [k for k in range(grid * grid) if k not in touched]
        picked += [(1 + empty[k], len(WORDS), 0) for k in torch.randperm(len(empty), generator=rng)[:none_tiles]]
        for view, label, kind in picked:
            views.append(pixels[view].to(torch.bfloat16))
            labels.append(label)
            kinds.append(kind)
    return torch.stack(views), torch.tensor(labels), torch.tensor(kinds)


def linear_probe(train: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...], steps: int = 300) -> float:
    """Held-out accuracy of a linear read-out (48 words + none) of flattened features, fitted with Adam."""
    x, y = train[0].flatten(1), train[1]
    mean, std = x.mean(0), x.std(0) + 1e-5
    weight = torch.zeros(x.shape[1], len(WORDS) + 1, requires_grad=True)
    bias = torch.zeros(len(WORDS) + 1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy((x - mean) / std @ weight + bias, y) + 1e-4 * weight.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((((test[0].flatten(1) - mean) / std @ weight + bias).argmax(-1) == test[1]).float().mean())


@torch.no_grad()
def tower_features(tower: Any, processor: Any, grid: int, split: str, seed: int, n: int) -> tuple[torch.Tensor, ...]:
    """(features, labels, kinds) of :func:`reading_views`."""
    views, labels, kinds = reading_views(split, seed, n, processor, grid)
    return torch.cat([tower(views[i : i + 256].float()) for i in range(0, len(views), 256)]), labels, kinds


@torch.no_grad()
def probe_tower(tokenizer: Any, state: dict[str, torch.Tensor], args) -> dict[str, Any]:
    """What the frozen tower's features say about the word, per kind of view (the whole canvas; the word's tile of
    a 2×2 and of a ``grid`` × ``grid`` cut): a linear probe's held-out accuracy."""
    t0 = time.perf_counter()
    result: dict[str, float] = {}
    for grid in sorted({2, args.grid}):
        pinpoints = [[96 * k, 96 * k] for k in range(2, grid + 1)]
        model, processor = compose(tokenizer, ViewsConfig("anyres", {"grid_pinpoints": pinpoints}))
        model.vision_tower.load_state_dict(state)
        tower = model.vision_tower.eval()
        train = tower_features(tower, processor, grid, "train", args.seed + 1, args.probe_n)
        test = tower_features(tower, processor, grid, "test", 1, args.eval_n)
        names = {1: "whole canvas, one 96-px view", 2: f"the word's tile ({grid}x{grid})"}
        with torch.enable_grad():
            for kind, name in names.items():
                picked = (tuple(t[train[2] == kind] for t in train[:2]), tuple(t[test[2] == kind] for t in test[:2]))
                result[name] = round(linear_probe(*picked), 3)
    return {"linear_probe": result, "s": round(time.perf_counter() - t0)}


def lr_factor(steps: int) -> Any:
    """Linear warmup over 5 % of ``steps``, then cosine to 10 %."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def train_mode(name: str, views: ViewsConfig, projector: str, tokenizer: Any, data: dict[str, Any], args) -> dict:
    torch.manual_seed(args.seed)
    model, processor = compose(tokenizer, views, projector)
    model.vision_tower.load_state_dict(data["tower"])
    model.vision_tower.requires_grad_(False)
    t0 = time.perf_counter()
    train = [compact(processor.encode(r.messages, r.images, train=True, name=r.id)) for r in data["train"]]
    test = [compact(processor.encode(m, [png], train=True)) for m, png, _ in data["test"]]
    blank = [compact(processor.encode(m, [img], train=True)) for m, _, img in data["test"]]
    encode_s = time.perf_counter() - t0
    size = (data["size"], data["size"])
    info = {"views": processor.views.num_views(size), "tokens_per_image": processor.views.num_tokens(size),
            "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args.steps))
    order = torch.Generator().manual_seed(args.seed)
    curve, losses = [], []
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train), (args.batch,), generator=order).tolist()
        batch = forward_batch(model, processor, [train[i] for i in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch, supervised_loss=True)
        loss = out["loss_sum"] / out["targets"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            point = {"mode": name, "step": step, "s": round(time.perf_counter() - started),
                     "loss": round(statistics.fmean(losses[-args.eval_every :]), 4),
                     "text_accuracy": round(accuracy(model, processor, test), 4)}  # fmt: skip
            curve.append(point)
            print(json.dumps(point), flush=True)
    train_s = time.perf_counter() - started
    result = {**info, "text_accuracy": curve[-1]["text_accuracy"],
              "blank_accuracy": round(accuracy(model, processor, blank), 4),
              "train_s": round(train_s), "s_per_step": round(train_s / args.steps, 3), "encode_s": round(encode_s),
              "curve": curve}  # fmt: skip
    model.eval()
    return {"result": result, "model": model, "processor": processor}


@torch.no_grad()
def prefill_costs(trained: dict[str, dict], images: list[bytes], rounds: int) -> dict[str, dict[str, float]]:
    """Per mode: prompt tokens, and median ms per image for the views and for the prompt's forward pass."""
    times: dict[str, dict[str, list[float]]] = {m: {"views": [], "forward": []} for m in trained}
    tokens: dict[str, int] = {}
    prompt = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    for r in range(rounds):
        for mode, parts in trained.items():  # interleaved, so every mode sees the same machine load
            model, processor = parts["model"], parts["processor"]
            png = images[r % len(images)]
            t0 = time.perf_counter()
            sample = processor.encode(prompt, [png])
            t1 = time.perf_counter()
            batch = processor.collate([sample], padding_side="left")
            batch.pop("image_counts", None)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(**batch, use_cache=False)
            t2 = time.perf_counter()
            tokens[mode] = len(sample.input_ids)
            if r >= 2:  # warm-up rounds
                times[mode]["views"].append(1000 * (t1 - t0))
                times[mode]["forward"].append(1000 * (t2 - t1))
    return {
        mode: {
            "prompt_tokens": tokens[mode],
            "views_ms": round(statistics.median(t["views"]), 1),
            "prefill_ms": round(statistics.median(t["forward"]), 1),
        }
        for mode, t in times.items()
    }


def to_rgb(pixels: torch.Tensor, processor: Any) -> Image.Image:
    """One view's normalised ``(3, S, S)`` pixels back to an RGB image."""
    mean = torch.tensor(processor.image_config.mean)[:, None, None]
    std = torch.tensor(processor.image_config.std)[:, None, None]
    rgb = ((pixels.float() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def figure(path: str, grid: int, index: int = 0) -> Path:
    """One highres scene, its single 96-px view and its anyres tiles (the registered views' own pixels), with the
    cuts drawn and the word enlarged from each."""
    scene = sample_scene("val", 0, index, variant="highres")
    assert scene.word is not None, "pick a scene that shows a word"
    image, side = render_scene(scene), scene.image_size
    tokenizer = train_bpe_tokenizer([QUESTION], vocab_size=300)
    views = {}
    for name in ("single", "anyres"):
        _, processor = compose(tokenizer, modes(grid)[name][0])
        views[name] = [to_rgb(v, processor) for v in processor.views.pixels(image, "figure")]
    font = ImageFont.load_default(size=15)
    red, gap, pad, head = (220, 30, 30), 6, 16, 40
    tile = views["anyres"][1].width
    cut = side / grid
    x1, y1, x2, y2 = scene.word.bbox
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    zoom_side, zoom = 64, 3  # a 64-px window of the canvas around the word, shown 3× (per view, same field)
    panels: list[tuple[str, Image.Image]] = []
    original = image.copy()
    draw = ImageDraw.Draw(original)
    for k in range(1, grid):
        draw.line([(round(k * cut), 0), (round(k * cut), side)], fill=red, width=2)
        draw.line([(0, round(k * cut)), (side, round(k * cut))], fill=red, width=2)
    panels.append((f"canvas {side} px, cut into {grid}x{grid} tiles", original))
    single = views["single"][0]
    panels.append((f"single: one {single.width}-px view", single.resize((side, side), Image.Resampling.NEAREST)))
    mosaic = Image.new("RGB", (grid * tile + (grid - 1) * gap,) * 2, "white")
    for k, view in enumerate(views["anyres"][1:]):
        row, col = divmod(k, grid)
        mosaic.paste(view, (col * (tile + gap), row * (tile + gap)))
    panels.append((f"anyres: {grid * grid} tiles of {tile} px (+ base view)", mosaic.resize(
        (side, side), Image.Resampling.NEAREST)))  # fmt: skip
    zooms = Image.new("RGB", (zoom_side * zoom, 2 * zoom_side * zoom + gap), "white")
    for k, (view, scale) in enumerate([(single, single.width / side), (None, grid * tile / side)]):
        if view is None:  # the tile holding the word's centre, in the tiles' own pixels
            row, col = int(cy // cut), int(cx // cut)
            view = views["anyres"][1 + row * grid + col]
            ox, oy = (cx - col * cut) * scale, (cy - row * cut) * scale
        else:
            ox, oy = cx * scale, cy * scale
        half = zoom_side * scale / 2
        crop = view.crop((round(ox - half), round(oy - half), round(ox + half), round(oy + half)))
        zooms.paste(crop.resize((zoom_side * zoom,) * 2, Image.Resampling.NEAREST), (0, k * (zoom_side * zoom + gap)))
    panels.append((f'"{scene.word.text}": single view / tile', zooms))
    width = sum(p.width for _, p in panels) + pad * (len(panels) + 1)
    height = max(p.height for _, p in panels) + head + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for title, panel in panels:
        draw.text((x, 12), title, fill=(0, 0, 0), font=font)
        canvas.paste(panel, (x, head))
        x += panel.width + pad
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="single,anyres_2x2,anyres,hd,anyres_ps", help="comma-separated, in order")
    parser.add_argument("--grid", type=int, default=3, help="most tiles per side (anyres pinpoints, hd max_crops)")
    parser.add_argument("--probe-n", type=int, default=2000, help="scenes of the tower's linear probe")
    parser.add_argument("--steps", type=int, default=1000, help="steps of each mode (tower frozen)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-n", type=int, default=3000, help="training images (each shows a word)")
    parser.add_argument("--eval-n", type=int, default=300, help="held-out test images (each shows a word)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--timing-rounds", type=int, default=22, help="images timed per mode (2 are warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/highres-proxy/result.json")
    parser.add_argument("--figure", help="only write the picture of the views to this PNG")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config, state = builtin_tower()
    VISION.update(config)
    if args.figure:
        print(figure(args.figure, args.grid))
        return 0
    started = time.perf_counter()
    train = word_records("train", args.seed, args.train_n)
    test = word_records("test", 0, args.eval_n)
    data = {
        "train": train,
        "test_records": test,
        "test": eval_set(test, 0),
        "size": train[0].meta["truth"]["image_size"],
    }
    texts = [m["content"].replace("<image>\n", "") for r in train for m in r.messages]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=1000)
    data_s = time.perf_counter() - started
    data["tower"] = state
    tower_report = {"source": "src/vlmkit/assets/default (frozen)", **probe_tower(tokenizer, state, args)}
    print(json.dumps({"tower": tower_report}), flush=True)
    table = modes(args.grid)
    trained, skipped = {}, {}
    for name in [m for m in args.modes.split(",") if m]:
        views, projector = table[name]
        if not available(views, projector):
            skipped[name] = f"views {views.name!r} or projector {projector!r} is not registered"
            continue
        try:
            trained[name] = train_mode(name, views, projector, tokenizer, data, args)
        except Exception as exc:  # a mode that can't run is reported, not fatal
            skipped[name] = f"{type(exc).__name__}: {exc}"
            print(json.dumps({"mode": name, "skipped": skipped[name]}), flush=True)
    costs = prefill_costs(trained, [png for _, png, _ in data["test"]], args.timing_rounds)
    summary = {
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "vision": VISION, "lm": LM,
                   "canvas": data["size"], "vocab": len(tokenizer), "data_s": round(data_s)},
        "tower": tower_report,
        "modes": {m: {**{k: v for k, v in t["result"].items() if k != "curve"}, **costs[m]}
                  for m, t in trained.items()},
        "curves": {m: t["result"]["curve"] for m, t in trained.items()},
        "skipped": skipped,
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    short = {
        "tower": tower_report["linear_probe"],
        **{k: summary[k] for k in ("modes", "skipped", "minutes")},
    }
    print(json.dumps(short, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
