"""An lmms-eval model plugin: ``lmms-eval --model vlmkit --model_args model=NAME_OR_FOLDER --tasks ...`` runs any
model vlmkit loads (built-in names, vlmkit checkpoints, transformers VLMs) on an lmms-eval task.

lmms-eval (tested: 0.7.3) finds it through the ``lmms_eval.models`` entry point (``pyproject.toml``:
:func:`manifest`, read by ``lmms_eval.models.registry_v2``), and through
``lmms_eval.api.registry.register_model("vlmkit")`` once this module is imported. It implements lmms-eval's simple
model interface (``lmms_eval.api.model.lmms``): ``generate_until`` (batched through vlmkit's engine, requests
grouped by their generation kwargs; token counts reported) and ``loglikelihood`` (vlmkit-native models). lmms-eval
is an optional dependency: without it, importing this module works and building the model says how to install it.

``model_args``: ``model`` (default ``default``), ``device``, ``dtype``, ``max_new_tokens`` (128, when a task gives
none), ``allow_remote_images``; the batch size is lmms-eval's ``--batch_size`` (an integer).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import torch

from vlmkit.errors import ConfigError, VlmkitError

try:  # optional: lmms-eval's declared dependencies would replace torch, so vlmkit does not depend on it
    from lmms_eval.api.instance import GenerationResult as _Result
    from lmms_eval.api.instance import TokenCounts as _TokenCounts
    from lmms_eval.api.model import lmms as _Base
    from lmms_eval.api.registry import register_model as _register_model
except ImportError:  # pragma: no cover - exercised when lmms-eval is absent
    _Base = object
    _register_model = None

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
"""lmms-eval's ``DEFAULT_IMAGE_TOKEN``: some task contexts write it; vlmkit places the images itself."""

GEN_KWARGS = {"until", "max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "num_beams",
              "repetition_penalty"}  # fmt: skip
"""The lmms-eval ``generation_kwargs`` the plugin applies; any other is refused by name."""

LMMS_EVAL_VERSION = "0.7.3"
"""The lmms-eval release the plugin is tested with (installed without its declared dependencies, which would
replace vlmkit's torch)."""

MODEL_ARGS = ("model", "device", "dtype", "batch_size", "max_new_tokens", "allow_remote_images")


def manifest() -> Any:
    """lmms-eval's ``ModelManifest`` for ``--model vlmkit`` (the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlmkit", simple_class_path="vlmkit.interop.lmms_eval.VlmkitLMM")


def generation_options(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> dict[str, Any]:
    """lmms-eval's generation kwargs → vlmkit's options, with transformers' meaning (``do_sample`` false or
    ``temperature`` 0: greedy; ``until``: stop strings; ``num_beams`` must be 1)."""
    unknown = sorted(set(gen_kwargs) - GEN_KWARGS)
    if unknown:
        raise ConfigError(f"lmms-eval generation kwargs {', '.join(unknown)} are not supported by vlmkit's plugin")
    if gen_kwargs.get("num_beams") not in (None, 1):
        raise ConfigError(f"num_beams={gen_kwargs['num_beams']}: vlmkit decodes greedily or by sampling, not beams")
    until = gen_kwargs.get("until") or []
    stop = [until] if isinstance(until, str) else [s for s in until if s]
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    sample = bool(gen_kwargs.get("do_sample")) and temperature > 0
    options: dict[str, Any] = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
        "stop": stop,
        "temperature": temperature if sample else 0.0,
    }
    if sample:
        for key in ("top_p", "top_k"):
            if gen_kwargs.get(key) is not None:
                options[key] = gen_kwargs[key]
    if gen_kwargs.get("repetition_penalty") is not None:
        options["repetition_penalty"] = float(gen_kwargs["repetition_penalty"])
    return options


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ConfigError(f"{name}={value!r}: vlmkit's lmms-eval plugin needs a positive integer")
    return number


class VlmkitLMM(_Base):
    """vlmkit behind lmms-eval's ``lmms`` interface."""

    def __init__(
        self,
        model: str = "default",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_new_tokens: int | str = 128,
        allow_remote_images: bool = False,
        **unused: Any,
    ) -> None:
        if _register_model is None:
            raise ConfigError(
                "the vlmkit lmms-eval plugin needs lmms-eval: pip install 'vlmkit[lmms-eval]' && "
                f"pip install --no-deps lmms-eval=={LMMS_EVAL_VERSION} (docs/evaluation.md)"
            )
        if unused:
            raise ConfigError(f"unknown vlmkit model_args {', '.join(sorted(unused))}; valid: {', '.join(MODEL_ARGS)}")
        super().__init__()
        import vlmkit

        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.vlm = vlmkit.load(str(model), device=device, dtype=dtype, allow_remote_images=bool(allow_remote_images))

    # -- requests ------------------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _conversation(self, context: str, doc_to_visual: Any, doc: Any) -> list[dict[str, Any]]:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if any(isinstance(v, str | dict) for v in visuals):
            raise ConfigError("video and audio inputs are not supported by vlmkit's lmms-eval plugin (images only)")
        text = context.replace(IMAGE_MARKER, "").strip() if IMAGE_MARKER in context else context
        parts = [{"type": "image", "image": v} for v in visuals] + [{"type": "text", "text": text}]
        return [{"role": "user", "content": parts}]

    def _generate(self, conversations: list[Any], options: dict[str, Any], where: list[str]) -> list[Any]:
        """vlmkit's results for one batch; when a request fails (a bad image, a prompt too long), the others are
        answered alone and it gets None (logged)."""
        try:
            return list(self.vlm.generate_batch(conversations, **options))
        except ConfigError:
            raise
        except VlmkitError:
            if len(conversations) == 1:
                raise
        results: list[Any] = []
        for conversation, name in zip(conversations, where, strict=True):
            try:
                results.append(self.vlm.generate_batch([conversation], **options)[0])
            except ConfigError:
                raise
            except VlmkitError as exc:
                logger.warning("lmms-eval request %s failed, answered with an empty string: %s", name, exc)
                results.append(None)
        return results

    def generate_until(self, requests: Sequence[Any]) -> list[Any]:
        """Answers in request order (lmms-eval ``GenerationResult``: text and token counts; an empty text for a
        request that failed); requests with the same generation kwargs are decoded in batches."""
        answers: list[Any] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            options = generation_options(dict(requests[indices[0]].args[1]), self.max_new_tokens)
            for lo in range(0, len(indices), self.batch_size):
                chunk = indices[lo : lo + self.batch_size]
                conversations, where = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    conversations.append(self._conversation(context, doc_to_visual, self._doc(task, split, doc_id)))
                    where.append(f"{task}/{split}/{doc_id}")
                for i, result in zip(chunk, self._generate(conversations, options, where), strict=True):
                    if result is None:
                        answers[i] = _Result(text="")
                        continue
                    counts = _TokenCounts(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens)
                    answers[i] = _Result(text=result.text, token_counts=counts)
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]),
                                                result.text)  # fmt: skip
        return answers

    def loglikelihood(self, requests: Sequence[Any]) -> list[Any]:
        """``(loss, is_greedy)`` per request, lmms-eval's convention (not lm-evaluation-harness's log-likelihood):
        the mean negative log-probability of the continuation's tokens after the prompt (the chat template with its
        generation prompt; end of turn not included), as lmms-eval's own models return it (``llava_hf``:
        ``float(loss.item())``) and its ``multiple_choice`` scoring expects (``api/task.py``: ``np.argmin``); and
        whether greedy decoding would produce those tokens. The continuation's leading whitespace (lmms-eval's
        ``target_delimiter``, which joins context and continuation in plain text) is dropped: here the generation
        prompt separates them. vlmkit-native models only.

        Each pair is wrapped in lmms-eval's ``GenerationResult``: lmms-eval 0.7.3's evaluator keeps a str or a
        ``GenerationResult``'s ``text`` as it is and turns any other output into its ``str()``
        (``api/instance.py`` ``unwrap_generation_output``), which leaves the tasks a string ``"(1.2, False)"``.
        """
        from vlmkit.inference.engine import Engine

        engine = self.vlm.engine
        if not isinstance(engine, Engine):
            raise ConfigError("loglikelihood needs a vlmkit-native model; this one runs on the transformers backend")
        out = []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            conversation = self._conversation(context, doc_to_visual, doc)
            pair = self._loglikelihood(engine, conversation, str(continuation).lstrip())
            self.cache_hook.add_partial("loglikelihood", (context, continuation), pair)
            out.append(_Result(text=pair))
        return out

    @staticmethod
    @torch.inference_mode()
    def _loglikelihood(engine: Any, conversation: list[dict[str, Any]], continuation: str) -> tuple[float, bool]:
        prompt = engine.encode(conversation, "request")
        tokens = engine.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not tokens:
            return 0.0, True
        ids = torch.tensor([prompt.input_ids + tokens], device=engine.model.device)
        sizes = torch.tensor(prompt.image_sizes).reshape(-1, 2) if prompt.image_sizes else None
        pixels = prompt.pixel_values.to(engine.model.device) if prompt.pixel_values is not None else None
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                              image_sizes=sizes).logits[0, len(prompt.input_ids) - 1 : -1].float()  # fmt: skip
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(tokens, device=logprobs.device)
        loss = -float(logprobs.gather(-1, target[:, None]).mean())
        return loss, bool((logprobs.argmax(-1) == target).all())

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise ConfigError("vlmkit's lmms-eval plugin does not run multi-round tasks")


if _register_model is not None:
    _register_model("vlmkit")(VlmkitLMM)
