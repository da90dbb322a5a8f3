"""Vision towers beyond CLIP and SigLIP: Dinov2, ViT and Dinov2-with-registers have a ``cls_token`` (and
registers), not CLIP's ``class_embedding``; the token count must match the features whatever the family."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2Config, Dinov2WithRegistersConfig, ViTConfig

from conftest import clip_config, compose_tiny, image_turn, llama_config, siglip_config
from vlmkit.api import VLM
from vlmkit.models.vision import TOWERS, normalisation_for

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=8)  # fmt: skip
FAMILIES = {
    "clip": (lambda: clip_config(), 1),
    "siglip": (lambda: siglip_config(), 0),
    "dinov2": (lambda: Dinov2Config(**SMALL), 1),
    "vit": (lambda: ViTConfig(**SMALL), 1),
    "dinov2-registers": (lambda: Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4), 5),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("strategy", ["auto", "full"])
def test_every_family_chats_with_matching_token_counts(family, strategy):
    config, prefix = FAMILIES[family]
    torch.manual_seed(0)
    model, processor = compose_tiny(config(), llama_config(), select_strategy=strategy)
    tower = model.vision_tower
    assert tower.prefix_tokens == prefix
    features = tower(torch.zeros(1, 3, 32, 32))
    patches = (32 // 8) ** 2
    expected = patches + (prefix if strategy == "full" or prefix == 0 else 0)
    assert features.shape[1] == tower.num_tokens() == processor.tokens_per_image == expected
    answer = VLM(model, processor).chat([image_turn("What is it?")], max_new_tokens=3)
    assert isinstance(answer, str)


def test_families_have_their_own_normalisation():
    from vlmkit.config import VisionConfig

    assert normalisation_for(VisionConfig(), "dinov2")[0] == (0.485, 0.456, 0.406)
    assert normalisation_for(VisionConfig(), "siglip_vision_model")[0] == (0.5, 0.5, 0.5)
    assert "dinov2_with_registers" in TOWERS.names()


def test_a_tower_with_registers_is_not_exported_as_llava():
    from vlmkit.errors import ConfigError
    from vlmkit.interop.hf_llava import check_expressible

    config, _ = FAMILIES["dinov2-registers"]
    model, _ = compose_tiny(config(), llama_config())
    with pytest.raises(ConfigError, match="drops one CLS token; this tower has 5 prefix tokens"):
        check_expressible(model)
