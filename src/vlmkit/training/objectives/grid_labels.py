"""The ``grid_labels`` objective: the vision tower alone learns ShapesWorld's per-cell labels (one process).

The labels, the temporary heads and their loss live in :mod:`vlmkit.training.grid_labels`; this is the stage
around them: its checks, its image pool and seeded batch order, and the heads' weights in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmkit.data.formats import resolve_image
from vlmkit.errors import ConfigError, DataError
from vlmkit.training.config import StageConfig
from vlmkit.training.data import read_samples
from vlmkit.training.grid_labels import CellLabels, GridLabelObjective, cell_labels, stack_targets, truth_of
from vlmkit.training.model import apply_policy
from vlmkit.training.objectives.base import OBJECTIVES, StageRun, StageSetup, StepBatch


@OBJECTIVES.register("grid_labels")
class GridLabels:
    """Vision pretraining on the records' ``meta.truth`` through temporary per-cell heads (dropped after)."""

    run: StageRun
    pool: list[Any]
    labels: list[CellLabels]
    module: GridLabelObjective
    total: int

    def check(self, stage: StageConfig, where: str) -> None:
        policy = stage.policy
        if policy.vision != "full" or policy.projector != "frozen" or policy.language_model != "frozen":
            raise ConfigError(
                f"{where}: objective grid_labels trains the vision tower alone; set policy "
                "{vision: full, projector: frozen, language_model: frozen}"
            )
        if stage.streaming is True:
            raise ConfigError(f"{where}: objective grid_labels reads its images first; drop streaming: true")

    def start(self, run: StageRun) -> StageSetup:
        stage, env, where = run.stage, run.env, run.where
        if env.distributed:
            raise ConfigError(f"{where}: the grid_labels objective runs in one process; start it without torchrun")
        self.run, self.pool = run, []
        for source in stage.data:
            samples = [s for s, _ in zip(read_samples(source), range(source.limit or 2**62), strict=False)]
            self.pool += [s for s in samples if s.images]
        self.labels = [cell_labels(truth_of(s, where)) for s in self.pool]  # all checked before the first step
        if len(self.pool) < stage.batch_size:
            n = len(self.pool)
            raise DataError(f"{where}: {n} samples with an image, fewer than batch_size {stage.batch_size}")
        self.total = stage.steps or max(1, math.ceil((stage.epochs or 1.0) * len(self.pool) / stage.batch_size))
        apply_policy(run.model, stage)
        self.module = GridLabelObjective(run.model.vision_tower).to(env.device).train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        lr = stage.module_lr.get("vision", stage.lr)
        groups = [{"params": params, "lr": lr, "weight_decay": stage.weight_decay, "name": "vision"}]
        summary = f"grid_labels on {len(self.pool)} images"
        return StageSetup(self.module, groups, self.total, stage.batch_size, len(self.pool), summary=summary)

    def batches(self, start: int) -> Iterator[StepBatch]:
        stage = self.run.stage
        rng = np.random.default_rng([self.run.seed, self.run.index])
        order = [rng.choice(len(self.pool), size=stage.batch_size, replace=False) for _ in range(self.total)]
        for step in range(start, self.total):
            pixels = self.run.processor.load_images([resolve_image(self.pool[i].images[0]) for i in order[step]])
            targets = stack_targets(self.labels[i] for i in order[step])
            yield StepBatch(iter([(pixels, targets)]), record={"samples": stage.batch_size})

    def loss(self, module: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        pixels, targets = batch
        loss, accuracy = module(pixels.to(self.run.env.device), targets)
        return loss, {"accuracy": accuracy}

    def state_dict(self) -> dict[str, Any]:
        return {"heads": self.module.heads.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "heads" in state:  # checkpoints written before the stage could resume midway hold none (at its end)
            self.module.heads.load_state_dict(state["heads"])
