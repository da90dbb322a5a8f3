"""Many processes: PyTorch DDP set up from torchrun's environment (gloo on CPU, nccl on CUDA).

Every rank holds the whole model and computes its own micro-batches of each global batch; DDP averages the
gradients. Only rank 0 writes files. Models that don't fit one device need FSDP (see docs/training.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlmkit.devices import resolve_device

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    """Where this process stands: its rank, the world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), or a single-process environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistEnv(device=target)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        initialized_here = True
        log.info("rank %d/%d joined the process group (%s) on %s", rank, world_size, backend, target)
    return DistEnv(rank, world_size, local_rank, target, initialized_here)


def shutdown(env: DistEnv) -> None:
    """Leave the process group if :func:`init_distributed` joined it."""
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP around ``model`` when there are several processes (unused parameters allowed: text-only batches
    leave the projector out); the model itself otherwise."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def all_reduce_sum(value: float, env: DistEnv) -> float:
    """The sum of ``value`` over all ranks."""
    if not env.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop at the same step)."""
    return all_reduce_sum(float(flag), env) > 0


def gather(obj: Any, env: DistEnv) -> list[Any]:
    """``obj`` of every rank, in rank order (on every rank)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
