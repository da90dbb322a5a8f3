"""Generation for transformers VLMs with the interface of vlmkit's :class:`~vlmkit.inference.engine.Engine`.

Tokens come from the model's own ``generate()`` (models such as Qwen2-VL have their own position schemes, so the
decoding loop is theirs). vlmkit's options, stop strings, streaming and results are layered on through a logits
processor (sampling, per row) and a stopping criterion (detokenising, stopping, emitting text, per row).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    BatchFeature,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from vlmkit.errors import ProcessingError
from vlmkit.inference.engine import Conversation, choice_keys, encode_raw_prompt, token_ids
from vlmkit.inference.options import GenerationOptions, GenerationResult
from vlmkit.inference.rows import RowState, StreamEvent
from vlmkit.interop.hf_processor import HFProcessor
from vlmkit.processing.limits import check_text_fits

log = logging.getLogger(__name__)

_END = object()

Render = tuple[str, str | None, bool]
"""How a prompt was made: ``("chat", chat_template or None, continue_final_message)`` or ``("raw", None, False)``
(a text prompt, no template). One ``generate`` call takes prompts of one kind only."""
CHAT: Render = ("chat", None, False)
RAW: Render = ("raw", None, False)


@dataclass
class HFEncoded:
    """A checked conversation, ready to batch: its messages (images loaded) and its prompt as the model sees it.

    ``image_token_counts`` has the image placeholder tokens of each contiguous run: one run per image for most
    models (tiling models such as Idefics3 have several); their sum is the prompt's image tokens.
    """

    conversation: list[dict[str, Any]]
    input_ids: list[int]
    image_token_counts: list[int]
    render: Render = CHAT
    text: str | None = None
    """The raw prompt (``render`` is :data:`RAW`)."""


class _Rows(StoppingCriteria):
    """Per-row bookkeeping, called by ``generate`` after every step with the new tokens.

    Each new token goes to its row's detokenizer; a row finishes on a stop token, a stop string or its budget, and
    its text pieces and result go to ``emit``. Returns which rows are done; cancelled rows are done and silent.
    """

    def __init__(self, rows: list[RowState], stop_ids: set[int], emit: Callable[[StreamEvent], None]) -> None:
        self.rows = rows
        self.stop_ids = stop_ids
        self.emit = emit

    def cancel(self, keys: AbstractSet[Hashable] | None = None) -> None:
        """Stop rows (all rows when ``keys`` is None) at the next step, without a result."""
        for row in self.rows:
            if keys is None or row.key in keys:
                row.cancelled = True

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            if not row.done:
                for event in row.accept(token, self.stop_ids):
                    self.emit(event)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _ChooseTokens(LogitsProcessor):
    """Sampling and repetition penalty by vlmkit's own rules, per row (own options, own seeded generator).

    ``generate`` runs greedily; for a row that samples or penalises, every logit but the chosen token's is
    masked, so the argmax picks it. Plain greedy rows keep the model's logits untouched.
    """

    def __init__(self, rows: list[RowState], tracker: _Rows) -> None:
        self.rows = rows
        self.tracker = tracker

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for r, row in enumerate(self.rows):
            if not row.done and row.wants_logprobs:
                row.observe(scores[r])
            if not row.done and not row.plain:
                try:
                    token = row.choose(scores[r])
                except Exception as exc:  # this row fails alone; the stopping criterion retires it
                    log.exception("choosing the next token failed for request %s", row.key)
                    self.tracker.emit(row.fail(exc))
                    continue
                scores[r].fill_(float("-inf"))
                scores[r, token] = 0.0
        return scores


class _Generation:
    """One ``model.generate`` call over a fixed set of rows, run in the calling thread or in a worker thread."""

    def __init__(self, engine: HFEngine, inputs: BatchFeature, rows: list[RowState]) -> None:
        self.engine = engine
        self.inputs = inputs
        self.rows = rows
        self.queue: queue.Queue[Any] = queue.Queue()
        self.tracker = _Rows(rows, engine.stop_ids, lambda event: None)
        self.thread: threading.Thread | None = None
        self.finished = False

    def run(self) -> None:
        """Generate in this thread; the results are on the rows."""
        model = self.engine.model
        inputs = self.inputs.to(device=model.device, dtype=model.dtype)  # the dtype applies to float tensors only
        pad = self.engine.pad_token_id
        with torch.inference_mode():
            model.generate(
                **inputs,
                **({"pad_token_id": pad} if pad is not None else {}),
                do_sample=False,  # sampling, when asked for, is _ChooseTokens' job
                num_beams=1,
                repetition_penalty=1.0,
                max_new_tokens=max(row.budget for row in self.rows),
                logits_processor=LogitsProcessorList([_ChooseTokens(self.rows, self.tracker)]),
                stopping_criteria=StoppingCriteriaList([self.tracker]),
            )

    def start(self) -> None:
        """Generate in a worker thread; its events (and an error, if any) come out of :meth:`events`."""

        def work() -> None:
            try:
                self.run()
            except BaseException as exc:  # handed to the consuming thread, which raises it
                self.queue.put(exc)
            finally:
                self.queue.put(_END)

        self.tracker.emit = self.queue.put
        self.thread = threading.Thread(target=work, name="vlmkit-hf-generate", daemon=True)
        self.thread.start()

    def events(self) -> list[StreamEvent]:
        """Wait for the next events (none once generation has ended, then ``finished`` is set)."""
        items = [self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        events = []
        for item in items:
            if item is _END:
                self.finished = True
                self.close()
            elif isinstance(item, BaseException):
                self.finished = True
                self.close()
                raise item
            else:
                events.append(item)
        return events

    def close(self) -> None:
        """Stop generating after the current step and wait for the worker thread."""
        self.tracker.cancel()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()


def _runs(ids: list[int], placeholders: set[int]) -> list[int]:
    """Lengths of the contiguous runs of placeholder tokens in ``ids``."""
    counts: list[int] = []
    previous = False
    for token in ids:
        inside = token in placeholders
        if inside:
            if previous:
                counts[-1] += 1
            else:
                counts.append(1)
        previous = inside
    return counts


Item = tuple[Hashable, Conversation | HFEncoded, GenerationOptions]


def render_of(prompt: Any) -> Render:
    """How ``prompt`` (an :class:`HFEncoded` or a conversation) becomes model inputs."""
    return prompt.render if isinstance(prompt, HFEncoded) else CHAT


class HFEngine:
    """Batched generation for a transformers VLM and its :class:`~vlmkit.interop.hf_processor.HFProcessor`.

    The checkpoint's sampling defaults (``generation_config.json``) are not used: vlmkit's options decide, with
    vlmkit's sampling rules (so a seeded request gives the same tokens alone or in any batch).
    """

    capabilities: frozenset[str] = frozenset()
    """Runs only: export and training need a native model."""

    def __init__(self, model: PreTrainedModel, processor: HFProcessor) -> None:
        self.model = model.eval()
        self.processor = processor
        text_config = model.config.get_text_config(decoder=True)
        self.context_length: int = int(getattr(text_config, "max_position_embeddings", 0) or 1 << 30)
        head = model.get_output_embeddings()
        self.vocab_size: int = head.weight.shape[0] if head is not None else int(text_config.vocab_size)
        tokenizer = processor.tokenizer
        self.stop_ids = set(token_ids(model.generation_config.eos_token_id) + token_ids(tokenizer.eos_token_id))
        pad = model.generation_config.pad_token_id
        pad = pad if pad is not None else tokenizer.pad_token_id
        self.pad_token_id: int | None = pad if pad is not None else min(self.stop_ids, default=None)
        # the image placeholder (counted as image tokens; not text the repetition penalty has "seen")
        placeholder = getattr(model.config, "image_token_id", None)
        if not isinstance(placeholder, int):
            placeholder = getattr(processor.processor, "image_token_id", None)
        self.placeholder_ids = {placeholder} if isinstance(placeholder, int) else set()

    # -- preparation -----------------------------------------------------------------------------------------
    def _check_length(self, tokens: int, name: str) -> None:
        if tokens >= self.context_length:
            raise ProcessingError(
                f"{name}: the prompt has {tokens} tokens (images included) but the model's context is "
                f"{self.context_length} tokens; shorten the conversation or use fewer or smaller images"
            )

    def encode(
        self,
        conversation: Conversation,
        name: str = "request",
        *,
        continue_final_message: bool = False,
        chat_template: str | None = None,
    ) -> HFEncoded:
        """Check a conversation (images, template, context length) and keep it ready for a batch.

        ``continue_final_message`` and ``chat_template`` as :meth:`Engine.encode` (the stop tokens stay the
        model's generation config's)."""
        check_text_fits(conversation, self.context_length, self.processor.tokenizer, name)
        messages = self.processor.conversation(conversation, name=name)
        if continue_final_message and (not messages or messages[-1]["role"] != "assistant"):
            raise ProcessingError(
                f"{name}: continue_final_message continues the last message, which must be the assistant's"
            )
        render: Render = ("chat", chat_template, bool(continue_final_message))
        batch = self.processor.prepare([messages], chat_template=chat_template,
                                       continue_final_message=continue_final_message)  # fmt: skip
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        self._check_length(len(ids), name)
        runs = _runs(ids, self.placeholder_ids)
        budget = self.processor.max_image_tokens
        if budget is not None and sum(runs) > budget:
            raise ProcessingError(
                f"{name}: its images make {sum(runs)} image tokens, over the budget of {budget}; send fewer or "
                "smaller images"
            )
        return HFEncoded(messages, ids, runs, render)

    def encode_prompt(self, text: str, name: str = "request") -> HFEncoded:
        """A raw text prompt, as :meth:`Engine.encode_prompt`."""
        ids = encode_raw_prompt(self.processor.tokenizer, text, self.placeholder_ids, name)
        self._check_length(len(ids), name)
        return HFEncoded([], ids, [], RAW, text)

    def _new_row(self, key: Hashable, prompt: list[int], options: GenerationOptions, choice: int = 0) -> RowState:
        self._check_length(len(prompt), f"conversation {key}")
        return RowState.create(
            key, prompt, options, tokenizer=self.processor.tokenizer, vocab_size=self.vocab_size,
            context_length=self.context_length, skip_ids=self.placeholder_ids, choice=choice,
            stop_ids=self.stop_ids,
        )  # fmt: skip

    def _generation(self, items: Sequence[Item]) -> tuple[_Generation | None, list[StreamEvent]]:
        """The generation for ``items``, and the error events of those refused on their own (bad options).

        A request with ``n`` > 1 takes ``n`` rows of the batch (its prompt prepared ``n`` times)."""
        items, failed = self._checked(items)
        if not items:
            return None, failed
        renders = {render_of(c) for _, c, _ in items}
        if len(renders) > 1:
            raise ProcessingError("one batch mixes prompts made with different chat templates or settings")
        render = renders.pop()
        copies = [(key, c, opts) for key, c, opts in items for _ in range(opts.n)]
        if render == RAW:
            texts = [c.text for _, c, _ in copies]  # type: ignore[union-attr]
            encoded = self.processor.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
            batch = BatchFeature(dict(encoded))
        else:
            messages = [
                c.conversation if isinstance(c, HFEncoded) else self.processor.conversation(c, name=f"conversation {k}")
                for k, c, _ in copies
            ]
            batch = self.processor.prepare(messages, chat_template=render[1], continue_final_message=render[2])
        masks = batch["attention_mask"].bool()
        prompts = [ids[mask].tolist() for ids, mask in zip(batch["input_ids"], masks, strict=True)]
        rows: list[RowState] = []
        for (key, _, opts), prompt in zip(copies, prompts, strict=True):
            choice = sum(row.key == key for row in rows)
            rows.append(self._new_row(key, prompt, opts, choice))
        return _Generation(self, batch, rows), failed

    def _checked(self, items: Sequence[Item]) -> tuple[list[Item], list[StreamEvent]]:
        """Split off the items whose own state can't start (e.g. a seed the generator refuses)."""
        good: list[Item] = []
        failed: list[StreamEvent] = []
        for item in items:
            key, conversation, opts = item
            prompt = conversation.input_ids if isinstance(conversation, HFEncoded) else []
            try:
                RowState.create(
                    key, prompt, opts, tokenizer=self.processor.tokenizer, vocab_size=self.vocab_size,
                    context_length=self.context_length, skip_ids=self.placeholder_ids,
                )  # fmt: skip
            except Exception as exc:  # one request's bad state fails that request only
                log.warning("request %s refused before prefill: %s", key, exc)
                failed.append(StreamEvent(key, "", error=exc))
            else:
                good.append(item)
        return good, failed

    @staticmethod
    def _items(
        conversations: Sequence[Conversation | HFEncoded], options: GenerationOptions | Sequence[GenerationOptions]
    ) -> list[Item]:
        if isinstance(options, GenerationOptions):
            options = [options] * len(conversations)
        if len(options) != len(conversations):
            raise ProcessingError(f"{len(conversations)} conversations but {len(options)} sets of options")
        return list(zip(range(len(conversations)), conversations, options, strict=True))

    # -- generation ------------------------------------------------------------------------------------------
    def generate(
        self,
        conversations: Sequence[Conversation | HFEncoded],
        options: GenerationOptions | Sequence[GenerationOptions],
    ) -> list[GenerationResult]:
        """Generate ``n`` answers per conversation, all in one batch, in :meth:`Engine.generate`'s order."""
        if not conversations:
            return []
        generation, failed = self._generation(self._items(conversations, options))
        if failed and failed[0].error is not None:
            raise failed[0].error
        assert generation is not None
        generation.run()
        for row in generation.rows:
            if row.error is not None:
                raise row.error
        found = {(row.key, row.choice): row.result for row in generation.rows}
        return [found[key] for key in choice_keys(len(conversations), options)]  # type: ignore[misc]

    def stream_batch(
        self,
        conversations: Sequence[Conversation | HFEncoded],
        options: GenerationOptions | Sequence[GenerationOptions],
    ) -> Iterator[StreamEvent]:
        """Generate for a batch, yielding text pieces as they are decoded (any order across requests).

        ``generate()`` runs in a worker thread that hands events over a queue; closing the iterator early stops
        generation after the current step and joins the thread.
        """
        if not conversations:
            return
        generation, failed = self._generation(self._items(conversations, options))
        if failed and failed[0].error is not None:
            raise failed[0].error
        assert generation is not None
        generation.start()
        try:
            while not generation.finished:
                for event in generation.events():
                    if event.error is not None:
                        raise event.error
                    yield event
        finally:
            generation.close()

    def new_batch(self) -> HFDecodeBatch:
        """A running batch with the interface of :meth:`Engine.new_batch` (used by the server's scheduler)."""
        return HFDecodeBatch(self)


class HFDecodeBatch:
    """:class:`~vlmkit.inference.engine.DecodeBatch`'s interface (add, step, cancel) over ``generate`` calls.

    ``generate`` can't take rows while it runs, so requests added meanwhile wait and start together as the next
    batch once it ends; :meth:`step` blocks until the running batch has new text.
    """

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        self._waiting: list[Item] = []
        self._live: dict[Hashable, int] = {}
        """Requests of the running generation and how many of their answers are still running."""
        self._generation: _Generation | None = None

    def __len__(self) -> int:
        return len(self._waiting) + len(self._live)

    @property
    def keys(self) -> list[Hashable]:
        return [key for key, _, _ in self._waiting] + list(self._live)

    def _begin(self, items: list[Item]) -> list[StreamEvent]:
        """Start the items made like the first one (same chat template settings); the others wait."""
        render = render_of(items[0][1])
        now = [item for item in items if render_of(item[1]) == render]
        self._waiting = [item for item in items if render_of(item[1]) != render] + self._waiting
        generation, failed = self.engine._generation(now)
        if generation is not None:
            generation.start()
            self._generation = generation
            self._live = {}
            for row in generation.rows:
                self._live[row.key] = self._live.get(row.key, 0) + 1
        return failed

    def add(self, items: Sequence[Item]) -> list[StreamEvent]:
        """Queue ``(key, encoded prompt, options)`` items; they start now if nothing is running.

        Returns the error events of items refused on their own (as :meth:`DecodeBatch.add`)."""
        if self._generation is None and not self._waiting:
            return self._begin(list(items))  # a bad batch fails here, for exactly these items
        self._waiting.extend(items)
        return []

    def cancel(self, keys: AbstractSet[Hashable]) -> None:
        """Drop requests without emitting anything for them."""
        self._waiting = [item for item in self._waiting if item[0] not in keys]
        if self._generation is not None:
            self._generation.tracker.cancel(keys & self._live.keys())
        for key in keys:
            self._live.pop(key, None)

    def step(self) -> list[StreamEvent]:
        """The running batch's next text pieces and results; starts the waiting requests once it has ended."""
        events: list[StreamEvent] = []
        if self._generation is not None and not self._generation.finished:
            events = [e for e in self._generation.events() if e.index in self._live]
            for event in events:
                if event.error is not None:  # the request failed: its other answers stop too
                    self._generation.tracker.cancel({event.index})
                    self._live.pop(event.index, None)
                elif event.result is not None and event.index in self._live:
                    self._live[event.index] -= 1
                    if not self._live[event.index]:
                        del self._live[event.index]
        if self._generation is not None and self._generation.finished:
            self._generation, self._live = None, {}
        if self._generation is None and self._waiting:
            waiting, self._waiting = self._waiting, []
            try:
                events += self._begin(waiting)
            except Exception as exc:  # the batch could not start: it fails these requests, not the running ones
                log.exception("starting a batch failed")
                events += [StreamEvent(key, "", error=exc) for key, _, _ in waiting]
        return events
