"""Typed configs (dataclasses) and their strict conversion from and to plain dicts / JSON."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from vlmkit.errors import CheckpointError, ConfigError

FORMAT_VERSION = 1
"""Version of the checkpoint layout (config.json + model.safetensors). Bump on incompatible changes."""

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses.

    Unknown keys raise :class:`ConfigError` listing the valid ones, prefixed by ``where`` (e.g. ``vision.``).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; valid keys: "
            f"{', '.join(where + k for k in fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{where}{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Convert nested dicts into dataclasses where the type hint asks for one."""
    options = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return config_from_dict(option, value, where + ".")  # type: ignore[arg-type]
    literals = [o for o in options if o is not type(None)]
    if value is not None and literals and all(typing.get_origin(o) is Literal for o in literals):
        choices = [c for o in literals for c in typing.get_args(o)]
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


@dataclass
class VisionConfig:
    """The vision tower: loaded from ``source`` (hub id or folder) or built from ``hf_config``."""

    source: str | None = None
    hf_config: dict[str, Any] | None = None
    feature_layer: int | list[int] = -2
    """Hidden-state index (or indices, concatenated on the feature dim) taken from the tower."""
    select_strategy: Literal["auto", "default", "full"] = "auto"
    """``default`` drops the first (CLS) token, ``full`` keeps all; ``auto`` picks per tower (SigLIP: full)."""


@dataclass
class LMConfig:
    """The causal LM: loaded from ``source`` (hub id or folder) or built from ``hf_config``."""

    source: str | None = None
    hf_config: dict[str, Any] | None = None


@dataclass
class ProjectorConfig:
    name: str = "mlp2x_gelu"


@dataclass
class ViewsConfig:
    """How an image becomes the tower's views and its tokens: a strategy of :data:`vlmkit.views.VIEWS` and its
    options (``single``: one square view; see docs/high-resolution.md)."""

    name: str = "single"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class VLMConfig:
    """Everything needed to rebuild a vlmkit model; saved as ``config.json`` next to ``model.safetensors``."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    image_token_id: int | None = None
    """Token id of the image placeholder in the LM vocabulary (set when the model is composed)."""
    format_version: int = FORMAT_VERSION

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(config_to_dict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> VLMConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{folder}: no config.json; is this a vlmkit checkpoint folder?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
        version = data.get("format_version")
        if not isinstance(version, int):
            raise CheckpointError(f"{path}: no format_version; not a vlmkit checkpoint")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format version {version} is newer than this vlmkit understands ({FORMAT_VERSION}); "
                "upgrade vlmkit"
            )
        return config_from_dict(cls, data)
