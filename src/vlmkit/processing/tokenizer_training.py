"""Train a small byte-level BPE tokenizer offline (for the built-in model, demos and tests)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmkit.processing.chat import DEFAULT_CHAT_TEMPLATE, DEFAULT_TEMPLATE_TOKENS
from vlmkit.tokens import IMAGE_TOKEN

BASE_TOKENS = ("<pad>", "<s>", "</s>")


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1, chat: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` with pad/bos/eos tokens.

    ``chat=True`` also adds ``<image>``, the ChatML markers and the ChatML template. Byte-level: any text (any
    language, emoji) round-trips, even characters never seen in training.
    """
    chat_tokens = [IMAGE_TOKEN, *DEFAULT_TEMPLATE_TOKENS] if chat else []
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*BASE_TOKENS, *chat_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=chat_tokens,
    )
    wrapped.chat_template = DEFAULT_CHAT_TEMPLATE if chat else None
    return wrapped
