"""Per-request decoding state shared by every engine: token choice, text pieces, stopping, the final result."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from vlmkit.inference.detokenize import IncrementalDetokenizer
from vlmkit.inference.options import GenerationOptions, GenerationResult
from vlmkit.inference.sampling import choose_token


@dataclass
class StreamEvent:
    """A piece of text for request ``index`` (any hashable key); ``result`` is set on the request's last event.

    ``error`` is set instead when the request failed on its own (its sampling or its prefill): that row has
    left the batch, the others go on.
    """

    index: Hashable
    text: str
    result: GenerationResult | None = None
    error: Exception | None = None


@dataclass
class RowState:
    """One request being decoded: its options, budget, sampler state and detokenizer."""

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
    ) -> RowState:
        """State for a prompt; ``skip_ids`` (image placeholders) don't count for the repetition penalty.

        ``stream=False``: text pieces are not needed, so the text is decoded once at the end.
        """
        generator = None
        if not options.greedy:
            generator = torch.Generator()
            generator.manual_seed(options.seed if options.seed is not None else int(torch.randint(0, 2**62, ())))
        seen = None
        if options.repetition_penalty != 1.0:
            skip = set(skip_ids)
            seen = torch.zeros(vocab_size, dtype=torch.bool)
            kept = [t for t in prompt if t not in skip and 0 <= t < vocab_size]
            seen[torch.tensor(kept, dtype=torch.long)] = True
        return cls(
            key=key,
            options=options,
            prompt_tokens=len(prompt),
            budget=min(options.max_new_tokens, context_length - len(prompt)),
            detok=IncrementalDetokenizer(tokenizer, options.stop, incremental=stream),
            generator=generator,
            seen=seen,
        )

    @property
    def done(self) -> bool:
        return self.cancelled or self.result is not None or self.error is not None

    def fail(self, error: Exception) -> StreamEvent:
        """End this row with ``error`` (its own failure, not the batch's); returns its last event."""
        self.error = error
        return StreamEvent(self.key, "", error=error)

    @property
    def plain(self) -> bool:
        """Greedy with no penalty: the argmax of the logits is the answer."""
        return self.options.greedy and self.seen is None

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's ``(vocab,)`` logits, by its options (sampling, penalty)."""
        return choose_token(logits, self.options, self.seen, self.generator)

    def accept(self, token: int, stop_ids: set[int]) -> list[StreamEvent]:
        """Take the chosen token: returns the text piece, and the result when the row is finished."""
        self.generated += 1
        events: list[StreamEvent] = []
        finish = None
        if token in stop_ids:
            finish = "stop"
        else:
            if self.seen is not None:
                self.seen[token] = True
            piece = self.detok.add(token)
            if piece:
                events.append(StreamEvent(self.key, piece))
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
            )
            events.append(StreamEvent(self.key, tail, self.result))
        return events
