"""Search an index by text or by image: the query is embedded by the index's own model, then FAISS finds the
nearest live rows by cosine similarity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmkit.embeddings.encoder import DualEncoder, load_encoder
from vlmkit.embeddings.index import EmbeddingIndex, Hit
from vlmkit.errors import ConfigError
from vlmkit.processing.images import load_image


def open_index(index: str | Path | EmbeddingIndex) -> EmbeddingIndex:
    return index if isinstance(index, EmbeddingIndex) else EmbeddingIndex.open(index)


def encoder_for(index: EmbeddingIndex, encoder: DualEncoder | None = None, device: str = "auto",
                dtype: str = "auto") -> DualEncoder:  # fmt: skip
    """``encoder`` when given (its dimension must match), else the model the index was built with."""
    if encoder is None:
        encoder = load_encoder(index.model, device=device, dtype=dtype)
    if encoder.dim != index.dim:
        raise ConfigError(f"model {encoder.name!r} makes {encoder.dim}-dimension vectors; the index holds {index.dim}")
    return encoder


def search(
    index: str | Path | EmbeddingIndex,
    text: str | None = None,
    *,
    image: Any = None,
    k: int = 10,
    encoder: DualEncoder | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> list[Hit]:
    """The ``k`` indexed images most similar to ``text`` or to ``image`` (a path, bytes or PIL image), best first."""
    if (text is None) == (image is None):
        raise ConfigError("search by text or by --image, not both and not neither")
    if text is not None and not text.strip():
        raise ConfigError("the search text is empty")
    opened = open_index(index)
    model = encoder_for(opened, encoder, device, dtype)
    query = model.embed_texts([text]) if text is not None else model.embed_images([load_image(image)])
    return opened.search(query, k)[0]
