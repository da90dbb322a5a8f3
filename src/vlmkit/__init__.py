"""vlmkit: build, train, run, serve, evaluate and export vision-language models."""

from vlmkit.api import VLM, load
from vlmkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ImageError,
    ImageTokenMismatchError,
    ProcessingError,
    RegistryError,
    VlmkitError,
)
from vlmkit.models.compose import compose, load_pretrained, save_pretrained
from vlmkit.models.projector import build_projector, projector_names
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.images import load_image
from vlmkit.processing.processor import VLMProcessor

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ImageError",
    "ImageTokenMismatchError",
    "ProcessingError",
    "RegistryError",
    "VLM",
    "VLMProcessor",
    "VisionLanguageModel",
    "VlmkitError",
    "build_projector",
    "compose",
    "load",
    "load_image",
    "load_pretrained",
    "projector_names",
    "save_pretrained",
]
