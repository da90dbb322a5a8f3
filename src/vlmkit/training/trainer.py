"""The training loop: stages in order, exact resume, DDP, signals, checkpoints and records."""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_model, save_model

from vlmkit.data.sample import IMAGE_TOKEN
from vlmkit.errors import ConfigError, DataError, VlmkitError
from vlmkit.models.compose import load_pretrained
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.processor import VLMProcessor
from vlmkit.training import checkpoint as ckpt
from vlmkit.training import distributed as dist_utils
from vlmkit.training.config import StageConfig, TrainConfig, config_as_dict, load_config
from vlmkit.training.data import (
    PADDING_PLAN_STEPS,
    BatchPlan,
    Collator,
    MicroBatches,
    SourceData,
    check_source,
    load_stage_data,
    padding_fraction,
    read_samples,
)
from vlmkit.training.metrics import MetricsWriter, read_metrics, truncate_metrics
from vlmkit.training.model import (
    ADAPTER_DIR,
    apply_policy,
    build_model,
    export_plain,
    lora_components,
    param_groups,
    save_adapters,
    set_gradient_checkpointing,
    train_tokenizer,
    trainable_counts,
)
from vlmkit.training.optim import build_optimizer
from vlmkit.training.plots import plot_stage

log = logging.getLogger(__name__)

FINAL_DIR = "final"
Callback = Callable[[dict[str, Any]], bool | None]
"""Called with every record written to metrics.jsonl; returning True asks the run to stop (as SIGTERM does)."""


class TrainingError(VlmkitError, RuntimeError):
    """Training could not go on (e.g. out of memory); the message says what to change."""


@dataclass
class StageResult:
    """What one stage did: steps run, trainable parameters, padding before/after grouping, its plot."""

    name: str
    steps: int
    trainable: dict[str, dict[str, int]]
    padding_before: float
    padding_after: float
    samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    plot: Path | None = None


@dataclass
class TrainResult:
    """The outcome of :func:`train`: the last global step, where the model went, and whether it was stopped."""

    output_dir: Path
    global_step: int
    stages: list[StageResult]
    losses: list[float]
    interrupted: bool = False
    signal: str | None = None
    checkpoint: Path | None = None
    final_dir: Path | None = None


def train(
    config: str | Path | dict[str, Any] | TrainConfig,
    overrides: list[str] | dict[str, Any] | None = None,
    resume: str | Path | bool | None = None,
    callbacks: list[Callback] | None = None,
) -> TrainResult:
    """Train as ``config`` (a YAML/TOML path, a mapping or a :class:`TrainConfig`) says.

    ``overrides``: ``["stages.0.lr=1e-3", ...]`` or a dict of dotted keys. ``resume``: True for the latest
    checkpoint of the output folder, or a checkpoint / run folder. Under ``torchrun`` every process calls this.
    """
    return Trainer(load_config(config, overrides), resume=resume, callbacks=callbacks).run()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on a device (None: plain fp32)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision fp16 needs a CUDA device (this run is on {device.type}); use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class _StopFlag:
    """Set by SIGINT/SIGTERM (or a callback); the loop checkpoints and returns at the next step boundary."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def set(self, name: str) -> None:
        if self.signal is None:
            self.signal = name

    @contextmanager
    def handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def handle(signum: int, frame: Any) -> None:
            log.warning("received %s: writing a checkpoint at the end of this step", signal.Signals(signum).name)
            self.set(signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _sample_texts(config: TrainConfig) -> Iterator[str]:
    for stage in config.stages:
        for source in stage.data:
            for sample in read_samples(source, decode_images=False):
                for message in sample.messages:
                    yield str(message["content"]).replace(IMAGE_TOKEN, " ")


class Trainer:
    """Runs a :class:`TrainConfig`; see :func:`train`."""

    def __init__(
        self, config: TrainConfig, resume: str | Path | bool | None = None, callbacks: list[Callback] | None = None
    ) -> None:
        self.config = config
        self.resume = resume
        self.callbacks = list(callbacks or [])
        self.output_dir = Path(config.output_dir)
        self.checkpoint_root = self.output_dir / ckpt.CHECKPOINT_DIR
        self.stop = _StopFlag()
        self.losses: list[float] = []
        self.global_step = 0
        self.last_checkpoint: Path | None = None
        self.model: VisionLanguageModel
        self.processor: VLMProcessor

    # -- setup ----------------------------------------------------------------------------------------------
    def _check_data(self) -> None:
        for i, stage in enumerate(self.config.stages):
            for j, source in enumerate(stage.data):
                check_source(source, f"stage {stage.name!r} (stages.{i}) data[{j}]")

    def _build(self, resume_from: Path | None) -> None:
        torch.manual_seed(self.config.seed)
        if resume_from is not None:
            self.model, self.processor = load_pretrained(resume_from / ckpt.MODEL_DIR)
            return
        tokenizer = None
        spec = self.config.model
        if spec.train_tokenizer and not spec.checkpoint:
            folder = self.output_dir / "tokenizer"
            if self.env.is_main:
                train_tokenizer(_sample_texts(self.config), spec.train_tokenizer, folder)
            dist_utils.barrier(self.env)
            tokenizer = str(folder)
        self.model, self.processor = build_model(spec, tokenizer)

    def _seed_training(self) -> None:
        """Seed dropout and friends per rank (a resumed run then restores the saved states instead)."""
        seed = self.config.seed + self.env.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _write_config(self) -> None:
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(config_as_dict(self.config), sort_keys=False)
            (self.output_dir / "config.yaml").write_text(text)

    # -- the run --------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Every stage from the start or the resumed position; returns a :class:`TrainResult`."""
        self.env = dist_utils.init_distributed(self.config.device)
        try:
            return self._run()
        finally:
            dist_utils.shutdown(self.env)

    def _run(self) -> TrainResult:
        self._check_data()
        found = ckpt.load_resume(self.resume, self.output_dir)  # passes over a damaged latest checkpoint
        resume_from, state = found if found is not None else (None, None)
        existing = ckpt.list_checkpoints(self.checkpoint_root)
        if state is None and existing:
            raise ConfigError(
                f"output_dir {self.output_dir} already holds checkpoints (latest {existing[-1].name}); continue "
                "with --resume, or choose another output_dir"
            )
        if state is not None:
            self._warn_config_change(resume_from)  # type: ignore[arg-type]
            log.info("resuming from %s (global step %d)", resume_from, state["position"]["global_step"])
        self._build(resume_from)
        self._seed_training()
        self.model.to(self.env.device)
        self._write_config()
        if self.env.is_main:
            ckpt.clean_stale(self.checkpoint_root)
            metrics = self.output_dir / "metrics.jsonl"
            if state is not None:
                truncate_metrics(metrics, state["position"]["global_step"])
            else:
                metrics.unlink(missing_ok=True)
        self.metrics = MetricsWriter(self.output_dir, enabled=self.env.is_main, tensorboard=self.config.tensorboard)
        results: list[StageResult] = []
        first_stage = state["position"]["stage_index"] if state else 0
        self.global_step = state["position"]["global_step"] if state else 0
        try:
            with self.stop.handlers():
                for index in range(first_stage, len(self.config.stages)):
                    resumed = state if (state is not None and index == first_stage) else None
                    results.append(self._run_stage(index, resumed, resume_from))
                    if self.stop.signal:
                        break
            final_dir = None
            if not self.stop.signal:
                final_dir = self._export_final()
        finally:
            self.metrics.close()
        return TrainResult(
            self.output_dir, self.global_step, results, self.losses, self.stop.signal is not None,
            self.stop.signal, self.last_checkpoint, final_dir,
        )  # fmt: skip

    def _warn_config_change(self, path: Path) -> None:
        saved = ckpt.read_meta(path).get("config", {})
        now = config_as_dict(self.config)
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k != "output_dir")
        if changed:
            log.warning("resuming with a changed config (%s): the run is no longer exactly reproducible", changed)

    def _stage_steps(self, stage: StageConfig, plan: BatchPlan) -> int:
        if stage.steps is not None:
            return stage.steps
        return max(1, math.ceil((stage.epochs or 1.0) * plan.epoch_size / plan.global_batch))

    def _emit(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        for callback in self.callbacks:
            if callback(record):
                self.stop.set("callback")

    # -- one stage ------------------------------------------------------------------------------------------
    def _run_stage(self, index: int, state: dict[str, Any] | None, resume_from: Path | None) -> StageResult:
        stage, env = self.config.stages[index], self.env
        if stage.objective == "grid_labels":
            return self._run_grid_stage(index, state)
        sources = load_stage_data(stage, self.processor, index)
        global_batch = stage.batch_size * stage.grad_accum * env.world_size
        plan = BatchPlan(
            [[s.length for s in src.samples] for src in sources],
            [src.source.weight for src in sources],
            global_batch,
            seed=self.config.seed,
            stage_index=index,
            group_by_length=stage.group_by_length,
        )
        total = self._stage_steps(stage, plan)
        start = state["position"]["stage_step"] if state else 0
        measured = min(total, PADDING_PLAN_STEPS)
        plain = BatchPlan(plan.lengths, [src.source.weight for src in sources], global_batch, seed=self.config.seed,
                          stage_index=index, group_by_length=False)  # fmt: skip
        pad_before = padding_fraction(plain, measured, env.world_size, stage.grad_accum, packing=False)
        pad_after = padding_fraction(plan, measured, env.world_size, stage.grad_accum, packing=stage.packing)

        apply_policy(self.model, stage)
        set_gradient_checkpointing(self.model, stage)
        if state is not None and resume_from is not None and (resume_from / ckpt.TRAINING_STATE).is_file():
            load_model(self.model, str(resume_from / ckpt.TRAINING_STATE), strict=True, device=str(env.device))
        self.model.to(env.device).train()
        collator = Collator(self.processor, stage.packing, stage.loss_weighting)
        counts = trainable_counts(self.model)
        optimizer, scheduler = build_optimizer(param_groups(self.model, stage), stage, total)
        amp_dtype = resolve_precision(stage.precision, env.device)
        scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        samples = sum(len(s.samples) for s in sources)
        skipped = sum((src.skipped for src in sources), start=Counter())
        self._log_stage_start(stage, index, counts, total, global_batch, samples, pad_before, pad_after, optimizer)

        model = dist_utils.wrap(self.model, env)
        loader = torch.utils.data.DataLoader(
            MicroBatches(plan, sources, collator, start_step=start, stop_step=total,
                         rank=env.rank, world_size=env.world_size, accum=stage.grad_accum),
            batch_size=None, num_workers=self.config.num_workers, generator=torch.Generator(),
        )  # fmt: skip
        if state is not None:
            ckpt.set_rng_state(state["rng"][env.rank] if env.rank < len(state["rng"]) else state["rng"][0])
        stage_records: list[dict[str, Any]] = []
        step = start
        saved_at = self.global_step if state is not None else -1
        context = dict(stage=stage, index=index, optimizer=optimizer, scheduler=scheduler, scaler=scaler, total=total)
        with self._progress(stage, total, start) as bar:
            batches = iter(loader)
            while step < total:
                started = time.perf_counter()
                record = self._train_step(model, batches, plan, sources, step, amp_dtype, **context)
                record["step_time_s"] = time.perf_counter() - started
                record["samples_per_s"] = global_batch / record["step_time_s"]
                record["tokens_per_s"] = record["tokens"] / record["step_time_s"]
                step += 1
                self.global_step += 1
                record.update(step=self.global_step, stage=stage.name, stage_step=step)
                self.losses.append(record["loss"])
                stage_records.append(record)
                if self.global_step % self.config.log_every == 0 or step == total:
                    self._emit(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                samples_s=f"{record['samples_per_s']:.1f}")  # fmt: skip
                stop = dist_utils.any_rank(self.stop.signal is not None, env)
                if stop:
                    self.stop.set("SIGTERM")
                every = self.config.save_every
                if stop or step == total or (every and self.global_step % every == 0):
                    self._save(step, **context)
                    saved_at = self.global_step
                if stop:
                    log.warning("stopped at global step %d; resume with --resume", self.global_step)
                    break
        if step == total and saved_at != self.global_step:
            self._save(step, **context)
        plot = self._plot(stage, index) if step == total else None
        self._emit({"event": "stage_end", "step": self.global_step, "stage": stage.name, "stage_step": step,
                    "plot": str(plot) if plot else None})  # fmt: skip
        del model
        return StageResult(stage.name, step - start, counts, pad_before, pad_after, samples, dict(skipped), plot)

    def _run_grid_stage(self, index: int, state: dict[str, Any] | None) -> StageResult:
        """A ``grid_labels`` stage: the tower learns per-cell labels with temporary heads (one process).

        It checkpoints only at its end; stopped midway, a resumed run starts the stage again."""
        from vlmkit.training.grid_labels import GridLabelObjective, cell_labels, stack_targets, truth_of

        stage, env = self.config.stages[index], self.env
        where = f"stage {stage.name!r} (stages.{index})"
        if env.distributed:
            raise ConfigError(f"{where}: the grid_labels objective runs in one process; start it without torchrun")
        pool: list[Any] = []
        for source in stage.data:
            samples = [s for s, _ in zip(read_samples(source), range(source.limit or 2**62), strict=False)]
            pool += [s for s in samples if s.images]
        labels = [cell_labels(truth_of(s, where)) for s in pool]  # every label checked before the first step
        if len(pool) < stage.batch_size:
            raise DataError(f"{where}: {len(pool)} samples with an image, fewer than batch_size {stage.batch_size}")
        total = stage.steps or max(1, math.ceil((stage.epochs or 1.0) * len(pool) / stage.batch_size))
        start = state["position"]["stage_step"] if state else 0
        apply_policy(self.model, stage)
        objective = GridLabelObjective(self.model.vision_tower).to(env.device).train()
        params = [p for p in objective.parameters() if p.requires_grad]
        lr = stage.module_lr.get("vision", stage.lr)
        groups = [{"params": params, "lr": lr, "weight_decay": stage.weight_decay, "name": "vision"}]
        optimizer, scheduler = build_optimizer(groups, stage, total)
        amp_dtype = resolve_precision(stage.precision, env.device)
        scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16)
        counts = trainable_counts(self.model)
        log.info("stage %d %r: grid_labels on %d images, %d steps of %d, lr %g", index, stage.name, len(pool),
                 total, stage.batch_size, lr)  # fmt: skip
        self._emit({"event": "stage_start", "step": self.global_step, "stage": stage.name, "stage_index": index,
                    "steps": total, "global_batch": stage.batch_size, "samples": len(pool), "trainable": counts,
                    "objective": stage.objective})  # fmt: skip
        rng = np.random.default_rng([self.config.seed, index])
        order = [rng.choice(len(pool), size=stage.batch_size, replace=False) for _ in range(total)]
        context = dict(stage=stage, index=index, optimizer=optimizer, scheduler=scheduler, scaler=scaler, total=total)
        step = start
        with self._progress(stage, total, start) as bar:
            while step < total and not self.stop.signal:
                started = time.perf_counter()
                pixels = self.processor.load_images([pool[i].images[0] for i in order[step]])
                targets = stack_targets(labels[i] for i in order[step])
                with torch.autocast(env.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, accuracy = objective(pixels.to(env.device), targets)  # type: ignore[union-attr]
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm or math.inf))
                lr_now = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                self.global_step += 1
                elapsed = time.perf_counter() - started
                record = {"event": "step", "loss": float(loss.detach()), "lr": lr_now, "lrs": {"vision": lr_now},
                          "grad_norm": grad_norm, "accuracy": accuracy, "samples": stage.batch_size,
                          "step_time_s": elapsed,
                          "samples_per_s": stage.batch_size / elapsed, "step": self.global_step,
                          "stage": stage.name, "stage_step": step}  # fmt: skip
                self.losses.append(record["loss"])
                if self.global_step % self.config.log_every == 0 or step == total:
                    self._emit(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr_now:.2e}")
        self.model.vision_tower.requires_grad_(False)
        if step < total:
            log.warning("stopped during grid_labels stage %r; a resumed run starts this stage again", stage.name)
            return StageResult(stage.name, step - start, counts, 0.0, 0.0, len(pool))
        if start < total:
            self._save(step, **context)
        plot = self._plot(stage, index)
        self._emit({"event": "stage_end", "step": self.global_step, "stage": stage.name, "stage_step": step,
                    "plot": str(plot) if plot else None})  # fmt: skip
        return StageResult(stage.name, step - start, counts, 0.0, 0.0, len(pool), plot=plot)

    def _log_stage_start(self, stage, index, counts, total, global_batch, samples, pad_before, pad_after, optimizer):
        training = [c for c, n in counts.items() if n["trainable"]]
        policy = ", ".join(f"{c}={getattr(stage.policy, c)}" for c in counts)
        lines = [f"{c:<16}{n['trainable']:>14,}{n['total']:>14,}" for c, n in counts.items()]
        table = "\n".join([f"{'component':<16}{'trainable':>14}{'total':>14}", *lines])
        lrs = {g["name"]: g.get("initial_lr", g["lr"]) for g in optimizer.param_groups if "no_decay" not in g["name"]}
        log.info(
            "stage %d %r: %d steps of %d samples (%d usable samples); policy %s; training %s (%s parameters); "
            "lr %s; padding %.1f%% → %.1f%%\n%s",
            index, stage.name, total, global_batch, samples, policy, ", ".join(training),
            f"{sum(n['trainable'] for n in counts.values()):,}", lrs, 100 * pad_before, 100 * pad_after, table,
        )  # fmt: skip
        self._emit({
            "event": "stage_start", "step": self.global_step, "stage": stage.name, "stage_index": index,
            "steps": total, "global_batch": global_batch, "samples": samples, "trainable": counts,
            "policy": {c: getattr(stage.policy, c) for c in counts}, "lrs": lrs,
            "padding_before": pad_before, "padding_after": pad_after, "packing": stage.packing,
            "group_by_length": stage.group_by_length,
        })  # fmt: skip

    def _progress(self, stage: StageConfig, total: int, start: int):
        from tqdm import tqdm

        enabled = self.config.progress and self.env.is_main
        return tqdm(total=total, initial=start, desc=stage.name, unit="step", disable=not enabled, dynamic_ncols=True)

    def _train_step(
        self, model, batches, plan, sources: list[SourceData], step, amp_dtype, *, stage, index, optimizer,
        scheduler, scaler, total,
    ) -> dict[str, Any]:  # fmt: skip
        env = self.env
        items = plan.batch(step)
        targets = sum(sources[i].samples[j].targets for i, j in items)
        tokens = sum(sources[i].samples[j].length for i, j in items)
        # the loss is the weighted mean over the global batch's targets: every micro-step divides by this sum
        norm = (
            float(targets)
            if stage.loss_weighting == "token"
            else sum(sum(sources[i].samples[j].loss_weights(stage.loss_weighting)) for i, j in items)
        )
        loss_sum = 0.0
        for a in range(stage.grad_accum):
            batch = next(batches)
            sync = a == stage.grad_accum - 1 or not env.distributed
            with nullcontext() if sync else model.no_sync():
                try:
                    loss_sum += self._micro_step(model, batch, amp_dtype, scaler, norm)
                except torch.OutOfMemoryError as exc:
                    optimizer.zero_grad(set_to_none=True)
                    raise TrainingError(
                        f"stage {stage.name!r}: out of memory at batch_size {stage.batch_size} (step {step}); "
                        f"lower batch_size and raise grad_accum to keep the global batch, e.g. batch_size "
                        f"{max(1, stage.batch_size // 2)} with grad_accum {stage.grad_accum * 2}, or turn on "
                        "gradient_checkpointing"
                    ) from exc
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if stage.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, math.inf))
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = dist_utils.all_reduce_sum(loss_sum, env) / (norm or 1.0)
        first = optimizer.param_groups[0]["name"]
        return {"event": "step", "loss": loss, "lr": lrs[first], "lrs": lrs, "grad_norm": grad_norm,
                "samples": len(items), "tokens": tokens, "targets": targets,
                "epoch": (step + 1) * plan.global_batch / plan.epoch_size}  # fmt: skip

    def _micro_step(self, model, batch: dict[str, Any], amp_dtype, scaler, norm: float) -> float:
        """Forward + backward of one micro-batch; the loss is scaled so that gradients summed over micro-batches
        and averaged over ranks equal those of the (weighted) mean loss over the global batch's target tokens;
        ``norm`` is that batch's sum of target weights."""
        device = self.env.device
        keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "loss_weights")
        inputs = {k: batch[k].to(device) for k in keys if k in batch}
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss_sum = model(**inputs, labels=batch["labels"].to(device), supervised_loss=True)["loss_sum"]
        scale = self.env.world_size / (norm or 1.0)
        scaler.scale(loss_sum * scale).backward()
        return float(loss_sum.detach())

    # -- writing --------------------------------------------------------------------------------------------
    def _save(self, stage_step: int, *, stage, index, total, optimizer, scheduler, scaler, **_) -> None:
        env = self.env
        rngs = dist_utils.gather(ckpt.rng_state(), env)
        if env.is_main:
            position = {"global_step": self.global_step, "stage_index": index, "stage": stage.name,
                        "stage_step": stage_step, "stage_steps": total}  # fmt: skip
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rngs,
                     "position": position}  # fmt: skip

            def write(folder: Path) -> None:
                export_plain(self.model, self.processor, folder / ckpt.MODEL_DIR)
                if lora_components(self.model):
                    save_adapters(self.model, folder / ADAPTER_DIR)
                    save_model(self.model, str(folder / ckpt.TRAINING_STATE))
                torch.save(state, folder / ckpt.TRAINER_STATE)
                ckpt.write_meta(folder, position, config_as_dict(self.config))

            path = ckpt.write_atomic(self.checkpoint_root / ckpt.checkpoint_name(self.global_step), write)
            removed = ckpt.prune(self.checkpoint_root, self.config.keep_last)
            log.info("saved checkpoint %s%s", path, f" (removed {len(removed)} old)" if removed else "")
            self.last_checkpoint = path
        dist_utils.barrier(env)
        if not env.is_main:
            self.last_checkpoint = self.checkpoint_root / ckpt.checkpoint_name(self.global_step)

    def _plot(self, stage: StageConfig, index: int) -> Path | None:
        if not self.env.is_main:
            return None
        records = [r for r in read_metrics(self.output_dir) if r.get("event") == "step" and r["stage"] == stage.name]
        if not records:
            return None
        path = plot_stage(records, self.output_dir / "plots" / f"{index}-{stage.name}.png", f"stage {stage.name}")
        log.info("stage %r: curves in %s", stage.name, path)
        return path

    def _export_final(self) -> Path | None:
        """The trained model as a plain vlmkit checkpoint (LoRA merged) in ``OUTPUT/final``, plus its adapters."""
        final = self.output_dir / FINAL_DIR
        if self.env.is_main:

            def write(folder: Path) -> None:
                export_plain(self.model, self.processor, folder)
                if lora_components(self.model):
                    save_adapters(self.model, folder / ADAPTER_DIR)

            ckpt.write_atomic(final, write)
            log.info("saved the trained model to %s", final)
        dist_utils.barrier(self.env)
        return final
