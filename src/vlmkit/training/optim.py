"""AdamW and the warmup + cosine learning-rate schedule of a stage."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from vlmkit.training.config import StageConfig


def warmup_steps(stage: StageConfig, total_steps: int) -> int:
    """The stage's warmup length in steps (``warmup_steps``, else ``warmup_ratio`` of the stage)."""
    if stage.warmup_steps is not None:
        return min(stage.warmup_steps, total_steps)
    return int(stage.warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based): linear warmup from ``1/(warmup+1)`` to 1,
    then cosine from 1 down to ``min_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    groups: list[dict[str, Any]], stage: StageConfig, total_steps: int
) -> tuple[torch.optim.AdamW, LambdaLR]:
    """AdamW over the parameter groups and a LambdaLR scaling every group's lr by :func:`lr_factor`."""
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=tuple(stage.betas), eps=stage.eps)  # type: ignore[arg-type]
    warmup = warmup_steps(stage, total_steps)
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, stage.min_lr_ratio))
    return optimizer, scheduler
