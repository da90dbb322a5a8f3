"""The objective seam: the :class:`Objective` protocol, what it exchanges with the step loop, and the registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.processor import VLMProcessor
from vlmkit.registry import Registry
from vlmkit.training.config import StageConfig
from vlmkit.training.distributed import DistEnv


@dataclass
class StageRun:
    """What an objective gets at the start of a stage: the model, the stage and where this process stands."""

    model: VisionLanguageModel
    processor: VLMProcessor
    stage: StageConfig
    index: int
    env: DistEnv
    seed: int
    num_workers: int = 0

    @property
    def where(self) -> str:
        """The stage as error messages name it: ``stage 'align' (stages.0)``."""
        return f"stage {self.stage.name!r} (stages.{self.index})"


@dataclass
class StageSetup:
    """What :meth:`Objective.start` gives the loop: what trains, how long, and what to report."""

    module: nn.Module
    """Run forward by :meth:`Objective.loss` (wrapped by the stage's parallel strategy, DDP or FSDP, under torchrun)."""
    param_groups: list[dict[str, Any]]
    """AdamW parameter groups, each with a ``name`` (the step records' ``lrs`` keys)."""
    total: int
    """Optimizer steps in the stage."""
    global_batch: int
    """Samples per optimizer step, over all processes."""
    samples: int
    """Usable samples in the stage's data (a streaming stage: the records in its files, before any is read)."""
    summary: str = ""
    """Appended to the stage's start log line."""
    start_record: dict[str, Any] = field(default_factory=dict)
    """Extra fields of the ``stage_start`` record."""
    padding: tuple[float, float] = (0.0, 0.0)
    """Padding fraction of random batches and of the batches served (:class:`~vlmkit.training.StageResult`)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples skipped while reading the data, by reason."""


@dataclass
class StepBatch:
    """One optimizer step's data: ``accum`` micro-batches (taken one at a time, in order) and the loss divisor.

    The loop back-propagates ``loss * world_size / norm`` for each micro-batch and records the step's loss as the
    sum over micro-batches and processes divided by ``norm``; ``record`` goes into the step record as it is."""

    micro: Iterator[Any]
    accum: int = 1
    norm: float = 1.0
    record: dict[str, Any] = field(default_factory=dict)


class Objective(Protocol):
    """A stage's training objective; its registered factory builds a fresh one for every stage run."""

    def check(self, stage: StageConfig, where: str) -> None:
        """Refuse a stage config this objective cannot train (ConfigError); runs when the config loads."""

    def start(self, run: StageRun) -> StageSetup:
        """Read and check the stage's data, apply its policy and build what trains; runs as the stage starts."""
        ...

    def batches(self, start: int) -> Iterator[StepBatch]:
        """The batches of steps ``start``, ``start + 1``, ... to the stage's end: a pure function of the step."""
        ...

    def loss(self, module: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """One micro-batch's loss (scaled as the step's ``norm`` expects) and fields for the step record."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the objective beyond the model (tensors and plain values; ``{}``: none)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, when a run resumes inside or at the end of the stage."""


OBJECTIVES: Registry[Callable[[], Objective]] = Registry("objective")
"""Objective factories by name (``lm``, ``grid_labels``); register one with ``@OBJECTIVES.register("name")``."""
