"""The embeddings' Python API: ``vlmkit.Embedder``, ``vlmkit.embed``, ``vlmkit.search``, ``vlmkit.classify``,
``vlmkit.find_duplicates`` and ``vlmkit.open_index``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmkit.embeddings.classify import classify
from vlmkit.embeddings.dedupe import DuplicatePair, duplicate_groups, near_duplicates
from vlmkit.embeddings.embed import EmbedSummary, embed
from vlmkit.embeddings.encoder import DualEncoder, load_encoder
from vlmkit.embeddings.index import EmbeddingIndex, Hit
from vlmkit.embeddings.search import open_index, search
from vlmkit.embeddings.templates import resolve_templates
from vlmkit.embeddings.zeroshot import Prediction, label_embeddings, logit_scale, parse_labels, predict
from vlmkit.processing.images import load_image

__all__ = ["Embedder", "classify", "embed", "find_duplicates", "open_index", "search"]


class Embedder:
    """A loaded dual encoder: ``Embedder("clip-shapes")``, a CLIP/SigLIP folder or hub id.

    >>> e = Embedder("clip-shapes")
    >>> e.images(["a.png"]).shape, e.texts(["a red circle"]).shape      # unit-norm float32 rows
    >>> e.classify(["a.png"], ["red circle", "blue square"])[0].label
    """

    def __init__(self, model: str | DualEncoder = "clip-shapes", device: str = "auto", dtype: str = "auto") -> None:
        self.encoder = model if isinstance(model, DualEncoder) else load_encoder(model, device=device, dtype=dtype)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def images(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """``(n, dim)`` embeddings of images (paths, bytes, PIL images), read by ``vlmkit.load_image``."""
        return self.encoder.embed_images([load_image(image) for image in images], batch_size=batch_size)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, dim)`` embeddings of texts."""
        return self.encoder.embed_texts(list(texts))

    def classify(self, images: Sequence[Any], labels: str | Sequence[str],
                 templates: str | Path | Sequence[str] | None = None) -> list[Prediction]:  # fmt: skip
        """Zero-shot labels of images, CLIP's way (template-averaged label embeddings)."""
        names = parse_labels(labels)
        weights = label_embeddings(self.encoder, names, resolve_templates(templates or self.encoder.templates))
        return predict(self.images(images), names, weights, logit_scale(self.encoder))

    def embed(self, paths: Sequence[str | Path], out: str | Path, **kwargs: Any) -> EmbedSummary:
        """:func:`vlmkit.embed` with this model."""
        return embed(paths, out, model=self.encoder, **kwargs)

    def search(self, index: str | Path | EmbeddingIndex, text: str | None = None, *, image: Any = None,
               k: int = 10) -> list[Hit]:  # fmt: skip
        """:func:`vlmkit.search` with this model."""
        return search(index, text, image=image, k=k, encoder=self.encoder)


def find_duplicates(index: str | Path | EmbeddingIndex, threshold: float = 0.95) -> tuple[list[DuplicatePair],
                                                                                          list[list[str]]]:  # fmt: skip
    """Near-duplicate pairs (cosine ≥ ``threshold``) of an index, and the groups they form."""
    pairs = near_duplicates(open_index(index), threshold)
    return pairs, duplicate_groups(pairs)
