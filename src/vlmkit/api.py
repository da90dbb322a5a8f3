"""The Python API: ``vlmkit.load(...)`` gives a :class:`VLM` that chats, streams and generates in batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.inference.engine import Conversation, Engine
from vlmkit.inference.options import GenerationOptions, GenerationResult
from vlmkit.models.compose import load_pretrained
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.images import ImageAccess
from vlmkit.processing.processor import VLMProcessor

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
DEVICES = ("auto", "cpu", "cuda", "mps")
BUILTIN_DIR = Path(__file__).parent / "assets" / "default"


def _tiny_random() -> tuple[VisionLanguageModel, VLMProcessor]:
    from vlmkit.models.tiny import tiny_random_vlm

    return tiny_random_vlm()


def _builtin_default() -> tuple[VisionLanguageModel, VLMProcessor]:
    if not (BUILTIN_DIR / "config.json").is_file():
        raise CheckpointError(
            "the built-in 'default' model is not shipped in this version yet; pass a vlmkit checkpoint folder, or "
            "'tiny-random' for a tiny untrained model that shows the pipeline"
        )
    return load_pretrained(BUILTIN_DIR)


# Exact names of models that need no download.
BUILTIN_MODELS: dict[str, Callable[[], tuple[VisionLanguageModel, VLMProcessor]]] = {
    "default": _builtin_default,
    "tiny-random": _tiny_random,
}
NOTICES = {
    "default": "vlmkit's built-in 'default' is a small demo model trained only on synthetic shapes (ShapesWorld); "
    "for photos, pass --model with a real checkpoint.",
    "tiny-random": "'tiny-random' is an UNTRAINED model: its text is random; it only shows the pipeline.",
}


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda, then mps, then cpu; anything else must be available."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; valid: {', '.join(DEVICES)} (or cuda:N)")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' asked for, but MPS is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on CUDA with bf16 support, fp16 on other accelerators, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _load_parts(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """``(model, processor, engine)``; the engine is None except for models that bring their own."""
    if name in BUILTIN_MODELS:
        return (*BUILTIN_MODELS[name](), None)
    path = Path(name).expanduser()
    if not path.exists():
        if name.count("/") != 1 or name.startswith((".", "/", "~")):
            raise CheckpointError(
                f"unknown model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), not an existing folder, "
                "and not a hub id (owner/name)"
            )
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name))
        except Exception as exc:  # hub errors are many types; all mean "couldn't get it"
            raise CheckpointError(f"model {name!r}: not a local folder and the hub download failed ({exc})") from exc
    if not (path / "config.json").is_file():
        raise CheckpointError(f"model folder {path} has no config.json")
    from vlmkit.interop.hf_backend import is_transformers_vlm, load_transformers_vlm
    from vlmkit.interop.hf_llava import is_hf_llava, load_hf_llava

    if is_hf_llava(path):
        return (*load_hf_llava(path), None)
    if is_transformers_vlm(path):
        return load_transformers_vlm(path, device, dtype)
    return (*load_pretrained(path), None)


class VLM:
    """A loaded model with its processor and engine: the object the API, CLI and server all use."""

    def __init__(self, model: Any, processor: Any, name: str = "", engine: Any = None) -> None:
        """``model`` and ``processor`` are vlmkit's own unless ``engine`` (e.g. an ``HFEngine``) runs them."""
        self.model = model
        self.processor = processor
        self.name = name
        self.engine = engine if engine is not None else Engine(model, processor)

    @property
    def notice(self) -> str | None:
        """A one-time message the CLI shows for demo models (None for real checkpoints)."""
        return NOTICES.get(self.name)

    @staticmethod
    def _conversation(messages: str | Conversation, images: Sequence[Any] | None) -> Conversation:
        if isinstance(messages, str):
            parts: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images or []]
            return [{"role": "user", "content": [*parts, {"type": "text", "text": messages}]}]
        if images:
            raise ConfigError("give images inside the messages' content parts, or pass a string prompt with images")
        return messages

    def generate_batch(self, conversations: Sequence[Conversation], **options: Any) -> list[GenerationResult]:
        """One :class:`GenerationResult` per conversation, generated together in one batch."""
        return self.engine.generate(list(conversations), GenerationOptions.from_kwargs(**options))

    def chat(self, messages: str | Conversation, images: Sequence[Any] | None = None, **options: Any) -> str:
        """The assistant's reply to a conversation (or to a string prompt with optional images)."""
        return self.generate_batch([self._conversation(messages, images)], **options)[0].text

    def stream(
        self, messages: str | Conversation, images: Sequence[Any] | None = None, **options: Any
    ) -> Iterator[str]:
        """The reply as text pieces, yielded as they are decoded; they concatenate to :meth:`chat`'s text."""
        conversation = self._conversation(messages, images)
        for event in self.engine.stream_batch([conversation], GenerationOptions.from_kwargs(**options)):
            if event.text:
                yield event.text


def load(
    model: str = "default",
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    allow_remote_images: bool = False,
) -> VLM:
    """Load ``"default"``, ``"tiny-random"``, a local vlmkit checkpoint folder or a hub id.

    Images in conversations may be paths, bytes, PIL images or data URLs; http(s) URLs only with
    ``allow_remote_images=True``.
    """
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    vlm_model, processor, engine = _load_parts(str(model), target, torch_dtype)
    if engine is None:  # transformers VLMs are loaded on the device, in the dtype
        vlm_model.to(device=target, dtype=torch_dtype).eval()
    processor.image_access = ImageAccess(allow_remote=allow_remote_images)
    return VLM(vlm_model, processor, name=str(model), engine=engine)
