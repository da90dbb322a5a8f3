"""The processor: tokenizer + chat template + image transform → model-ready tensors, and batch collation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vlmkit.config import ViewsConfig, config_from_dict, config_to_dict
from vlmkit.errors import CheckpointError, ImageTokenMismatchError, ProcessingError
from vlmkit.processing.chat import (
    DEFAULT_TEMPLATE_TOKENS,
    IMAGE_TOKEN,
    ChatEncoder,
    ImageLayout,
    check_image_layout,
    place_images,
)
from vlmkit.processing.conversation import parse_conversation
from vlmkit.processing.images import (
    DEFAULT_MAX_PIXELS,
    ImageAccess,
    ImageTransform,
    ImageTransformConfig,
    describe_source,
    load_image,
)
from vlmkit.tokens import IGNORE_INDEX
from vlmkit.views import Geometry, build_views, views_to_dict

log = logging.getLogger(__name__)

PROCESSOR_FILE = "processor_config.json"


@dataclass
class EncodedSample:
    """One conversation ready for collation: ids with image placeholders expanded, labels, pixels."""

    input_ids: list[int]
    labels: list[int] | None
    pixel_values: torch.Tensor | None  # (num_images, 3, H, W)
    image_token_counts: list[int]
    image_order: list[int] | None = None
    """For each image run of ``input_ids``, the index of its image among those given (the processor's image
    layout may show an image again); None: the given order."""
    image_sizes: list[tuple[int, int]] | None = None
    """``(height, width)`` of the image of each run (what multi-view strategies lay the image out by)."""
    stop_ids: tuple[int, ...] = ()
    """End-of-turn ids of the chat template it was encoded with, when that is not the processor's own."""

    @property
    def num_images(self) -> int:
        return len(self.image_token_counts)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> list[str]:
    """Add ``<image>`` (and, with no chat template, ChatML markers and the default template) in place.

    Returns the tokens that were added; the LM's embeddings must then be resized to ``len(tokenizer)``.
    """
    from vlmkit.processing.chat import DEFAULT_CHAT_TEMPLATE

    wanted = [image_token]
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        wanted += list(DEFAULT_TEMPLATE_TOKENS)
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    for token in wanted:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ProcessingError(f"{token!r} must be a single token, but the tokenizer splits it into {ids}")
    return missing


class VLMProcessor:
    """Turns chat messages with images into ``input_ids``, ``labels``, ``attention_mask`` and ``pixel_values``.

    ``<image>`` markers become ``tokens_per_image`` placeholder ids each, so sequence positions line up with the
    image features the model splices in. ``image_layout`` says where image tokens go (see
    :func:`~vlmkit.processing.chat.place_images`): ``as_written``, or ``after_each_question`` (the built-in
    model's).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_config: ImageTransformConfig,
        tokens_per_image: int,
        image_token: str = IMAGE_TOKEN,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        image_layout: ImageLayout = "as_written",
        views: ViewsConfig | None = None,
    ) -> None:
        check_image_layout(image_layout, "image_layout")
        prepare_tokenizer(tokenizer, image_token)
        self.tokenizer = tokenizer
        self.chat = ChatEncoder(tokenizer, image_token=image_token)
        self.image_config = image_config
        self.image_transform = ImageTransform(image_config)
        self.tokens_per_image = tokens_per_image
        """Placeholder tokens of one view (of the whole image with the ``single`` views strategy)."""
        self.views_config = views or ViewsConfig()
        self.views = build_views(
            self.views_config, Geometry(image_config.size, tokens_per_image, tower_dim=0), self.image_transform
        )
        self.image_token = image_token
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(image_token))  # type: ignore[arg-type]
        self.max_pixels = max_pixels
        self.image_layout: ImageLayout = image_layout
        self.image_access = ImageAccess()  # where images may come from; a server narrows it
        self.max_image_tokens: int | None = None
        """Image tokens one conversation may hold (a server sets it; None: only the context bounds them)."""
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.stop_token_ids: list[int] = self.chat.end_of_turn_ids()

    # -- single conversations -------------------------------------------------------------------------------
    def load_images(self, sources: list[Any]) -> torch.Tensor | None:
        """Load and transform image sources into a ``(N, 3, size, size)`` tensor (None for no images).

        A source object that appears several times (an image shown again) is loaded once."""
        if not sources:
            return None
        loaded: dict[int, torch.Tensor] = {}
        for s in sources:
            if id(s) not in loaded:
                image = load_image(s, max_pixels=self.max_pixels, access=self.image_access)
                loaded[id(s)] = self.image_transform(image, describe_source(s))
        return torch.stack([loaded[id(s)] for s in sources])

    def load_views(self, sources: list[Any]) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
        """Every view of every source, ``(total views, 3, S, S)`` (None for no images), and each image's
        ``(height, width)``; a source object given several times is loaded once."""
        if not sources:
            return None, []
        images: dict[int, Any] = {}
        for s in sources:
            if id(s) not in images:
                images[id(s)] = load_image(s, max_pixels=self.max_pixels, access=self.image_access)
        sizes = [(images[id(s)].height, images[id(s)].width) for s in sources]
        self.check_image_budget(sizes)  # before any view is allocated
        views = {key: self.views.pixels(image, describe_source(image)) for key, image in images.items()}
        return torch.cat([views[id(s)] for s in sources]), sizes

    def check_image_budget(self, sizes: list[tuple[int, int]], name: str = "request") -> None:
        """Refuse images whose tokens together pass :attr:`max_image_tokens` (None: no budget)."""
        if self.max_image_tokens is None:
            return
        tokens = sum(self.views.num_tokens(size) for size in sizes)
        if tokens > self.max_image_tokens:
            raise ProcessingError(
                f"{name}: its {len(sizes)} image(s) make {tokens} image tokens ({self.views_config.name} views), "
                f"over the budget of {self.max_image_tokens}; send fewer images (a views strategy's own bound, "
                "max_tiles or max_crops, sets how many tokens one image makes)"
            )

    def image_sizes(self, sources: list[Any]) -> list[tuple[int, int]]:
        """Each source's ``(height, width)``, decoding it as :func:`load_image` does (orientation applied)."""
        sizes = []
        for s in sources:
            image = load_image(s, max_pixels=self.max_pixels, access=self.image_access)
            sizes.append((image.height, image.width))
        return sizes

    def encode(
        self,
        messages: list[dict[str, Any]],
        images: list[Any] | None = None,
        *,
        train: bool = False,
        name: str = "sample",
        max_length: int | None = None,
        pixels: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
    ) -> EncodedSample:
        """Encode one conversation. ``train=True`` also builds labels (assistant tokens only, -100 elsewhere).

        ``pixels=False`` leaves ``pixel_values`` None (the images are transformed later, e.g. per batch).
        ``continue_final_message``: the last (assistant) message is left open for the model to continue.
        ``chat_template``: a Jinja template instead of the tokenizer's (its end-of-turn ids go to ``stop_ids``)."""
        conversation = parse_conversation(messages, images, name=name, image_token=self.image_token)
        flat, given = conversation.to_strings(self.image_token)
        flat, order = place_images(flat, self.image_layout, self.image_token)
        sources = [given[i] for i in order]
        encoder = self.chat
        if chat_template is not None:
            if not isinstance(chat_template, str) or not chat_template.strip():
                raise ProcessingError(f"{name}: chat_template must be a Jinja template string")
            encoder = ChatEncoder(self.tokenizer, chat_template, image_token=self.image_token)
        chat = encoder.encode(flat, train=train, name=name, continue_final_message=continue_final_message)
        sizes: list[tuple[int, int]] | None
        if pixels:
            pixel_values, sizes = self.load_views(sources)
        else:  # transformed later (per batch); multi-view token counts still need each image's size
            pixel_values, sizes = None, None if self.views_config.name == "single" else self.image_sizes(sources)
        counts = (
            [self.views.num_tokens(size) for size in sizes]
            if sizes is not None
            else [self.tokens_per_image] * len(sources)
        )
        found = chat.input_ids.count(self.image_token_id)
        if found != len(counts):
            raise ImageTokenMismatchError(
                f"{name}: {len(counts)} image(s) but {found} {self.image_token} token(s) after templating; "
                "the chat template must keep each marker"
            )
        ids: list[int] = []
        supervised: list[bool] = []
        image_index = 0
        for token, sup in zip(chat.input_ids, chat.supervised, strict=True):
            if token == self.image_token_id:
                ids += [token] * counts[image_index]
                supervised += [False] * counts[image_index]
                image_index += 1
            else:
                ids.append(token)
                supervised.append(sup)
        if max_length is not None and len(ids) > max_length:
            raise ProcessingError(f"{name}: {len(ids)} tokens (images included) is over the limit of {max_length}")
        labels = [t if s else IGNORE_INDEX for t, s in zip(ids, supervised, strict=True)] if train else None
        stops = tuple(encoder.end_of_turn_ids()) if chat_template is not None else ()
        return EncodedSample(ids, labels, pixel_values, counts, order, sizes, stops)

    # -- batches --------------------------------------------------------------------------------------------
    def collate(
        self, samples: list[EncodedSample], padding_side: Literal["left", "right"] = "right"
    ) -> dict[str, torch.Tensor]:
        """Pad a list of encoded samples into a batch (right padding for training, left for generation).

        ``pixel_values`` holds every view of every image of the batch in row order; ``image_counts`` the images
        per row; ``image_sizes`` each image's ``(height, width)`` (when the samples have them).
        """
        if not samples:
            raise ProcessingError("cannot collate an empty batch")
        width = max(len(s.input_ids) for s in samples)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(samples), width), dtype=torch.long)
        has_labels = all(s.labels is not None for s in samples)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
            input_ids[row, cols] = torch.tensor(sample.input_ids, dtype=torch.long)
            attention[row, cols] = 1
            if labels is not None:
                labels[row, cols] = torch.tensor(sample.labels, dtype=torch.long)
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention}
        if labels is not None:
            batch["labels"] = labels
        pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        batch["image_counts"] = torch.tensor([s.num_images for s in samples], dtype=torch.long)
        if pixels and all(s.image_sizes is not None for s in samples if s.num_images):
            sizes = [size for s in samples for size in s.image_sizes or []]
            batch["image_sizes"] = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
        return batch

    def __call__(
        self,
        conversations: list[list[dict[str, Any]]],
        images: list[list[Any] | None] | None = None,
        *,
        train: bool = False,
        padding_side: Literal["left", "right"] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode and collate a batch of conversations (right-padded for training, left-padded otherwise)."""
        images = images or [None] * len(conversations)
        encoded = [
            self.encode(conv, imgs, train=train, name=f"conversation {i}")
            for i, (conv, imgs) in enumerate(zip(conversations, images, strict=True))
        ]
        return self.collate(encoded, padding_side or ("right" if train else "left"))

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    # -- persistence ----------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Write tokenizer files (chat template included) and ``processor_config.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        data = {
            "image": config_to_dict(self.image_config),
            "tokens_per_image": self.tokens_per_image,
            "image_token": self.image_token,
            "max_pixels": self.max_pixels,
            "image_layout": self.image_layout,
            "views": views_to_dict(self.views_config),
        }
        (folder / PROCESSOR_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> VLMProcessor:
        path = Path(folder) / PROCESSOR_FILE
        if not path.is_file():
            raise CheckpointError(f"{folder}: no {PROCESSOR_FILE}; is this a vlmkit checkpoint folder?")
        data = json.loads(path.read_text())
        image = data["image"]
        image["mean"], image["std"] = tuple(image["mean"]), tuple(image["std"])
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(
            tokenizer,
            config_from_dict(ImageTransformConfig, image, "image."),
            data["tokens_per_image"],
            data.get("image_token", IMAGE_TOKEN),
            data.get("max_pixels", DEFAULT_MAX_PIXELS),
            data.get("image_layout", "as_written"),
            config_from_dict(ViewsConfig, data.get("views", {}), "views."),
        )
