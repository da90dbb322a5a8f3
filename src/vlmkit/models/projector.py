"""Projectors: map vision features to the LM's embedding space, by exact name (:data:`PROJECTORS`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vlmkit.errors import RegistryError
from vlmkit.models.pixel_shuffle import PixelShuffleProjector
from vlmkit.registry import Registry

ProjectorFactory = Callable[[int, int], nn.Module]
"""``(in_features, out_features) -> nn.Module``."""

PROJECTORS: Registry[ProjectorFactory] = Registry("projector")


def register_projector(name: str) -> Callable[[ProjectorFactory], ProjectorFactory]:
    """Register a projector factory ``(in_features, out_features) -> nn.Module`` under an exact name."""
    return PROJECTORS.register(name)


class IdentityProjector(nn.Identity):
    """Pass-through; only valid when the vision feature size equals the LM hidden size."""


@register_projector("linear")
def _linear(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features)


@register_projector("identity")
def _identity(in_features: int, out_features: int) -> nn.Module:
    if in_features != out_features:
        raise RegistryError(
            f"projector 'identity' needs equal sizes, but vision features have {in_features} dims and the LM "
            f"hidden size is {out_features}; use 'linear' or 'mlp2x_gelu'"
        )
    return IdentityProjector()


def mlp_gelu(in_features: int, out_features: int, depth: int) -> nn.Sequential:
    """``depth`` linear layers with GELU between them (``mlp2x_gelu`` = Linear-GELU-Linear, as in LLaVA-1.5)."""
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


PROJECTORS.register_family(
    r"mlp(?P<depth>[1-9][0-9]?)x_gelu",
    lambda match: lambda i, o: mlp_gelu(i, o, int(match.group("depth"))),
    "mlp{N}x_gelu (N = 1..99, e.g. mlp2x_gelu)",
)


PROJECTORS.register_family(
    r"pixel_shuffle(?P<scale>[2-9]|[1-9][0-9])x",
    lambda match: lambda i, o: PixelShuffleProjector(i, o, int(match.group("scale"))),
    "pixel_shuffle{s}x (s = 2..99, e.g. pixel_shuffle2x)",
)


def projector_names() -> list[str]:
    """Valid names: the fixed ones plus the ``mlp{N}x_gelu`` and ``pixel_shuffle{s}x`` families."""
    return PROJECTORS.names()


def build_projector(name: str, in_features: int, out_features: int) -> nn.Module:
    """Build a projector by exact name; an unknown name raises an error listing the valid ones."""
    return PROJECTORS.get(name)(in_features, out_features)
