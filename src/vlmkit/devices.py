"""The one home of device and dtype resolution, for inference (``vlmkit.load``, every command) and training."""

from __future__ import annotations

import torch

from vlmkit.errors import ConfigError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """``auto`` → CUDA, then MPS, then CPU; anything else must be available. ``local_rank`` (training under
    torchrun): ``cuda`` means this rank's GPU, and ``auto`` never picks MPS (DDP runs on CUDA or CPU)."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; valid: {', '.join(DEVICES)} (or cuda:N)")
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif _mps() and local_rank is None:
            device = "mps"
        else:
            device = "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available on this machine")
        if device == "cuda" and local_rank is not None:
            device = f"cuda:{local_rank}"
    if device == "mps" and not _mps():
        raise ConfigError("device 'mps' asked for, but MPS is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Weights' dtype: ``auto`` → bf16 on CUDA with bf16 support, fp16 on other accelerators, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Training's autocast dtype for a precision setting on a device (None: plain fp32)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision fp16 needs a CUDA device (this run is on {device.type}); use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
