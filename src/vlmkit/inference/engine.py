"""The one generation engine: batched prefill with left padding, KV-cache decoding, per-row stopping.

The Python API, the CLI (chat, describe), the server and the evaluator all generate through :class:`Engine`.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import torch
from transformers import DynamicCache

from vlmkit.backends.base import EXPORT, TRAIN
from vlmkit.errors import ProcessingError
from vlmkit.inference import kv_cache
from vlmkit.inference.options import GenerationOptions, GenerationResult
from vlmkit.inference.rows import RowState, StreamEvent
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.limits import check_text_fits
from vlmkit.processing.processor import EncodedSample, VLMProcessor

log = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]


def token_ids(value: Any) -> list[int]:
    """An ``eos_token_id``-style value (None, one id or a list) as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


class Engine:
    """Batched generation for a :class:`VisionLanguageModel` and its :class:`VLMProcessor` (the native backend)."""

    capabilities = frozenset({EXPORT, TRAIN})

    def __init__(self, model: VisionLanguageModel, processor: VLMProcessor) -> None:
        self.model = model.eval()
        self.processor = processor
        config = model.language_model.config
        self.context_length: int = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab_size: int = model.language_model.get_output_embeddings().weight.shape[0]
        # the template's end of turn and EOS, and every end-of-sequence id the LM's generation config lists
        # (Llama 3 has three)
        generation = getattr(model.language_model, "generation_config", None)
        self.stop_ids = set(processor.stop_token_ids) | set(token_ids(getattr(generation, "eos_token_id", None)))

    # -- encoding -------------------------------------------------------------------------------------------
    def encode(
        self,
        conversation: Conversation,
        name: str = "request",
        *,
        continue_final_message: bool = False,
        chat_template: str | None = None,
    ) -> EncodedSample:
        """Encode a prompt and check it fits the context (with room for at least one new token).

        ``continue_final_message``: the conversation ends with the start of the assistant's answer, which the
        model continues (no end of turn after it). ``chat_template``: a Jinja template used instead of the
        tokenizer's (its end-of-turn token also stops this prompt's answers)."""
        check_text_fits(conversation, self.context_length, self.processor.tokenizer, name)
        encoded = self.processor.encode(
            conversation, name=name, continue_final_message=continue_final_message, chat_template=chat_template
        )
        self._check_length(len(encoded.input_ids), name)
        return encoded

    def encode_prompt(self, text: str, name: str = "request") -> EncodedSample:
        """A raw text prompt (no chat template, as OpenAI's legacy completions), tokenized with the tokenizer's
        special tokens (BOS); special-token strings in it are the tokens themselves, but never image markers."""
        ids = encode_raw_prompt(self.processor.tokenizer, text, {self.processor.image_token_id}, name)
        self._check_length(len(ids), name)
        return EncodedSample(ids, None, None, [])

    def _check_length(self, tokens: int, name: str) -> None:
        if tokens >= self.context_length:
            raise ProcessingError(
                f"{name}: the prompt has {tokens} tokens (images included) but the model's context "
                f"is {self.context_length} tokens; shorten the conversation or use fewer images"
            )

    # -- generation -----------------------------------------------------------------------------------------
    def generate(
        self,
        conversations: Sequence[Conversation | EncodedSample],
        options: GenerationOptions | Sequence[GenerationOptions],
    ) -> list[GenerationResult]:
        """Generate ``n`` answers per conversation (options' ``n``, 1 by default), all in one batch: the results
        of conversation 0 (choices 0 .. n-1), then of conversation 1, ... (transformers' ``generate`` order)."""
        results: dict[tuple[Hashable, int], GenerationResult] = {}
        for event in self.stream_batch(conversations, options, stream=False):
            if event.result is not None:
                results[(event.index, event.choice)] = event.result
        return [results[key] for key in choice_keys(len(conversations), options)]

    def stream_batch(
        self,
        conversations: Sequence[Conversation | EncodedSample],
        options: GenerationOptions | Sequence[GenerationOptions],
        stream: bool = True,
    ) -> Iterator[StreamEvent]:
        """Generate for a batch, yielding text pieces as they are decoded (any order across requests).

        ``stream=False`` yields only each request's final event (its whole text), skipping incremental decoding.
        """
        if not conversations:
            return
        if isinstance(options, GenerationOptions):
            options = [options] * len(conversations)
        if len(options) != len(conversations):
            raise ProcessingError(f"{len(conversations)} conversations but {len(options)} sets of options")
        encoded = [
            c if isinstance(c, EncodedSample) else self.encode(c, name=f"conversation {i}")
            for i, c in enumerate(conversations)
        ]
        with torch.inference_mode():
            yield from self._run(encoded, list(options), stream)

    def _new_row(
        self, key: Hashable, sample: EncodedSample, options: GenerationOptions, stream: bool, choice: int = 0
    ) -> RowState:
        return RowState.create(
            key, sample.input_ids, options, tokenizer=self.processor.tokenizer, vocab_size=self.vocab_size,
            context_length=self.context_length, skip_ids=(self.processor.image_token_id,), stream=stream,
            choice=choice, stop_ids=self.stop_ids, extra_stop_ids=sample.stop_ids,
        )  # fmt: skip

    def new_batch(self) -> DecodeBatch:
        """An empty running batch that requests can join (:meth:`DecodeBatch.add`) and leave at any step."""
        return DecodeBatch(self)

    def _run(
        self, encoded: list[EncodedSample], options: list[GenerationOptions], stream: bool
    ) -> Iterator[StreamEvent]:
        batch = self.new_batch()
        failed = batch.add([(i, s, o) for i, (s, o) in enumerate(zip(encoded, options, strict=True))], stream=stream)
        if failed and failed[0].error is not None:
            raise failed[0].error
        while batch:
            for event in batch.step():
                if event.error is not None:
                    raise event.error
                yield event


def choice_keys(count: int, options: GenerationOptions | Sequence[GenerationOptions]) -> list[tuple[int, int]]:
    """``(conversation, choice)`` of every answer of a batch, in result order."""
    per_row = [options] * count if isinstance(options, GenerationOptions) else list(options)
    return [(i, choice) for i, opts in enumerate(per_row) for choice in range(opts.n)]


def encode_raw_prompt(tokenizer: Any, text: str, forbidden: set[int], name: str = "request") -> list[int]:
    """Token ids of a raw prompt (special tokens added as the tokenizer does, e.g. BOS); image placeholders
    (``forbidden``) are refused, since a raw prompt carries no image."""
    if not isinstance(text, str) or not text:
        raise ProcessingError(f"{name}: the prompt is empty")
    ids = [int(t) for t in tokenizer(text)["input_ids"]]
    if forbidden & set(ids):
        raise ProcessingError(f"{name}: the prompt holds the image placeholder token; a text prompt has no image")
    return ids


class DecodeBatch:
    """Rows being decoded together: left-padded KV cache, attention mask, next positions and next-token logits.

    ``add`` prefills new requests and merges them into the running batch; ``step`` picks one token per row,
    emits text, retires finished rows and runs one decoding forward pass for the rest.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows: list[RowState] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.next_pos = torch.zeros(0, dtype=torch.long)
        self.logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def keys(self) -> list[Hashable]:
        return [row.key for row in self.rows]

    @torch.inference_mode()
    def add(
        self, items: Sequence[tuple[Hashable, EncodedSample, GenerationOptions]], stream: bool = True
    ) -> list[StreamEvent]:
        """Prefill ``(key, encoded prompt, options)`` items together and join them to the batch.

        A request that fails on its own (its options, or a prefill that fails for it alone) does not join;
        its error event is returned, and the other requests join. ``stream=False``: text is decoded once at
        the end instead of piece by piece. A request with ``n`` > 1 is prefilled once and its KV cache row
        copied to its ``n`` rows (each with its own seed).
        """
        failed: list[StreamEvent] = []
        good: list[tuple[EncodedSample, list[RowState]]] = []
        for key, sample, opts in items:
            try:
                rows = [self.engine._new_row(key, sample, opts, stream, choice) for choice in range(opts.n)]
            except Exception as exc:  # one request's bad state fails that request only
                log.warning("request %s refused before prefill: %s", key, exc)
                failed.append(StreamEvent(key, "", error=exc))
            else:
                good.append((sample, rows))
        if not good:
            return failed
        try:
            self._prefill(good)
        except Exception as exc:
            if len(good) == 1:
                log.exception("prefill failed for request %s", good[0][1][0].key)
                return [*failed, good[0][1][0].fail(exc)]
            # find the request that fails: each one alone (the others' prefill is then correct as it is)
            log.warning("batched prefill failed (%s); prefilling its %d requests one by one", exc, len(good))
            for sample, rows in good:
                try:
                    self._prefill([(sample, rows)])
                except Exception as alone:
                    log.exception("prefill failed for request %s", rows[0].key)
                    failed.append(rows[0].fail(alone))
        return failed

    def _prefill(self, items: list[tuple[EncodedSample, list[RowState]]]) -> None:
        engine, model = self.engine, self.engine.model
        device = model.device
        batch = engine.processor.collate([sample for sample, _ in items], padding_side="left")
        mask = batch["attention_mask"].to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=mask,
            position_ids=positions,
            pixel_values=batch["pixel_values"].to(device) if "pixel_values" in batch else None,
            image_sizes=batch.get("image_sizes"),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1]
        counts = [len(rows) for _, rows in items]
        if any(count != 1 for count in counts):  # n > 1: the prompt's cache row, once per answer
            index = torch.repeat_interleave(torch.arange(len(items), device=mask.device),
                                            torch.tensor(counts, device=mask.device))  # fmt: skip
            kv_cache.select_rows(cache, index)
            mask, logits, positions = mask[index], logits[index], positions[index]
        rows = [row for _, group in items for row in group]
        if self.cache is None or not self.rows:
            self.cache, self.mask, self.logits = cache, mask, logits
            self.next_pos = positions[:, -1] + 1
            self.rows = rows
        else:
            self.cache, self.mask = kv_cache.merge(self.cache, self.mask, cache, mask)
            self.logits = torch.cat([self.logits, logits])  # type: ignore[list-item]
            self.next_pos = torch.cat([self.next_pos, positions[:, -1] + 1])
            self.rows += rows

    def cancel(self, keys: AbstractSet[Hashable]) -> None:
        """Drop rows (e.g. a client went away) without emitting anything for them."""
        self._keep([r for r, row in enumerate(self.rows) if row.key not in keys])

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.logits = [], None, None
            self.mask = self.mask[:0]
            self.next_pos = self.next_pos[:0]
            return
        index = torch.tensor(keep, device=self.mask.device)
        kv_cache.select_rows(self.cache, index)  # type: ignore[arg-type]
        self.mask = kv_cache.trim_padding(self.cache, self.mask[index])  # type: ignore[arg-type]
        self.next_pos, self.logits = self.next_pos[index], self.logits[index]  # type: ignore[index]
        self.rows = [self.rows[k] for k in keep]

    @torch.inference_mode()
    def step(self) -> list[StreamEvent]:
        """Choose the next token of every row; returns text pieces and the results of rows that finished."""
        events: list[StreamEvent] = []
        tokens: list[int] = []
        keep: list[int] = []
        # one argmax for all plain greedy rows; sampled or penalised rows choose one by one
        argmax = self.logits.argmax(-1).tolist()  # type: ignore[union-attr]
        for r, row in enumerate(self.rows):
            if row.wants_logprobs:
                row.observe(self.logits[r])  # type: ignore[index]
            if row.plain:
                token = argmax[r]
            else:
                try:
                    token = row.choose(self.logits[r])  # type: ignore[index]
                except Exception as exc:  # one row's sampling error fails that row only
                    log.exception("choosing the next token failed for request %s", row.key)
                    events.append(row.fail(exc))
                    continue
            events += row.accept(token, self.engine.stop_ids)
            if row.result is None:
                keep.append(r)
                tokens.append(token)
        self._keep(keep)
        if self.rows:
            device = self.mask.device
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
            out = self.engine.model.language_model(
                input_ids=torch.tensor(tokens, device=device)[:, None],
                attention_mask=self.mask,
                position_ids=self.next_pos[:, None],
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self.logits = out.logits[:, -1]
            self.next_pos = self.next_pos + 1
        return events
