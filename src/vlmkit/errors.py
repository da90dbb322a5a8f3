"""The vlmkit error hierarchy. Every error a user can cause is one of these, with a message saying what to do."""

from __future__ import annotations


class VlmkitError(Exception):
    """Base class of every error vlmkit raises on purpose."""


class ConfigError(VlmkitError, ValueError):
    """A configuration value or combination is invalid."""


class RegistryError(ConfigError, KeyError):
    """An exact-name registry lookup failed; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes
        return str(self.args[0]) if self.args else ""


class ImageError(VlmkitError, ValueError):
    """An image could not be read: missing, corrupt, truncated, not an image, or too large."""


class ProcessingError(VlmkitError, ValueError):
    """Messages, templates or token sequences could not be turned into model inputs."""


class ImageTokenMismatchError(ProcessingError):
    """The number of image placeholders does not match the number of images or image features."""


class CheckpointError(VlmkitError, OSError):
    """A checkpoint is missing, incomplete, from an unknown format version, or incompatible."""


class DataError(VlmkitError, ValueError):
    """A dataset file or record is malformed; the message names the file and the record or line."""
