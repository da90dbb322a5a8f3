"""Shared pieces of the benchmarks: the model they measure and ShapesWorld images."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import LlamaConfig, SiglipVisionConfig

import vlmkit
from vlmkit.api import VLM
from vlmkit.processing.tokenizer_training import train_bpe_tokenizer


def bench_model(model: str | None = None, lm_vocab: int | None = None) -> VLM:
    """``model`` (a vlmkit checkpoint) or a random SigLIP (128 px, 64 image tokens) + Llama (4 × 256) VLM.

    ``lm_vocab`` widens the LM's vocabulary (embedding and head rows) to a real LM's size, e.g. 32000.
    """
    if model:
        return vlmkit.load(model)
    corpus = ["there is a red circle in the top left and a small blue square in the center"] * 50
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=1000)
    vision = SiglipVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                                image_size=128, patch_size=16)  # fmt: skip
    vocab = max(len(tokenizer), lm_vocab or 0)
    lm = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     initializer_range=0.1)  # fmt: skip
    torch.manual_seed(0)
    return VLM(*vlmkit.compose(vision, lm, "mlp2x_gelu", tokenizer=tokenizer), name="bench-random")


def shapes_images(n: int) -> list[Image.Image]:
    from vlmkit.data.shapes import render_scene, sample_scene

    return [render_scene(sample_scene("val", 1, i)) for i in range(n)]
