"""Vision towers: any transformers vision model, with LLaVA-style feature-layer and CLS-token selection."""

from __future__ import annotations

import json
import logging
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

log = logging.getLogger(__name__)

# Exact model_type -> (model class, has a CLS token first). Other towers go through AutoModel.
TOWERS: dict[str, tuple[type[PreTrainedModel], bool]] = {
    "clip_vision_model": (CLIPVisionModel, True),
    "siglip_vision_model": (SiglipVisionModel, False),
}
# Normalisation used by each tower family's own image processor.
TOWER_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


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
    if config.model_type in TOWERS:
        return TOWERS[config.model_type][0]
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
    return TOWER_NORMALISATION.get(model_type, (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))


class VisionTower(nn.Module):
    """A transformers vision model plus the choice of hidden layer(s) and tokens fed to the projector."""

    def __init__(self, model: PreTrainedModel, feature_layer: int | list[int] = -2, select_strategy: str = "auto"):
        super().__init__()
        self.model = model
        hf = model.config
        has_cls = TOWERS.get(hf.model_type, (None, None))[1]
        if has_cls is None:
            has_cls = hasattr(getattr(model, "vision_model", model), "embeddings") and hasattr(
                getattr(getattr(model, "vision_model", model), "embeddings", None), "class_embedding"
            )
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
        extra = 1 if self.has_cls and self.select_strategy == "full" else 0
        return (height // patch) * (width // patch) + extra

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` pixels to ``(N, tokens, hidden_size)`` features."""
        pixel_values = pixel_values.to(dtype=self.model.dtype)
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = outputs.hidden_states
        selected = [hidden[layer] for layer in self._layers]
        if self.select_strategy == "default":
            selected = [h[:, 1:] for h in selected]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
