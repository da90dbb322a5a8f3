"""``vlmkit.pipeline("image-text-to-text", model=...)``: transformers' pipeline call over any vlmkit model.

A transformers user's code runs as written::

    pipe = vlmkit.pipeline("image-text-to-text", model="out/openvino")
    pipe.generation_config.max_new_tokens = None        # let max_length decide, as in transformers
    pipe(text=messages, generate_kwargs={"max_length": 512, "repetition_penalty": 1.1,
                                         "streamer": TextStreamer(tokenizer=pipe.tokenizer, skip_prompt=False)})
    pipe.model.dispose()

The answer is :meth:`vlmkit.api.VLM.chat`'s (the same engine, options and template); the output is transformers'
structure. Generation settings resolve as transformers resolves them: ``pipe.generation_config``, then
``generate_kwargs``, then ``max_new_tokens=``; ``max_new_tokens`` wins over ``max_length`` (prompt + new tokens);
``temperature``, ``top_p`` and ``top_k`` apply only with ``do_sample=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from vlmkit.errors import ConfigError

log = logging.getLogger(__name__)

TASKS = ("image-text-to-text",)
DEFAULT_MAX_LENGTH = 20
"""transformers' ``max_length`` when neither it nor ``max_new_tokens`` is set."""
DEFAULT_TOP_K = 50
"""transformers' ``top_k`` when sampling and none is set."""
GENERATE_KWARGS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_p", "top_k",
                   "repetition_penalty", "num_return_sequences", "stop_strings", "streamer", "seed", "pad_token_id",
                   "use_cache", "num_beams")  # fmt: skip
"""What ``generate_kwargs`` may hold (``seed`` is vlmkit's; ``pad_token_id`` and ``use_cache`` change nothing)."""


class PipelineModel:
    """``pipe.model``: the loaded :class:`~vlmkit.api.VLM`'s attributes, and ``dispose()`` to free it."""

    def __init__(self, vlm: Any) -> None:
        self.vlm = vlm

    def dispose(self) -> None:
        """Free the model, its runtime and caches (:meth:`vlmkit.api.VLM.close`)."""
        self.vlm.close()

    close = dispose

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["vlm"], name)


def _is_chat(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and isinstance(value[0], Mapping)


def _is_chats(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(_is_chat(v) for v in value)


class ImageTextToTextPipeline:
    """transformers' ``ImageTextToTextPipeline`` call over a vlmkit model (see the module docstring)."""

    task = "image-text-to-text"

    def __init__(self, vlm: Any) -> None:
        from transformers import GenerationConfig

        self.vlm = vlm
        self.model = PipelineModel(vlm)
        self.processor = vlm.processor
        self.tokenizer = vlm.processor.tokenizer
        self.generation_config = GenerationConfig(max_new_tokens=256)
        """transformers' pipeline default (256 new tokens); set ``max_new_tokens = None`` to let ``max_length``
        decide."""

    # -- inputs ---------------------------------------------------------------------------------------------
    def _inputs(self, images: Any, text: Any) -> tuple[list[Any], bool]:
        """(conversations or prompt strings with their images, whether it was a batch)."""
        from vlmkit.processing.conversation import prompt_conversation

        if text is None and (_is_chat(images) or _is_chats(images)):  # pipe(messages)
            images, text = None, images
        if text is None:
            raise ConfigError("give text: a prompt string, a conversation (list of messages) or a list of them")
        if _is_chat(text) or _is_chats(text):
            if images is not None:
                raise ConfigError(
                    "images go inside the messages' content ({'type': 'image', 'image': ...}) when text is a chat"
                )
            return ([list(c) for c in text], True) if _is_chats(text) else ([list(text)], False)
        if isinstance(text, str):
            given = [] if images is None else list(images) if isinstance(images, list | tuple) else [images]
            return [(text, prompt_conversation(text, given).to_messages())], False
        if isinstance(text, list | tuple) and all(isinstance(t, str) for t in text):
            per = [None] * len(text) if images is None else list(images)
            if len(per) != len(text):
                raise ConfigError(f"{len(text)} prompts but {len(per)} images (give one image, or list, per prompt)")
            rows = []
            for t, i in zip(text, per, strict=True):
                given = [] if i is None else list(i) if isinstance(i, list | tuple) else [i]
                rows.append((t, prompt_conversation(t, given).to_messages()))
            return rows, True
        raise ConfigError(f"text must be a string, a chat or a list of them, got {type(text).__name__}")

    # -- options --------------------------------------------------------------------------------------------
    def _settings(self, generate_kwargs: Mapping[str, Any] | None, max_new_tokens: int | None) -> dict[str, Any]:
        if generate_kwargs is not None and not isinstance(generate_kwargs, Mapping):
            raise ConfigError(f"generate_kwargs must be a dict, got {type(generate_kwargs).__name__}")
        extra = dict(generate_kwargs or {})
        unknown = sorted(set(extra) - set(GENERATE_KWARGS))
        if unknown:
            supported = ", ".join(GENERATE_KWARGS)
            raise ConfigError(f"generate_kwargs: unsupported {', '.join(unknown)}; vlmkit's pipeline takes {supported}")
        if max_new_tokens is not None:
            if "max_new_tokens" in extra:
                raise ConfigError(
                    "'max_new_tokens' is defined twice, once in 'generate_kwargs' and once as a direct parameter; "
                    "use only one"
                )
            extra["max_new_tokens"] = max_new_tokens
        config = self.generation_config
        names = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                 "num_return_sequences", "stop_strings", "num_beams")  # fmt: skip
        settings = {name: getattr(config, name, None) for name in names}
        settings.update(extra)
        return settings

    def _options(self, settings: dict[str, Any]) -> Any:
        from vlmkit.inference.options import GenerationOptions

        if (settings.get("num_beams") or 1) != 1:
            raise ConfigError("num_beams > 1 (beam search) is not supported; vlmkit decodes greedily or samples")
        kwargs: dict[str, Any] = {}
        max_new, max_length = settings.get("max_new_tokens"), settings.get("max_length")
        if max_new is not None:
            if max_length is not None:
                log.info("max_new_tokens (=%s) and max_length (=%s) are both set: max_new_tokens wins", max_new,
                         max_length)  # fmt: skip
            kwargs["max_new_tokens"] = max_new
        else:
            kwargs["max_length"] = max_length if max_length is not None else DEFAULT_MAX_LENGTH
        if settings.get("do_sample"):
            kwargs["temperature"] = settings.get("temperature") if settings.get("temperature") is not None else 1.0
            kwargs["top_p"] = settings.get("top_p") if settings.get("top_p") is not None else 1.0
            kwargs["top_k"] = settings.get("top_k") if settings.get("top_k") is not None else DEFAULT_TOP_K
        else:
            ignored = [n for n in ("temperature", "top_p", "top_k") if settings.get(n) is not None]
            if ignored:
                log.warning("do_sample is not set: %s only apply when sampling (do_sample=True); decoding greedily",
                            ", ".join(ignored))  # fmt: skip
        if settings.get("repetition_penalty") is not None:
            kwargs["repetition_penalty"] = settings["repetition_penalty"]
        if settings.get("num_return_sequences") is not None:
            kwargs["n"] = settings["num_return_sequences"]
        stop = settings.get("stop_strings")
        if stop:
            kwargs["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        if settings.get("seed") is not None:
            kwargs["seed"] = settings["seed"]
        return GenerationOptions(**kwargs)

    # -- the call -------------------------------------------------------------------------------------------
    def __call__(
        self,
        images: Any = None,
        text: Any = None,
        *,
        max_new_tokens: int | None = None,
        generate_kwargs: Mapping[str, Any] | None = None,
        return_full_text: bool | None = None,
        continue_final_message: bool | None = None,
        stop_sequence: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """transformers' output: one list of ``{"input_text", "generated_text"}`` dicts per input (``n`` of them
        with ``num_return_sequences``); the list itself for one input, a list of those lists for a batch.
        ``generated_text`` is the conversation with the new assistant message (``return_full_text=False``: the
        new text only); for a prompt string, the prompt followed by the answer."""
        if kwargs:
            raise ConfigError(
                f"unsupported pipeline argument(s) {', '.join(sorted(kwargs))}; vlmkit's pipeline takes images, text, "
                "max_new_tokens, generate_kwargs, return_full_text, continue_final_message, stop_sequence"
            )
        settings = self._settings(generate_kwargs, max_new_tokens)
        streamer = settings.pop("streamer", None)
        if stop_sequence is not None:
            settings["stop_strings"] = stop_sequence
        options = self._options(settings)
        inputs, batched = self._inputs(images, text)
        prompts = []
        for i, item in enumerate(inputs):
            conversation = item[1] if isinstance(item, tuple) else item
            cont = continue_final_message
            if cont is None:
                last = conversation[-1]
                cont = isinstance(last, Mapping) and last.get("role") == "assistant"
            encoding = {"continue_final_message": True} if cont else {}
            prompts.append((item, cont, self.vlm.engine.encode(conversation, f"input {i}", **encoding)))
        if streamer is not None:
            if len(prompts) != 1 or options.n != 1:
                raise ConfigError("a streamer takes one answer at a time (batch size 1, num_return_sequences 1)")
            results = [[self._streamed(prompts[0][2], options, streamer)]]
        else:
            flat = self.vlm.engine.generate([p for _, _, p in prompts], options)
            results = [flat[i * options.n : (i + 1) * options.n] for i in range(len(prompts))]
        full = True if return_full_text is None else bool(return_full_text)
        out = [
            [self._record(item, cont, result.text, full) for result in answers]
            for (item, cont, _), answers in zip(prompts, results, strict=True)
        ]
        return out if batched else out[0]

    def _streamed(self, prompt: Any, options: Any, streamer: Any) -> Any:
        """Generate one answer through the running batch, putting token ids to ``streamer`` as transformers'
        ``generate`` does: the prompt's ids first (``(1, L)``), then each new token (``(1,)``), then ``end()``.

        New tokens are read from the batch's rows as they are chosen (backends whose running batch has
        ``rows``: native and OpenVINO); other backends put them when the answer ends. The end-of-turn token
        that stops an answer is not put (vlmkit's answers never hold it)."""
        import torch

        streamer.put(torch.tensor([prompt.input_ids], dtype=torch.long))
        batch = self.vlm.engine.new_batch()
        sent = 0
        result = None

        def put(ids: list[int]) -> None:
            nonlocal sent
            for token in ids[sent:]:
                streamer.put(torch.tensor([token], dtype=torch.long))
            sent = max(sent, len(ids))

        try:
            events = batch.add([(0, prompt, options)])
            while True:
                for event in events:
                    if event.error is not None:
                        raise event.error
                    if event.result is not None:
                        result = event.result
                if result is not None:
                    put(result.token_ids)
                    break
                for row in getattr(batch, "rows", []):
                    if row.key == 0:
                        put(list(row.detok.ids))
                if not len(batch):
                    raise ConfigError("the answer ended without a result")
                events = batch.step()
        finally:
            streamer.end()
        return result

    @staticmethod
    def _record(item: Any, cont: bool, text: str, full: bool) -> dict[str, Any]:
        if isinstance(item, tuple):  # a prompt string
            prompt = item[0]
            return {"input_text": prompt, "generated_text": prompt + text if full else text}
        if not full:
            return {"input_text": item, "generated_text": text}
        if cont:
            last = dict(item[-1])
            content = last.get("content")
            if isinstance(content, str):
                last["content"] = content + text
            else:
                parts = list(content or [])
                tail = dict(parts[-1]) if parts else {"type": "text", "text": ""}
                tail["text"] = tail.get("text", "") + text
                last["content"] = [*parts[:-1], tail]
            return {"input_text": item, "generated_text": [*item[:-1], last]}
        return {"input_text": item, "generated_text": [*item, {"role": "assistant", "content": text}]}


def pipeline(
    task: str = "image-text-to-text",
    model: Any = "default",
    *,
    processor: Any = None,
    device: str = "auto",
    dtype: str = "auto",
    allow_remote_images: bool = False,
) -> ImageTextToTextPipeline:
    """An ``image-text-to-text`` pipeline over ``model``: a name :func:`vlmkit.load` takes (``default``, a folder
    — an OpenVINO export included — or a hub id) or a loaded :class:`~vlmkit.api.VLM`. vlmkit models carry their
    processor, so ``processor`` may only be that one (or None). Image URLs need ``allow_remote_images=True``."""
    from vlmkit.api import VLM, load

    if task not in TASKS:
        raise ConfigError(f"unknown pipeline task {task!r}; vlmkit has: {', '.join(TASKS)}")
    if isinstance(model, VLM):
        vlm = model
    elif isinstance(model, str):
        vlm = load(model, device=device, dtype=dtype, allow_remote_images=allow_remote_images)
    else:
        raise ConfigError(f"model must be a model name or folder, or a vlmkit.VLM; got {type(model).__name__}")
    if processor is not None and processor is not vlm.processor:
        raise ConfigError("vlmkit models carry their own processor; leave processor unset")
    return ImageTextToTextPipeline(vlm)
