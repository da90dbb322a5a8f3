"""The recipe of the built-in ``clip-shapes`` model: a tiny CLIP trained contrastively on ShapesWorld captions.

``python -m vlmkit.embeddings.training recipes/clip.yaml [--set key=value ...]`` renders the training scenes
once (cached as uint8 pixels exactly as the model's image processor resizes them), trains a CLIP-form BPE
tokenizer on the captions, then trains a transformers :class:`~transformers.CLIPModel` from scratch with CLIP's
symmetric InfoNCE loss (learnt temperature), and saves it with its processor in ``output_dir/final``, a folder
:func:`vlmkit.embeddings.encoder.load_folder_encoder` (and plain transformers) loads. Each caption is the
canonical one or a paraphrase (objects shuffled), so the text tower learns the phrasing, not one word order.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from tqdm import tqdm

from vlmkit.config import config_from_dict, config_to_dict
from vlmkit.errors import ConfigError, VlmkitError

log = logging.getLogger(__name__)


@dataclass
class ClipRecipe:
    """Every setting of a ``clip-shapes`` training run (recipes/clip.yaml)."""

    output_dir: str = "runs/clip"
    cache_dir: str = "runs/clip-cache"
    seed: int = 0
    data_seed: int = 0
    train_scenes: int = 50000
    image_size: int = 96
    """The model's input side; ShapesWorld's 128-px images are resized to it (bicubic, as its processor does)."""
    vocab_size: int = 1024
    max_length: int = 96
    projection_dim: int = 128
    logit_scale_init: float = 2.6592
    """log(1 / temperature) at the start: CLIP's 2.6592 is temperature 0.07."""
    vision: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 160, "intermediate_size": 640, "num_hidden_layers": 3, "num_attention_heads": 4,
        "patch_size": 32})  # fmt: skip
    text: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4})  # fmt: skip
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast of the towers (the loss stays float32); measured no faster than fp32 at these widths."""
    canonical: float = 0.5
    hard_negatives: float = 0.0
    """Fraction of each batch that are twins of the batch's other scenes with one object's shape or colour changed
    (rendered on the fly, their captions changed to match): a random batch almost never holds two scenes that
    differ only in a shape, so without them nothing makes the model tell shapes apart."""
    """Probability that a training caption is the canonical one (else one of its three paraphrases)."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end)."""
    eval_split: str = "val"
    """Where the periodic and final measurements are taken: ``val`` while tuning, ``test`` for the model card."""
    eval_scenes: int = 1000
    eval_single: int = 500
    log_every: int = 50
    workers: int = 2
    """Processes that render the training scenes (once; cached in ``cache_dir``)."""


def _parse_value(text: str) -> Any:
    """A ``--set`` value as YAML, with numbers YAML 1.1 leaves as strings (``3e-3``) read as floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> ClipRecipe:  # type: ignore[assignment]
    """The recipe in a YAML file, with ``key=value`` overrides (values parsed as YAML, dotted keys for dicts)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc})") from exc
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        target = data
        *parents, last = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = _parse_value(value)
    return config_from_dict(ClipRecipe, data)


# ------------------------------------------------------------------------------------------------------ data


def image_processor(size: int) -> Any:
    """The built-in model's image processor: CLIP's (bicubic resize, centre crop, CLIP mean/std) at ``size``."""
    from transformers import CLIPImageProcessor

    from vlmkit.embeddings.encoder import _quiet_transformers

    with _quiet_transformers():
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _render_chunk(args: tuple[str, int, int, int, int]) -> np.ndarray:
    from vlmkit.data.shapes import render_scene, sample_scene

    split, seed, start, stop, size = args
    images = [render_scene(sample_scene(split, seed, i)) for i in range(start, stop)]
    return image_processor(size)(images=images, return_tensors="np", do_rescale=False, do_normalize=False)[
        "pixel_values"
    ]


def cached_pixels(split: str, seed: int, n: int, size: int, cache_dir: str | Path, workers: int = 1) -> np.ndarray:
    """``(n, 3, size, size)`` uint8: scenes 0..n-1 of ``split`` resized as the processor resizes them (its output
    before rescaling and normalising, so normalising these gives exactly its ``pixel_values``). Cached on disk;
    rendered by ``workers`` processes."""
    path = Path(cache_dir) / f"{split}-s{seed}-n{n}-{size}px.npy"
    if path.is_file():
        return np.load(path)
    out = np.empty((n, 3, size, size), np.uint8)
    chunk = 512
    jobs = [(split, seed, start, min(n, start + chunk), size) for start in range(0, n, chunk)]
    bar = tqdm(total=len(jobs), desc=f"render {split}", unit="chunk", dynamic_ncols=True)
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for (_, _, start, stop, _), pixels in zip(jobs, pool.imap(_render_chunk, jobs), strict=True):
                out[start:stop] = pixels
                bar.update()
    else:
        for job in jobs:
            out[job[2] : job[3]] = _render_chunk(job)
            bar.update()
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def normalise(pixels: np.ndarray, processor: Any) -> torch.Tensor:
    """uint8 pixels → the processor's ``pixel_values`` (rescale by 1/255, then its mean and std)."""
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (torch.from_numpy(pixels).float() / 255.0 - mean) / std


def twin(scene: Any, rng: np.random.Generator) -> Any:
    """``scene`` with one object's shape (or, half the time, colour) changed to another, every (colour, shape)
    pair still unique: a hard negative whose caption differs from the scene's in one word."""
    import dataclasses

    from vlmkit.data.shapes import COLOURS, SHAPES

    objects = list(scene.objects)
    k = int(rng.integers(len(objects)))
    taken = {(o.colour, o.shape) for o in objects}
    obj = objects[k]
    first = "shape" if rng.random() < 0.5 else "colour"
    for attribute in (first, "colour" if first == "shape" else "shape"):
        values = SHAPES if attribute == "shape" else tuple(COLOURS)
        choices = [v for v in values if v != getattr(obj, attribute)
                   and ((obj.colour, v) if attribute == "shape" else (v, obj.shape)) not in taken]  # fmt: skip
        if choices:  # a shape change can be impossible (every other shape taken in this colour): then a colour one
            break
    objects[k] = dataclasses.replace(obj, **{attribute: choices[int(rng.integers(len(choices)))]})
    return dataclasses.replace(scene, objects=tuple(objects))


def twin_pixels(scenes: list[Any], processor: Any) -> np.ndarray:
    """Render scenes and resize them as :func:`cached_pixels` does (uint8)."""
    from vlmkit.data.shapes import render_scene

    images = [render_scene(s) for s in scenes]
    return processor(images=images, return_tensors="np", do_rescale=False, do_normalize=False)["pixel_values"]


def captions_of(scene: Any, rng: np.random.Generator, canonical: float) -> str:
    """The canonical caption with probability ``canonical``, else one of its paraphrases (objects shuffled)."""
    from vlmkit.data.tasks import caption, caption_variants

    if rng.random() < canonical:
        return caption(scene)
    variants = caption_variants(scene, rng)[1:]
    return variants[int(rng.integers(len(variants)))]


# ------------------------------------------------------------------------------------------------------ model


def build_model(recipe: ClipRecipe, tokenizer: Any) -> Any:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=recipe.max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, projection_dim=recipe.projection_dim,
                          **recipe.text)  # fmt: skip
    vision = CLIPVisionConfig(image_size=recipe.image_size, projection_dim=recipe.projection_dim, **recipe.vision)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=recipe.projection_dim,
                        logit_scale_init_value=recipe.logit_scale_init)  # fmt: skip
    return CLIPModel(config)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not biases, norms, embeddings, the class token or the temperature)."""
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        no_decay = param.ndim < 2 or "embedding" in name or name == "logit_scale"
        (plain if no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the batch's image-text similarities, in float32."""
    image = torch.nn.functional.normalize(image.float(), dim=-1)
    text = torch.nn.functional.normalize(text.float(), dim=-1)
    logits = scale.float().exp() * text @ image.T
    target = torch.arange(len(logits))
    return (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2


def _features(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ------------------------------------------------------------------------------------------------------ run


def train(recipe: ClipRecipe, progress: bool = True) -> dict[str, Any]:
    """Run the recipe; returns (and writes to ``output_dir/summary.json``) its timings and final measurements."""
    from vlmkit.data.shapes import sample_scene
    from vlmkit.embeddings import shapes_eval
    from vlmkit.embeddings.encoder import DualEncoder
    from vlmkit.processing.clip_tokenizer import train_clip_bpe
    from vlmkit.training.optim import lr_factor

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(config_to_dict(recipe), indent=2) + "\n")
    started = time.perf_counter()
    processor = image_processor(recipe.image_size)
    pixels = cached_pixels("train", recipe.data_seed, recipe.train_scenes, recipe.image_size, recipe.cache_dir,
                           recipe.workers)  # fmt: skip
    train_scenes = [sample_scene("train", recipe.data_seed, i) for i in range(recipe.train_scenes)]
    rng = np.random.default_rng(recipe.seed)
    corpus = [captions_of(s, rng, 0.25) for s in train_scenes[:8000]]
    from vlmkit.embeddings.templates import TEMPLATES

    corpus += [t.format("red circle") for t in TEMPLATES.get("shapes")]
    tokenizer = train_clip_bpe(corpus, recipe.vocab_size, model_max_length=recipe.max_length)
    data_seconds = time.perf_counter() - started

    torch.manual_seed(recipe.seed)
    model = build_model(recipe, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe.weight_decay), lr=recipe.lr,
                                  betas=tuple(recipe.betas), eps=recipe.eps)  # type: ignore[arg-type]  # fmt: skip
    warmup = int(recipe.warmup_ratio * recipe.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, recipe.steps, warmup, recipe.min_lr_ratio)
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.precision == "bf16")
    max_scale = math.log(100.0)
    eval_scenes = shapes_eval.scenes(recipe.eval_scenes, split=recipe.eval_split)
    single_scenes = shapes_eval.scenes(recipe.eval_single, split=recipe.eval_split, objects=1)

    def evaluate() -> dict[str, Any]:
        model.eval()
        encoder = DualEncoder(model, processor, tokenizer, name="clip-shapes")
        with torch.inference_mode():
            result = {**shapes_eval.retrieval(encoder, eval_scenes), **shapes_eval.zero_shot(encoder, single_scenes)}
        model.train()
        return result

    records = (out / "records.jsonl").open("w")
    order = np.random.default_rng(recipe.seed + 1).permutation(recipe.train_scenes)
    position, train_seconds, eval_seconds = 0, 0.0, 0.0
    model.train()
    bar = tqdm(range(recipe.steps), desc="clip", unit="step", disable=not progress, dynamic_ncols=True)
    running = []
    for step in bar:
        tick = time.perf_counter()
        if position + recipe.batch_size > len(order):
            order, position = np.random.default_rng(recipe.seed + 2 + step).permutation(recipe.train_scenes), 0
        twins = round(recipe.hard_negatives * recipe.batch_size)
        base = recipe.batch_size - twins
        index = np.sort(order[position : position + base])
        position += base
        batch_scenes = [train_scenes[i] for i in index]
        batch_pixels = pixels[index]
        if twins:
            made = [twin(batch_scenes[int(j)], rng) for j in rng.choice(base, size=twins, replace=twins > base)]
            batch_scenes += made
            batch_pixels = np.concatenate([batch_pixels, twin_pixels(made, processor)])
        images = normalise(batch_pixels, processor)
        texts = tokenizer([captions_of(scene, rng, recipe.canonical) for scene in batch_scenes], padding=True,
                          truncation=True, max_length=recipe.max_length, return_tensors="pt")  # fmt: skip
        with autocast:
            image_features = _features(model.get_image_features(pixel_values=images))
            text_features = _features(model.get_text_features(input_ids=texts["input_ids"],
                                                              attention_mask=texts["attention_mask"]))  # fmt: skip
        loss = contrastive_loss(image_features, text_features, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_scale)
        train_seconds += time.perf_counter() - tick
        running.append(float(loss.detach()))
        done = step + 1
        if done % recipe.log_every == 0 or done == recipe.steps:
            scale = float(model.logit_scale.detach().exp())
            row = {"step": done, "loss": float(np.mean(running)), "lr": scheduler.get_last_lr()[0], "scale": scale,
                   "train_seconds": round(train_seconds, 1)}  # fmt: skip
            running = []
            bar.set_postfix(loss=f"{row['loss']:.3f}", scale=f"{row['scale']:.1f}")
            records.write(json.dumps(row) + "\n")
            records.flush()
        if (recipe.eval_every and done % recipe.eval_every == 0) or done == recipe.steps:
            tick = time.perf_counter()
            result = {"step": done, **evaluate()}
            eval_seconds += time.perf_counter() - tick
            records.write(json.dumps(result) + "\n")
            records.flush()
            log.info("step %d: %s", done, {k: round(v, 3) for k, v in result.items()})
    bar.close()
    records.close()
    final = out / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    tokenizer.save_pretrained(final)
    summary = {
        "parameters": params,
        "weights_mb": round((final / "model.safetensors").stat().st_size / 1e6, 2),
        "data_minutes": round(data_seconds / 60, 2),
        "train_minutes": round(train_seconds / 60, 2),
        "eval_minutes": round(eval_seconds / 60, 2),
        "threads": torch.get_num_threads(),
        **result,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmkit.embeddings.training", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="a recipe YAML (recipes/clip.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = train(load_recipe(args.recipe, args.set), progress=not args.quiet)
    except VlmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
