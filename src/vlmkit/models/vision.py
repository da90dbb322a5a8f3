"""Vision towers: any transformers vision model, with LLaVA-style feature-layer and CLS-token selection."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
)

from vlmkit.config import VisionConfig
from vlmkit.errors import ConfigError
from vlmkit.processing.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlmkit.registry import Registry

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TowerSpec:
    """What vlmkit knows about one family of vision towers (a transformers ``model_type``)."""

    model_class: type[PreTrainedModel] | None
    """The class to load (None: transformers' ``AutoModel`` mapping)."""
    prefix_tokens: Callable[[PretrainedConfig], int]
    """Tokens before the patches in the hidden states: a CLS token, register tokens."""
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    """Normalisation of the family's own image processor (a tower folder's preprocessor_config.json wins)."""


TOWERS: Registry[TowerSpec] = Registry("vision tower")
"""Tower families by transformers ``model_type``; any other vision model works too, its CLS token detected."""

TOWERS.add("clip_vision_model", TowerSpec(CLIPVisionModel, lambda _: 1))
TOWERS.add("siglip_vision_model", TowerSpec(SiglipVisionModel, lambda _: 0, (0.5,) * 3, (0.5,) * 3))
TOWERS.add("dinov2", TowerSpec(None, lambda _: 1, IMAGENET_MEAN, IMAGENET_STD))
TOWERS.add("dinov2_with_registers", TowerSpec(
    None, lambda config: 1 + int(getattr(config, "num_register_tokens", 0)), IMAGENET_MEAN, IMAGENET_STD
))  # fmt: skip
TOWERS.add("vit", TowerSpec(None, lambda _: 1, (0.5,) * 3, (0.5,) * 3))


def _detected_prefix_tokens(model: PreTrainedModel) -> int:
    """CLS (``class_embedding`` as in CLIP, ``cls_token`` as in ViT/Dinov2) plus register tokens, if any."""
    embeddings = getattr(getattr(model, "vision_model", model), "embeddings", None)
    cls = int(any(hasattr(embeddings, name) for name in ("class_embedding", "cls_token")))
    registers = getattr(embeddings, "register_tokens", None)
    return cls + (int(registers.shape[1]) if isinstance(registers, torch.Tensor | nn.Parameter) else 0)


def _vision_part(config: PretrainedConfig) -> PretrainedConfig:
    """The vision sub-config of a composite (CLIP/SigLIP dual-encoder) config, or the config itself."""
    sub = getattr(config, "vision_config", None)
    return sub if isinstance(sub, PretrainedConfig) else config


def hf_config_from_dict(data: dict[str, Any], what: str) -> PretrainedConfig:
    """Rebuild a transformers config from its ``to_dict()`` form (``model_type`` required)."""
    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"{what} hf_config needs a 'model_type' (e.g. 'clip_vision_model', 'llama')")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise ConfigError(f"{what} hf_config: unknown model_type {model_type!r} ({exc})") from exc


def _tower_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    spec = TOWERS.get(config.model_type) if config.model_type in TOWERS else None
    if spec is not None and spec.model_class is not None:
        return spec.model_class
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]  # type: ignore[return-value]
    except KeyError as exc:
        raise ConfigError(f"no transformers vision model class for model_type {config.model_type!r}") from exc


def normalisation_for(config: VisionConfig, model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std for a tower: from its folder's preprocessor_config.json if there is one, else by family."""
    if config.source and (Path(config.source) / "preprocessor_config.json").is_file():
        data = json.loads((Path(config.source) / "preprocessor_config.json").read_text())
        if "image_mean" in data and "image_std" in data:
            return tuple(data["image_mean"]), tuple(data["image_std"])
    if model_type in TOWERS:
        spec = TOWERS.get(model_type)
        return spec.mean, spec.std
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


class VisionTower(nn.Module):
    """A transformers vision model plus the choice of hidden layer(s) and tokens fed to the projector."""

    def __init__(self, model: PreTrainedModel, feature_layer: int | list[int] = -2, select_strategy: str = "auto"):
        super().__init__()
        self.model = model
        hf = model.config
        if hf.model_type in TOWERS:
            prefix = TOWERS.get(hf.model_type).prefix_tokens(hf)
        else:
            prefix = _detected_prefix_tokens(model)
        has_cls = prefix > 0
        if select_strategy == "auto":
            select_strategy = "default" if has_cls else "full"
        if select_strategy not in ("default", "full"):
            raise ConfigError(f"select_strategy must be 'auto', 'default' or 'full', got {select_strategy!r}")
        if select_strategy == "default" and not has_cls:
            raise ConfigError(
                f"select_strategy 'default' drops a CLS token, but {hf.model_type} has none (it would drop a real "
                "image patch); use 'full' or 'auto'"
            )
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        n_hidden = hf.num_hidden_layers + 1  # embeddings output + one per layer
        if not layers or any(not -n_hidden <= layer < n_hidden for layer in layers):
            raise ConfigError(f"feature_layer {feature_layer!r} out of range for a tower with {n_hidden} hidden states")
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        self.has_cls = has_cls
        self.prefix_tokens = prefix
        """Non-patch tokens first in the hidden states (CLS, registers); ``default`` drops them."""
        self._layers = layers

    @classmethod
    def from_config(
        cls, config: VisionConfig, load_weights: bool = True, dtype: torch.dtype | None = None
    ) -> VisionTower:
        """Build from ``config.hf_config`` or load ``config.source`` (folder or hub id) with ``from_pretrained``."""
        if config.source and load_weights:
            hf = _vision_part(AutoConfig.from_pretrained(config.source))
            model = _tower_class(hf).from_pretrained(config.source, config=hf, dtype=dtype or torch.float32)
        elif config.hf_config is not None:
            hf = _vision_part(hf_config_from_dict(config.hf_config, "vision"))
            model = _tower_class(hf)._from_config(hf, dtype=dtype or torch.float32)
        elif config.source:
            hf = _vision_part(AutoConfig.from_pretrained(config.source))
            model = _tower_class(hf)._from_config(hf, dtype=dtype or torch.float32)
        else:
            raise ConfigError("vision tower needs a 'source' (hub id or folder) or an 'hf_config'")
        return cls(model, config.feature_layer, config.select_strategy)

    @property
    def hidden_size(self) -> int:
        """Size of one feature vector given to the projector (hidden size × number of selected layers)."""
        return self.model.config.hidden_size * len(self._layers)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    def num_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Feature vectors per image of the given pixel size (default: the tower's input size)."""
        patch = self.model.config.patch_size
        height = height or self.image_size
        width = width or self.image_size
        extra = self.prefix_tokens if self.select_strategy == "full" else 0
        return (height // patch) * (width // patch) + extra

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` pixels to ``(N, tokens, hidden_size)`` features."""
        pixel_values = pixel_values.to(dtype=self.model.dtype)
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = outputs.hidden_states
        selected = [hidden[layer] for layer in self._layers]
        if self.select_strategy == "default":
            selected = [h[:, self.prefix_tokens :] for h in selected]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
