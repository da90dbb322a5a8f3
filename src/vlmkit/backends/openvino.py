"""The OpenVINO backend: folders written by ``vlmkit export --to openvino`` (see
:mod:`vlmkit.interop.openvino_export`), run with OpenVINO's runtime through vlmkit's API and commands.

Prompts are encoded by vlmkit's own :class:`~vlmkit.processing.processor.VLMProcessor` and tokens are chosen,
detokenised and stopped by :class:`~vlmkit.inference.rows.RowState`, as in the native engine, so options,
stop strings and multi-turn conversations behave the same. Each row of a running batch has its own OpenVINO
infer request (its own stateful KV cache): rows are prefilled and decoded one by one, never padded, so a row's
tokens don't depend on the batch. ``openvino`` is imported only when a folder is loaded.

The device is OpenVINO's ``CPU`` unless ``VLMKIT_OPENVINO_DEVICE`` names another (``GPU``, ``AUTO``); the model's
dtype was fixed at export (``--weights``). ``OMP_NUM_THREADS``, when set, bounds OpenVINO's threads too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Hashable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.backends.base import BACKENDS, BackendLoader, LoadedModel
from vlmkit.errors import CheckpointError, ConfigError, ImageTokenMismatchError, ProcessingError

log = logging.getLogger(__name__)

RUNTIME = "openvino"
DEVICE_ENV = "VLMKIT_OPENVINO_DEVICE"
Conversation = list[dict[str, Any]]


class OpenVINOModel:
    """The three compiled models of an export folder and its ``config.json``; :meth:`close` releases them."""

    def __init__(self, folder: str | Path, device: str = "CPU", properties: dict[str, Any] | None = None) -> None:
        from vlmkit.interop.openvino_export import EXPORT_VERSION, require_openvino

        ov = require_openvino()
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{config_path}: not readable JSON ({exc})") from exc
        version = self.config.get("export_version")
        if not isinstance(version, int) or version > EXPORT_VERSION:
            raise CheckpointError(
                f"{self.folder}: OpenVINO export version {version!r}; this vlmkit reads up to {EXPORT_VERSION}"
            )
        self.device = device
        props: dict[str, Any] = dict(self.config.get("runtime_config", {})) if device == "CPU" else {}
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if device == "CPU" and threads.isdigit() and int(threads) > 0:
            props["INFERENCE_NUM_THREADS"] = int(threads)
        props.update(properties or {})
        self.properties = props
        files = self.config["files"]
        missing = [name for name in files.values() if not (self.folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{self.folder}: the OpenVINO export is incomplete (missing {', '.join(missing)})")
        self.core = ov.Core()
        try:
            self.vision = self.core.compile_model(str(self.folder / files["vision"]), device, props)
            self.embeddings = self.core.compile_model(str(self.folder / files["embeddings"]), device, props)
            self.lm = self.core.compile_model(str(self.folder / files["language_model"]), device, props)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.folder}: OpenVINO could not compile it for {device} ({exc})") from exc
        self._vision_request = self.vision.create_infer_request()
        self._embed_request = self.embeddings.create_infer_request()
        self._lock = threading.Lock()
        self.closed = False

    def image_features(self, pixel_values: Any) -> Any:
        """``(N, 3, S, S)`` float32 pixels → ``(N, tokens, hidden)`` projected features (a numpy copy)."""
        with self._lock:
            return self._vision_request.infer([pixel_values])[0].copy()

    def embed(self, input_ids: Any) -> Any:
        """``(B, L)`` int64 ids → ``(B, L, hidden)`` embeddings (a numpy copy)."""
        with self._lock:
            return self._embed_request.infer([input_ids])[0].copy()

    def new_request(self) -> Any:
        """A fresh LM infer request: its own KV cache (OpenVINO variables), empty."""
        if self.closed:
            raise ConfigError("this OpenVINO model was closed")
        return self.lm.create_infer_request()

    def close(self) -> None:
        """Release the compiled models, their requests and the runtime core."""
        self.closed = True
        for name in ("_vision_request", "_embed_request", "vision", "embeddings", "lm", "core"):
            if hasattr(self, name):
                delattr(self, name)


@dataclass
class _Row:
    state: Any  # RowState
    request: Any  # the row's LM infer request
    logits: Any  # (vocab,) float32 logits of the next token
    length: int  # tokens in the row's KV cache


class OpenVINOEngine:
    """The :class:`~vlmkit.backends.Backend` contract over an :class:`OpenVINOModel` and a vlmkit processor."""

    capabilities: frozenset[str] = frozenset()
    """Runs only: training and export need the source (PyTorch) model."""

    def __init__(self, model: OpenVINOModel, processor: Any) -> None:
        from vlmkit.inference.engine import token_ids

        self.model = model
        self.processor = processor
        config = model.config
        self.context_length: int = int(config["context_length"])
        self.vocab_size: int = int(config["vocab_size"])
        self.image_token_id: int = int(config["image_token_id"])
        if self.image_token_id != processor.image_token_id:
            raise CheckpointError(
                f"{model.folder}: the processor's image token ({processor.image_token_id}) is not the model's "
                f"({self.image_token_id})"
            )
        self.stop_ids = set(processor.stop_token_ids) | set(token_ids(config.get("eos_token_ids")))
        self._pool: list[Any] = []

    # -- encoding -------------------------------------------------------------------------------------------
    def encode(self, conversation: Conversation, name: str = "request", **encoding: Any) -> Any:
        """Encode a prompt (vlmkit's processor, so ``continue_final_message`` and ``chat_template`` as the native
        engine) and check it fits the context, with room for one new token."""
        from vlmkit.processing.limits import check_text_fits

        check_text_fits(conversation, self.context_length, self.processor.tokenizer, name)
        encoded = self.processor.encode(conversation, name=name, **encoding)
        self._check_length(len(encoded.input_ids), name)
        return encoded

    def encode_prompt(self, text: str, name: str = "request") -> Any:
        """A raw text prompt (no chat template), as the native engine's ``encode_prompt``."""
        from vlmkit.inference.engine import encode_raw_prompt
        from vlmkit.processing.processor import EncodedSample

        ids = encode_raw_prompt(self.processor.tokenizer, text, {self.image_token_id}, name)
        self._check_length(len(ids), name)
        return EncodedSample(ids, None, None, [])

    def _check_length(self, tokens: int, name: str) -> None:
        if tokens >= self.context_length:
            raise ProcessingError(
                f"{name}: the prompt has {tokens} tokens (images included) but the model's context is "
                f"{self.context_length} tokens; shorten the conversation or use fewer images"
            )

    # -- generation -----------------------------------------------------------------------------------------
    def generate(self, conversations: Sequence[Any], options: Any) -> list[Any]:
        """``options.n`` answers per conversation (or encoded prompt): conversation 0's choices first, then 1's."""
        from vlmkit.inference.engine import choice_keys

        results: dict[tuple[Hashable, int], Any] = {}
        for event in self.stream_batch(conversations, options, stream=False):
            if event.result is not None:
                results[(event.index, event.choice)] = event.result
        return [results[key] for key in choice_keys(len(conversations), options)]

    def stream_batch(self, conversations: Sequence[Any], options: Any, stream: bool = True) -> Iterator[Any]:
        """Text pieces as they are decoded, each answer's result last (``stream=False``: final events only)."""
        from vlmkit.inference.options import GenerationOptions
        from vlmkit.processing.processor import EncodedSample

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
        batch = self.new_batch()
        failed = batch.add(list(zip(range(len(encoded)), encoded, options, strict=True)), stream=stream)
        if failed and failed[0].error is not None:
            raise failed[0].error
        while batch:
            for event in batch.step():
                if event.error is not None:
                    raise event.error
                yield event

    def new_batch(self) -> OpenVINOBatch:
        """An empty running batch (rows join with ``add`` and leave finished or cancelled)."""
        if self.model.closed:
            raise ConfigError("this OpenVINO model was closed")
        return OpenVINOBatch(self)

    # -- rows -----------------------------------------------------------------------------------------------
    def _new_state(self, key: Hashable, sample: Any, options: Any, stream: bool, choice: int) -> Any:
        from vlmkit.inference.rows import RowState

        return RowState.create(
            key, sample.input_ids, options, tokenizer=self.processor.tokenizer, vocab_size=self.vocab_size,
            context_length=self.context_length, skip_ids=(self.image_token_id,), stream=stream, choice=choice,
            stop_ids=self.stop_ids, extra_stop_ids=getattr(sample, "stop_ids", ()),
        )  # fmt: skip

    def _request(self) -> Any:
        request = self._pool.pop() if self._pool else self.model.new_request()
        request.reset_state()
        return request

    def _release(self, request: Any) -> None:
        if len(self._pool) < 8 and not self.model.closed:
            request.reset_state()
            self._pool.append(request)

    def _prefill(self, sample: Any, request: Any) -> Any:
        import numpy as np

        ids = np.asarray([sample.input_ids], dtype=np.int64)
        embeds = self.model.embed(ids)
        slots = ids[0] == self.image_token_id
        if sample.pixel_values is not None:
            features = self.model.image_features(sample.pixel_values.float().numpy())
            flat = features.reshape(-1, features.shape[-1])
            if int(slots.sum()) != flat.shape[0]:
                raise ImageTokenMismatchError(
                    f"{int(slots.sum())} image placeholder tokens but the images make {flat.shape[0]} features"
                )
            embeds[0, slots] = flat
        elif slots.any():
            raise ImageTokenMismatchError(f"{int(slots.sum())} image placeholder tokens but no images were given")
        n = ids.shape[1]
        out = request.infer(
            {
                "inputs_embeds": embeds,
                "attention_mask": np.ones((1, n), dtype=np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None],
            }
        )
        return out["logits"][0, -1].copy()

    @staticmethod
    def _copy_cache(source: Any, target: Any) -> None:
        """Give ``target`` a copy of ``source``'s KV cache (a prompt prefilled once for its ``n`` answers)."""
        import numpy as np
        import openvino as ov

        states = {state.name: state for state in source.query_state()}
        for state in target.query_state():
            state.state = ov.Tensor(np.array(states[state.name].state.data))

    def _decode(self, rows: list[_Row], tokens: list[int]) -> None:
        import numpy as np

        embeds = self.model.embed(np.asarray(tokens, dtype=np.int64)[:, None])
        for r, row in enumerate(rows):
            out = row.request.infer(
                {
                    "inputs_embeds": embeds[r : r + 1],
                    "attention_mask": np.ones((1, row.length + 1), dtype=np.int64),
                    "position_ids": np.asarray([[row.length]], dtype=np.int64),
                }
            )
            row.logits = out["logits"][0, -1].copy()
            row.length += 1

    def close(self) -> None:
        """Release the pooled requests and the compiled models."""
        self._pool.clear()
        self.model.close()


class OpenVINOBatch:
    """:class:`~vlmkit.backends.RunningBatch` over per-row infer requests: ``add`` prefills each new prompt alone
    (once for its ``n`` answers), ``step`` picks one token per row, emits text, retires finished rows and decodes
    one token for the rest."""

    def __init__(self, engine: OpenVINOEngine) -> None:
        self.engine = engine
        self.items: list[_Row] = []

    def __len__(self) -> int:
        return len(self.items)

    @property
    def keys(self) -> list[Hashable]:
        return [row.state.key for row in self.items]

    @property
    def rows(self) -> list[Any]:
        """The rows' :class:`~vlmkit.inference.rows.RowState` (as the native batch's ``rows``)."""
        return [row.state for row in self.items]

    def add(self, items: Sequence[tuple[Hashable, Any, Any]], stream: bool = True) -> list[Any]:
        """Prefill ``(key, encoded prompt, options)`` items; returns the error events of those that failed alone."""
        from vlmkit.inference.rows import StreamEvent

        engine = self.engine
        failed = []
        for key, sample, options in items:
            try:
                states = [engine._new_state(key, sample, options, stream, c) for c in range(options.n)]
            except Exception as exc:  # one request's bad state fails that request only
                log.warning("request %s refused before prefill: %s", key, exc)
                failed.append(StreamEvent(key, "", error=exc))
                continue
            requests: list[Any] = []
            try:
                requests.append(engine._request())
                logits = engine._prefill(sample, requests[0])
                for _ in states[1:]:
                    requests.append(engine._request())
                    engine._copy_cache(requests[0], requests[-1])
            except Exception as exc:  # this prompt's own failure
                log.exception("prefill failed for request %s", key)
                for request in requests:
                    engine._release(request)
                failed.append(states[0].fail(exc))
                continue
            for state, request in zip(states, requests, strict=True):
                self.items.append(_Row(state, request, logits, len(sample.input_ids)))
        return failed

    def cancel(self, keys: AbstractSet[Hashable]) -> None:
        """Drop rows without emitting anything for them."""
        for row in self.items:
            if row.state.key in keys:
                self.engine._release(row.request)
        self.items = [row for row in self.items if row.state.key not in keys]

    def step(self) -> list[Any]:
        """The next token of every row: text pieces, results of finished rows, errors of rows that failed."""
        import torch

        events: list[Any] = []
        keep: list[_Row] = []
        tokens: list[int] = []
        for row in self.items:
            state = row.state
            try:
                if state.wants_logprobs:
                    state.observe(torch.from_numpy(row.logits))
                token = int(row.logits.argmax()) if state.plain else state.choose(torch.from_numpy(row.logits))
            except Exception as exc:  # one row's sampling error fails that row only
                log.exception("choosing the next token failed for request %s", state.key)
                events.append(state.fail(exc))
                self.engine._release(row.request)
                continue
            events += state.accept(token, self.engine.stop_ids)
            if state.result is None:
                keep.append(row)
                tokens.append(token)
            else:
                self.engine._release(row.request)
        self.items = keep
        if keep:
            try:
                self.engine._decode(keep, tokens)
            except Exception as exc:  # a runtime failure while decoding: each row fails with it
                log.exception("decoding failed")
                events += [row.state.fail(exc) for row in keep]
                self.items = []
        return events


def load_openvino(folder: str | Path, device: str = "CPU", properties: dict[str, Any] | None = None) -> LoadedModel:
    """Load an export folder on an OpenVINO device (``CPU``, ``GPU``, ``AUTO``) with extra compile properties."""
    from vlmkit.processing.processor import VLMProcessor

    model = OpenVINOModel(folder, device, properties)
    processor = VLMProcessor.from_pretrained(folder)
    return LoadedModel(model, processor, OpenVINOEngine(model, processor))


def _is_openvino(folder: Path, config: dict[str, Any]) -> bool:
    return config.get("vlmkit_runtime") == RUNTIME


def _load(folder: Path, device: Any, dtype: Any) -> LoadedModel:
    target = os.environ.get(DEVICE_ENV, "CPU")
    if getattr(device, "type", "cpu") != "cpu" and DEVICE_ENV not in os.environ:
        log.info("an OpenVINO export runs on OpenVINO's CPU device (set %s for another); not on %s", DEVICE_ENV,
                 device)  # fmt: skip
    return load_openvino(folder, target)


BACKENDS.add(RUNTIME, BackendLoader(_is_openvino, _load, priority=5))
