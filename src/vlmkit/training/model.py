"""The model side of training: build it from a spec, apply a stage's per-component policy (frozen, full, LoRA
through peft), optimizer parameter groups, and plain (LoRA-merged) exports."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.compose import compose, save_pretrained
from vlmkit.models.vision import VisionTower
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.processor import VLMProcessor
from vlmkit.training.config import COMPONENTS, ModelSpec, StageConfig

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
MODULE_OF = {"vision": "vision_tower", "projector": "projector", "language_model": "language_model"}
"""Config component name → attribute of :class:`VisionLanguageModel`."""


def build_model(spec: ModelSpec, tokenizer: Any = None) -> tuple[VisionLanguageModel, VLMProcessor]:
    """The model and processor a spec describes (a checkpoint, or parts composed with a new projector).

    ``tokenizer`` (an object or folder) replaces ``spec.tokenizer``, e.g. one trained for ``train_tokenizer``.
    """
    spec.validate()
    if spec.checkpoint:
        model, processor = _load_checkpoint(spec.checkpoint)
    else:
        tokenizer = tokenizer if tokenizer is not None else spec.tokenizer
        lm = spec.lm
        if isinstance(lm, dict) and "vocab_size" not in lm and tokenizer is not None:
            if isinstance(tokenizer, str | Path):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
            lm = {**lm, "vocab_size": len(tokenizer)}
        model, processor = compose(
            spec.vision,  # type: ignore[arg-type]
            lm,  # type: ignore[arg-type]
            spec.projector,
            tokenizer=tokenizer,
            feature_layer=spec.feature_layer,
            select_strategy=spec.select_strategy,
            resize_mode=spec.resize_mode,
            image_layout=spec.image_layout or "as_written",
            views=spec.views,
        )
    if spec.checkpoint and spec.image_layout is not None:
        processor.image_layout = spec.image_layout
    if spec.projector_checkpoint:
        model.load_projector(spec.projector_checkpoint)  # ConfigError when the dimensions differ
        log.info("loaded the projector from %s", spec.projector_checkpoint)
    return model, processor


def train_tokenizer(texts: Iterable[str], vocab_size: int, folder: str | Path) -> Path:
    """Train a byte-level BPE chat tokenizer on ``texts`` and save it to ``folder``."""
    from vlmkit.processing.tokenizer_training import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(str(folder))
    log.info("trained a byte-level BPE tokenizer of %d tokens on the training texts (%s)", len(tokenizer), folder)
    return Path(folder)


def _load_checkpoint(name: str) -> tuple[VisionLanguageModel, VLMProcessor]:
    """A model to train, named as every command names one (built-in, folder or hub id), on the CPU in fp32."""
    from vlmkit.backends import TRAIN, load_model

    loaded = load_model(name, torch.device("cpu"), torch.float32)
    if TRAIN not in loaded.engine.capabilities:
        raise CheckpointError(
            f"model.checkpoint {name!r} runs on a backend vlmkit can't train ({type(loaded.engine).__name__}); "
            "train a vlmkit model (a built-in, a vlmkit checkpoint or a transformers LLaVA folder)"
        )
    return loaded.model, loaded.processor


# ---------------------------------------------------------------------------------------------------- policy


def _peft_target(model: VisionLanguageModel, component: str) -> tuple[Any, str]:
    """(owner, attribute) of the module LoRA wraps for a component (the tower's transformers model)."""
    if component == "vision":
        return model.vision_tower, "model"
    if component == "language_model":
        return model, "language_model"
    raise ConfigError(f"LoRA is not supported for the {component}; use 'full' or 'frozen'")


def lora_components(model: VisionLanguageModel) -> dict[str, Any]:
    """Components currently wrapped by a peft LoRA model, by config name."""
    from peft import PeftModel

    out = {}
    for component in ("vision", "language_model"):
        owner, attr = _peft_target(model, component)
        module = getattr(owner, attr)
        if isinstance(module, PeftModel):
            out[component] = module
    return out


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft still asks transformers for ``is_gradient_checkpointing``, deprecated in transformers 5."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def merge_lora(model: VisionLanguageModel) -> list[str]:
    """Merge every LoRA adapter into its base weights, in place; returns the merged components."""
    merged = []
    for component, peft_model in lora_components(model).items():
        owner, attr = _peft_target(model, component)
        with _quiet_peft():
            setattr(owner, attr, peft_model.merge_and_unload())
        merged.append(component)
    return merged


def apply_policy(model: VisionLanguageModel, stage: StageConfig) -> None:
    """Freeze, fully train or LoRA-wrap each component as the stage says (earlier adapters are merged first)."""
    from peft import LoraConfig, get_peft_model

    merged = merge_lora(model)
    if merged:
        log.info("merged the LoRA adapters of %s into the base weights", ", ".join(merged))
    for component in COMPONENTS:
        policy = getattr(stage.policy, component)
        for module in model.component_modules(MODULE_OF[component]):
            module.requires_grad_(policy == "full")
        if policy == "lora":
            owner, attr = _peft_target(model, component)
            config = LoraConfig(
                r=stage.lora.r,
                lora_alpha=stage.lora.alpha,  # type: ignore[arg-type]
                lora_dropout=stage.lora.dropout,
                target_modules=stage.lora.target_modules,
            )
            try:
                with _quiet_peft():
                    wrapped = get_peft_model(getattr(owner, attr), config)
            except ValueError as exc:
                raise ConfigError(f"stage {stage.name!r}: LoRA on the {component}: {exc}") from exc
            setattr(owner, attr, wrapped)


def set_gradient_checkpointing(model: VisionLanguageModel, stage: StageConfig) -> None:
    """Turn activation checkpointing on or off for the LM (always on the backward path) and a training tower."""
    targets = [("language_model", model.language_model), ("vision", model.vision_tower.model)]
    for component, module in targets:
        base = module.get_base_model() if hasattr(module, "get_base_model") else module  # type: ignore[operator]
        on = stage.gradient_checkpointing and (component == "language_model" or stage.policy.vision != "frozen")
        if not getattr(base, "supports_gradient_checkpointing", False):
            if on:
                log.warning("%s does not support gradient checkpointing", type(base).__name__)
            continue
        kwargs = {"use_reentrant": False}
        if on and hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif on:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules()):
            getattr(base, "activation_checkpointing_disable", base.gradient_checkpointing_disable)()


def param_groups(model: VisionLanguageModel, stage: StageConfig) -> list[dict[str, Any]]:
    """AdamW groups per component (its ``module_lr`` or the stage ``lr``); biases and norms get no decay."""
    groups = []
    for component in COMPONENTS:
        lr = stage.module_lr.get(component, stage.lr)
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for param in (p for module in model.component_modules(MODULE_OF[component]) for p in module.parameters()):
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        for params, wd, suffix in ((decay, stage.weight_decay, ""), (no_decay, 0.0, ".no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": component + suffix})
    return groups


def trainable_counts(model: VisionLanguageModel) -> dict[str, dict[str, int]]:
    """Trainable and total parameters per component (config names)."""
    summary = model.parameter_summary()
    return {
        component: {"trainable": summary[MODULE_OF[component]].trainable, "total": summary[MODULE_OF[component]].total}
        for component in COMPONENTS
    }


# ---------------------------------------------------------------------------------------------------- export


def merged_view(model: VisionLanguageModel) -> VisionLanguageModel:
    """The model with LoRA merged, as a plain VisionLanguageModel; merged parts are copies, ``model`` is untouched
    (parts without LoRA are shared, not copied)."""
    wrapped = lora_components(model)
    if not wrapped:
        return model
    tower = model.vision_tower
    if "vision" in wrapped:
        with _quiet_peft():
            merged = copy.deepcopy(wrapped["vision"]).merge_and_unload()
        tower = VisionTower(merged, tower.feature_layer, tower.select_strategy)
    lm = model.language_model
    if "language_model" in wrapped:
        with _quiet_peft():
            lm = copy.deepcopy(wrapped["language_model"]).merge_and_unload()
    merged_model = VisionLanguageModel(model.config, tower, model.projector, lm)
    merged_model.image_views = model.image_views  # shared, like the projector (a new one would be random)
    return merged_model


def export_plain(model: VisionLanguageModel, processor: VLMProcessor, folder: str | Path) -> Path:
    """Save a plain vlmkit checkpoint (LoRA merged) that :func:`vlmkit.load_pretrained` reads."""
    with torch.no_grad():
        return save_pretrained(merged_view(model), processor, folder)


def save_adapters(model: VisionLanguageModel, folder: str | Path) -> list[str]:
    """Save each LoRA adapter with peft (``folder/<component>/adapter_model.safetensors``)."""
    saved = []
    for component, peft_model in lora_components(model).items():
        with _quiet_peft():
            peft_model.save_pretrained(str(Path(folder) / component))
        saved.append(component)
    return saved


def load_adapter(model: VisionLanguageModel, folder: str | Path, component: str = "language_model") -> None:
    """Attach a saved LoRA adapter (``save_adapters``' ``folder/<component>``) to a model's component."""
    from peft import PeftModel

    path = Path(folder) / component
    if not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path}: no adapter_config.json; not a saved LoRA adapter")
    owner, attr = _peft_target(model, component)
    with _quiet_peft():
        setattr(owner, attr, PeftModel.from_pretrained(getattr(owner, attr), str(path)))
