"""Generation options and results, validated once for every entry point (API, CLI, server, evaluator)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from vlmkit.errors import ConfigError


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate. ``temperature=0`` is greedy; ``seed`` makes sampling reproducible per request."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be ≥ 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationOptions:
        """Build from keyword arguments; unknown names raise an error listing the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ConfigError(f"unknown generation option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")
        return cls(**{k: v for k, v in kwargs.items() if v is not None})


@dataclass
class GenerationResult:
    """One generated answer: its text, why it ended, and token counts (prompt counts include image tokens)."""

    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)
