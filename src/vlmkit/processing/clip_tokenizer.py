"""CLIP's BPE tokenizer, offline: the vocabulary OpenAI's CLIP (and so Stable Diffusion's text encoder) uses.

``src/vlmkit/assets/clip_bpe/bpe_simple_vocab_16e6.txt.gz`` is the merges file from the open_clip_torch 3.3.0
wheel (MIT licence, copied beside it; open_clip is no dependency: even ``import open_clip.tokenizer`` needs
torchvision). The vocabulary is built from the merges exactly as CLIP builds it (256
byte symbols, the same 256 ending a word, one token per merge, then ``<|startoftext|>`` and
``<|endoftext|>``: 49,408 ids), and the tokenizer is transformers' :class:`~transformers.CLIPTokenizer` over them,
the class ``openai/clip-vit-large-patch14`` loads: every count includes the start and end tokens.

:func:`train_clip_bpe` trains a tokenizer of the same form on other texts (the built-in ``clip-shapes`` model's).
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_BPE_FILE = Path(__file__).parent.parent / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2
"""How many of the file's merges CLIP uses (its vocabulary is 49,408 ids)."""
CLIP_CONTEXT = 77
"""The tokens CLIP's text encoder reads, start and end tokens included (Stable Diffusion truncates there)."""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@functools.cache
def byte_symbols() -> tuple[str, ...]:
    """The 256 printable symbols byte-level BPE writes bytes as, in CLIP's vocabulary order (``bytes_to_unicode``:
    the printable bytes as themselves, then the others as ``chr(256 + n)``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return (*(chr(b) for b in printable), *(chr(256 + n) for n in range(len(others))))


def build_clip_tokenizer(merges: list[tuple[str, str]], model_max_length: int = CLIP_CONTEXT) -> CLIPTokenizer:
    """A CLIP tokenizer over ``merges`` (in rank order), its vocabulary built as CLIP builds it."""
    symbols = list(byte_symbols())
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)  # type: ignore[arg-type]


def read_merges(path: str | Path = CLIP_BPE_FILE, count: int = CLIP_MERGES) -> list[tuple[str, str]]:
    """The first ``count`` merges of a gzipped CLIP merges file (its first line is a version header)."""
    with gzip.open(path) as handle:
        lines = handle.read().decode("utf-8").split("\n")[1 : count + 1]
    return [(left, right) for left, right in (line.split() for line in lines)]


@functools.cache
def _clip_tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer(read_merges())


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's own tokenizer (ViT-B/32, ViT-L/14, Stable Diffusion 1.x/2.x's text encoder), built once per process."""
    return _clip_tokenizer()


def train_clip_bpe(texts: Iterable[str], vocab_size: int = 1024, model_max_length: int = CLIP_CONTEXT) -> CLIPTokenizer:
    """A CLIP-form tokenizer (same normalisation, pre-tokenisation and byte symbols) whose merges are learnt from
    ``texts``: about ``vocab_size`` ids, any text still tokenizes (every byte symbol is in the vocabulary)."""
    from tokenizers import Tokenizer, models, trainers

    backend = build_clip_tokenizer([]).backend_tokenizer
    trainer_model = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    trainer_model.normalizer = backend.normalizer
    trainer_model.pre_tokenizer = backend.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=list(byte_symbols()),
        end_of_word_suffix="</w>",
    )
    trainer_model.train_from_iterator(texts, trainer)
    import json

    learnt = json.loads(trainer_model.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt]
    return build_clip_tokenizer(merges, model_max_length)  # type: ignore[arg-type]
