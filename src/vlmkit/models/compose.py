"""Compose a new VLM from a vision tower, a projector and a causal LM; load a saved one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from vlmkit.config import LMConfig, ProjectorConfig, ViewsConfig, VisionConfig, VLMConfig
from vlmkit.errors import ConfigError
from vlmkit.models.projector import build_projector
from vlmkit.models.vision import VisionTower, normalisation_for
from vlmkit.models.vlm import VisionLanguageModel, build_language_model, tokens_per_view
from vlmkit.processing.chat import ImageLayout
from vlmkit.processing.images import ImageTransformConfig
from vlmkit.processing.processor import VLMProcessor, prepare_tokenizer
from vlmkit.tokens import IMAGE_TOKEN
from vlmkit.views import projector_in

log = logging.getLogger(__name__)

PartSpec = str | Path | PretrainedConfig | dict[str, Any]


def _part(spec: PartSpec, what: str) -> tuple[str | None, dict[str, Any] | None]:
    """(source, hf_config) from a hub id / folder, a transformers config or a config dict."""
    if isinstance(spec, str | Path):
        return str(spec), None
    if isinstance(spec, PretrainedConfig):
        return None, spec.to_dict()
    if isinstance(spec, dict):
        return None, dict(spec)
    raise ConfigError(
        f"{what}: give a hub id, a folder, a transformers config or a config dict, not {type(spec).__name__}"
    )


def compose(
    vision: PartSpec,
    lm: PartSpec,
    projector: str = "mlp2x_gelu",
    *,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    feature_layer: int | list[int] = -2,
    select_strategy: str = "auto",
    resize_mode: str = "pad",
    image_layout: ImageLayout = "as_written",
    views: ViewsConfig | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[VisionLanguageModel, VLMProcessor]:
    """Join a vision tower and a causal LM through a new projector; returns the model and its processor.

    ``vision`` and ``lm`` are hub ids or local folders (loaded with ``from_pretrained``) or configs (random
    init). The tokenizer defaults to the LM's; ``<image>`` is added to it when missing and the LM's embeddings
    are resized to match. ``image_layout`` is where the processor puts image tokens (``as_written`` or
    ``after_each_question``; see :func:`vlmkit.processing.chat.place_images`). ``views`` is how an image
    becomes the tower's views and its tokens (default ``single``; see :mod:`vlmkit.views`).
    """
    views = views or ViewsConfig()
    v_source, v_hf = _part(vision, "vision")
    l_source, l_hf = _part(lm, "lm")
    vision_config = VisionConfig(
        source=v_source,
        hf_config=v_hf,
        feature_layer=feature_layer,
        select_strategy=select_strategy,  # type: ignore[arg-type]  # checked by VisionConfig
    )
    tower = VisionTower.from_config(vision_config, dtype=dtype)
    language_model = build_language_model(LMConfig(source=l_source, hf_config=l_hf), dtype=dtype)
    # every end-of-sequence id the LM stops on (Llama 3 lists three in generation_config.json): into its config,
    # which the checkpoint inlines, so a saved and reloaded model stops on them too
    eos = getattr(getattr(language_model, "generation_config", None), "eos_token_id", None)
    if eos is not None:
        language_model.config.eos_token_id = eos

    if tokenizer is None:
        if l_source is None:
            raise ConfigError("the LM was given as a config, so pass a tokenizer (object, folder or hub id)")
        tokenizer = l_source
    if isinstance(tokenizer, str | Path):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    added = prepare_tokenizer(tokenizer, IMAGE_TOKEN)
    rows = int(language_model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
    if len(tokenizer) > rows:
        log.info("adding %s to the tokenizer: resizing LM embeddings %d → %d", added, rows, len(tokenizer))
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)

    mean, std = normalisation_for(vision_config, tower.model.config.model_type)
    image_config = ImageTransformConfig(size=tower.image_size, resize_mode=resize_mode, mean=mean, std=std)  # type: ignore[arg-type]
    proj = build_projector(projector, projector_in(views, tower.hidden_size), language_model.config.hidden_size)
    proj = proj.to(dtype or torch.float32)
    processor = VLMProcessor(
        tokenizer,
        image_config,
        tokens_per_image=tokens_per_view(tower, proj),
        image_layout=image_layout,
        views=views,
    )
    config = VLMConfig(
        vision=VisionConfig(
            source=v_source,
            hf_config=tower.model.config.to_dict(),
            feature_layer=feature_layer,
            select_strategy=tower.select_strategy,  # type: ignore[arg-type]
        ),
        lm=LMConfig(source=l_source, hf_config=language_model.config.to_dict()),
        projector=ProjectorConfig(name=projector),
        views=views,
        image_token_id=processor.image_token_id,
    )
    model = VisionLanguageModel(config, tower, proj, language_model)
    log.debug("composed VLM:\n%s", model.format_parameter_summary())
    return model, processor


def load_pretrained(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[VisionLanguageModel, VLMProcessor]:
    """Load a vlmkit checkpoint folder: the model and its processor."""
    return VisionLanguageModel.from_pretrained(folder, dtype=dtype), VLMProcessor.from_pretrained(folder)


def save_pretrained(model: VisionLanguageModel, processor: VLMProcessor, folder: str | Path) -> Path:
    """Save model and processor into one folder that :func:`load_pretrained` reads."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)
