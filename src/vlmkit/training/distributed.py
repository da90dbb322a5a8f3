"""Many processes, set up from torchrun's environment (gloo on CPU, nccl on CUDA), under one of two strategies.

``ddp``: every rank holds the whole model (PyTorch ``DistributedDataParallel``), computes its own micro-batches
of each global batch, and DDP averages the gradients. ``fsdp``: PyTorch's FSDP2 (``fully_shard``) shards the
parameters, gradients and optimizer state over the ranks, one group per LM decoder layer plus the rest of the
model. Either way only rank 0 writes files, and checkpoints hold the full, unsharded state in the same format
(a plain vlmkit model folder and an ordinary optimizer state dict), so a run saved under one strategy resumes
under the other or in one process.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlmkit.devices import resolve_device
from vlmkit.errors import ConfigError

log = logging.getLogger(__name__)

Strategy = Literal["ddp", "fsdp"]


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


# ---------------------------------------------------------------------------------------------------- strategies


class Parallel(Protocol):
    """How the step loop runs a stage's module over the processes (:func:`wrap` makes one).

    Methods marked *collective* must be called by every rank, in the same order.
    """

    module: nn.Module
    """What the objective's loss runs forward."""
    sharded: bool
    """True when the module's parameters are shards (``fsdp`` over several processes): the model the stage
    started from can't be used again as it is."""

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``groups`` (built on the module before wrapping) with the parameters the wrapped module trains."""
        ...

    def no_sync(self) -> AbstractContextManager[Any]:
        """A context for micro-batches whose gradients need not be exchanged yet (gradient accumulation)."""
        ...

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip the gradients to ``max_norm`` (``inf``: don't); the total norm over every rank's gradients."""
        ...

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """*Collective.* On rank 0, a plain (unsharded) ``model`` holding the trained weights; None elsewhere."""
        ...

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """*Collective.* On rank 0, the optimizer's full state dict (torch's format, as one process has it)."""
        ...

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a full state dict (from :meth:`optimizer_state`, under any strategy) into this rank's optimizer."""
        ...


class DataParallel:
    """``ddp``: DDP around the module over several processes (unused parameters allowed: text-only batches leave
    the projector out); the module itself in one process."""

    sharded = False

    def __init__(self, module: nn.Module, env: DistEnv) -> None:
        self.env = env
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.module: nn.Module = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
        else:
            self.module = module

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return groups

    def no_sync(self) -> AbstractContextManager[Any]:
        return self.module.no_sync() if self.env.distributed else nullcontext()  # type: ignore[operator]

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def full_model(self, model: nn.Module) -> nn.Module | None:
        return model if self.env.is_main else None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        return optimizer.state_dict() if self.env.is_main else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The LM's decoder layers inside ``module``: submodules of its ``language_model`` (peft-wrapped or not)
    whose class is one of the LM's ``_no_split_modules``, innermost first."""
    lm = getattr(module, "language_model", None)
    if lm is None:
        return []
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in reversed(list(lm.modules())) if type(m).__name__ in kinds]


class FullyShardedParallel:
    """``fsdp`` over several processes: FSDP2's ``fully_shard`` on each LM decoder layer, then on the whole
    module (the vision tower, the projector, embeddings and LM head form that root group).

    Frozen parameters are sharded like the others and simply get no gradient; parameters a rank's micro-batch
    leaves unused (the projector on a text-only batch) reduce a zero gradient, so the ranks' collectives match.
    With bf16 autocast the gathered parameters are bf16 and gradients are reduced in fp32 (FSDP2's
    ``MixedPrecisionPolicy``); fp16 loss scaling is refused. Rank 0 keeps an unsharded copy of the model on the
    CPU, into which :meth:`full_model` gathers the weights for checkpoints.
    """

    sharded = True

    def __init__(self, module: nn.Module, env: DistEnv, amp_dtype: torch.dtype | None) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if amp_dtype == torch.float16:
            raise ConfigError(
                "strategy 'fsdp' does not support fp16 (its loss scaling); set the stage's precision to bf16 or "
                "fp32, or use strategy 'ddp'"
            )
        self.env = env
        self._names = {id(p): name for name, p in module.named_parameters()}
        module.to("cpu")  # fully_shard moves each group to the device as it shards it: one layer whole at a time
        self.plain = copy.deepcopy(module) if env.is_main else None
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32 if amp_dtype else None)
        layers = decoder_layers(module)
        if not layers:
            log.warning("strategy fsdp: no LM decoder layers found in %s; sharding it as one group",
                        type(module).__name__)  # fmt: skip
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        module.set_reduce_scatter_unused_params(True)  # type: ignore[operator]
        self.module = module
        log.info("strategy fsdp: %d decoder layers + the root sharded over %d processes", len(layers), env.world_size)

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        now = dict(self.module.named_parameters())
        out = []
        for group in groups:
            params = []
            for param in group["params"]:
                name = self._names.get(id(param))
                if name is None or name not in now:
                    raise ConfigError(
                        f"strategy 'fsdp': parameter group {group.get('name')!r} holds a parameter outside the "
                        "module the stage trains; use strategy 'ddp'"
                    )
                params.append(now[name])
            out.append({**group, "params": params})
        return out

    def no_sync(self) -> AbstractContextManager[Any]:
        return nullcontext()  # each micro-batch reduce-scatters: gradients stay sharded

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    def full_model(self, model: nn.Module) -> nn.Module | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)
        if self.plain is None:
            return None
        self.plain.load_state_dict(state)
        return self.plain

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        from torch.distributed.tensor import DTensor

        saved = optimizer.state_dict()  # keyed by parameter index; values are this rank's shards
        state = {}
        for index in sorted(saved["state"]):
            values = saved["state"][index]
            state[index] = {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in values.items()}
        return {**saved, "state": state} if self.env.is_main else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in optimizer.param_groups for p in group["params"]]
        shards: dict[int, dict[str, Any]] = {}
        for index, values in state["state"].items():
            param = params[index]
            shards[index] = {
                k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
                if isinstance(param, DTensor) and torch.is_tensor(v) and v.shape == param.shape
                else v
                for k, v in values.items()
            }
        optimizer.load_state_dict({**state, "state": shards})


STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")


def wrap(module: nn.Module, env: DistEnv, strategy: Strategy = "ddp", amp_dtype: torch.dtype | None = None) -> Parallel:
    """``module`` under ``strategy`` (see the module docstring); in one process both strategies run the module
    itself. Build the optimizer afterwards, from :meth:`Parallel.param_groups`."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: {strategy!r} is not one of {', '.join(map(repr, STRATEGIES))}")
    if strategy == "fsdp" and env.distributed:
        return FullyShardedParallel(module, env, amp_dtype)
    return DataParallel(module, env)


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
