"""The training config: model spec, stages (data mix, per-component policy, optimisation) and run settings.

Read from YAML or TOML with :func:`load_config`; ``--set key=value`` overrides use dotted keys, with list
indices for stages (``stages.1.lr=2e-5``). Unknown keys raise :class:`~vlmkit.errors.ConfigError` listing the
valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlmkit.config import ViewsConfig, config_from_dict, config_to_dict
from vlmkit.errors import ConfigError, RegistryError
from vlmkit.processing.chat import ImageLayout

COMPONENTS = ("vision", "projector", "language_model")
"""Config names of the three model components (``vision`` is the model's ``vision_tower``)."""
Policy = Literal["frozen", "full", "lora"]
LossWeighting = Literal["token", "turn", "turn_sqrt"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class ModelSpec:
    """Where the model comes from: a vlmkit checkpoint, or parts (vision tower, projector, LM) composed anew.

    ``vision`` and ``lm`` are hub ids, local folders, or transformers config dicts (with ``model_type``; random
    init). ``tokenizer`` defaults to the LM's; ``train_tokenizer`` (a vocabulary size) instead trains a
    byte-level BPE tokenizer on the texts of every stage's data, for LMs built from scratch.
    """

    checkpoint: str | None = None
    """A vlmkit checkpoint folder, or a built-in name (``tiny-random``); excludes ``vision``/``lm``."""
    vision: str | dict[str, Any] | None = None
    lm: str | dict[str, Any] | None = None
    projector: str = "mlp2x_gelu"
    projector_checkpoint: str | None = None
    """A folder written by ``save_projector`` (e.g. an earlier alignment run) loaded into the new model."""
    tokenizer: str | None = None
    train_tokenizer: int | None = None
    feature_layer: int | list[int] = -2
    select_strategy: Literal["auto", "default", "full"] = "auto"
    resize_mode: Literal["pad", "resize"] = "pad"
    image_layout: ImageLayout | None = None
    """Where the processor puts image tokens (:func:`vlmkit.processing.chat.place_images`); None keeps the
    checkpoint's own layout, or ``as_written`` for a new model."""
    views: ViewsConfig | None = None
    """How images become views and tokens for a new model (``{name: anyres, options: {...}}``; None: ``single``);
    a checkpoint keeps its own."""

    def validate(self) -> None:
        if self.checkpoint and (self.vision is not None or self.lm is not None):
            raise ConfigError("model: give either 'checkpoint' or 'vision' + 'lm', not both")
        if self.checkpoint and self.views is not None:
            raise ConfigError("model.views: a checkpoint keeps the views it was trained with; give it for new models")
        if not self.checkpoint and (self.vision is None or self.lm is None):
            raise ConfigError("model: give 'checkpoint' (a vlmkit checkpoint) or both 'vision' and 'lm'")
        if self.tokenizer and self.train_tokenizer:
            raise ConfigError("model: give either 'tokenizer' or 'train_tokenizer', not both")
        if self.train_tokenizer is not None and self.train_tokenizer < 300:
            raise ConfigError(
                f"model.train_tokenizer: vocabulary size must be at least 300, got {self.train_tokenizer}"
            )


@dataclass
class DataSource:
    """One dataset of a stage's mix; ``weight`` is its share of the stage's samples (renormalised)."""

    path: str
    format: Literal["llava", "jsonl", "wds", "hf", "parquet"] | None = None
    weight: float = 1.0
    image_root: str | None = None
    skip_bad: bool = False
    """Skip malformed records (counted and logged) instead of failing."""
    limit: int | None = None
    """Use only the first ``limit`` usable samples."""
    split: str | None = None
    """The split of a ``DatasetDict`` folder or of hub-style parquet files."""
    columns: dict[str, str] | None = None
    """Field renaming, source name → vlmkit name (docs/formats.md)."""
    llava_compat: Literal["auto", "on", "off"] | bool = "auto"
    """LLaVA's preprocessing (trailing ``<image>`` moved, a leading assistant turn dropped): ``auto`` for
    LLaVA-schema records; YAML's bare ``on``/``off`` (booleans) mean the same."""
    allow_absolute_paths: bool = False
    """Accept absolute image paths outside the data root."""
    caption_prompt: str | None = None
    """The question of caption records (img2dataset); default ``Describe the image.``"""


@dataclass
class PolicySpec:
    """What trains in a stage, per component: ``frozen``, ``full`` (every weight) or ``lora`` (adapters)."""

    vision: Policy = "frozen"
    projector: Policy = "full"
    language_model: Policy = "frozen"


@dataclass
class LoraSpec:
    """peft LoRA settings for components whose policy is ``lora``."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass
class StageConfig:
    """One training stage (LLaVA: ``align`` then ``instruct``): its data mix, policy and optimisation."""

    name: str = "stage"
    data: list[DataSource] = field(default_factory=list)
    objective: str = "lm"
    """The name of a registered objective (:data:`vlmkit.training.objectives.OBJECTIVES`, where each says what it
    trains); ``lm``: next-token loss on the assistant turns."""
    loss_weighting: LossWeighting = "token"
    """How the ``lm`` loss averages over supervised tokens: ``token`` (every token counts the same, as LLaVA),
    ``turn`` (every assistant turn counts the same, whatever its length) or ``turn_sqrt`` (a turn of n tokens
    weighs sqrt(n), each token 1/sqrt(n): InternVL 2.5's square averaging)."""
    policy: PolicySpec = field(default_factory=PolicySpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    lr: float = 1e-3
    module_lr: dict[str, float] = field(default_factory=dict)
    """Learning rate per component (``vision``, ``projector``, ``language_model``), overriding ``lr``."""
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    """Warmup length as a fraction of the stage's steps (ignored when ``warmup_steps`` is set)."""
    min_lr_ratio: float = 0.0
    """The cosine decays to ``lr * min_lr_ratio``."""
    steps: int | None = None
    epochs: float | None = None
    """Passes over the mix (one pass = as many samples as the sources hold); ``steps`` wins when both are set."""
    batch_size: int = 8
    """Samples per device and micro-step; the global batch is ``batch_size * grad_accum * world_size``."""
    grad_accum: int = 1
    max_length: int | None = None
    """Samples longer than this (image tokens included) are skipped and counted."""
    max_grad_norm: float | None = 1.0
    precision: Precision = "auto"
    """``auto``: bf16 autocast on CUDA with bf16 support, fp16 on older CUDA, fp32 on CPU."""
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    """Sort samples by length within mega-batches so batches pad less (batch order stays random)."""
    packing: bool = False
    """Pack several samples into one row of each micro-batch (position ids restart; attention stays per sample)."""
    streaming: Literal["auto"] | bool = "auto"
    """Read, encode and batch the data as the stage goes (bounded memory; docs/training.md, "Streaming") instead
    of encoding every sample first; ``auto``: when a webdataset, parquet or ``datasets`` source is in the mix and
    the sources hold at least 100,000 records (none with a ``limit``)."""
    shuffle_buffer: int = 2048
    """Streaming: usable samples per shuffle window of each source (what each process holds per source)."""


@dataclass
class TrainConfig:
    """A training run: the model, its stages in order, and where and how often to write."""

    model: ModelSpec = field(default_factory=ModelSpec)
    stages: list[StageConfig] = field(default_factory=list)
    output_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"
    save_every: int | None = 500
    """Checkpoint every N optimizer steps (and always at the end of each stage); None: only stage ends."""
    keep_last: int | None = 3
    log_every: int = 1
    tensorboard: bool = False
    progress: bool = True
    num_workers: int = 0
    """Data-loading worker processes (0: load in the training process)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ``ddp`` (every process holds the whole model) or ``fsdp`` (FSDP2 shards parameters,
    gradients and optimizer state over the processes; docs/training.md). One process runs the model either way."""

    def validate(self) -> None:
        """Check combinations that a single field can't; raises ConfigError."""
        self.model.validate()
        if not self.stages:
            raise ConfigError("stages: give at least one stage (e.g. align, then instruct)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: names must be unique, got {names}")
        for v, what in ((self.save_every, "save_every"), (self.keep_last, "keep_last")):
            if v is not None and v < 1:
                raise ConfigError(f"{what} must be at least 1 (or null), got {v}")
        if self.log_every < 1:
            raise ConfigError(f"log_every must be at least 1, got {self.log_every}")
        for i, stage in enumerate(self.stages):
            _validate_stage(stage, f"stages.{i} ({stage.name})")
            if self.strategy == "fsdp" and stage.precision == "fp16":
                raise ConfigError(
                    f"stages.{i} ({stage.name}).precision: fp16 (loss scaling) is not supported with strategy "
                    "'fsdp'; use bf16 or fp32, or strategy 'ddp'"
                )


def _validate_stage(stage: StageConfig, where: str) -> None:
    if not stage.data:
        raise ConfigError(f"{where}: 'data' is empty; list at least one dataset {{path, weight}}")
    for j, source in enumerate(stage.data):
        if not (source.weight > 0 and math.isfinite(source.weight)):
            raise ConfigError(f"{where}.data.{j}: weight must be positive, got {source.weight}")
        if source.limit is not None and source.limit < 1:
            raise ConfigError(f"{where}.data.{j}: limit must be at least 1, got {source.limit}")
    unknown = sorted(set(stage.module_lr) - set(COMPONENTS))
    if unknown:
        raise ConfigError(f"{where}.module_lr: unknown component(s) {unknown}; valid: {', '.join(COMPONENTS)}")
    if stage.policy.projector == "lora":
        raise ConfigError(f"{where}.policy.projector: LoRA is for the vision tower and the LM; use 'full' or 'frozen'")
    _check_objective(stage, where)
    if all(getattr(stage.policy, c) == "frozen" for c in COMPONENTS):
        raise ConfigError(f"{where}: every component is frozen; nothing would train")
    positive = {"lr": stage.lr, "batch_size": stage.batch_size, "grad_accum": stage.grad_accum}
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{where}.{name} must be positive, got {value}")
    if stage.steps is not None and stage.steps < 1:
        raise ConfigError(f"{where}.steps must be at least 1, got {stage.steps}")
    if stage.epochs is not None and not stage.epochs > 0:
        raise ConfigError(f"{where}.epochs must be positive, got {stage.epochs}")
    if not 0 <= stage.warmup_ratio < 1:
        raise ConfigError(f"{where}.warmup_ratio must be in [0, 1), got {stage.warmup_ratio}")
    if stage.max_length is not None and stage.max_length < 2:
        raise ConfigError(f"{where}.max_length must be at least 2, got {stage.max_length}")
    if len(stage.betas) != 2:
        raise ConfigError(f"{where}.betas must be two numbers, got {stage.betas}")
    if stage.lora.r < 1:
        raise ConfigError(f"{where}.lora.r must be at least 1, got {stage.lora.r}")
    if stage.streaming not in (True, False, "auto"):
        raise ConfigError(f"{where}.streaming must be true, false or 'auto', got {stage.streaming!r}")
    if stage.shuffle_buffer < 1:
        raise ConfigError(f"{where}.shuffle_buffer must be at least 1, got {stage.shuffle_buffer}")
    if stage.streaming is True and any(source.limit is not None for source in stage.data):
        raise ConfigError(f"{where}: 'limit' needs the whole source read first; drop it or set streaming: false")


def _check_objective(stage: StageConfig, where: str) -> None:
    """The stage's objective must be registered, and its own checks must pass."""
    from vlmkit.training.objectives import OBJECTIVES  # the objectives import this module

    try:
        factory = OBJECTIVES.get(stage.objective)
    except RegistryError as exc:
        raise ConfigError(f"{where}.objective: {exc}") from None
    factory().check(stage, where)


def _coerce_numbers(obj: Any, where: str) -> None:
    """Check the plain number fields of a config object in place. YAML reads ``1e-4`` (no dot) as a string, so
    numeric strings are converted; anything that is not a number raises ConfigError naming the key."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        options = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
        if value is None or not options & {int, float} or options - {int, float, type(None)}:
            continue  # not a plain number field
        name, want = f"{where}{f.name}", "a number" if float in options else "an integer"
        try:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError
            number = float(value)
            if float not in options and not number.is_integer():
                raise ValueError
        except ValueError:
            raise ConfigError(f"{name}: expected {want}, got {value!r}") from None
        setattr(obj, f.name, number if float in options else int(number))


def _list_of(cls: type, items: Any, where: str) -> list:
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a list, got {type(items).__name__}")
    return [config_from_dict(cls, item, f"{where}.{i}.") for i, item in enumerate(items)]


def config_from_mapping(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a plain dict (as read from YAML/TOML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a training config must be a mapping, got {type(data).__name__}")
    data = copy.deepcopy(data)
    stages = data.pop("stages", [])
    config = config_from_dict(TrainConfig, data)
    config.stages = []
    if not isinstance(stages, list):
        raise ConfigError(f"stages: expected a list of stages, got {type(stages).__name__}")
    for i, raw in enumerate(stages):
        if not isinstance(raw, dict):
            raise ConfigError(f"stages.{i}: expected a mapping, got {type(raw).__name__}")
        raw = dict(raw)
        sources = raw.pop("data", [])
        stage = config_from_dict(StageConfig, raw, f"stages.{i}.")
        stage.data = _list_of(DataSource, sources, f"stages.{i}.data")
        for obj, at in ((stage, ""), (stage.lora, "lora."), *((d, f"data.{j}.") for j, d in enumerate(stage.data))):
            _coerce_numbers(obj, f"stages.{i}.{at}")
        config.stages.append(stage)
    _coerce_numbers(config, "")
    config.validate()
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a ``.yaml``/``.yml``/``.toml``/``.json`` config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config type {suffix!r}; use .yaml, .yml, .toml or .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, list indices; values parsed as YAML) to a raw config."""
    data = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides or [])
    for key, value in items:
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[:depth]) or 'list'} has no item {part!r}")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
                if not last and not isinstance(node.get(part), dict | list):
                    node[part] = {}
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is not a mapping or a list")
            if last:
                node[index] = value
            else:
                node = node[index]
    return data


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    source: str | Path | dict[str, Any] | TrainConfig, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """A validated :class:`TrainConfig` from a file path, a mapping or a config object, with overrides."""
    if isinstance(source, TrainConfig):
        data = config_to_dict(source)
    elif isinstance(source, dict):
        data = source
    else:
        data = read_config_file(source)
    return config_from_mapping(apply_overrides(data, overrides))


def config_as_dict(config: TrainConfig) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config (what checkpoints and ``config.yaml`` in the run folder hold)."""
    return config_to_dict(config)


def stage_fields() -> list[str]:
    """Names of the keys a stage accepts (for docs and error messages)."""
    return [f.name for f in dataclasses.fields(StageConfig)]
