"""The transformers backend: pretrained VLMs vlmkit can't express natively, run through vlmkit's API.

Qwen2-VL, InternVL (the ``-hf`` checkpoints), Idefics3/SmolVLM, LLaVA-NeXT, Gemma 3 and the other models behind
transformers' ``AutoModelForImageTextToText`` load with their own processor and chat template. Images still come
through :func:`vlmkit.processing.images.load_image` (same access policy, size limit and errors); the model's
processor gets PIL images only, so it never reads files or URLs itself. Generation is
:class:`vlmkit.interop.hf_engine.HFEngine`, which has :class:`vlmkit.inference.engine.Engine`'s interface, so chat,
streaming, batches, describe, eval and the server work unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel

from vlmkit.errors import CheckpointError
from vlmkit.interop.hf_engine import HFEngine
from vlmkit.interop.hf_processor import HFProcessor, load_hf_processor

log = logging.getLogger(__name__)

NATIVE_MODEL_TYPES = frozenset({"llava"})
"""Image-text-to-text model types vlmkit imports as its own models (see :mod:`vlmkit.interop.hf_llava`)."""


# -- detection and loading ------------------------------------------------------------------------------------
def _model_type(folder: Path) -> str | None:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def is_transformers_vlm(folder: str | Path) -> bool:
    """Whether ``folder`` holds a transformers image-text-to-text checkpoint that this backend runs (not LLaVA)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = _model_type(Path(folder))
    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in NATIVE_MODEL_TYPES


def load_transformers_vlm(
    name_or_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, HFProcessor, HFEngine]:
    """Load a transformers VLM (hub id or folder) with its processor: ``(model, processor adapter, engine)``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
        model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), config=config, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{name_or_path}: cannot load it as a transformers vision-language model ({exc})"
        ) from exc
    model.to(device).eval()  # type: ignore[arg-type]
    processor = HFProcessor(load_hf_processor(name_or_path, config.model_type))
    return model, processor, HFEngine(model, processor)
