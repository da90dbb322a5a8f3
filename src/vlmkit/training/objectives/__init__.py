"""Training objectives by name: what a stage trains, how its batches are built, its loss and what it saves.

The trainer runs one step loop (optimizer, AMP, clipping, records, checkpoints, signals, resume) for every
objective; an objective is one module whose factory is registered in :data:`OBJECTIVES` (docs/training.md,
"How to add an objective"). Built in: ``lm`` (:mod:`.lm`) and ``grid_labels`` (:mod:`.grid_labels`).
"""

from vlmkit.training.objectives import grid_labels, lm
from vlmkit.training.objectives.base import OBJECTIVES, Objective, StageRun, StageSetup, StepBatch

__all__ = ["OBJECTIVES", "Objective", "StageRun", "StageSetup", "StepBatch", "grid_labels", "lm"]
