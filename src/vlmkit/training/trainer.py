"""The training loop: stages in order, exact resume, DDP or FSDP, signals, checkpoints and records.

One step loop serves every objective; what a stage trains, its batches and its loss come from the objective
registered under its ``objective`` name (:mod:`vlmkit.training.objectives`).
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_model, save_model

from vlmkit.devices import resolve_precision
from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.models.compose import load_pretrained
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.processor import VLMProcessor
from vlmkit.tokens import IMAGE_TOKEN
from vlmkit.training import checkpoint as ckpt
from vlmkit.training import distributed as dist_utils
from vlmkit.training.config import StageConfig, TrainConfig, config_as_dict, load_config
from vlmkit.training.data import check_source, read_samples
from vlmkit.training.metrics import MetricsWriter, read_metrics, truncate_metrics
from vlmkit.training.model import (
    ADAPTER_DIR,
    build_model,
    export_plain,
    lora_components,
    save_adapters,
    train_tokenizer,
    trainable_counts,
)
from vlmkit.training.objectives import OBJECTIVES, Objective, StageRun, StageSetup, StepBatch
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


@dataclass
class _Stage:
    """One stage run's pieces, as the step loop and the checkpoint writer use them."""

    config: StageConfig
    index: int
    objective: Objective
    setup: StageSetup
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    parallel: dist_utils.Parallel


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
        self._reload_from: Path | None = None
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

    def _reload_model(self, checkpoint: Path) -> None:
        """Load the model of ``checkpoint`` on every rank, as a resume would (a stage under fsdp leaves only shards);
        building it draws no random numbers the run would see."""
        rng = ckpt.rng_state()
        self.model, _ = load_pretrained(checkpoint / ckpt.MODEL_DIR)
        self.model.to(self.env.device)
        ckpt.set_rng_state(rng)
        self._reload_from = None

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

    def _emit(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        for callback in self.callbacks:
            if callback(record):
                self.stop.set("callback")

    # -- one stage ------------------------------------------------------------------------------------------
    def _run_stage(self, index: int, state: dict[str, Any] | None, resume_from: Path | None) -> StageResult:
        """One stage from its start (or the resumed step) to its end or a stop: the same loop for every objective."""
        stage, env = self.config.stages[index], self.env
        if self._reload_from is not None:  # the last stage sharded the model: continue from its checkpoint
            self._reload_model(self._reload_from)
        objective = OBJECTIVES.get(stage.objective)()
        context = StageRun(self.model, self.processor, stage, index, env, self.config.seed, self.config.num_workers)
        setup = objective.start(context)
        if state is not None and resume_from is not None and (resume_from / ckpt.TRAINING_STATE).is_file():
            load_model(self.model, str(resume_from / ckpt.TRAINING_STATE), strict=True, device=str(env.device))
        counts = trainable_counts(self.model)
        amp_dtype = resolve_precision(stage.precision, env.device)
        if self.config.strategy == "fsdp" and env.distributed and setup.module is not self.model:
            raise ConfigError(f"stage {stage.name!r}: the {stage.objective!r} objective can't run under strategy "
                              "'fsdp' (it trains a module other than the model); use strategy 'ddp'")  # fmt: skip
        parallel = dist_utils.wrap(setup.module, env, self.config.strategy, amp_dtype)
        optimizer, scheduler = build_optimizer(parallel.param_groups(setup.param_groups), stage, setup.total)
        scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16)
        run = _Stage(stage, index, objective, setup, optimizer, scheduler, scaler, amp_dtype, parallel)
        if state is not None:
            parallel.load_optimizer_state(optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            objective.load_state_dict(state.get("objective") or {})
        self._log_stage_start(run, counts)

        module = parallel.module
        if state is not None:
            ckpt.set_rng_state(state["rng"][env.rank] if env.rank < len(state["rng"]) else state["rng"][0])
        total = setup.total
        start = step = state["position"]["stage_step"] if state else 0
        saved_at = self.global_step if state is not None else -1
        with self._progress(stage, total, start) as bar:
            batches = objective.batches(start)
            while step < total:
                started = time.perf_counter()
                record = self._train_step(module, next(batches), step, run)
                record["step_time_s"] = time.perf_counter() - started
                record["samples_per_s"] = setup.global_batch / record["step_time_s"]
                if "tokens" in record:
                    record["tokens_per_s"] = record["tokens"] / record["step_time_s"]
                step += 1
                self.global_step += 1
                record.update(step=self.global_step, stage=stage.name, stage_step=step)
                self.losses.append(record["loss"])
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
                    self._save(step, run)
                    saved_at = self.global_step
                if stop:
                    log.warning("stopped at global step %d; resume with --resume", self.global_step)
                    break
        if step == total and saved_at != self.global_step:
            self._save(step, run)
        plot = self._plot(stage, index) if step == total else None
        self._emit({"event": "stage_end", "step": self.global_step, "stage": stage.name, "stage_step": step,
                    "plot": str(plot) if plot else None})  # fmt: skip
        del module
        if parallel.sharded and step == total:
            self._reload_from = self.last_checkpoint
        before, after = setup.padding
        return StageResult(stage.name, step - start, counts, before, after, setup.samples, setup.skipped, plot)

    def _log_stage_start(self, run: _Stage, counts: dict[str, dict[str, int]]) -> None:
        stage, setup = run.config, run.setup
        training = [c for c, n in counts.items() if n["trainable"]]
        policy = {c: getattr(stage.policy, c) for c in counts}
        lines = [f"{c:<16}{n['trainable']:>14,}{n['total']:>14,}" for c, n in counts.items()]
        table = "\n".join([f"{'component':<16}{'trainable':>14}{'total':>14}", *lines])
        groups = run.optimizer.param_groups
        lrs = {g["name"]: g.get("initial_lr", g["lr"]) for g in groups if "no_decay" not in g["name"]}
        parts = [
            f"{setup.total} steps of {setup.global_batch} samples ({setup.samples} usable samples)",
            "policy " + ", ".join(f"{c}={p}" for c, p in policy.items()),
            f"training {', '.join(training)} ({sum(n['trainable'] for n in counts.values()):,} parameters)",
            f"lr {lrs}",
            setup.summary,
        ]
        log.info("stage %d %r: %s\n%s", run.index, stage.name, "; ".join(p for p in parts if p), table)
        self._emit({
            "event": "stage_start", "step": self.global_step, "stage": stage.name, "stage_index": run.index,
            "objective": stage.objective, "steps": setup.total, "global_batch": setup.global_batch,
            "samples": setup.samples, "trainable": counts, "policy": policy, "lrs": lrs, **setup.start_record,
        })  # fmt: skip

    def _progress(self, stage: StageConfig, total: int, start: int):
        from tqdm import tqdm

        enabled = self.config.progress and self.env.is_main
        return tqdm(total=total, initial=start, desc=stage.name, unit="step", disable=not enabled, dynamic_ncols=True)

    def _train_step(self, module: Any, batch: StepBatch, step: int, run: _Stage) -> dict[str, Any]:
        """One optimizer step over the batch's micro-batches: backward each, unscale, clip, step; its record."""
        env, stage, optimizer, scaler = self.env, run.config, run.optimizer, run.scaler
        scale = env.world_size / (batch.norm or 1.0)
        loss_sum = 0.0
        extras: dict[str, Any] = {}  # the objective's record fields, from the last micro-batch
        for a, micro in enumerate(batch.micro):
            sync = a == batch.accum - 1 or not env.distributed
            with nullcontext() if sync else run.parallel.no_sync():
                try:
                    value, extras = self._micro_step(module, micro, scale, run)
                except torch.OutOfMemoryError as exc:
                    optimizer.zero_grad(set_to_none=True)
                    raise TrainingError(
                        f"stage {stage.name!r}: out of memory at batch_size {stage.batch_size} (step {step}); "
                        f"lower batch_size and raise grad_accum to keep the global batch, e.g. batch_size "
                        f"{max(1, stage.batch_size // 2)} with grad_accum {stage.grad_accum * 2}, or turn on "
                        "gradient_checkpointing"
                    ) from exc
                loss_sum += value
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        max_norm = stage.max_grad_norm if stage.max_grad_norm is not None else math.inf
        grad_norm = run.parallel.clip_grad_norm(params, max_norm)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        scaler.step(optimizer)
        scaler.update()
        run.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = dist_utils.all_reduce_sum(loss_sum, env) / (batch.norm or 1.0)
        first = optimizer.param_groups[0]["name"]
        return {"event": "step", "loss": loss, "lr": lrs[first], "lrs": lrs, "grad_norm": grad_norm,
                **batch.record, **extras}  # fmt: skip

    def _micro_step(self, module: Any, batch: Any, scale: float, run: _Stage) -> tuple[float, dict[str, Any]]:
        """Forward + backward of one micro-batch: the objective's loss times ``scale`` (world size / the step's
        norm), so that gradients summed over micro-batches and averaged over ranks are those of the step's loss."""
        device, amp_dtype = self.env.device, run.amp_dtype
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, extras = run.objective.loss(module, batch)
        if not loss.requires_grad:
            # no trainable weight on this micro-batch's path (e.g. text only while only the projector trains): a
            # zero-valued graph over them gives zero gradients, and keeps every rank's gradient collectives matched
            params = [p for g in run.optimizer.param_groups for p in g["params"]]
            loss = loss + sum((p.sum() * 0.0 for p in params), loss.new_zeros(()))
        run.scaler.scale(loss * scale).backward()
        return float(loss.detach()), extras

    # -- writing --------------------------------------------------------------------------------------------
    def _save(self, stage_step: int, run: _Stage) -> None:
        env, scaler = self.env, run.scaler
        rngs = dist_utils.gather(ckpt.rng_state(), env)
        model = run.parallel.full_model(self.model)  # collective under fsdp: every rank sends its shards
        optimizer_state = run.parallel.optimizer_state(run.optimizer)
        if env.is_main:
            assert model is not None and optimizer_state is not None
            self.model = model  # type: ignore[assignment]  # under fsdp: rank 0's unsharded copy
            position = {"global_step": self.global_step, "stage_index": run.index, "stage": run.config.name,
                        "stage_step": stage_step, "stage_steps": run.setup.total}  # fmt: skip
            state = {"optimizer": optimizer_state, "scheduler": run.scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rngs,
                     "position": position, "objective": run.objective.state_dict()}  # fmt: skip

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
