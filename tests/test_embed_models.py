"""Dual encoders loaded by path (CLIP, SigLIP), their embeddings against plain transformers, and loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embed_fixtures import CORPUS, save_clip, save_siglip
from vlmkit.embeddings.builtin import EMBEDDING_MODELS
from vlmkit.embeddings.encoder import load_encoder, load_folder_encoder
from vlmkit.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    return save_siglip(tmp_path_factory.mktemp("siglip"))


def images(n=5):
    return [Image.new("RGB", (30 + 3 * i, 24), (40 * i, 255 - 40 * i, 90)) for i in range(n)]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_embeddings_are_unit_vectors_equal_to_plain_transformers(family, clip_folder, siglip_folder):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    folder = clip_folder if family == "clip" else siglip_folder
    encoder = load_encoder(str(folder), device="cpu")
    assert encoder.model_type == family and encoder.dim == (16 if family == "clip" else 32)
    vectors = encoder.embed_images(images(), batch_size=2)
    texts = encoder.embed_texts(CORPUS[:5])
    assert vectors.dtype == np.float32 and vectors.shape == (5, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    model = AutoModel.from_pretrained(folder).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        for image, vector in zip(images(), vectors, strict=True):
            out = model.get_image_features(**processor(images=image, return_tensors="pt"))
            plain = out if isinstance(out, torch.Tensor) else out.pooler_output
            np.testing.assert_allclose(vector, torch.nn.functional.normalize(plain, dim=-1)[0].numpy(), atol=1e-5)
        padding = {"padding": "max_length", "max_length": 16} if family == "siglip" else {}
        out = model.get_text_features(**tokenizer([CORPUS[1]], return_tensors="pt", **padding))
        plain = out if isinstance(out, torch.Tensor) else out.pooler_output
        np.testing.assert_allclose(texts[1], torch.nn.functional.normalize(plain, dim=-1)[0].numpy(), atol=1e-5)


def test_a_text_embeds_the_same_alone_and_padded_in_a_batch(clip_folder):
    encoder = load_encoder(str(clip_folder), device="cpu")
    alone = encoder.embed_texts(["a red circle"])
    batch = encoder.embed_texts(["a red circle", "there is one object and a photo of a dog"])
    np.testing.assert_allclose(alone[0], batch[0], atol=1e-5)


def test_loading_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="unknown embedding model 'nope'.*clip-shapes"):
        load_encoder("nope")
    with pytest.raises(CheckpointError, match="not a local folder and the hub download failed"):
        load_encoder("openai/clip-vit-base-patch32")
    with pytest.raises(CheckpointError, match="not a transformers model folder"):
        load_folder_encoder(tmp_path)
    from transformers import LlamaConfig, LlamaModel

    LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "lm")  # fmt: skip
    with pytest.raises(CheckpointError, match="'llama' is not a dual encoder"):
        load_folder_encoder(tmp_path / "lm")
    with pytest.raises(ConfigError, match="texts to embed must be strings"):
        load_encoder(str(save_clip(tmp_path / "clip")), device="cpu").embed_texts([3])  # type: ignore[list-item]


def test_the_built_in_model_is_registered_and_ships():
    assert "clip-shapes" in EMBEDDING_MODELS.names()
    entry = EMBEDDING_MODELS.get("clip-shapes")
    assert entry.templates == "shapes" and "ShapesWorld" in entry.notice
    folder = entry.folder()
    size = (folder / "model.safetensors").stat().st_size
    assert size <= 10 * 1024 * 1024, f"{size / 1e6:.1f} MB"
    encoder = load_encoder("clip-shapes", device="cpu")
    assert encoder.notice == entry.notice and encoder.model_type == "siglip"


def test_the_built_in_model_finds_shapesworld_scenes_by_caption_out_of_the_box(tmp_path, capsys):
    """`vlmkit embed` + `vlmkit search` with no --model: held-out scenes found by their captions."""
    import json

    from vlmkit.cli import main
    from vlmkit.data.shapes import render_scene, sample_scene
    from vlmkit.data.tasks import caption

    scenes = [sample_scene("test", 3, i) for i in range(40)]
    for scene in scenes:
        render_scene(scene).save(tmp_path / f"{scene.id}.png")
    assert main(["embed", str(tmp_path), "--out", str(tmp_path / "index"), "--quiet"]) == 0
    assert "40 embedded" in capsys.readouterr().err
    found = 0
    for scene in scenes[:20]:
        assert main(["search", str(tmp_path / "index"), caption(scene), "-k", "5", "--json"]) == 0
        out = capsys.readouterr()
        hits = [json.loads(line)["image"] for line in out.out.splitlines()]
        found += str(tmp_path / f"{scene.id}.png") in hits
    assert "clip-shapes" in out.err and found >= 18, f"recall@5 {found}/20 among 40 scenes"
