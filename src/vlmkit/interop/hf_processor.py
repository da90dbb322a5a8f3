"""vlmkit's view of a transformers processor: messages in every form vlmkit accepts → the model's inputs.

Images are loaded by :func:`vlmkit.processing.images.load_image` (same access policy, size limit and errors);
the model's processor gets PIL images only, so it never reads files or URLs itself.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import BatchFeature

from vlmkit.errors import CheckpointError, ProcessingError
from vlmkit.processing.conversation import parse_conversation
from vlmkit.processing.images import DEFAULT_MAX_PIXELS, ImageAccess

log = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]


def _images_only(cls: type) -> type:
    """``cls`` without its video processor: transformers' video processors need torchvision, images don't."""
    attributes = [name for name in cls.get_attributes() if "video" not in name]  # type: ignore[attr-defined]
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
            log.info("torchvision is not installed: loading %s without its video processor", cls.__name__)
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
    if not processor.chat_template:
        raise CheckpointError(
            f"{name_or_path}: the processor has no chat template (chat_template.jinja), so vlmkit can't turn "
            "messages into prompts for it; use the chat/instruct version of the model"
        )
    return processor


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
        self.max_image_tokens: int | None = None
        """Image tokens one conversation may hold (checked by the engine after the model's processor ran)."""

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @functools.cached_property
    def control_tokens(self) -> list[str]:
        """The tokenizer's special tokens (turn markers, image placeholders, EOS, ...)."""
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {})
        return sorted({t.content for t in decoder.values() if t.special})

    def _plain(self, text: str, where: str) -> str:
        """Refuse message text holding special-token strings: transformers' processors tokenize the rendered
        prompt as one string, so such text would become control tokens (a user could forge turns)."""
        for token in self.control_tokens:
            if token in text:
                raise ProcessingError(
                    f"{where}: the text contains the model's special token {token!r}, which this backend can't "
                    "keep as plain text; remove it"
                )
        return text

    def conversation(self, messages: Conversation, name: str = "conversation") -> list[dict[str, Any]]:
        """``messages`` (any form :func:`parse_conversation` reads) in transformers' content-parts form, every
        image loaded as an RGB PIL image; text with special-token strings is refused."""
        return parse_conversation(messages, name=name).to_transformers(
            max_pixels=self.max_pixels, access=self.image_access, check_text=self._plain, name=name
        )

    def prepare(
        self,
        conversations: Sequence[list[dict[str, Any]]],
        *,
        chat_template: str | None = None,
        continue_final_message: bool = False,
    ) -> BatchFeature:
        """Normalised conversations → one left-padded batch of model inputs, via the model's chat template (or
        ``chat_template``); ``continue_final_message`` leaves the last (assistant) message open."""
        try:
            return self.processor.apply_chat_template(
                list(conversations),
                chat_template=chat_template,
                add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"padding": True, "padding_side": "left"},
            )
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise ProcessingError(f"the model's processor could not turn the conversations into inputs: {exc}") from exc
