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

from vlmkit.errors import CheckpointError, DataError
from vlmkit.training import distributed as dist_utils
from vlmkit.training.config import StageConfig
from vlmkit.training.data import (
    MEGA_BATCHES,
    PADDING_PLAN_STEPS,
    BatchPlan,
    Collator,
    MicroBatches,
    SourceData,
    TrainSample,
    encode_source,
    padding_fraction,
    read_samples,
)
from vlmkit.training.model import apply_policy, param_groups, set_gradient_checkpointing
from vlmkit.training.objectives.base import OBJECTIVES, StageRun, StageSetup, StepBatch
from vlmkit.training.streaming import SourceStream, StreamPlan, wants_streaming

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
    stream: StreamPlan | None = None
    """A streaming stage's batches (None: the in-memory plan)."""
    _resumed: dict[str, Any] | None = None

    def check(self, stage: StageConfig, where: str) -> None:
        """Any policy trains through the LM loss; the generic stage checks suffice."""

    def start(self, run: StageRun) -> StageSetup:
        stage, env = run.stage, run.env
        self.run = run
        datasets = []
        for j, src in enumerate(stage.data):
            try:
                datasets.append(read_samples(src))
            except DataError as exc:
                raise DataError(f"{self._where(j)}: {exc}") from exc
        if wants_streaming(stage, datasets):
            return self._start_streaming(datasets)
        self.sources = sources = [
            encode_source(src, run.processor, stage.max_length, self._where(j)) for j, src in enumerate(stage.data)
        ]
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

        self._prepare()
        skipped = sum((src.skipped for src in sources), start=Counter())
        return StageSetup(
            run.model, param_groups(run.model, stage), total, global_batch, sum(len(s.samples) for s in sources),
            summary=f"padding {100 * pad_before:.1f}% → {100 * pad_after:.1f}%",
            start_record={"padding_before": pad_before, "padding_after": pad_after, "packing": stage.packing,
                          "group_by_length": stage.group_by_length, "streaming": False},
            padding=(pad_before, pad_after), skipped=dict(skipped),
        )  # fmt: skip

    def _where(self, j: int) -> str:
        stage = self.run.stage
        return f"stage {stage.name!r} data[{j}] ({stage.data[j].path})"

    def _prepare(self) -> None:
        run, stage = self.run, self.run.stage
        apply_policy(run.model, stage)
        set_gradient_checkpointing(run.model, stage)
        run.model.to(run.env.device).train()
        self.collator = Collator(run.processor, stage.packing, stage.loss_weighting)

    def _start_streaming(self, datasets: list[Any]) -> StageSetup:
        """A stage read as it goes (:mod:`vlmkit.training.streaming`): nothing is read before the first step."""
        run, stage, env = self.run, self.run.stage, self.run.env
        global_batch = stage.batch_size * stage.grad_accum * env.world_size
        records = sum(len(d) for d in datasets)
        self.total = stage.steps or max(1, math.ceil((stage.epochs or 1.0) * records / global_batch))
        self.epoch_size = records
        self.skipped: Counter[str] = Counter()
        streams = [
            SourceStream(src, d, run.processor, stage.max_length, self._where(j), key=(run.seed, run.index, j),
                         rank=env.rank, world_size=env.world_size, window=stage.shuffle_buffer, skipped=self.skipped)
            for j, (src, d) in enumerate(zip(stage.data, datasets, strict=True))
        ]  # fmt: skip
        self.stream = StreamPlan(
            streams, [src.weight for src in stage.data], stage.batch_size, stage.grad_accum, seed=run.seed,
            stage_index=run.index, rank=env.rank, group_by_length=stage.group_by_length, packing=stage.packing,
            skipped=self.skipped,
        )  # fmt: skip
        self._positions: dict[int, list[dict[str, Any]]] = {}
        self._next = 0
        self._prepare()
        units = sum(len(s.units) for s in streams)
        self.setup = StageSetup(
            run.model, param_groups(run.model, stage), self.total, global_batch, records,
            summary=f"streaming {records} records in {units} units, shuffle windows of {stage.shuffle_buffer}",
            start_record={"padding_before": None, "padding_after": None, "packing": stage.packing,
                          "group_by_length": stage.group_by_length, "streaming": True},
            skipped=self.skipped,
        )  # fmt: skip
        return self.setup

    def batches(self, start: int) -> Iterator[StepBatch]:
        if self.stream is not None:
            return self._stream_batches(start)
        return self._plan_batches(start)

    def _stream_batches(self, start: int) -> Iterator[StepBatch]:
        run, env, plan = self.run, self.run.env, self.stream
        assert plan is not None
        c = start // MEGA_BATCHES
        if self._resumed is None:
            if start:
                raise CheckpointError(
                    f"{run.where}: the checkpoint holds no stream position (written without streaming); resume "
                    "with streaming: false, or start the stage again"
                )
            plan.restore(None)
        else:
            if self._resumed["chunk"] != c:
                raise CheckpointError(f"{run.where}: the checkpoint's stream position is not that of step {start}")
            plan.restore(self._resumed["ranks"][env.rank])
        step = start
        while step < self.total:
            before = plan.snapshot()
            batches = plan.chunk(c)
            after = plan.snapshot()
            gathered = dist_utils.gather([before, after], env)
            self._positions = {c: [g[0] for g in gathered], c + 1: [g[1] for g in gathered]}
            self.setup.padding = plan.padding
            served = batches[step - c * MEGA_BATCHES : self.total - c * MEGA_BATCHES]
            collated = self._collated([m for b in served for m in plan.micro_batches(b)])
            for batch in served:
                self._next = step + 1
                yield self._step_batch(batch, collated, step)
                step += 1
            c += 1

    def _collated(self, micro: list[list[TrainSample]]) -> Iterator[dict[str, Any]]:
        """The chunk's micro-batches collated in order (in ``num_workers`` worker processes when asked)."""
        if not self.run.num_workers:
            return (self.collator(m) for m in micro)
        loader = torch.utils.data.DataLoader(
            _Listed(micro, self.collator), batch_size=None, num_workers=self.run.num_workers
        )
        return iter(loader)

    def _step_batch(self, items: list[TrainSample], collated: Iterator[dict[str, Any]], step: int) -> StepBatch:
        """One step of a streaming stage: the loss divisor and the record's counts are summed over processes."""
        stage, env = self.run.stage, self.run.env
        weighting = stage.loss_weighting
        targets = dist_utils.all_reduce_sum(float(sum(s.targets for s in items)), env)
        tokens = dist_utils.all_reduce_sum(float(sum(s.length for s in items)), env)
        norm = targets if weighting == "token" else dist_utils.all_reduce_sum(
            sum(sum(s.loss_weights(weighting)) for s in items), env
        )  # fmt: skip
        global_batch = len(items) * env.world_size
        record = {"samples": global_batch, "tokens": int(tokens), "targets": int(targets),
                  "epoch": (step + 1) * global_batch / max(1, self.epoch_size)}  # fmt: skip
        return StepBatch((next(collated) for _ in range(stage.grad_accum)), stage.grad_accum, norm, record)

    def _plan_batches(self, start: int) -> Iterator[StepBatch]:
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
        """A streaming stage's position: every process's stream as it stood at the start of the chunk of the
        next step (an in-memory stage's data position is its step, which the loop keeps)."""
        if self.stream is None:
            return {}
        c = self._next // MEGA_BATCHES
        return {"stream": {"chunk": c, "ranks": self._positions[c]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stream = state.get("stream")
        if stream is None or self.stream is None:
            return
        world = self.run.env.world_size
        if len(stream["ranks"]) != world:
            raise CheckpointError(
                f"{self.run.where}: the checkpoint was written by {len(stream['ranks'])} process(es); a streaming "
                f"stage resumes exactly only with as many (now {world})"
            )
        self._resumed = stream


class _Listed(torch.utils.data.Dataset):
    """A chunk's micro-batches, collated by index (in DataLoader workers)."""

    def __init__(self, micro: list[list[TrainSample]], collator: Collator) -> None:
        self.micro, self.collator = micro, collator

    def __len__(self) -> int:
        return len(self.micro)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return self.collator(self.micro[k])
