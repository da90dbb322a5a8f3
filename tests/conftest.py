"""Shared fixtures: tiny tokenizers and configs built offline, so every test runs without a model hub."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from vlmkit.processing.tokenizer_training import train_bpe_tokenizer

CORPUS = [
    "There is a red circle in the top left and a blue square in the center.",
    "Is there a green triangle in the image? Yes. No. How many stars are there? 3",
    "The word is hello. Describe the image. What colour is the hexagon? purple",
    "Where is the yellow diamond? bottom right. pink brown gray black orange 0 1 2 3 4 5 6 7 8 9",
    "Ünïcödé façade — naïve café 東京 👍 emoji test",
]


@functools.cache
def _tokenizer_json() -> str:
    return train_bpe_tokenizer(CORPUS * 20, vocab_size=400, chat=False).backend_tokenizer.to_str()


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer with no chat template unless one is given (specials: pad, s, /s)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                    patch_size=8)  # fmt: skip
SMALL_LM = dict(vocab_size=420, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip


def clip_config(**kw) -> CLIPVisionConfig:
    return CLIPVisionConfig(**{**SMALL_VISION, **kw})


def siglip_config(**kw) -> SiglipVisionConfig:
    return SiglipVisionConfig(**{**SMALL_VISION, **kw})


def llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(**{**SMALL_LM, "tie_word_embeddings": False, **kw})


def qwen2_config(**kw) -> Qwen2Config:
    return Qwen2Config(**{**SMALL_LM, "tie_word_embeddings": True, **kw})


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def compose_tiny(vision=None, lm=None, projector: str = "mlp2x_gelu", **kw):
    """A tiny composed model + processor (CLIP + Llama unless told otherwise)."""
    from vlmkit.models.compose import compose

    return compose(vision or clip_config(), lm or llama_config(), projector, tokenizer=make_tokenizer(), **kw)


def solid_image(color=(200, 30, 30), size=(40, 30)):
    from PIL import Image

    return Image.new("RGB", size, color)


def image_turn(text: str, n_images: int = 1, color=(200, 30, 30)) -> dict:
    parts = [{"type": "image", "image": solid_image(color)} for _ in range(n_images)]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture
def run(monkeypatch, capsys):
    """Run ``vlmkit data ARGS`` in-process (only the data commands registered); returns (exit code, stdout, stderr)."""
    from vlmkit import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ("data",))

    def _run(*args: str | Path) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench(request):
    """The bench/ script the test module names in ``BENCH_MODULE``, imported as a module (bench/ on the path
    while the module's tests run, as when the script runs)."""
    import importlib
    import sys

    sys.path.insert(0, str(BENCH_DIR))
    try:
        yield importlib.import_module(request.module.BENCH_MODULE)
    finally:
        sys.path.remove(str(BENCH_DIR))
