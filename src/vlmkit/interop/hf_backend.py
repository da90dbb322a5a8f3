"""The transformers backend: pretrained VLMs vlmkit can't express natively, run through vlmkit's API.

Qwen2-VL, InternVL (the ``-hf`` checkpoints), Idefics3/SmolVLM, LLaVA-NeXT, Gemma 3 and the other models behind
transformers' ``AutoModelForImageTextToText`` load with their own processor and chat template. Images still come
through :func:`vlmkit.processing.images.load_image` (same access policy, size limit and errors); the model's
processor gets PIL images only, so it never reads files or URLs itself. :class:`HFEngine` has the interface of
:class:`vlmkit.inference.engine.Engine`, so chat, streaming, batches, describe and eval work unchanged.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from PIL import Image
from transformers import BatchFeature, LogitsProcessor, PreTrainedModel, StoppingCriteria

from vlmkit.errors import CheckpointError, ProcessingError
from vlmkit.inference.detokenize import IncrementalDetokenizer
from vlmkit.inference.engine import Conversation, StreamEvent
from vlmkit.inference.options import GenerationOptions, GenerationResult
from vlmkit.inference.sampling import choose_token
from vlmkit.processing.chat import ROLES
from vlmkit.processing.images import DEFAULT_MAX_PIXELS, ImageAccess, load_image

log = logging.getLogger(__name__)

NATIVE_MODEL_TYPES = frozenset({"llava"})
"""Image-text-to-text model types vlmkit imports as its own models (see :mod:`vlmkit.interop.hf_llava`)."""
IMAGE_KEYS = ("image", "url", "path", "base64")


# -- detection and loading ------------------------------------------------------------------------------------
def _model_type(folder: Path) -> str | None:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def is_transformers_vlm(folder: str | Path) -> bool:
    """Whether ``folder`` holds a transformers image-text-to-text checkpoint that this backend runs (not LLaVA)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = _model_type(Path(folder))
    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in NATIVE_MODEL_TYPES


def _images_only(cls: type) -> type:
    """``cls`` without its video processor: transformers' video processors need torchvision, images don't."""
    attributes = [name for name in cls.get_attributes() if "video" not in name]
    return type(cls.__name__, (cls,), {"video_processor": None, "get_attributes": classmethod(lambda _: attributes)})


def load_hf_processor(name_or_path: str | Path, model_type: str) -> Any:
    """The model's own processor (tokenizer, image processor, chat template) for a hub id or folder.

    Without torchvision, processors that also handle video (Qwen2-VL, InternVL, SmolVLM ...) are loaded without
    their video part, which transformers can't build then; images are unaffected.
    """
    from transformers import AutoProcessor, ProcessorMixin
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name
    from transformers.utils import is_torchvision_available

    cls = None
    if not is_torchvision_available() and PROCESSOR_MAPPING_NAMES.get(model_type):
        cls = processor_class_from_name(PROCESSOR_MAPPING_NAMES[model_type])
        if not (isinstance(cls, type) and issubclass(cls, ProcessorMixin)):
            cls = None
        elif any("video" in name for name in cls.get_attributes()):
            cls = _images_only(cls)
    try:
        processor = (cls or AutoProcessor).from_pretrained(str(name_or_path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{name_or_path}: cannot load the model's processor ({exc})") from exc
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise CheckpointError(
            f"{name_or_path}: the processor has no image processor or tokenizer; a vision-language checkpoint "
            "needs both (preprocessor_config.json / processor_config.json and the tokenizer files)"
        )
    return processor


def load_transformers_vlm(
    name_or_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, HFProcessor, HFEngine]:
    """Load a transformers VLM (hub id or folder) with its processor: ``(model, processor adapter, engine)``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
        model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{name_or_path}: cannot load it as a transformers vision-language model ({exc})"
        ) from exc
    model.to(device).eval()
    processor = HFProcessor(load_hf_processor(name_or_path, config.model_type))
    return model, processor, HFEngine(model, processor)


# -- messages → model inputs ----------------------------------------------------------------------------------
class HFProcessor:
    """vlmkit's view of a transformers processor: ``tokenizer``, ``max_pixels``, ``image_access`` and batching.

    Messages take every form vlmkit accepts (string content, text/image/image_url parts); images are loaded
    with :func:`load_image` under ``image_access`` and ``max_pixels`` before the model's processor sees them.
    """

    def __init__(
        self, processor: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS, image_access: ImageAccess | None = None
    ) -> None:
        self.processor = processor
        self.max_pixels = max_pixels
        self.image_access = image_access or ImageAccess()

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def _load(self, source: Any) -> Image.Image:
        return load_image(source, max_pixels=self.max_pixels, access=self.image_access)

    def _part(self, part: Any, where: str) -> dict[str, Any]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            return {"type": "text", "text": str(part.get("text", ""))}
        if kind == "image":
            key = next((k for k in IMAGE_KEYS if k in part), None)
            if key is None:
                raise ProcessingError(f"{where}: image part without 'image', 'url', 'path' or 'base64'")
            source = part[key]
            if key == "base64" and isinstance(source, str) and not source.startswith("data:"):
                source = f"data:;base64,{source}"  # a bare base64 payload
            return {"type": "image", "image": self._load(source)}
        if kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not url:
                raise ProcessingError(f"{where}: image_url part without a url")
            return {"type": "image", "image": self._load(url)}
        raise ProcessingError(f"{where}: unknown content part type {kind!r}; valid types: text, image, image_url")

    def conversation(self, messages: Conversation, name: str = "conversation") -> list[dict[str, Any]]:
        """``messages`` in transformers' content-parts form, every image loaded as an RGB PIL image."""
        if not isinstance(messages, list) or not messages:
            raise ProcessingError(f"{name}: a conversation must be a non-empty list of messages")
        out = []
        for index, message in enumerate(messages):
            where = f"{name}, message {index}"
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ProcessingError(f"{where}: needs 'role' and 'content' keys, got {message!r:.100}")
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise ProcessingError(f"{where}: unknown role {role!r}; valid roles: {', '.join(ROLES)}")
            if isinstance(content, str):
                parts = [{"type": "text", "text": content}]
            elif isinstance(content, list):
                parts = [self._part(part, where) for part in content]
            else:
                raise ProcessingError(f"{where}: content must be a string or a list of parts")
            out.append({"role": role, "content": parts})
        return out

    def prepare(self, conversations: Sequence[list[dict[str, Any]]]) -> BatchFeature:
        """Normalised conversations → one left-padded batch of model inputs, via the model's chat template."""
        try:
            return self.processor.apply_chat_template(
                list(conversations),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"padding": True, "padding_side": "left"},
            )
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise ProcessingError(
                f"the model's processor could not turn the conversation(s) into inputs: {exc}"
            ) from exc


# -- generation -----------------------------------------------------------------------------------------------
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
    result: GenerationResult | None = None

    @property
    def plain(self) -> bool:
        """Greedy with no penalty: the model's own argmax is the answer."""
        return self.options.greedy and self.seen is None


class _Batch(StoppingCriteria):
    """Per-row bookkeeping, called by ``model.generate`` after every step with the new tokens.

    Each new token goes to its row's detokenizer; a row finishes on a stop token, a stop string or its budget, and
    text pieces and results go to ``emit``. Returns which rows are done; ``cancel()`` ends every row.
    """

    def __init__(self, rows: list[_Row], stop_ids: set[int], emit: Callable[[StreamEvent], None]) -> None:
        self.rows = rows
        self.stop_ids = stop_ids
        self.emit = emit
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def _finish(self, row: _Row, reason: str) -> None:
        tail = row.detok.finish()
        row.result = GenerationResult(
            text=row.detok.text,
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.generated,
            token_ids=list(row.detok.ids),
        )
        self.emit(StreamEvent(row.index, tail, row.result))

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            if row.result is not None or self.cancelled:
                continue
            row.generated += 1
            if token in self.stop_ids:
                self._finish(row, "stop")
                continue
            if row.seen is not None:
                row.seen[token] = True
            piece = row.detok.add(token)
            if piece:
                self.emit(StreamEvent(row.index, piece))
            if row.detok.stopped:
                self._finish(row, "stop")
            elif row.generated >= row.budget:
                self._finish(row, "length")
        done = [self.cancelled or row.result is not None for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _ChooseTokens(LogitsProcessor):
    """Sampling and repetition penalty with vlmkit's own rules, per row (own options, own seeded generator).

    ``generate`` runs greedily; for a row that samples or penalises, every logit but the chosen token's is
    masked, so the argmax picks it. Plain greedy rows are left to the model's argmax untouched.
    """

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for r, row in enumerate(self.rows):
            if row.result is None and not row.plain:
                token = choose_token(scores[r].cpu(), row.options, row.seen, row.generator)
                scores[r].fill_(float("-inf"))
                scores[r, token] = 0.0
        return scores


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class HFEngine:
    """Batched generation for a transformers VLM, with :class:`vlmkit.inference.engine.Engine`'s interface.

    Generation is the model's own ``generate()`` (models such as Qwen2-VL need their own position scheme), with
    vlmkit's options, stop strings, streaming and results layered on through a logits processor and a stopping
    criterion. Checkpoint sampling defaults (``generation_config.json``) are not used: vlmkit's options decide.
    """

    def __init__(self, model: PreTrainedModel, processor: HFProcessor) -> None:
        self.model = model.eval()
        self.processor = processor
        text_config = model.config.get_text_config(decoder=True)
        self.context_length: int = int(getattr(text_config, "max_position_embeddings", 0) or 1 << 30)
        head = model.get_output_embeddings()
        self.vocab_size: int = head.weight.shape[0] if head is not None else int(text_config.vocab_size)
        tokenizer = processor.tokenizer
        self.stop_ids = set(_token_ids(model.generation_config.eos_token_id)) | set(_token_ids(tokenizer.eos_token_id))
        pad = model.generation_config.pad_token_id
        pad = pad if pad is not None else tokenizer.pad_token_id
        self.pad_token_id: int | None = pad if pad is not None else min(self.stop_ids, default=None)
        placeholders = [
            getattr(model.config, "image_token_id", None),
            getattr(processor.processor, "image_token_id", None),
        ]
        self.placeholder_ids = {int(t) for t in placeholders if isinstance(t, int)}

    # -- preparation -----------------------------------------------------------------------------------------
    def _rows(self, batch: BatchFeature, options: list[GenerationOptions]) -> list[_Row]:
        rows = []
        for index, (ids, mask, opts) in enumerate(
            zip(batch["input_ids"], batch["attention_mask"], options, strict=True)
        ):
            prompt = ids[mask.bool()]
            n = len(prompt)
            if n >= self.context_length:
                raise ProcessingError(
                    f"conversation {index}: the prompt has {n} tokens (images included) but the model's context is "
                    f"{self.context_length} tokens; shorten the conversation or use fewer or smaller images"
                )
            generator = None
            if not opts.greedy:
                generator = torch.Generator()
                generator.manual_seed(opts.seed if opts.seed is not None else int(torch.randint(0, 2**62, ())))
            seen = None
            if opts.repetition_penalty != 1.0:
                seen = torch.zeros(self.vocab_size, dtype=torch.bool)
                kept = [t for t in prompt.tolist() if t not in self.placeholder_ids and 0 <= t < self.vocab_size]
                seen[torch.tensor(kept, dtype=torch.long)] = True
            rows.append(
                _Row(
                    index=index,
                    options=opts,
                    prompt_tokens=n,
                    budget=min(opts.max_new_tokens, self.context_length - n),
                    detok=IncrementalDetokenizer(self.processor.tokenizer, opts.stop),
                    generator=generator,
                    seen=seen,
                )
            )
        return rows

    def _prepare(
        self, conversations: Sequence[Conversation], options: GenerationOptions | Sequence[GenerationOptions]
    ) -> tuple[BatchFeature, list[_Row]]:
        if isinstance(options, GenerationOptions):
            options = [options] * len(conversations)
        if len(options) != len(conversations):
            raise ProcessingError(f"{len(conversations)} conversations but {len(options)} option sets")
        normalised = [self.processor.conversation(c, name=f"conversation {i}") for i, c in enumerate(conversations)]
        batch = self.processor.prepare(normalised)
        return batch, self._rows(batch, list(options))

    # -- generation ------------------------------------------------------------------------------------------
    def _run(self, batch: BatchFeature, rows: list[_Row], tracker: _Batch) -> None:
        model = self.model
        inputs = batch.to(device=model.device, dtype=model.dtype)  # dtype applies to float tensors only
        extra = {"pad_token_id": self.pad_token_id} if self.pad_token_id is not None else {}
        with torch.inference_mode():
            model.generate(
                **inputs,
                **extra,
                do_sample=False,  # sampling, when asked for, is _ChooseTokens' job
                num_beams=1,
                repetition_penalty=1.0,
                max_new_tokens=max(row.budget for row in rows),
                logits_processor=[_ChooseTokens(rows)],
                stopping_criteria=[tracker],
            )

    def generate(
        self, conversations: Sequence[Conversation], options: GenerationOptions | Sequence[GenerationOptions]
    ) -> list[GenerationResult]:
        """Generate one answer per conversation, all in one batch."""
        if not conversations:
            return []
        batch, rows = self._prepare(conversations, options)
        self._run(batch, rows, _Batch(rows, self.stop_ids, lambda event: None))
        return [row.result for row in rows]  # type: ignore[misc]

    def stream_batch(
        self, conversations: Sequence[Conversation], options: GenerationOptions | Sequence[GenerationOptions]
    ) -> Iterator[StreamEvent]:
        """Generate for a batch, yielding text pieces as they are decoded (any order across requests).

        ``generate()`` runs in a worker thread that hands events over a queue; closing the iterator early stops
        generation after the current step and joins the thread.
        """
        if not conversations:
            return
        batch, rows = self._prepare(conversations, options)
        events: queue.Queue[Any] = queue.Queue()
        tracker = _Batch(rows, self.stop_ids, events.put)
        end = object()

        def work() -> None:
            try:
                self._run(batch, rows, tracker)
            except BaseException as exc:  # handed to the consuming thread, which raises it
                events.put(exc)
            finally:
                events.put(end)

        worker = threading.Thread(target=work, name="vlmkit-hf-generate", daemon=True)
        worker.start()
        try:
            while (item := events.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            tracker.cancel()
            worker.join()
