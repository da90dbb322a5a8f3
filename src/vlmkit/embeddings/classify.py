"""Zero-shot classification of image files and folders: one row per image (its label, or its error)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlmkit.embeddings.encoder import DualEncoder, load_encoder
from vlmkit.embeddings.templates import resolve_templates
from vlmkit.embeddings.zeroshot import label_embeddings, logit_scale, parse_labels, predict
from vlmkit.errors import VlmkitError
from vlmkit.processing.image_files import collect_keyed, safe_text
from vlmkit.processing.images import load_image


def classify(
    paths: Sequence[str | Path],
    labels: str | Sequence[str],
    *,
    model: str | DualEncoder = "clip-shapes",
    templates: str | Path | Sequence[str] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """Rows ``{"image", "path", "label", "score", "probabilities", "error"}`` for every image under ``paths``, in
    order, a batch at a time. ``templates``: a set name, a file or a list (default: the model's own set, CLIP's
    80 ImageNet templates for any model but the built-in one); a bad image's row has its ``error``."""
    names = parse_labels(labels)
    images = collect_keyed(paths)
    encoder = model if isinstance(model, DualEncoder) else load_encoder(model, device=device, dtype=dtype)
    weights = label_embeddings(encoder, names, resolve_templates(templates or encoder.templates))
    scale = logit_scale(encoder)
    items = list(images.items())
    bar = tqdm(total=len(items), unit="img", desc="classify", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(items), batch_size):
        rows, loaded = [], []
        for key, path in items[start : start + batch_size]:
            row: dict[str, Any] = {"image": safe_text(str(path)), "path": key, "label": None, "score": None,
                                   "probabilities": None, "error": None}  # fmt: skip
            try:
                loaded.append((row, load_image(path)))
            except VlmkitError as exc:
                row["error"] = safe_text(str(exc))
            rows.append(row)
        if loaded:
            vectors = encoder.embed_images([image for _, image in loaded], batch_size=batch_size)
            for (row, _), pick in zip(loaded, predict(vectors, names, weights, scale), strict=True):
                row.update(label=pick.label, score=round(pick.score, 6),
                           probabilities={k: round(v, 6) for k, v in pick.probabilities.items()})  # fmt: skip
        bar.update(len(rows))
        yield from rows
    bar.close()
