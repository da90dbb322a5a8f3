"""Export ``anyres`` vlmkit models to transformers' LLaVA-NeXT format (``LlavaNextForConditionalGeneration``).

The weights keep LLaVA's original on-disk layout (see :mod:`vlmkit.interop.hf_llava`) plus LLaVA-NeXT's
``image_newline``; the image processor saved is the very one vlmkit's ``anyres`` views run, and the model half
calls transformers' own layout functions, so pixels, token counts and the feature layout match by construction.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file
from transformers import LlavaNextConfig

from vlmkit.errors import ConfigError
from vlmkit.interop.hf_llava import check_parts, llava_config_kwargs, llava_state_dict, save_hf_processor
from vlmkit.models.vlm import VisionLanguageModel, tokens_per_view
from vlmkit.processing.processor import VLMProcessor
from vlmkit.views.anyres import AnyresAssembler, AnyresViews

log = logging.getLogger(__name__)

NEWLINE = {"image_views.image_newline": "image_newline"}
"""vlmkit's AnyRes weight → its LLaVA-NeXT name."""


def check_expressible(model: VisionLanguageModel) -> None:
    """Raise :class:`ConfigError` saying why transformers' LLaVA-NeXT can't hold this model, if it can't."""
    views = model.config.views.name
    if views != "anyres":
        hint = " (one view per image: export it as hf-llava)" if views == "single" else ""
        raise ConfigError(
            f"transformers' LLaVA-NeXT lays images out with AnyRes; this model uses the {views!r} views strategy{hint}"
        )
    check_parts(model)
    tower = model.vision_tower
    side = tower.image_size // tower.model.config.patch_size
    if tokens_per_view(tower, model.projector) != side * side:
        raise ConfigError(
            f"LLaVA-NeXT takes a {side}×{side} feature grid per view; this model's views make "
            f"{tokens_per_view(tower, model.projector)} tokens"
        )


def _assembler(model: VisionLanguageModel) -> AnyresAssembler:
    check_expressible(model)
    assert isinstance(model.image_views, AnyresAssembler)
    return model.image_views


def llava_next_config(model: VisionLanguageModel) -> LlavaNextConfig:
    """The LlavaNextConfig equivalent of an ``anyres`` vlmkit model."""
    pinpoints = _assembler(model).pinpoints  # the layout the model was trained with
    return LlavaNextConfig(**llava_config_kwargs(model), image_grid_pinpoints=pinpoints)


def export_hf_llava_next(model: VisionLanguageModel, processor: VLMProcessor, out: str | Path) -> Path:
    """Write a folder that ``LlavaNextForConditionalGeneration`` and ``AutoProcessor`` load with
    ``from_pretrained``."""
    from transformers import LlavaNextProcessor

    check_expressible(model)
    views = processor.views
    if not isinstance(views, AnyresViews) or views.pinpoints != _assembler(model).pinpoints:
        raise ConfigError(
            f"the processor's views ({processor.views_config}) don't match the model's ({model.config.views})"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    llava_next_config(model).save_pretrained(out)
    weights = llava_state_dict(model, "original", NEWLINE)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_hf_processor(LlavaNextProcessor, views.processor, model, processor, out)  # the processor vlmkit runs
    log.info("exported to %s (transformers LLaVA-NeXT format, %d tensors)", out, len(weights))
    return out
