"""The ``lm`` objective: next-token loss on the assistant turns, over the stage's weighted data mix.

The loss is the (weighted) mean over the global batch's supervised tokens: each micro-batch returns its loss sum
and the step's ``norm`` is the batch's sum of target weights, whatever the micro-batching, packing or world size.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vlmkit.training.config import StageConfig
from vlmkit.training.data import (
    PADDING_PLAN_STEPS,
    BatchPlan,
    Collator,
    MicroBatches,
    SourceData,
    load_stage_data,
    padding_fraction,
)
from vlmkit.training.model import apply_policy, param_groups, set_gradient_checkpointing
from vlmkit.training.objectives.base import OBJECTIVES, StageRun, StageSetup, StepBatch

INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes", "loss_weights")


def stage_steps(stage: StageConfig, plan: BatchPlan) -> int:
    """The stage's length: ``steps``, else ``epochs`` (default 1) passes over the mix."""
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil((stage.epochs or 1.0) * plan.epoch_size / plan.global_batch))


@OBJECTIVES.register("lm")
class LanguageModelling:
    """Next-token prediction on the stage's conversations (LLaVA's align and instruct stages)."""

    run: StageRun
    sources: list[SourceData]
    plan: BatchPlan
    collator: Collator
    total: int

    def check(self, stage: StageConfig, where: str) -> None:
        """Any policy trains through the LM loss; the generic stage checks suffice."""

    def start(self, run: StageRun) -> StageSetup:
        stage, env = run.stage, run.env
        self.run = run
        self.sources = sources = load_stage_data(stage, run.processor)
        global_batch = stage.batch_size * stage.grad_accum * env.world_size
        weights = [src.source.weight for src in sources]
        lengths = [[s.length for s in src.samples] for src in sources]
        self.plan = plan = BatchPlan(lengths, weights, global_batch, seed=run.seed, stage_index=run.index,
                                     group_by_length=stage.group_by_length)  # fmt: skip
        self.total = total = stage_steps(stage, plan)
        measured = min(total, PADDING_PLAN_STEPS)
        plain = BatchPlan(plan.lengths, weights, global_batch, seed=run.seed, stage_index=run.index,
                          group_by_length=False)  # fmt: skip
        pad_before = padding_fraction(plain, measured, env.world_size, stage.grad_accum, packing=False)
        pad_after = padding_fraction(plan, measured, env.world_size, stage.grad_accum, packing=stage.packing)

        apply_policy(run.model, stage)
        set_gradient_checkpointing(run.model, stage)
        run.model.to(env.device).train()
        self.collator = Collator(run.processor, stage.packing, stage.loss_weighting)
        skipped = sum((src.skipped for src in sources), start=Counter())
        return StageSetup(
            run.model, param_groups(run.model, stage), total, global_batch, sum(len(s.samples) for s in sources),
            summary=f"padding {100 * pad_before:.1f}% → {100 * pad_after:.1f}%",
            start_record={"padding_before": pad_before, "padding_after": pad_after, "packing": stage.packing,
                          "group_by_length": stage.group_by_length},
            padding=(pad_before, pad_after), skipped=dict(skipped),
        )  # fmt: skip

    def batches(self, start: int) -> Iterator[StepBatch]:
        run, stage, plan, sources = self.run, self.run.stage, self.plan, self.sources
        loader = torch.utils.data.DataLoader(
            MicroBatches(plan, sources, self.collator, start_step=start, stop_step=self.total,
                         rank=run.env.rank, world_size=run.env.world_size, accum=stage.grad_accum),
            batch_size=None, num_workers=run.num_workers, generator=torch.Generator(),
        )  # fmt: skip
        micro = iter(loader)
        for step in range(start, self.total):
            items = plan.batch(step)
            targets = sum(sources[i].samples[j].targets for i, j in items)
            tokens = sum(sources[i].samples[j].length for i, j in items)
            norm = (
                float(targets)
                if stage.loss_weighting == "token"
                else sum(sum(sources[i].samples[j].loss_weights(stage.loss_weighting)) for i, j in items)
            )
            record = {"samples": len(items), "tokens": tokens, "targets": targets,
                      "epoch": (step + 1) * plan.global_batch / plan.epoch_size}  # fmt: skip
            yield StepBatch((next(micro) for _ in range(stage.grad_accum)), stage.grad_accum, norm, record)

    def loss(self, module: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        device = self.run.env.device
        inputs = {k: batch[k].to(device) for k in INPUT_KEYS if k in batch}
        return module(**inputs, labels=batch["labels"].to(device), supervised_loss=True)["loss_sum"], {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing beyond the model, the optimizer and the data position (which the loop restores)."""
