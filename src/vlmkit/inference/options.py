"""Generation options and results, validated once for every entry point (API, CLI, server, evaluator).

:meth:`GenerationOptions.from_kwargs` also reads the names people know from transformers (``max_length``,
``do_sample``, ``num_return_sequences``, ``generate_kwargs``) and vLLM (``max_tokens``, ``n``, ``logprobs``);
:func:`options_per_row` gives each conversation of a batch its own options from per-row lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from vlmkit.errors import ConfigError

MAX_LOGPROBS = 20
"""The most alternatives ``logprobs`` may ask for (OpenAI's and vLLM's default limit)."""

ALIASES = {"max_tokens": "max_new_tokens", "num_return_sequences": "n"}
"""Other libraries' names for the same options: vLLM's ``max_tokens``, transformers' ``num_return_sequences``."""

TRANSLATED = ("do_sample", "generate_kwargs")
"""transformers' names that are translated rather than renamed (see :meth:`GenerationOptions.from_kwargs`)."""

ENCODING_OPTIONS = ("continue_final_message", "chat_template")
"""Options of how a conversation becomes a prompt (``VLM.chat`` / ``generate_batch`` / ``Backend.encode``)."""

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate. ``temperature=0`` is greedy; ``seed`` makes sampling reproducible per request.

    ``max_length`` (transformers' meaning: prompt + new tokens), when set, replaces ``max_new_tokens``. ``n``
    answers per prompt (choice 0 uses ``seed`` itself, choice j a seed derived from it). ``logprobs``: None
    (off), or how many top alternatives to report besides each chosen token's logprob (vLLM's meaning; 0 = the
    chosen token only). ``response_format``: OpenAI's ``{"type": "json_object"}`` or ``{"type":
    "json_schema", "json_schema": {"schema": {...}}}``, enforced by constrained decoding (llguidance).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    max_length: int | None = None
    n: int = 1
    logprobs: int | None = None
    response_format: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.max_length is not None and (not _is_int(self.max_length) or self.max_length <= 0):
            raise ConfigError(f"max_length must be a positive integer (prompt + new tokens), got {self.max_length!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be ≥ 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ConfigError(f"n (num_return_sequences) must be a positive integer, got {self.n!r}")
        if self.logprobs is True:  # OpenAI's spelling: the chosen tokens' logprobs only
            object.__setattr__(self, "logprobs", 0)
        elif self.logprobs is False:
            object.__setattr__(self, "logprobs", None)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ConfigError(
                f"logprobs must be None or the number of top alternatives, 0 to {MAX_LOGPROBS} (0 = the chosen "
                f"token only), got {self.logprobs!r}"
            )
        check_response_format(self.response_format)
        if self.response_format is not None and self.response_format.get("type") == "text":
            object.__setattr__(self, "response_format", None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationOptions:
        """Build from keyword arguments; unknown names raise an error listing the valid ones.

        Besides the fields: ``max_tokens`` (vLLM) = ``max_new_tokens``; ``num_return_sequences``
        (transformers) = ``n``; ``do_sample`` (transformers): False is greedy (a temperature > 0 with it is
        refused as contradictory), True samples at ``temperature`` (1.0 when not given, as transformers);
        ``generate_kwargs`` (transformers pipelines): a dict of more of these names. ``max_length`` and
        ``max_new_tokens`` together are refused (transformers would silently prefer one). None means "default".
        """
        kwargs = merge_generate_kwargs(kwargs)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        valid = [f.name for f in fields(cls)]
        misplaced = sorted(set(kwargs) & set(ENCODING_OPTIONS))
        if misplaced:
            raise ConfigError(
                f"{', '.join(misplaced)} decide(s) how a conversation becomes a prompt, not how to generate: pass "
                "it to VLM.chat / VLM.generate_batch / the backend's encode()"
            )
        unknown = sorted(set(kwargs) - set(valid) - set(ALIASES) - set(TRANSLATED))
        if unknown:
            names = [*valid, *ALIASES, "do_sample", "generate_kwargs"]
            raise ConfigError(f"unknown generation option(s) {', '.join(unknown)}; valid options: {', '.join(names)}")
        for alias, name in ALIASES.items():
            if alias in kwargs:
                if name in kwargs:
                    raise ConfigError(f"{alias} and {name} are the same option; give one of them")
                kwargs[name] = kwargs.pop(alias)
        if "max_length" in kwargs and "max_new_tokens" in kwargs:
            raise ConfigError("give max_new_tokens (new tokens) or max_length (prompt + new tokens), not both")
        if "do_sample" in kwargs:
            do_sample = kwargs.pop("do_sample")
            if not isinstance(do_sample, bool):
                raise ConfigError(f"do_sample must be True or False, got {do_sample!r}")
            temperature = kwargs.get("temperature")
            if do_sample:
                if temperature == 0:
                    raise ConfigError("do_sample=True needs a temperature > 0 (temperature 0 is greedy decoding)")
                kwargs.setdefault("temperature", 1.0)
            else:
                if temperature not in (None, 0):
                    raise ConfigError(
                        f"do_sample=False is greedy decoding, but temperature={temperature} asks for sampling; "
                        "give one of them"
                    )
                kwargs["temperature"] = 0.0
        return cls(**kwargs)


def check_response_format(value: Mapping[str, Any] | None) -> None:
    """Refuse a ``response_format`` that is not OpenAI's shape (the schema itself is checked when compiled)."""
    if value is None:
        return
    if not isinstance(value, Mapping) or value.get("type") not in RESPONSE_FORMATS:
        raise ConfigError(
            f"response_format must be {{'type': one of {', '.join(RESPONSE_FORMATS)}}}, got {value!r:.200}"
        )
    if value["type"] == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise ConfigError("response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}")


def merge_generate_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with transformers' ``generate_kwargs`` dict merged in (a name given both ways is refused)."""
    extra = kwargs.get("generate_kwargs")
    if extra is None:
        return {k: v for k, v in kwargs.items() if k != "generate_kwargs"}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"generate_kwargs must be a dict of generation options, got {type(extra).__name__}")
    if "generate_kwargs" in extra:
        raise ConfigError("generate_kwargs can't hold another generate_kwargs")
    both = sorted(set(extra) & set(kwargs))
    if both:
        raise ConfigError(f"{', '.join(both)} given both directly and in generate_kwargs; give it once")
    return {**{k: v for k, v in kwargs.items() if k != "generate_kwargs"}, **extra}


def asks_for_choices(kwargs: Mapping[str, Any]) -> bool:
    """Whether the call names ``n`` / ``num_return_sequences`` (directly or in ``generate_kwargs``): then each
    conversation's answers come back as a list, whatever n is."""
    extra = kwargs.get("generate_kwargs")
    names = set(kwargs) | (set(extra) if isinstance(extra, Mapping) else set())
    return bool(names & {"n", "num_return_sequences"})


def _per_row(name: str, value: Any) -> bool:
    """Whether ``value`` gives each row its own value: a list or tuple (for ``stop``, only a list of lists)."""
    if not isinstance(value, list | tuple):
        return False
    if name == "stop":
        return bool(value) and all(v is None or isinstance(v, list | tuple) for v in value)
    return True


def options_per_row(count: int | None, **kwargs: Any) -> list[GenerationOptions]:
    """One :class:`GenerationOptions` per conversation of a batch of ``count`` (None: a single conversation).

    An option given as a list (or tuple) has one value per conversation, in order; ``stop`` is per row only as a
    list of lists (``stop=["a", "b"]`` is two stop strings for every row, ``stop=[["a"], None]`` one per row).
    A single conversation refuses per-row lists.
    """
    kwargs = merge_generate_kwargs(kwargs)
    rows = [name for name, value in kwargs.items() if _per_row(name, value)]
    if not rows:
        options = GenerationOptions.from_kwargs(**kwargs)
        return [options] * (count or 1)
    if count is None:
        raise ConfigError(
            f"{', '.join(rows)}: a list gives one value per conversation of a batch, but a single conversation was "
            "given; pass one value (or a list of conversations)"
        )
    for name in rows:
        if len(kwargs[name]) != count:
            raise ConfigError(f"{name} has {len(kwargs[name])} values for {count} conversations; give one per row")
    return [
        GenerationOptions.from_kwargs(**{k: (v[i] if k in rows else v) for k, v in kwargs.items()})
        for i in range(count)
    ]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability: its id, text, UTF-8 bytes and, when asked, the top alternatives
    (each a :class:`TokenLogprob` without alternatives), likeliest first."""

    token_id: int
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class GenerationResult:
    """One generated answer: its text, why it ended, and token counts (prompt counts include image tokens).

    ``choice`` is its index among the ``n`` answers of its prompt; ``logprobs`` (when asked) has one entry per
    token of ``token_ids``.
    """

    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)
    choice: int = 0
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)
