"""The built-in ``clip-shapes`` model's measurements on ShapesWorld's held-out test split.

- retrieval over ``n`` test scenes and their canonical captions: text→image recall@1 and @5 (is the caption's
  own image among the top 1 / 5 of the ``n`` images), image→text recall@1;
- zero-shot colour (10 classes) and shape (6 classes) of the first ``n_single`` one-object test scenes, with
  CLIP's template averaging over caption-style templates that name every other attribute (size, shape or colour,
  place): e.g. colour "red" = the mean of "There is one object: a {size} red {shape} {place}." over all sizes,
  shapes and places.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from vlmkit.data.shapes import CELLS, COLOURS, SHAPES, SIZES, Scene, render_scene, sample_scene
from vlmkit.data.tasks import _CELL_PHRASES, caption
from vlmkit.embeddings.encoder import DualEncoder
from vlmkit.embeddings.zeroshot import label_embeddings


def scenes(n: int, split: str = "test", seed: int = 0, objects: int | None = None) -> list[Scene]:
    """The first ``n`` scenes of ``split`` (with exactly ``objects`` objects when given)."""
    found: list[Scene] = []
    index = 0
    while len(found) < n:
        scene = sample_scene(split, seed, index)
        if objects is None or len(scene.objects) == objects:
            found.append(scene)
        index += 1
    return found


def render(items: list[Scene]) -> list[Image.Image]:
    return [render_scene(s) for s in items]


def recall_at(sims: np.ndarray, k: int) -> float:
    """Fraction of rows whose own column (the diagonal) is among their ``k`` highest (ties count against)."""
    own = np.diag(sims)[:, None]
    rank = (sims > own).sum(axis=1)
    return float((rank < k).mean())


def retrieval(encoder: DualEncoder, items: list[Scene], images: np.ndarray | None = None) -> dict[str, float]:
    """Text→image recall@1/@5 and image→text recall@1 over ``items`` (``images``: their embeddings, if known)."""
    image_emb = encoder.embed_images(render(items)) if images is None else images
    text_emb = encoder.embed_texts([caption(s) for s in items])
    sims = text_emb @ image_emb.T  # rows: captions
    return {"t2i_r1": recall_at(sims, 1), "t2i_r5": recall_at(sims, 5), "i2t_r1": recall_at(sims.T, 1)}


def attribute_templates(attribute: str) -> tuple[str, ...]:
    """Caption-style templates with one ``{}`` for ``attribute`` (colour or shape), every other attribute varied."""
    places = [_CELL_PHRASES[c] for c in CELLS]
    if attribute == "colour":
        return tuple(f"There is one object: a {z} {{}} {s} {p}." for z in SIZES for s in SHAPES for p in places)
    return tuple(f"There is one object: a {z} {c} {{}} {p}." for z in SIZES for c in COLOURS for p in places)


def zero_shot(encoder: DualEncoder, items: list[Scene], images: np.ndarray | None = None) -> dict[str, float]:
    """Zero-shot colour and shape accuracy over one-object scenes."""
    image_emb = encoder.embed_images(render(items)) if images is None else images
    out: dict[str, float] = {}
    for attribute, labels in (("colour", list(COLOURS)), ("shape", list(SHAPES))):
        weights = label_embeddings(encoder, labels, attribute_templates(attribute))
        picks = (image_emb @ weights.T).argmax(axis=1)
        truth = [getattr(s.objects[0], attribute) for s in items]
        out[f"zeroshot_{attribute}"] = float(np.mean([labels[p] == t for p, t in zip(picks, truth, strict=True)]))
    return out


def evaluate(
    encoder: DualEncoder, n: int = 1000, n_single: int = 500, split: str = "test", seed: int = 0
) -> dict[str, Any]:
    """Every measurement above, on scenes of ``split`` under ``seed``."""
    retrieved = retrieval(encoder, scenes(n, split=split, seed=seed))
    zero = zero_shot(encoder, scenes(n_single, split=split, seed=seed, objects=1))
    return {**retrieved, **zero, "split": split, "seed": seed, "n": n, "n_single": n_single}
