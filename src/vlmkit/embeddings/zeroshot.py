"""Zero-shot labels, as CLIP computes them: each label's text embedding is the mean of its prompt templates'
normalised embeddings, normalised again; an image takes the label of highest cosine similarity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlmkit.embeddings.encoder import DualEncoder
from vlmkit.errors import ConfigError


def parse_labels(spec: str | Sequence[str]) -> list[str]:
    """Labels from ``"sedan,suv,hatchback"`` or a list: stripped, non-empty, distinct, at least two."""
    labels = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    labels = [s for s in labels if s]
    duplicates = sorted({s for s in labels if labels.count(s) > 1})
    if duplicates:
        raise ConfigError(f"labels must be distinct; repeated: {', '.join(duplicates)}")
    if len(labels) < 2:
        raise ConfigError(f"give at least two labels (comma-separated), got {labels or 'none'}")
    return labels


def label_embeddings(encoder: DualEncoder, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """``(len(labels), dim)``: per label, the normalised mean of its templates' normalised text embeddings."""
    prompts = [template.format(label) for label in labels for template in templates]
    texts = encoder.embed_texts(prompts).reshape(len(labels), len(templates), -1)
    means = texts.mean(axis=1)
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def logit_scale(encoder: DualEncoder) -> float:
    """The model's learnt softmax temperature (``logit_scale.exp()``; CLIP's is 100), 100 when it has none."""
    scale = getattr(encoder.model, "logit_scale", None)
    return float(scale.detach().float().exp()) if scale is not None else 100.0


@dataclass
class Prediction:
    label: str
    score: float
    """Cosine similarity of the image and the label's embedding."""
    probabilities: dict[str, float]
    """Softmax over the labels of the similarities times the model's logit scale."""


def predict(image_embeddings: np.ndarray, labels: Sequence[str], weights: np.ndarray, scale: float) -> list[Prediction]:
    """The best label of each image embedding (rows normalised) against label embeddings ``weights``."""
    sims = image_embeddings @ weights.T
    logits = scale * sims
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    best = sims.argmax(axis=1)
    return [
        Prediction(labels[b], float(sims[i, b]), {label: float(p) for label, p in zip(labels, probs[i], strict=True)})
        for i, b in enumerate(best)
    ]
