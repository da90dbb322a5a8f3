"""Chat messages → rendered template → token ids, with per-token supervision masks.

The assistant spans come from the template's own rendering: the conversation is rendered up to each assistant
turn (with the generation prompt) and through it; the character offsets between the two renderings are the
assistant span, and tokens are supervised when their offsets fall inside a span. No string splitting on role
markers, so any Jinja template works as long as rendering a prefix of the conversation gives a prefix of the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from transformers import PreTrainedTokenizerBase

from vlmkit.errors import ProcessingError
from vlmkit.tokens import IMAGE_TOKEN

# ChatML, used when the tokenizer has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>")

ImageLayout = Literal["as_written", "after_each_question"]
"""Where a processor puts the image tokens of a conversation (see :func:`place_images`)."""
IMAGE_LAYOUTS: tuple[str, ...] = get_args(ImageLayout)


def check_image_layout(layout: str, name: str = "image layout") -> None:
    """Raise ProcessingError naming ``name`` unless ``layout`` is one of :data:`IMAGE_LAYOUTS`."""
    if layout not in IMAGE_LAYOUTS:
        raise ProcessingError(f"unknown {name} {layout!r}; valid layouts: {', '.join(IMAGE_LAYOUTS)}")


def place_images(
    messages: list[dict[str, str]], layout: ImageLayout, image_token: str = IMAGE_TOKEN
) -> tuple[list[dict[str, str]], list[int]]:
    """Move the ``<image>`` markers of string messages to where the model's ``layout`` wants them.

    ``as_written`` keeps them where they are. ``after_each_question``: every user turn is its text first, then
    its images; a user turn without images shows the images of the latest user turn that had some again, so
    each question is followed by the image it is about. (A small model learns to bind a question's words to
    the right image token far faster when the image tokens can attend to the question: docs/default-model.md.)
    The text of a user turn is its pieces between markers, stripped, joined by newlines; other roles keep
    their markers in place. Returns the new messages and, for each marker in the new order, the index of its
    image in the original order (repeats for images shown again).
    """
    check_image_layout(layout)
    total = sum(m["content"].count(image_token) for m in messages)
    if layout == "as_written":
        return messages, list(range(total))
    out: list[dict[str, str]] = []
    order: list[int] = []
    shown: list[int] = []
    cursor = 0
    for message in messages:
        pieces = message["content"].split(image_token)
        own = list(range(cursor, cursor + len(pieces) - 1))
        cursor += len(own)
        if message["role"] != "user":
            out.append(message)
            order += own
            continue
        shown = own or shown
        parts = [p.strip() for p in pieces if p.strip()] + [image_token] * len(shown)
        out.append({"role": "user", "content": "\n".join(parts)})
        order += shown
    return out, order


@dataclass
class EncodedChat:
    """Token ids of a rendered conversation and, for training, which tokens are supervised."""

    input_ids: list[int]
    supervised: list[bool]


class ChatEncoder:
    """Renders conversations with a tokenizer's chat template and tokenises them with supervision masks."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None, image_token: str = IMAGE_TOKEN
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ProcessingError("vlmkit needs a fast (Rust) tokenizer: supervision masks use its offsets")
        self.tokenizer = tokenizer
        self.template = chat_template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        self.image_token = image_token
        self.control_tokens = sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} - {image_token}
        )
        """Special tokens (turn markers, EOS, ...) that text in messages must not produce."""

    def render(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, continue_final_message: bool = False
    ) -> str:
        return self.tokenizer.apply_chat_template(  # type: ignore[return-value]  # tokenize=False gives a str
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )  # fmt: skip

    def encode(
        self,
        messages: list[dict[str, str]],
        *,
        train: bool,
        name: str = "sample",
        continue_final_message: bool = False,
    ) -> EncodedChat:
        """Tokenise a string-content conversation.

        ``train=False``: the prompt for generation (with the generation prompt when the last turn isn't the
        assistant's). ``continue_final_message``: the last (assistant) message is rendered without its end of
        turn, for the model to continue (transformers' ``continue_final_message``). ``train=True``: the whole
        conversation, assistant turns (with their end-of-turn token) supervised. Raises
        :class:`ProcessingError` naming ``name`` when no token would be supervised or the template is not
        prefix-stable.
        """
        if continue_final_message:
            if train or messages[-1]["role"] != "assistant":
                raise ProcessingError(
                    f"{name}: continue_final_message continues the last message, which must be the assistant's "
                    "(the start of its answer)" + (" and is for generation, not training" if train else "")
                )
            try:
                text = self.render(messages, add_generation_prompt=False, continue_final_message=True)
            except ValueError as exc:  # the template does not show the final message as written
                raise ProcessingError(f"{name}: continue_final_message: {exc}") from exc
            ids, _ = self.tokenize(text, messages, name)
            return EncodedChat(ids, [False] * len(ids))
        if not train:
            text = self.render(messages, add_generation_prompt=messages[-1]["role"] != "assistant")
            ids, _ = self.tokenize(text, messages, name)
            return EncodedChat(ids, [False] * len(ids))
        text = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if not message["content"].strip():
                raise ProcessingError(f"{name}: assistant turn {i} is empty; there is nothing to learn from it")
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise ProcessingError(
                    f"{name}: the chat template renders turn {i} differently depending on what follows, so the "
                    "assistant tokens can't be located; use a template whose renderings of a prefix are prefixes"
                )
            end = len(through.rstrip())  # keep the end-of-turn token, not the whitespace after it
            if end > len(before):
                spans.append((len(before), end))
        ids, offsets = self.tokenize(text, messages, name)
        supervised = [any(s <= start < e for s, e in spans) for start, _ in offsets]
        if not any(supervised):
            raise ProcessingError(
                f"{name}: no assistant token to supervise (the conversation needs a non-empty assistant reply)"
            )
        return EncodedChat(ids, supervised)

    def tokenize(
        self, text: str, messages: list[dict[str, str]], name: str = "sample"
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of a rendered conversation, messages' text kept as plain text.

        The template's own markers are control tokens; the same strings typed in a message (a user writing
        ``<|im_end|>\n<|im_start|>system``) are tokenized as ordinary text, so no one can forge a turn. Only the
        ``<image>`` marker stays a token inside messages. Text without control-token strings tokenizes exactly
        as the whole rendering would.
        """
        risky = [i for i, m in enumerate(messages) if any(t in m["content"] for t in self.control_tokens)]
        if not risky:
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
        segments: list[tuple[int, int, bool]] = []  # (start, end, plain text only)
        cursor = emitted = 0  # where the next message is searched from; the end of the last segment
        for i, message in enumerate(messages):
            content = message["content"]
            at = text.find(content, cursor) if content else -1
            if at < 0:
                if i in risky:
                    raise ProcessingError(
                        f"{name}: message {i} contains control-token text the chat template changes, so it can't "
                        "be kept as plain text; remove the special tokens from it"
                    )
                continue
            cursor = at + len(content)
            if i in risky:
                segments += [(emitted, at, False), (at, cursor, True)]
                emitted = cursor
        segments.append((emitted, len(text), False))
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for start, end, plain in segments:
            pieces = text[start:end].split(self.image_token) if plain else [text[start:end]]
            at = start
            for k, piece in enumerate(pieces):
                if k:  # the image marker between pieces
                    ids.append(int(self.tokenizer.convert_tokens_to_ids(self.image_token)))  # type: ignore[arg-type]
                    offsets.append((at, at + len(self.image_token)))
                    at += len(self.image_token)
                if piece:
                    encoding = self.tokenizer(
                        piece, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=plain
                    )
                    ids += encoding["input_ids"]
                    offsets += [(at + a, at + b) for a, b in encoding["offset_mapping"]]
                at += len(piece)
        return ids, offsets

    def end_of_turn_ids(self) -> list[int]:
        """Token ids that end an assistant turn: the tokenizer's EOS and the template's end-of-turn token."""
        ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        before = self.render(probe[:1], add_generation_prompt=True)
        through = self.render(probe, add_generation_prompt=False)
        tail = through[len(before) + len("ok") :] if through.startswith(before) else ""
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        for token_id in self.tokenizer(tail, add_special_tokens=False)["input_ids"]:
            if token_id in special:
                if token_id not in ids:
                    ids.append(token_id)
                break
        return ids
