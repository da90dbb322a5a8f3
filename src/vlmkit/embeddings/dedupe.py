"""Near-duplicate images in an index: every pair of live rows whose cosine similarity is at least a threshold
(FAISS range search, exact), and the groups they join into (connected components), e.g. to curate a
fine-tuning set: keep one image per group."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vlmkit.embeddings.index import EmbeddingIndex, _faiss
from vlmkit.errors import ConfigError

CHUNK = 4096


@dataclass
class DuplicatePair:
    a: str
    """The image (as given when embedded) of the lower id."""
    b: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "score": round(self.score, 6)}


def near_duplicates(index: EmbeddingIndex | str | Path, threshold: float, progress: bool = False
                    ) -> list[DuplicatePair]:  # fmt: skip
    """Every pair of distinct live images with cosine similarity ≥ ``threshold`` (in (-1, 1]), highest first
    (ties by the images' order in the index)."""
    if not -1.0 < threshold <= 1.0:
        raise ConfigError(f"the dedupe threshold is a cosine similarity in (-1, 1], got {threshold}")
    opened = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex.open(index)
    ids, vectors = opened.live_vectors()
    if len(ids) < 2:
        return []
    flat = _faiss().IndexFlatIP(opened.dim)
    flat.add(vectors)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))  # range search keeps scores > radius
    found: list[tuple[float, int, int]] = []
    for start in tqdm(range(0, len(ids), CHUNK), desc="dedupe", unit="chunk", disable=not progress):
        lims, scores, neighbours = flat.range_search(vectors[start : start + CHUNK], radius)
        for q in range(len(lims) - 1):
            i = start + q
            for score, j in zip(scores[lims[q] : lims[q + 1]], neighbours[lims[q] : lims[q + 1]], strict=True):
                if j > i and score >= np.float32(threshold):
                    found.append((float(score), i, int(j)))
    found.sort(key=lambda item: (-item[0], item[1], item[2]))
    image = [opened.row(id).get("image", opened.row(id)["path"]) for id in ids]
    return [DuplicatePair(image[i], image[j], score) for score, i, j in found]


def duplicate_groups(pairs: list[DuplicatePair]) -> list[list[str]]:
    """The images the pairs connect, as groups (each sorted; groups by their first image): keep one of each."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pair in pairs:
        ra, rb = root(pair.a), root(pair.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for member in parent:
        groups.setdefault(root(member), []).append(member)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])
