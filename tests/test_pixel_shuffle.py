"""Pixel shuffle projectors (``pixel_shuffle{s}x``): Idefics3's connector exactly, token counts the processor
asks for, chat and save/load with the ``single`` views, and refusals that name the numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import Idefics3Config
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

from conftest import clip_config, compose_tiny, image_turn, llama_config, siglip_config
from vlmkit.api import VLM
from vlmkit.config import ViewsConfig
from vlmkit.errors import ConfigError, RegistryError
from vlmkit.inference.options import GenerationOptions
from vlmkit.models.compose import load_pretrained, save_pretrained
from vlmkit.models.pixel_shuffle import PixelShuffleProjector, pixel_shuffle
from vlmkit.models.projector import build_projector
from vlmkit.views import VIEWS


@pytest.mark.parametrize(("scale", "side"), [(2, 4), (2, 24), (3, 24), (4, 24), (4, 32)])
def test_pixel_shuffle_equals_idefics3s(scale, side):
    x = torch.randn(3, side * side, 5)
    expected = Idefics3Connector.pixel_shuffle(None, x, scale)  # type: ignore[arg-type]  # `self` unused there
    assert torch.equal(pixel_shuffle(x, scale), expected)


@pytest.mark.parametrize("scale", [2, 3])
def test_projector_equals_idefics3s_connector(scale):
    config = Idefics3Config(
        vision_config={"hidden_size": 8, "num_attention_heads": 2},
        text_config={"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2},
        scale_factor=scale,
    )
    connector = Idefics3Connector(config)
    projector = build_projector(f"pixel_shuffle{scale}x", 8, 16)
    assert isinstance(projector, PixelShuffleProjector) and projector.proj.bias is None
    projector.proj.load_state_dict(connector.modality_projection.proj.state_dict())
    x = torch.randn(2, 36, 8)
    with torch.no_grad():
        assert torch.equal(projector(x), connector(x))
    assert projector(x).shape == (2, 36 // scale**2, 16)


def test_the_family_and_its_refusals():
    assert build_projector("pixel_shuffle4x", 8, 16).proj.in_features == 8 * 16
    for name in ("pixel_shuffle1x", "pixel_shuffle0x", "pixel_shuffle100x", "pixel_shuffle", "pixel_shuffle2"):
        with pytest.raises(RegistryError, match=rf"'{name}'.*pixel_shuffle\{{s\}}x"):
            build_projector(name, 8, 16)
    projector = build_projector("pixel_shuffle2x", 8, 16)
    assert projector.output_tokens(576) == 144 and build_projector("pixel_shuffle3x", 8, 16).output_tokens(576) == 64
    with pytest.raises(ConfigError, match="square grid of tokens per view, but the tower gives 577"):
        projector.output_tokens(577)
    with pytest.raises(ConfigError, match=r"pixel_shuffle4x needs a grid side divisible by 4.*6×6 \(36 tokens"):
        build_projector("pixel_shuffle4x", 8, 16).output_tokens(36)
    with pytest.raises(ConfigError, match=r"\(views, tokens, channels\).*got shape \(16, 8\)"):
        projector(torch.randn(16, 8))


def test_the_processor_asks_the_projector_for_its_token_count():
    model, processor = compose_tiny(siglip_config(), llama_config(), projector="pixel_shuffle2x")
    assert model.vision_tower.num_tokens() == 16 and processor.tokens_per_image == 4
    batch = processor([[image_turn("What is it?")]])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 4
    assert model.encode_images(batch["pixel_values"]).shape == (1, 4, 48)
    _, processor = compose_tiny(clip_config(image_size=48), projector="pixel_shuffle3x")  # CLS dropped: 6×6 → 2×2
    assert processor.tokens_per_image == 4
    with pytest.raises(ConfigError, match="tower gives 17.*select_strategy 'default'"):
        compose_tiny(clip_config(), projector="pixel_shuffle2x", select_strategy="full")
    with pytest.raises(ConfigError, match=r"divisible by 3.*4×4"):
        compose_tiny(siglip_config(), projector="pixel_shuffle3x")


def test_chat_with_single_views_trains_and_survives_save_and_load(tmp_path):
    vlm = VLM(*compose_tiny(siglip_config(), llama_config(initializer_range=0.3), projector="pixel_shuffle2x",
                            views=ViewsConfig("single")))  # fmt: skip
    conversations = [[image_turn("What is it?")], [image_turn("And these?", n_images=2, color=(0, 0, 250))],
                     [{"role": "user", "content": "hi"}]]  # fmt: skip
    options = GenerationOptions(max_new_tokens=6)
    batched = vlm.engine.generate(conversations, options)
    alone = [vlm.engine.generate([c], options)[0] for c in conversations]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    train = vlm.processor([[image_turn("colour?"), {"role": "assistant", "content": "red"}]], train=True)
    out = vlm.model(train["input_ids"], train["attention_mask"], train["pixel_values"], labels=train["labels"],
                    supervised_loss=True)  # fmt: skip
    out["loss_sum"].backward()
    assert vlm.model.projector.proj.weight.grad is not None
    save_pretrained(vlm.model, vlm.processor, tmp_path / "m")
    reloaded = VLM(*load_pretrained(tmp_path / "m"))
    assert reloaded.processor.tokens_per_image == 4 and reloaded.model.config.projector.name == "pixel_shuffle2x"
    assert [r.token_ids for r in reloaded.engine.generate(conversations, options)] == [r.token_ids for r in alone]


@pytest.mark.skipif("anyres" not in VIEWS, reason="no anyres views strategy")
def test_anyres_views_take_the_shuffled_grid():
    model, processor = compose_tiny(siglip_config(), llama_config(), projector="pixel_shuffle2x",
                                    views=ViewsConfig("anyres"))  # fmt: skip
    assert processor.tokens_per_image == 4
    batch = processor([[image_turn("a")], [image_turn("b", color=(0, 200, 0))]])
    features = model.encode_images(batch["pixel_values"], batch["image_sizes"])
    slots = (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert [f.shape[0] for f in features] == slots


def test_pixel_shuffle_models_are_not_exported_as_llava():
    from vlmkit.interop.hf_llava import check_expressible

    model, _ = compose_tiny(siglip_config(), projector="pixel_shuffle2x")
    with pytest.raises(ConfigError, match="projector is 'pixel_shuffle2x', which it can't express"):
        check_expressible(model)
    if "anyres" in VIEWS:
        llava_next = pytest.importorskip("vlmkit.interop.hf_llava_next")
        model, _ = compose_tiny(siglip_config(), projector="pixel_shuffle2x", views=ViewsConfig("anyres"))
        with pytest.raises(ConfigError, match="'pixel_shuffle2x'"):
            llava_next.check_expressible(model)
