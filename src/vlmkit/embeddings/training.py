"""The recipe of the built-in ``clip-shapes`` model: a tiny dual encoder trained contrastively on ShapesWorld captions.

``python -m vlmkit.embeddings.training recipes/clip.yaml [--set key=value ...]`` renders the training scenes
once (cached as uint8 pixels exactly as the model's image processor resizes them), trains a CLIP-form BPE
tokenizer on the captions, then trains a transformers dual encoder with a contrastive loss (CLIP's symmetric
InfoNCE or SigLIP's sigmoid loss, learnt temperature): a :class:`~transformers.CLIPModel` from scratch, or a
:class:`~transformers.SiglipModel` whose image tower is a vlmkit VLM's, locked but its pooling head (LiT, Zhai et
al. 2022: its features are then computed once), with a new text tower. It saves the model with its processor in
``output_dir/final``, a folder :func:`vlmkit.embeddings.encoder.load_folder_encoder` (and plain transformers)
loads. Each caption is the canonical one or a paraphrase (objects shuffled), so the text tower learns the
phrasing, not one word order.
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
    architecture: Literal["clip", "siglip"] = "clip"
    """``clip``: a transformers ``CLIPModel`` (CLS pooling, causal text tower pooled at the end token);
    ``siglip``: a ``SiglipModel`` (attention-pooling head, texts padded to ``max_length`` and pooled at the last
    position; its embedding size is the vision width)."""
    vision_init: str = ""
    """A vlmkit VLM (a built-in name such as ``default``, or a checkpoint folder) whose SigLIP vision tower starts
    the image tower (``siglip`` only): its geometry and image normalisation are the tower's, so ``vision`` must be
    empty. ``""``: the image tower starts from random weights with the ``vision`` settings."""
    freeze_vision: Literal["none", "body", "all"] = "none"
    """Locked-image tuning (LiT): ``body`` freezes the image tower but its pooling head (``siglip``), ``all`` the
    whole image tower; only the rest trains."""
    unfreeze_at: int = 0
    """Step at which a frozen image tower starts training too, at ``vision_lr_scale`` × the lr (0: never)."""
    vision_lr_scale: float = 1.0
    """The image tower's lr multiplier once it trains (after ``unfreeze_at``, or throughout when not frozen)."""
    loss: Literal["softmax", "sigmoid"] = "softmax"
    """``softmax``: CLIP's symmetric cross-entropy over the batch; ``sigmoid``: SigLIP's pairwise sigmoid loss
    (uses the model's ``logit_bias``; ``siglip`` only)."""
    logit_bias_init: float = -10.0
    """The sigmoid loss's starting bias (SigLIP's -10)."""
    save_dtype: Literal["fp32", "fp16"] = "fp32"
    """The saved weights' dtype (``fp16`` halves the file; vlmkit loads them as float32)."""
    train_scenes: int = 50000
    image_size: int = 96
    """The model's input side; ShapesWorld's 128-px images are resized to it (bicubic, as its processor does)."""
    vocab_size: int = 1024
    max_length: int = 96
    projection_dim: int = 128
    """The embedding size (``siglip``: it must equal the vision width, which its pooling head outputs)."""
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
    """Probability that a training caption is the canonical one (else one of its three paraphrases)."""
    hard_negatives: float = 0.0
    """Fraction of each batch that are twins of the batch's other scenes with one object's shape or colour changed
    (rendered on the fly, their captions changed to match): a random batch almost never holds two scenes that
    differ only in a shape, so without them nothing makes the model tell shapes apart."""
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
    return check_recipe(config_from_dict(ClipRecipe, data))


def check_recipe(recipe: ClipRecipe) -> ClipRecipe:
    """``recipe`` if its settings fit together, else a :class:`ConfigError` naming the one that doesn't."""
    if recipe.architecture != "siglip":
        for key, value, plain in (("vision_init", recipe.vision_init, ""), ("loss", recipe.loss, "softmax")):
            if value != plain:
                raise ConfigError(f"{key}: {value!r} needs architecture 'siglip' (got {recipe.architecture!r})")
    if recipe.freeze_vision != "none" and not recipe.vision_init:
        raise ConfigError(f"freeze_vision: {recipe.freeze_vision!r} locks a pretrained image tower; name it in "
                          "vision_init")  # fmt: skip
    if recipe.vision_init and recipe.vision:
        raise ConfigError(f"vision: the image tower comes from vision_init {recipe.vision_init!r}; leave vision "
                          f"empty (got {sorted(recipe.vision)})")  # fmt: skip
    if not recipe.vision_init and not recipe.vision:
        raise ConfigError("vision: empty, and no vision_init tower to take the image tower from")
    if recipe.unfreeze_at and (recipe.freeze_vision == "none" or not 0 < recipe.unfreeze_at < recipe.steps):
        raise ConfigError(f"unfreeze_at: {recipe.unfreeze_at} needs a frozen image tower (freeze_vision) and a step "
                          f"inside the run (1-{recipe.steps - 1})")  # fmt: skip
    return recipe


# ------------------------------------------------------------------------------------------------------ data


def image_processor(size: int) -> Any:
    """The built-in model's image processor: CLIP's (bicubic resize, centre crop, CLIP mean/std) at ``size``."""
    from transformers import CLIPImageProcessor

    from vlmkit.embeddings.encoder import _quiet_transformers

    with _quiet_transformers():
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def model_processor(recipe: ClipRecipe, mean: Any = None, std: Any = None) -> Any:
    """The image processor saved with the model: CLIP's, or SigLIP's (bicubic resize to the square, ``mean`` and
    ``std``: those the image tower was trained with)."""
    if recipe.architecture == "clip":
        return image_processor(recipe.image_size)
    from transformers import SiglipImageProcessor

    from vlmkit.embeddings.encoder import _quiet_transformers

    size = {"height": recipe.image_size, "width": recipe.image_size}
    with _quiet_transformers():
        return SiglipImageProcessor(size=size, image_mean=list(mean or (0.5,) * 3), image_std=list(std or (0.5,) * 3))


def vlm_tower(name: str) -> tuple[Any, Any]:
    """The transformers vision model of a vlmkit VLM (built-in name or checkpoint folder) and its image transform
    config (size, mean, std)."""
    from vlmkit.models.builtin import BUILTIN_MODELS
    from vlmkit.models.compose import load_pretrained

    vlm, processor = BUILTIN_MODELS.get(name).load() if name in BUILTIN_MODELS else load_pretrained(name)
    tower = vlm.vision_tower.model
    if tower.config.model_type != "siglip_vision_model":
        raise ConfigError(f"vision_init: {name!r} has a {tower.config.model_type!r} tower; a SigLIP one is needed")
    if not getattr(tower.config, "vision_use_head", False):
        raise ConfigError(f"vision_init: {name!r}'s SigLIP tower has no pooling head (vision_use_head)")
    return tower, processor.image_transform.config


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


def build_model(recipe: ClipRecipe, tokenizer: Any, tower: Any = None) -> Any:
    """A new dual encoder of ``recipe.architecture``; ``tower``: a SigLIP vision model whose weights it starts from."""
    if recipe.architecture == "siglip":
        return build_siglip(recipe, tokenizer, tower)
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


def build_siglip(recipe: ClipRecipe, tokenizer: Any, tower: Any = None) -> Any:
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig

    if tower is not None:
        vision = tower.config.to_dict()
    else:
        vision = SiglipVisionConfig(image_size=recipe.image_size, vision_use_head=True, **recipe.vision).to_dict()
    if vision["image_size"] != recipe.image_size:
        raise ConfigError(f"image_size: {recipe.image_size}, but the vision_init tower reads {vision['image_size']} px")
    if recipe.projection_dim != vision["hidden_size"]:
        raise ConfigError(f"projection_dim: {recipe.projection_dim}, but a SigLIP embedding is the vision width "
                          f"({vision['hidden_size']})")  # fmt: skip
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=recipe.max_length,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, projection_size=recipe.projection_dim, **recipe.text)  # fmt: skip
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    if tower is not None:
        model.vision_model.load_state_dict(tower.state_dict())
    with torch.no_grad():
        model.logit_scale.fill_(recipe.logit_scale_init)
        model.logit_bias.fill_(recipe.logit_bias_init)
    return model


def vision_parameters(model: Any, part: str) -> list[torch.nn.Parameter]:
    """The image tower's parameters that ``freeze_vision=part`` freezes (``body``: all but a SigLIP pooling head)."""
    if part == "none":
        return []
    tower = model.vision_model
    return [p for name, p in tower.named_parameters() if part == "all" or not name.startswith("head.")]


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float = 1.0,
                     vision: list[torch.nn.Parameter] = (), vision_lr: float = 1.0) -> list[dict[str, Any]]:  # type: ignore[assignment]  # fmt: skip
    """Weight decay on matrices only (not biases, norms, embeddings, the class token, the pooling probe or the
    temperature and bias); ``vision`` parameters in their own groups at ``vision_lr``."""
    own = {id(p) for p in vision}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        no_decay = param.ndim < 2 or "embedding" in name or name in ("logit_scale", "logit_bias") or "probe" in name
        groups.setdefault((id(param) in own, no_decay), []).append(param)
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr": vision_lr if tower else lr}
            for (tower, no_decay), params in sorted(groups.items())]  # fmt: skip


def frozen_features(model: Any, pixels: np.ndarray, processor: Any, part: str, chunk: int = 512) -> torch.Tensor:
    """What a frozen SigLIP image tower makes of ``pixels`` (uint8), computed once: its last hidden state (``body``:
    the trained pooling head reads it) or its embedding (``all``)."""
    tower = model.vision_model
    parts = []
    with torch.no_grad():
        for start in range(0, len(pixels), chunk):
            output = tower(pixel_values=normalise(pixels[start : start + chunk], processor))
            parts.append(output.last_hidden_state if part == "body" else output.pooler_output)
    return torch.cat(parts)


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: every image-text pair of the batch a binary match / no-match, summed per text, in float32."""
    image = torch.nn.functional.normalize(image.float(), dim=-1)
    text = torch.nn.functional.normalize(text.float(), dim=-1)
    logits = scale.float().exp() * text @ image.T + bias.float()
    signs = 2 * torch.eye(len(logits)) - 1
    return -torch.nn.functional.logsigmoid(signs * logits).sum() / len(logits)


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
    tower, transform = vlm_tower(recipe.vision_init) if recipe.vision_init else (None, None)
    processor = model_processor(recipe, *((transform.mean, transform.std) if transform else ()))
    train_scenes = [sample_scene("train", recipe.data_seed, i) for i in range(recipe.train_scenes)]
    rng = np.random.default_rng(recipe.seed)
    corpus = [captions_of(s, rng, 0.25) for s in train_scenes[:8000]]
    from vlmkit.embeddings.templates import TEMPLATES

    corpus += [t.format("red circle") for t in TEMPLATES.get("shapes")]
    tokenizer = train_clip_bpe(corpus, recipe.vocab_size, model_max_length=recipe.max_length)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe, tokenizer, tower)  # before rendering: a tower that does not fit fails fast
    del tower
    pixels = cached_pixels("train", recipe.data_seed, recipe.train_scenes, recipe.image_size, recipe.cache_dir,
                           recipe.workers)  # fmt: skip
    data_seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    frozen = vision_parameters(model, recipe.freeze_vision)
    tower_params = frozen if recipe.freeze_vision != "none" else vision_parameters(model, "all")
    for param in frozen:
        param.requires_grad_(False)
    groups = parameter_groups(model, recipe.weight_decay, recipe.lr, tower_params, recipe.lr * recipe.vision_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps)  # type: ignore[arg-type]
    padding = "max_length" if recipe.architecture == "siglip" else True  # SigLIP pools the last position
    cached = recipe.architecture == "siglip" and recipe.freeze_vision != "none" and not recipe.unfreeze_at
    feature_seconds = 0.0
    if cached:  # a tower that never trains sees each image once
        tick = time.perf_counter()
        features = frozen_features(model, pixels, processor, recipe.freeze_vision)
        feature_seconds = time.perf_counter() - tick
        log.info("frozen image tower: features of %d scenes in %.1f s", len(features), feature_seconds)
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
        if recipe.unfreeze_at and step == recipe.unfreeze_at:
            for param in frozen:
                param.requires_grad_(True)
            log.info("step %d: the image tower trains from here", step)
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
            made_pixels = twin_pixels(made, processor)
        if cached:
            hidden = features[index]
            if twins:
                hidden = torch.cat([hidden, frozen_features(model, made_pixels, processor, recipe.freeze_vision)])
        else:
            images = normalise(np.concatenate([batch_pixels, made_pixels]) if twins else batch_pixels, processor)
        texts = tokenizer([captions_of(scene, rng, recipe.canonical) for scene in batch_scenes], padding=padding,
                          truncation=True, max_length=recipe.max_length, return_tensors="pt")  # fmt: skip
        with autocast:
            if not cached:
                image_features = _features(model.get_image_features(pixel_values=images))
            else:
                image_features = model.vision_model.head(hidden) if recipe.freeze_vision == "body" else hidden
            text_features = _features(model.get_text_features(input_ids=texts["input_ids"],
                                                              attention_mask=texts["attention_mask"]))  # fmt: skip
        if recipe.loss == "sigmoid":
            loss = sigmoid_loss(image_features, text_features, model.logit_scale, model.logit_bias)
        else:
            loss = contrastive_loss(image_features, text_features, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
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
    if recipe.save_dtype == "fp16":
        model.to(torch.float16)
    model.save_pretrained(final)
    processor.save_pretrained(final)
    tokenizer.save_pretrained(final)
    summary = {
        "parameters": params,
        "weights_mb": round((final / "model.safetensors").stat().st_size / 1e6, 2),
        "data_minutes": round(data_seconds / 60, 2),
        "feature_minutes": round(feature_seconds / 60, 2),
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
