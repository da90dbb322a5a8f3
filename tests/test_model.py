import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    LlamaForCausalLM,
    SiglipVisionModel,
)

from conftest import (
    clip_config,
    compose_tiny,
    image_turn,
    llama_config,
    make_tokenizer,
    qwen2_config,
    siglip_config,
)
from vlmkit.config import VLMConfig
from vlmkit.errors import CheckpointError, ConfigError, ImageTokenMismatchError
from vlmkit.models.compose import compose, load_pretrained, save_pretrained
from vlmkit.models.vision import VisionTower
from vlmkit.models.vlm import VisionLanguageModel

TOWERS = {"clip": clip_config, "siglip": siglip_config}
LMS = {"llama": llama_config, "qwen2-tied": qwen2_config}


def conversations():
    return [
        [image_turn("Describe the image.", 2), {"role": "assistant", "content": "Two red squares."}],
        [{"role": "user", "content": "How many stars are there?"}, {"role": "assistant", "content": "3"}],
        [image_turn("What colour is the circle?", 1, (0, 0, 255)), {"role": "assistant", "content": "blue"}],
    ]


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu", "identity"])
@pytest.mark.parametrize("lm", sorted(LMS))
@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_grid_shapes_loss_and_gradients(tower, lm, projector):
    vision = TOWERS[tower](hidden_size=48) if projector == "identity" else TOWERS[tower]()
    model, processor = compose_tiny(vision, LMS[lm](), projector)
    model.set_trainable(vision=False, projector=projector != "identity", language_model=True)
    batch = processor(conversations(), train=True)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["image_counts"].tolist() == [2, 0, 1]
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 3 * processor.tokens_per_image == 48
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.language_model.config.vocab_size)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.language_model.parameters())
    if projector != "identity":
        assert (
            model.projector[0].weight.grad.abs().sum() > 0
            if projector != "linear"
            else model.projector.weight.grad.abs().sum() > 0
        )


def test_loss_is_mean_ce_over_supervised_tokens():
    model, processor = compose_tiny()
    batch = processor(conversations(), train=True)
    out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    manual = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual, atol=1e-5)
    # padding positions carry no label
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_splice_replaces_placeholders_in_place():
    model, processor = compose_tiny()
    batch = processor(conversations()[:1], train=False)
    ids = batch["input_ids"]
    embeds = model.embed_inputs(ids, batch["pixel_values"])
    assert embeds.shape[:2] == ids.shape  # sequence length unchanged
    features = model.encode_images(batch["pixel_values"])
    slots = ids[0] == processor.image_token_id
    assert torch.equal(embeds[0][slots], features.reshape(-1, features.shape[-1]))
    text = model.language_model.get_input_embeddings()(ids)
    assert torch.equal(embeds[0][~slots], text[0][~slots])


def test_mixed_batch_rows_match_single_rows():
    model, processor = compose_tiny()
    model.eval()
    convs = conversations()
    batch = processor(convs, train=True)
    with torch.no_grad():
        batched = model(**batch).logits
        for row, conv in enumerate(convs):
            single = processor([conv], train=True)
            n = single["input_ids"].shape[1]
            alone = model(**single).logits[0]
            assert torch.allclose(batched[row, :n], alone, atol=1e-5), row


def test_left_padding_gives_same_last_logits():
    model, processor = compose_tiny()
    model.eval()
    convs = [c[:1] for c in conversations()]
    with torch.no_grad():
        left = model(**processor(convs, padding_side="left")).logits[:, -1]
        for row, conv in enumerate(convs):
            alone = model(**processor([conv])).logits[0, -1]
            assert torch.allclose(left[row], alone, atol=1e-5)


def test_placeholder_count_mismatch_states_expected_and_found():
    model, processor = compose_tiny()
    batch = processor(conversations()[:1])
    with pytest.raises(ImageTokenMismatchError, match=r"expected 16 .*1 image.*found 32"):
        model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"][:1])
    with pytest.raises(ImageTokenMismatchError, match="32 image placeholder tokens but no images"):
        model(batch["input_ids"], batch["attention_mask"])


def test_variable_tokens_per_image_via_feature_list():
    model, processor = compose_tiny()
    hidden = model.language_model.config.hidden_size
    tok = processor.image_token_id
    ids = torch.tensor([[5, tok, tok, tok, tok, tok, 6, tok, tok, 7]])
    features = [torch.randn(5, hidden), torch.randn(2, hidden)]
    embeds = model.embed_inputs(ids, image_features=features)
    assert torch.equal(embeds[0, 1:6], features[0]) and torch.equal(embeds[0, 7:9], features[1])
    with pytest.raises(ImageTokenMismatchError, match=r"expected 8 .*\[5, 3\].*found 7"):
        model.embed_inputs(ids, image_features=[torch.randn(5, hidden), torch.randn(3, hidden)])


@pytest.mark.parametrize("layer", [-2, -1, 1, [-3, -1]])
def test_feature_layers_and_cls_handling(layer):
    tower = VisionTower(CLIPVisionModel(clip_config()).eval(), feature_layer=layer)
    pixels = torch.randn(2, 3, 32, 32)
    hidden = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    layers = [layer] if isinstance(layer, int) else layer
    expected = torch.cat([hidden[i][:, 1:] for i in layers], dim=-1)
    assert tower.select_strategy == "default" and tower.num_tokens() == 16
    assert tower.hidden_size == 32 * len(layers)
    assert torch.equal(tower(pixels), expected)


def test_full_strategy_and_siglip_has_no_cls():
    clip_full = VisionTower(CLIPVisionModel(clip_config()), select_strategy="full")
    assert clip_full(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32) and clip_full.num_tokens() == 17
    siglip = VisionTower(SiglipVisionModel(siglip_config()))
    assert siglip.select_strategy == "full"
    assert siglip(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32) and siglip.num_tokens() == 16
    with pytest.raises(ConfigError, match="has none"):
        VisionTower(SiglipVisionModel(siglip_config()), select_strategy="default")
    with pytest.raises(ConfigError, match="out of range"):
        VisionTower(CLIPVisionModel(clip_config()), feature_layer=-9)


def test_freezing_and_parameter_summary():
    model, _ = compose_tiny()
    model.set_trainable(vision=False, projector=True, language_model=False)
    summary = model.parameter_summary()
    assert summary["vision_tower"].trainable == 0
    assert summary["vision_tower"].frozen == sum(p.numel() for p in model.vision_tower.parameters())
    assert summary["projector"].frozen == 0
    assert summary["projector"].trainable == sum(p.numel() for p in model.projector.parameters())
    assert summary["language_model"].trainable == 0
    table = model.format_parameter_summary()
    assert "vision_tower" in table and f"{summary['projector'].trainable:,}" in table


def test_tied_embeddings_stay_tied_after_resize_and_reload(tmp_path):
    model, processor = compose_tiny(lm=qwen2_config(vocab_size=300))
    lm = model.language_model
    assert lm.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) > 300
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    save_pretrained(model, processor, tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    llm = loaded.language_model
    assert llm.get_output_embeddings().weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("tower,lm", [("clip", "llama"), ("siglip", "qwen2-tied")])
def test_save_load_bit_identical(tmp_path, tower, lm):
    model, processor = compose_tiny(TOWERS[tower](), LMS[lm](), feature_layer=[-2, -1])
    model.eval()
    batch = processor(conversations(), train=True)
    with torch.no_grad():
        before = model(**batch)
    save_pretrained(model, processor, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format_version"] == 1 and config["vision"]["feature_layer"] == [-2, -1]
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "processor_config.json").is_file()
    model2, processor2 = load_pretrained(tmp_path)
    batch2 = processor2(conversations(), train=True)
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    with torch.no_grad():
        after = model2(**batch2)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.loss, after.loss)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        VisionLanguageModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="newer than this vlmkit"):
        VLMConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 1, "visoin": {}}))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) visoin; valid keys: vision, lm, projector"):
        VLMConfig.load(tmp_path)


def test_projector_checkpoint_moves_to_another_lm(tmp_path):
    model, _ = compose_tiny(lm=llama_config(num_hidden_layers=2))
    model.save_projector(tmp_path / "proj")
    other, _ = compose_tiny(lm=llama_config(num_hidden_layers=3))  # another LM, same hidden size
    assert not torch.equal(other.projector[0].weight, model.projector[0].weight)
    other.load_projector(tmp_path / "proj")
    for a, b in zip(model.projector.state_dict().values(), other.projector.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    wider, _ = compose_tiny(lm=llama_config(hidden_size=64))
    with pytest.raises(ConfigError, match="maps 32 → 48, but this model needs 32 → 64"):
        wider.load_projector(tmp_path / "proj")
    with pytest.raises(CheckpointError, match="not a projector checkpoint"):
        wider.load_projector(tmp_path)


def test_parts_loaded_by_path_from_transformers_folders(tmp_path):
    # A dual-encoder CLIP checkpoint (like openai/clip-vit-*) and a causal LM + tokenizer, saved by transformers.
    clip = CLIPModel(
        CLIPConfig(
            vision_config=clip_config().to_dict(),
            text_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 99,
            },
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    lm = LlamaForCausalLM(llama_config())
    lm.save_pretrained(tmp_path / "lm")
    make_tokenizer().save_pretrained(tmp_path / "lm")
    model, processor = compose(str(tmp_path / "clip"), str(tmp_path / "lm"), "mlp2x_gelu")
    assert isinstance(model.vision_tower.model, CLIPVisionModel)
    assert torch.equal(
        model.vision_tower.model.embeddings.patch_embedding.weight,
        clip.vision_model.embeddings.patch_embedding.weight,
    )
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert torch.equal(
        model.language_model.model.layers[0].mlp.up_proj.weight, saved.model.layers[0].mlp.up_proj.weight
    )
    assert processor.image_config.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert model.config.vision.source == str(tmp_path / "clip")
    # a vision-only SigLIP folder with its own preprocessor_config.json
    SiglipVisionModel(siglip_config()).save_pretrained(tmp_path / "siglip")
    (tmp_path / "siglip" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]})
    )
    model, processor = compose(str(tmp_path / "siglip"), str(tmp_path / "lm"), "linear")
    assert model.vision_tower.select_strategy == "full"
    assert processor.image_config.mean == (0.1, 0.2, 0.3) and processor.image_config.std == (0.4, 0.5, 0.6)


def test_lm_config_without_tokenizer_is_an_error():
    with pytest.raises(ConfigError, match="pass a tokenizer"):
        compose(clip_config(), llama_config(), "linear")


@pytest.mark.parametrize("lm", sorted(LMS))
def test_supervised_loss_sum_equals_full_logits_loss(lm):
    model, processor = compose_tiny(clip_config(), LMS[lm]())
    batch = processor(conversations(), train=True)
    full = model(**batch)
    loss_sum, targets = model.supervised_loss_sum(
        batch["input_ids"], batch["labels"], batch["attention_mask"], batch["pixel_values"]
    )
    assert targets == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(loss_sum / targets, full.loss, atol=1e-5)
    loss_sum.backward()
    assert model.projector[0].weight.grad is not None
