"""Any transformers dual encoder (CLIP, SigLIP, SigLIP2, ...): images and texts → L2-normalised embeddings."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmkit.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MAX_LENGTH_PADDED = ("siglip", "siglip2")
"""Families whose text tower was trained on texts padded to a fixed length, its ``max_position_embeddings`` (64 in
every released SigLIP and SigLIP2), since it pools the last position."""


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' notices and progress bars while loading (e.g. 'falling back to the PIL image
    processor', 'Loading weights')."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _features(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (older transformers) or an output whose ``pooler_output`` is it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DualEncoder:
    """A dual encoder with its image processor and tokenizer; every embedding it returns has unit L2 norm.

    Built from objects in memory (tests, training) or by :func:`load_encoder` from a name.
    """

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any, name: str = "", notice: str | None = None,
                 templates: str = "imagenet") -> None:  # fmt: skip
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise CheckpointError(
                f"{name or type(model).__name__}: not a dual encoder (it has no get_image_features and "
                "get_text_features); use a CLIP, SigLIP or SigLIP2 model"
            )
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.name = name
        self.notice = notice
        self.templates = templates
        """The name of the prompt-template set zero-shot labels use by default (:mod:`~vlmkit.embeddings.templates`)."""
        config = model.config
        self.model_type = str(getattr(config, "model_type", ""))
        text_config = getattr(config, "text_config", None)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 77) or 77)
        self.pad_to_max = self.model_type in MAX_LENGTH_PADDED

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        """The embedding size."""
        projection = getattr(self.model.config, "projection_dim", None)
        if projection:
            return int(projection)
        return int(self.embed_texts(["a"]).shape[1])

    def image_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """The image processor's tensors for ``images`` (RGB PIL images), on the model's device and dtype."""
        batch = self.image_processor(images=list(images), return_tensors="pt")
        return {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}

    def text_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids (and attention mask) for ``texts``, truncated to what the text tower reads."""
        padding = "max_length" if self.pad_to_max else True
        batch = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=self.max_length,
                               return_tensors="pt")  # fmt: skip
        names = ("input_ids", "attention_mask", "position_ids")
        return {k: v.to(self.device) for k, v in batch.items() if k in names}

    @torch.inference_mode()
    def embed_pixels(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        """Normalised image embeddings (float32 numpy) from processor outputs."""
        features = _features(self.model.get_image_features(**inputs)).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """``(len(images), dim)`` normalised float32 embeddings, computed ``batch_size`` images at a time."""
        parts = [self.embed_pixels(self.image_inputs(images[i : i + batch_size]))
                 for i in range(0, len(images), batch_size)]  # fmt: skip
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """``(len(texts), dim)`` normalised float32 embeddings."""
        if any(not isinstance(t, str) for t in texts):
            raise ConfigError("texts to embed must be strings")
        parts = []
        for i in range(0, len(texts), batch_size):
            features = _features(self.model.get_text_features(**self.text_inputs(texts[i : i + batch_size])))
            parts.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


def load_folder_encoder(folder: str | Path, device: Any = "cpu", dtype: Any = torch.float32, name: str = "",
                        notice: str | None = None, templates: str = "imagenet") -> DualEncoder:  # fmt: skip
    """A dual encoder saved by transformers (``config.json``, weights, processor files) in ``folder``."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    folder = Path(folder)
    label = name or str(folder)
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(folder)
        except Exception as exc:  # transformers raises several types for a folder it can't read
            raise CheckpointError(f"{label}: not a transformers model folder ({exc})") from exc
        try:
            model = AutoModel.from_pretrained(folder, dtype=dtype)
        except Exception as exc:
            raise CheckpointError(f"{label}: the model ({config.model_type!r}) did not load ({exc})") from exc
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise CheckpointError(
                f"{label}: model_type {config.model_type!r} is not a dual encoder (no get_image_features and "
                "get_text_features); use a CLIP, SigLIP or SigLIP2 model"
            )
        try:
            image_processor = AutoImageProcessor.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:
            raise CheckpointError(f"{label}: its image processor or tokenizer did not load ({exc})") from exc
    return DualEncoder(model.to(device), image_processor, tokenizer, name=label, notice=notice, templates=templates)


def load_encoder(name: str = "clip-shapes", device: str = "auto", dtype: str | torch.dtype = "auto") -> DualEncoder:
    """A built-in encoder (:data:`~vlmkit.embeddings.builtin.EMBEDDING_MODELS`), a model folder or a hub id."""
    from vlmkit.backends.base import model_folder
    from vlmkit.devices import resolve_device, resolve_dtype
    from vlmkit.embeddings.builtin import EMBEDDING_MODELS

    target = resolve_device(device)
    weights = resolve_dtype(dtype, target)
    if name in EMBEDDING_MODELS:
        entry = EMBEDDING_MODELS.get(name)
        return load_folder_encoder(entry.folder(), target, weights, name=name, notice=entry.notice,
                                   templates=entry.templates)  # fmt: skip
    path = Path(name).expanduser()
    if not path.exists() and (name.count("/") != 1 or name.startswith((".", "/", "~"))):
        from vlmkit.embeddings.builtin import EMBEDDING_MODELS as builtins

        raise CheckpointError(
            f"unknown embedding model {name!r}: not a built-in name ({', '.join(builtins.names())}), not an "
            "existing folder, and not a hub id (owner/name)"
        )
    return load_folder_encoder(model_folder(name), target, weights, name=name)
