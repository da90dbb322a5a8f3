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
from vlmkit.errors import ConfigError, ProcessingError
from vlmkit.inference import kv_cache
from vlmkit.inference.caches import MB, CacheConfig
from vlmkit.inference.compiled import CompiledDecoder, bucket, check_decode_mode, static_cache_supported
from vlmkit.inference.image_cache import ImageFeatureCache, image_runs
from vlmkit.inference.options import GenerationOptions, GenerationResult
from vlmkit.inference.prefix_cache import PrefixCache, block_hashes, followers
from vlmkit.inference.rows import RowState, StreamEvent
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.limits import check_text_fits
from vlmkit.processing.processor import EncodedSample, VLMProcessor

log = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]

LOG_EVERY = 100
"""Prefills between two log lines of the caches' figures."""
MIN_SHARED_TOKENS = 32
"""Tokens of not-yet-cached blocks rows of one batch must share for them to be prefilled in two passes."""
MIN_SAVED_TOKENS = 64
"""Padding tokens a split of a prefill into length groups must save (:func:`length_groups`)."""


def length_groups(lengths: Sequence[int], min_saved: int = MIN_SAVED_TOKENS) -> list[list[int]]:
    """Rows of a left-padded prefill grouped by the tokens each computes, longest first: a row starts a new
    group when it is at most half as long as its group's longest and the rows from it on would save at least
    ``min_saved`` padding tokens. (A row whose prompt is mostly in the prefix cache computes few tokens; batched
    with uncached ones it would compute their length in padding.)"""
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    groups: list[list[int]] = [[]]
    for position, r in enumerate(order):
        group = groups[-1]
        if group and 2 * lengths[r] <= lengths[group[0]]:
            saved = sum(lengths[group[0]] - lengths[q] for q in order[position:])
            if saved >= min_saved:
                groups.append([])
        groups[-1].append(r)
    return groups


def token_ids(value: Any) -> list[int]:
    """An ``eos_token_id``-style value (None, one id or a list) as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


class Engine:
    """Batched generation for a :class:`VisionLanguageModel` and its :class:`VLMProcessor` (the native backend)."""

    capabilities = frozenset({EXPORT, TRAIN})

    def __init__(
        self, model: VisionLanguageModel, processor: VLMProcessor, caches: CacheConfig | None = None,
        decode: str = "auto",
    ) -> None:  # fmt: skip
        """``caches``: sizes of the image-feature and KV prefix caches (default :class:`CacheConfig`'s; 0 off).
        ``decode``: how decoding steps run (:meth:`set_decode`)."""
        self.model = model.eval()
        self.processor = processor
        config = model.language_model.config
        self.context_length: int = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab_size: int = model.language_model.get_output_embeddings().weight.shape[0]
        # the template's end of turn and EOS, and every end-of-sequence id the LM's generation config lists
        # (Llama 3 has three)
        generation = getattr(model.language_model, "generation_config", None)
        self.stop_ids = set(processor.stop_token_ids) | set(token_ids(getattr(generation, "eos_token_id", None)))
        self.configure_caches(caches or CacheConfig())
        self.set_decode(decode)

    # -- decoding steps -------------------------------------------------------------------------------------
    def set_decode(self, mode: str) -> None:
        """``"compiled"``: a preallocated KV cache and a ``torch.compile``'d one-token step (CUDA graphs on CUDA;
        eager, logged once, if compiling fails); ``"eager"``: transformers' ``DynamicCache``, no compile;
        ``"auto"``: compiled on CUDA, eager elsewhere. Batches already running keep their mode."""
        check_decode_mode(mode)
        if mode == "compiled" and not static_cache_supported(self.model.language_model.config):
            raise ConfigError(
                "decode='compiled': this language model's KV cache has sliding-window or other layers the static "
                "cache does not support; use decode='eager' (or 'auto')"
            )
        self.decode = mode
        self._decoder: CompiledDecoder | None = getattr(self, "_decoder", None)  # keeps what it compiled

    def decoder(self) -> CompiledDecoder | None:
        """The compiled decode step new batches use; None when they decode eagerly."""
        mode = self.decode
        if mode == "auto":
            supported = static_cache_supported(self.model.language_model.config)
            mode = "compiled" if self.model.device.type == "cuda" and supported else "eager"
        if mode == "eager":
            return None
        if self._decoder is None:
            self._decoder = CompiledDecoder(self.model.language_model)
        return self._decoder if self._decoder.error is None else None

    # -- caches ---------------------------------------------------------------------------------------------
    def configure_caches(self, config: CacheConfig) -> None:
        """Replace the image-feature and KV prefix caches (emptied) by ones of ``config``'s sizes."""
        self.cache_config = config
        self._prefills = 0
        self.image_cache = ImageFeatureCache(int(config.image_cache_mb * MB)) if config.image_cache_mb else None
        self.prefix_cache = (
            PrefixCache(int(config.prefix_cache_mb * MB), config.block_size) if config.prefix_cache_mb else None
        )

    def note_prefill(self) -> None:
        """Count a prefill through the caches; log the caches' figures every :data:`LOG_EVERY` of them."""
        self._prefills += 1
        if self._prefills % LOG_EVERY == 0:
            stats = self.cache_stats()
            image, prefix = stats["image"], stats["prefix"]
            log.info(
                "caches after %d prefills: images %s, prefix %s", self._prefills,
                "off" if image is None else f"{image['hits']}/{image['lookups']} hits, {image['bytes']} bytes",
                "off" if prefix is None else f"{prefix['hit_tokens']}/{prefix['query_tokens']} prompt tokens "
                f"reused, {prefix['bytes']} bytes",
            )  # fmt: skip

    def cache_stats(self) -> dict[str, dict[str, Any] | None]:
        """The caches' figures (:meth:`ByteLRU.stats`, :meth:`PrefixCache.stats`); None for a cache that is off."""
        return {
            "image": self.image_cache.stats() if self.image_cache is not None else None,
            "prefix": self.prefix_cache.stats() if self.prefix_cache is not None else None,
        }

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
    emits text, retires finished rows and runs one decoding forward pass for the rest: eagerly over a
    ``DynamicCache``, or (the engine's ``decode`` mode) with the compiled step over a static cache (``kv``).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows: list[RowState] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.next_pos = torch.zeros(0, dtype=torch.long)
        self.logits: torch.Tensor | None = None
        self.decoder = engine.decoder()
        """The compiled decode step, or None: decoding eagerly over ``cache`` (a ``DynamicCache``)."""
        self.kv: kv_cache.StaticKV | None = None
        """The compiled step's preallocated cache (``mask`` is then a view of its running rows and columns)."""

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
        engine = self.engine
        samples = [sample for sample, _ in items]
        if engine.prefix_cache is None and engine.image_cache is None:
            cache, mask, logits = self._forward(samples)
        else:
            cache, mask, logits = self._forward_reusing(samples)
            engine.note_prefill()
        next_pos = torch.tensor([len(sample.input_ids) for sample in samples], device=mask.device)
        counts = [len(rows) for _, rows in items]
        if any(count != 1 for count in counts):  # n > 1: the prompt's cache row, once per answer
            index = torch.repeat_interleave(torch.arange(len(items), device=mask.device),
                                            torch.tensor(counts, device=mask.device))  # fmt: skip
            kv_cache.select_rows(cache, index)
            mask, logits, next_pos = mask[index], logits[index], next_pos[index]
        self._join(cache, mask, logits, next_pos, [row for _, group in items for row in group])

    def _forward(self, samples: list[EncodedSample]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Prefill whole prompts (no cache): their KV cache, attention mask and last-position logits."""
        engine, model = self.engine, self.engine.model
        device = model.device
        batch = engine.processor.collate(samples, padding_side="left")
        mask = batch["attention_mask"].to(device)
        cache = DynamicCache()
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            pixel_values=batch["pixel_values"].to(device) if "pixel_values" in batch else None,
            image_sizes=batch.get("image_sizes"),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return cache, mask, out.logits[:, -1]

    def _forward_reusing(
        self, samples: list[EncodedSample], may_split: bool = True, may_group: bool = True
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """:meth:`_forward` through the caches: each row starts from its longest cached prefix (whole blocks)
        and computes only the rest, with image features from the image cache; its new whole blocks are kept.

        Row ``r``'s columns: ``[padding, its cached prefix (p_r), padding, the rest (s_r)]``, the prefixes
        right-aligned at ``P = max p_r`` and the rests at the end; the rest's positions run on from ``p_r``.
        When rows would share at least :data:`MIN_SHARED_TOKENS` tokens of blocks that none has cached yet,
        those that follow another are prefilled in a second pass that reuses what the first one kept. Rows that
        compute very different numbers of tokens (one mostly cached, one not) are first split into
        :func:`length_groups`, prefilled one group after the other."""
        engine, model = self.engine, self.engine.model
        device = model.device
        prefix, block = engine.prefix_cache, engine.cache_config.block_size
        runs = [image_runs(s, model.image_token_id, model.image_views.num_views) for s in samples]
        hashes = [
            block_hashes(s.input_ids, r, block) if prefix is not None else []
            for s, r in zip(samples, runs, strict=True)
        ]
        usable = [(len(s.input_ids) - 1) // block for s in samples]
        reused = [prefix.lookup(h[:u]) if prefix is not None else [] for h, u in zip(hashes, usable, strict=True)]
        if prefix is not None and may_group and len(samples) > 1:
            groups = length_groups([len(s.input_ids) - len(b) * block for s, b in zip(samples, reused, strict=True)])
            if len(groups) > 1:
                return self._in_passes(samples, groups, may_split=may_split)
        if prefix is not None and may_split and len(samples) > 1:
            later = followers(hashes, [len(b) for b in reused], usable)
            if sum(later.values()) * block >= MIN_SHARED_TOKENS:
                first = [i for i in range(len(samples)) if i not in later]
                return self._in_passes(samples, [first, sorted(later)], may_split=False)
        for sample, blocks in zip(samples, reused, strict=True):
            if prefix is not None:
                prefix.record(len(sample.input_ids), len(blocks) * block)
        starts = [len(blocks) * block for blocks in reused]
        width = max(starts)
        rests = [s.input_ids[start:] for s, start in zip(samples, starts, strict=True)]
        length = max(len(rest) for rest in rests)
        input_ids = torch.full((len(samples), length), engine.processor.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(samples), width + length), dtype=torch.long)
        positions = torch.zeros((len(samples), length), dtype=torch.long)
        for r, (start, rest) in enumerate(zip(starts, rests, strict=True)):
            input_ids[r, length - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            mask[r, width - start : width] = 1
            mask[r, width + length - len(rest) :] = 1
            positions[r, length - len(rest) :] = torch.arange(start, start + len(rest))
        # the images with placeholders in the rest (one the prefix cuts: the features of its tail)
        needed = [(run, run.tokens_before(start)) for rr, start in zip(runs, starts, strict=True) for run in rr
                  if run.positions[-1] >= start]  # fmt: skip
        features = None
        if needed:
            images = engine.image_cache if engine.image_cache is not None else ImageFeatureCache(0)
            whole = images.features([run for run, _ in needed], model.encode_images)
            features = [f[skip:] for f, (_, skip) in zip(whole, needed, strict=True)]
        cache = kv_cache.from_blocks(reused, width) if width else DynamicCache()
        mask = mask.to(device)
        out = model(
            input_ids=input_ids.to(device), attention_mask=mask, position_ids=positions.to(device),
            image_features=features, cache=cache, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        if prefix is not None:
            for r, (start, rest) in enumerate(zip(starts, rests, strict=True)):
                column = width + length - len(rest)  # where the rest starts in the cache
                new = [(b, key) for b, key in enumerate(hashes[r]) if b * block >= start and key not in prefix]
                blocks = [kv_cache.row_blocks(cache, r, column + b * block - start, 1, block)[0] for b, _ in new]
                prefix.insert([key for _, key in new], blocks)
        return cache, mask, out.logits[:, -1]

    def _in_passes(
        self, samples: list[EncodedSample], groups: list[list[int]], may_split: bool
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Prefill each group of rows in turn (a later group reuses the blocks an earlier one kept); the batches
        merged, rows in the order of ``samples``."""
        cache, mask, logits = None, None, []
        for group in groups:
            part, part_mask, part_logits = self._forward_reusing(
                [samples[i] for i in group], may_split=may_split, may_group=False
            )  # fmt: skip
            if cache is None:
                cache, mask = part, part_mask
            else:
                cache, mask = kv_cache.merge(cache, mask, part, part_mask)  # type: ignore[arg-type]
            logits.append(part_logits)
        assert cache is not None and mask is not None
        inverse = torch.argsort(torch.tensor([i for group in groups for i in group], device=mask.device))
        kv_cache.select_rows(cache, inverse)
        return cache, mask[inverse], torch.cat(logits)[inverse]

    def _join(
        self, cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor, next_pos: torch.Tensor,
        rows: list[RowState],
    ) -> None:  # fmt: skip
        """Merge prefilled rows (their left-padded cache and mask, first logits, next positions) into the batch."""
        if self.decoder is not None and self.cache is None:
            try:
                self._join_static(cache, mask, rows)
            except Exception as exc:  # e.g. no memory for the static cache: this batch decodes eagerly
                if self.rows:
                    raise
                log.warning("the static KV cache could not be set up (%s); this batch decodes eagerly", exc)
                self.decoder = None
            else:
                self.mask = self.kv.mask[: self.kv.rows, : self.kv.column]  # type: ignore[union-attr]
        if self.decoder is None:
            if self.cache is None or not self.rows:
                self.cache, self.mask = cache, mask
            else:
                self.cache, self.mask = kv_cache.merge(self.cache, self.mask, cache, mask)
        if not self.rows:
            self.logits, self.next_pos, self.rows = logits, next_pos, rows
        else:
            self.logits = torch.cat([self.logits, logits])  # type: ignore[list-item]
            self.next_pos = torch.cat([self.next_pos, next_pos])
            self.rows = self.rows + rows

    def _join_static(self, cache: DynamicCache, mask: torch.Tensor, rows: list[RowState]) -> None:
        """Copy new rows into the static cache: trimmed, or moved to a larger one, when they do not fit with
        room for every row's remaining tokens."""
        decoder, kv = self.decoder, self.kv
        assert decoder is not None
        count = len(self.rows) + len(rows)
        remaining = max(row.budget - row.generated for row in [*self.rows, *rows])
        needed = max(kv.column if kv is not None else 0, mask.shape[1]) + remaining
        if kv is not None and not kv.fits(count, needed):
            kv.trim()
            needed = max(kv.column, mask.shape[1]) + remaining
        if kv is None or not kv.fits(count, needed):
            larger = decoder.allocate(count, needed, cache)
            if kv is not None:
                larger.load(kv)
                decoder.release(kv)
            self.kv = kv = larger
        kv.append(cache, mask)

    @torch.inference_mode()
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
            if self.kv is not None:
                self.decoder.release(self.kv)  # type: ignore[union-attr]
                self.kv = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        if self.kv is not None:
            self._keep_static(keep)
        else:
            kv_cache.select_rows(self.cache, index)  # type: ignore[arg-type]
            self.mask = kv_cache.trim_padding(self.cache, self.mask[index])  # type: ignore[arg-type]
        self.next_pos, self.logits = self.next_pos[index], self.logits[index]  # type: ignore[index]
        self.rows = [self.rows[k] for k in keep]

    def _keep_static(self, keep: list[int]) -> None:
        kv, decoder = self.kv, self.decoder
        assert kv is not None and decoder is not None
        kv.keep(keep)
        if bucket(len(keep)) < kv.slots:  # half the slots or fewer in use: move to a smaller cache
            smaller = decoder.allocate(len(keep), kv.length, kv)
            smaller.load(kv)
            decoder.release(kv)
            self.kv = kv = smaller
        self.mask = kv.mask[: kv.rows, : kv.column]

    def _forward_static(self, tokens: list[int]) -> None:
        kv, decoder = self.kv, self.decoder
        assert kv is not None and decoder is not None
        if kv.column >= kv.length:  # budgets leave room, so only when a row outlived its estimate
            kv.trim()
            if kv.column >= kv.length:
                larger = decoder.allocate(kv.rows, kv.column + 1, kv)
                larger.load(kv)
                decoder.release(kv)
                self.kv = kv = larger
        kv.prepare(tokens, self.next_pos)
        self.logits = decoder.step(kv)[: len(tokens)]
        self.mask = kv.mask[: kv.rows, : kv.column]

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
        if self.rows and self.kv is not None:
            self._forward_static(tokens)
            self.next_pos = self.next_pos + 1
        elif self.rows:
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
