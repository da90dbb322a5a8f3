"""Per-request decoding state shared by every engine: token choice, text pieces, stopping, the final result."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from vlmkit.errors import ProcessingError
from vlmkit.inference.detokenize import IncrementalDetokenizer
from vlmkit.inference.logprobs import TokenTexts, log_softmax, token_logprob, token_texts
from vlmkit.inference.options import GenerationOptions, GenerationResult, TokenLogprob
from vlmkit.inference.sampling import choose_token

_MASK64 = (1 << 64) - 1


def choice_seed(seed: int, choice: int) -> int:
    """The seed of answer ``choice`` of a request seeded with ``seed``: choice 0 keeps it (so ``n=1`` and the
    first of ``n`` answers agree); choice j > 0 gets splitmix64(seed + j) reduced to [0, 2**63)."""
    if choice == 0:
        return seed
    z = (seed + choice * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass
class StreamEvent:
    """A piece of text for request ``index`` (any hashable key); ``result`` is set on the request's last event.

    ``choice`` is which of the request's ``n`` answers the piece belongs to (each answer has its own last event);
    ``logprobs`` (when asked) covers the tokens released since the answer's previous event.
    ``error`` is set instead when the request failed on its own (its sampling or its prefill): that row has
    left the batch, the others go on.
    """

    index: Hashable
    text: str
    result: GenerationResult | None = None
    error: Exception | None = None
    choice: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RowState:
    """One answer being decoded: its options, budget, sampler state, detokenizer, logprobs and constraint."""

    key: Hashable
    options: GenerationOptions
    prompt_tokens: int
    budget: int
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    seen: torch.Tensor | None
    generated: int = 0
    result: GenerationResult | None = None
    cancelled: bool = False
    error: Exception | None = None
    choice: int = 0
    extra_stop: frozenset[int] = frozenset()
    """Stop ids of this row's own chat template (an override), besides the engine's."""
    constraint: Any = None
    """A :class:`~vlmkit.inference.constrained.GrammarConstraint` (``response_format``), or None."""
    logprobs: list[TokenLogprob] | None = None
    texts: TokenTexts | None = field(default=None, repr=False)
    _pending: torch.Tensor | None = field(default=None, repr=False)
    _sent: int = 0

    @classmethod
    def create(
        cls,
        key: Hashable,
        prompt: list[int],
        options: GenerationOptions,
        *,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        context_length: int,
        skip_ids: Iterable[int] = (),
        stream: bool = True,
        choice: int = 0,
        stop_ids: Iterable[int] = (),
        extra_stop_ids: Iterable[int] = (),
    ) -> RowState:
        """State for answer ``choice`` of a prompt; ``skip_ids`` (image placeholders) don't count for the
        repetition penalty; ``stop_ids`` end the answer (what a ``response_format`` grammar ends with).

        ``stream=False``: text pieces are not needed, so the text is decoded once at the end.
        """
        room = context_length - len(prompt)
        if options.max_length is not None:
            if options.max_length <= len(prompt):
                raise ProcessingError(
                    f"max_length={options.max_length} (prompt + new tokens) leaves no room: the prompt has "
                    f"{len(prompt)} tokens (images included)"
                )
            budget = min(options.max_length - len(prompt), room)
        else:
            budget = min(options.max_new_tokens, room)
        generator = None
        if not options.greedy:
            generator = torch.Generator()
            seed = options.seed if options.seed is not None else int(torch.randint(0, 2**62, ()))
            generator.manual_seed(choice_seed(seed, choice))
        seen = None
        if options.repetition_penalty != 1.0:
            skip = set(skip_ids)
            seen = torch.zeros(vocab_size, dtype=torch.bool)
            kept = [t for t in prompt if t not in skip and 0 <= t < vocab_size]
            seen[torch.tensor(kept, dtype=torch.long)] = True
        extra = frozenset(extra_stop_ids)
        constraint = None
        if options.response_format is not None:
            from vlmkit.inference.constrained import GrammarConstraint, compile_response_format

            grammar = compile_response_format(options.response_format)
            if grammar is not None:
                constraint = GrammarConstraint(grammar, tokenizer, vocab_size, set(stop_ids) | extra)
        wants = options.logprobs is not None
        return cls(
            key=key,
            options=options,
            prompt_tokens=len(prompt),
            budget=budget,
            detok=IncrementalDetokenizer(tokenizer, options.stop, incremental=stream),
            generator=generator,
            seen=seen,
            choice=choice,
            extra_stop=extra,
            constraint=constraint,
            logprobs=[] if wants else None,
            texts=token_texts(tokenizer) if wants else None,
        )

    @property
    def done(self) -> bool:
        return self.cancelled or self.result is not None or self.error is not None

    def fail(self, error: Exception) -> StreamEvent:
        """End this row with ``error`` (its own failure, not the batch's); returns its last event."""
        self.error = error
        return StreamEvent(self.key, "", error=error, choice=self.choice)

    @property
    def plain(self) -> bool:
        """Greedy with no penalty and no constraint: the argmax of the logits is the answer."""
        return self.options.greedy and self.seen is None and self.constraint is None

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def observe(self, logits: torch.Tensor) -> None:
        """Keep the model's log-probabilities of this step (``logprobs``), before any adjustment or mask."""
        self._pending = log_softmax(logits)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's ``(vocab,)`` logits, by its options (constraint, penalty, sampling)."""
        if self.constraint is not None:
            allowed = self.constraint.allowed()
            if not allowed.any():
                raise ProcessingError("response_format: the grammar allows no token here")
            logits = logits.float().cpu().masked_fill(~allowed[: logits.shape[-1]], float("-inf"))
        return choose_token(logits, self.options, self.seen, self.generator)

    def _event(self, text: str, result: GenerationResult | None = None) -> StreamEvent:
        logprobs = None
        if self.logprobs is not None:
            logprobs, self._sent = self.logprobs[self._sent :], len(self.logprobs)
        return StreamEvent(self.key, text, result, choice=self.choice, logprobs=logprobs)

    def accept(self, token: int, stop_ids: set[int]) -> list[StreamEvent]:
        """Take the chosen token: returns the text piece, and the result when the row is finished."""
        self.generated += 1
        events: list[StreamEvent] = []
        finish = None
        if token in stop_ids or token in self.extra_stop:
            finish = "stop"
        else:
            if self.constraint is not None:
                self.constraint.advance(token)
            if self.logprobs is not None and self._pending is not None and self.texts is not None:
                self.logprobs.append(token_logprob(self.texts, self._pending, token, self.options.logprobs or 0))
            self._pending = None
            if self.seen is not None:
                self.seen[token] = True
            piece = self.detok.add(token)
            if piece:
                events.append(self._event(piece))
            if self.detok.stopped:
                finish = "stop"
            elif self.generated >= self.budget:
                finish = "length"
        if finish:
            tail = self.detok.finish()
            self.result = GenerationResult(
                text=self.detok.text,
                finish_reason=finish,  # type: ignore[arg-type]
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.generated,
                token_ids=list(self.detok.ids),
                choice=self.choice,
                logprobs=list(self.logprobs) if self.logprobs is not None else None,
            )
            events.append(self._event(tail, self.result))
        return events
