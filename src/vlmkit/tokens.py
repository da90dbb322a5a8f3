"""Markers every layer agrees on (data files, the processor, the model, training), in one light module."""

IMAGE_TOKEN = "<image>"
"""The marker that stands for one image inside message text (LLaVA's convention)."""

IGNORE_INDEX = -100
"""The label of a position the loss ignores (prompt tokens, image tokens, padding), as PyTorch's cross-entropy."""
