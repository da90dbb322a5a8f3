"""Vision pretraining on grid-cell labels: the labels, heads and loss of the ``grid_labels`` objective.

ShapesWorld records carry their scene's ground truth in ``meta.truth``. This objective trains the vision tower
alone to make every cell of the scene's 3×3 grid readable from the features the projector sees: the tower's
patch features are average-pooled onto the grid, and linear heads classify each cell (empty, object or word;
the object's shape, colour and size; the word; the cell's own index) and regress the object's box. The heads
are thrown away after the stage; what stays is a tower whose features already say what is where, so the later
stages only have to teach the LM to read them (docs/default-model.md measures why this matters). The stage
around them (data, checks, batch order, checkpoints) is :mod:`vlmkit.training.objectives.grid_labels`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.data.shapes import CELLS, COLOURS, SHAPES, SIZES, WORDS
from vlmkit.errors import DataError
from vlmkit.models.vision import VisionTower
from vlmkit.tokens import IGNORE_INDEX

GRID = 3
IGNORE = IGNORE_INDEX
KINDS = ("empty", "object", "word")
_COLOURS = tuple(COLOURS)
HEADS = {"kind": len(KINDS), "shape": len(SHAPES), "colour": len(_COLOURS), "size": len(SIZES),
         "word": len(WORDS), "cell": len(CELLS)}  # fmt: skip
"""Classification heads and their number of classes; plus a 4-value box regression for objects."""


@dataclass
class GridTargets:
    """Per-cell labels of a batch: class indices ``(N, 9)`` per head (``IGNORE`` where not applicable), object
    boxes ``(N, 9, 4)`` as fractions of the image side, and which cells hold an object ``(N, 9)``."""

    labels: dict[str, torch.Tensor]
    boxes: torch.Tensor
    has_box: torch.Tensor


CellLabels = tuple[dict[str, list[int]], list[list[float]], list[bool]]
"""One scene's labels per head, object boxes and which cells have a box (see :func:`cell_labels`)."""


def cell_labels(truth: dict[str, Any]) -> CellLabels:
    """The labels of the 9 cells of one scene's ground truth (``Scene.to_dict()``); DataError if malformed."""
    try:
        size = float(truth["image_size"])
        labels = {name: [IGNORE] * len(CELLS) for name in HEADS}
        labels["kind"] = [0] * len(CELLS)
        labels["cell"] = list(range(len(CELLS)))
        boxes = [[0.0] * 4 for _ in CELLS]
        has_box = [False] * len(CELLS)
        for obj in truth["objects"]:
            c = CELLS.index(obj["cell"])
            labels["kind"][c] = 1
            labels["shape"][c] = SHAPES.index(obj["shape"])
            labels["colour"][c] = _COLOURS.index(obj["colour"])
            labels["size"][c] = SIZES.index(obj["size"])
            boxes[c] = [v / size for v in obj["bbox"]]
            has_box[c] = True
        word = truth.get("word")
        if word is not None:
            c = CELLS.index(word["cell"])
            labels["kind"][c] = 2
            labels["word"][c] = WORDS.index(word["text"])
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"grid_labels: a record's meta.truth is not a ShapesWorld scene ({exc!r})") from exc
    return labels, boxes, has_box


def stack_targets(rows: Iterable[CellLabels]) -> GridTargets:
    """Batch the :func:`cell_labels` of several scenes."""
    rows = list(rows)
    labels = {name: torch.tensor([r[0][name] for r in rows]) for name in HEADS}
    return GridTargets(labels, torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows]))


def pool_to_grid(features: torch.Tensor) -> torch.Tensor:
    """``(N, tokens, D)`` square patch features → ``(N, 9, D)``, averaged over each cell of the 3×3 grid."""
    n, tokens, dim = features.shape
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise DataError(f"grid_labels needs a square grid of patch features, got {tokens} tokens (a CLS token?)")
    grid = features.transpose(1, 2).reshape(n, dim, side, side)
    return F.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2)


class GridHeads(nn.Module):
    """Linear per-cell heads on pooled tower features (thrown away after pretraining)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in HEADS.items()})
        self.box = nn.Linear(dim, 4)

    def forward(self, cells: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        h = self.norm(cells.float())
        return {name: head(h) for name, head in self.heads.items()}, self.box(h)


def grid_loss(
    logits: dict[str, torch.Tensor], boxes: torch.Tensor, targets: GridTargets
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the heads' cross-entropies and the box L1 (×10); also each head's accuracy on its cells."""
    total = torch.zeros((), device=boxes.device)
    accuracy: dict[str, float] = {}
    for name, out in logits.items():
        labels = targets.labels[name].to(out.device)
        mask = labels != IGNORE
        if not mask.any():
            continue
        total = total + F.cross_entropy(out[mask], labels[mask])
        accuracy[name] = float((out[mask].argmax(-1) == labels[mask]).float().mean())
    has_box = targets.has_box.to(boxes.device)
    if has_box.any():
        err = (boxes[has_box] - targets.boxes.to(boxes.device)[has_box]).abs()
        total = total + 10 * err.mean()
        accuracy["box_error"] = float(err.detach().mean())
    return total, accuracy


class GridLabelObjective(nn.Module):
    """The tower plus its temporary heads: ``(pixels, targets)`` → loss and per-head accuracies."""

    def __init__(self, tower: VisionTower) -> None:
        super().__init__()
        self.tower = tower
        self.heads = GridHeads(tower.hidden_size)

    def forward(self, pixel_values: torch.Tensor, targets: GridTargets) -> tuple[torch.Tensor, dict[str, float]]:
        logits, boxes = self.heads(pool_to_grid(self.tower(pixel_values)))
        return grid_loss(logits, boxes, targets)


def truth_of(sample: Any, where: str) -> dict[str, Any]:
    """A sample's ``meta.truth``; DataError naming the sample when it has none."""
    truth = (getattr(sample, "meta", None) or {}).get("truth")
    if not isinstance(truth, dict):
        raise DataError(
            f"{where}: sample {getattr(sample, 'id', '?')!r} has no meta.truth; the grid_labels objective needs "
            "ShapesWorld records (vlmkit data synth)"
        )
    return truth
