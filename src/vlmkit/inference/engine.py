"""The one generation engine: batched prefill with left padding, KV-cache decoding, per-row stopping.

The Python API, the CLI (chat, describe), the server and the evaluator all generate through :class:`Engine`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from vlmkit.errors import ProcessingError
from vlmkit.inference.detokenize import IncrementalDetokenizer
from vlmkit.inference.options import GenerationOptions, GenerationResult
from vlmkit.inference.sampling import choose_token
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.processor import EncodedSample, VLMProcessor

log = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]


@dataclass
class StreamEvent:
    """A piece of text for request ``index``; ``result`` is set on the request's last event."""

    index: int
    text: str
    result: GenerationResult | None = None


@dataclass
class _Row:
    index: int
    options: GenerationOptions
    prompt_tokens: int
    budget: int
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    seen: torch.Tensor | None
    generated: int = 0


class Engine:
    """Batched generation for a :class:`VisionLanguageModel` and its :class:`VLMProcessor`."""

    def __init__(self, model: VisionLanguageModel, processor: VLMProcessor) -> None:
        self.model = model.eval()
        self.processor = processor
        config = model.language_model.config
        self.context_length: int = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab_size: int = model.language_model.get_output_embeddings().weight.shape[0]
        self.stop_ids = set(processor.stop_token_ids)

    # -- encoding -------------------------------------------------------------------------------------------
    def encode(self, conversation: Conversation, name: str = "request") -> EncodedSample:
        """Encode a prompt and check it fits the context (with room for at least one new token)."""
        encoded = self.processor.encode(conversation, name=name)
        if len(encoded.input_ids) >= self.context_length:
            raise ProcessingError(
                f"{name}: the prompt has {len(encoded.input_ids)} tokens (images included) but the model's context "
                f"is {self.context_length} tokens; shorten the conversation or use fewer images"
            )
        return encoded

    # -- generation -----------------------------------------------------------------------------------------
    def generate(
        self, conversations: Sequence[Conversation], options: GenerationOptions | Sequence[GenerationOptions]
    ) -> list[GenerationResult]:
        """Generate one answer per conversation, all in one batch."""
        results: list[GenerationResult | None] = [None] * len(conversations)
        for event in self.stream_batch(conversations, options):
            if event.result is not None:
                results[event.index] = event.result
        return results  # type: ignore[return-value]

    def stream_batch(
        self,
        conversations: Sequence[Conversation | EncodedSample],
        options: GenerationOptions | Sequence[GenerationOptions],
    ) -> Iterator[StreamEvent]:
        """Generate for a batch, yielding text pieces as they are decoded (any order across requests)."""
        if not conversations:
            return
        if isinstance(options, GenerationOptions):
            options = [options] * len(conversations)
        encoded = [
            c if isinstance(c, EncodedSample) else self.encode(c, name=f"conversation {i}")
            for i, c in enumerate(conversations)
        ]
        with torch.inference_mode():
            yield from self._run(encoded, list(options))

    def _new_row(self, index: int, sample: EncodedSample, options: GenerationOptions) -> _Row:
        generator = None
        if not options.greedy:
            generator = torch.Generator()
            generator.manual_seed(options.seed if options.seed is not None else int(torch.randint(0, 2**62, ())))
        seen = None
        if options.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            ids = torch.tensor([t for t in sample.input_ids if t != self.processor.image_token_id], dtype=torch.long)
            seen[ids[ids < self.vocab_size]] = True
        n = len(sample.input_ids)
        return _Row(
            index=index,
            options=options,
            prompt_tokens=n,
            budget=min(options.max_new_tokens, self.context_length - n),
            detok=IncrementalDetokenizer(self.processor.tokenizer, options.stop),
            generator=generator,
            seen=seen,
        )

    def _run(self, encoded: list[EncodedSample], options: list[GenerationOptions]) -> Iterator[StreamEvent]:
        model = self.model
        device = model.device
        rows = [self._new_row(i, s, o) for i, (s, o) in enumerate(zip(encoded, options, strict=True))]
        batch = self.processor.collate(encoded, padding_side="left")
        mask = batch["attention_mask"].to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=mask,
            position_ids=positions,
            pixel_values=batch["pixel_values"].to(device) if "pixel_values" in batch else None,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_pos = positions[:, -1] + 1
        logits = out.logits[:, -1]
        del out, batch
        while rows:
            tokens: list[int] = []
            keep: list[int] = []
            # one argmax for all plain greedy rows; sampled or penalised rows choose one by one
            argmax = logits.argmax(-1).tolist()
            for r, row in enumerate(rows):
                plain = row.options.greedy and row.seen is None
                token = argmax[r] if plain else choose_token(logits[r], row.options, row.seen, row.generator)
                row.generated += 1
                finish = None
                if token in self.stop_ids:
                    finish = "stop"
                else:
                    if row.seen is not None:
                        row.seen[token] = True
                    piece = row.detok.add(token)
                    if row.detok.stopped:
                        finish = "stop"
                    elif row.generated >= row.budget:
                        finish = "length"
                    if piece:
                        yield StreamEvent(row.index, piece)
                if finish:
                    tail = row.detok.finish()
                    result = GenerationResult(
                        text=row.detok.text,
                        finish_reason=finish,  # type: ignore[arg-type]
                        prompt_tokens=row.prompt_tokens,
                        completion_tokens=row.generated,
                        token_ids=list(row.detok.ids),
                    )
                    yield StreamEvent(row.index, tail, result)
                else:
                    keep.append(r)
                    tokens.append(token)
            if not keep:
                break
            if len(keep) < len(rows):  # finished rows leave the batch
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, next_pos = mask[index], next_pos[index]
                rows = [rows[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            out = model.language_model(
                input_ids=torch.tensor(tokens, device=device)[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
        del cache
