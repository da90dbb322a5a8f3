"""A tiny, untrained, deterministic VLM: for demos and pipeline checks, never for answers."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, SiglipVisionConfig

from vlmkit.models.compose import compose
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.processor import VLMProcessor
from vlmkit.processing.tokenizer_training import train_bpe_tokenizer

CORPUS = (
    "There is a red circle in the top left and a small blue square in the center. "
    "Is there a green triangle? Yes. No. How many stars are there? 3. The word is cat."
)


def tiny_random_vlm(seed: int = 0) -> tuple[VisionLanguageModel, VLMProcessor]:
    """SigLIP (2 layers, 64 px, 16 image tokens) + mlp2x_gelu + Llama (2 layers, width 64), random weights."""
    tokenizer = train_bpe_tokenizer([CORPUS] * 20, vocab_size=300)
    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16
    )
    lm = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,  # larger than usual so the random text varies from image to image
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return compose(vision, lm, "mlp2x_gelu", tokenizer=tokenizer)
