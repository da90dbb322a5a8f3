"""The clip-shapes recipe (vlmkit.embeddings.training): its settings, its losses, and a tiny locked-image run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlmkit.embeddings.training import check_recipe, contrastive_loss, load_recipe, sigmoid_loss, train
from vlmkit.errors import ConfigError

SIGLIP = ["architecture=siglip", "vision_init=tiny-random", "vision={}", "projection_dim=64", "image_size=64"]


def recipe(tmp_path, *overrides):
    path = tmp_path / "clip.yaml"
    path.write_text("output_dir: x\n")
    return load_recipe(path, list(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=sigmoid"], "loss: 'sigmoid' needs architecture 'siglip'"),
        (["vision_init=default"], "vision_init: 'default' needs architecture 'siglip'"),
        (["architecture=siglip", "vision_init=default"], r"vision: the image tower comes from vision_init"),
        (["architecture=siglip", "vision={}"], "vision: empty, and no vision_init"),
        (["freeze_vision=body"], "freeze_vision: 'body' locks a pretrained image tower; name it in vision_init"),
        ([*SIGLIP, "unfreeze_at=10"], "unfreeze_at: 10 needs a frozen image tower"),
        ([*SIGLIP, "freeze_vision=body", "steps=10", "unfreeze_at=10"], r"a step inside the run \(1-9\)"),
        (["loss=hinge"], "loss"),
    ],
)
def test_settings_that_do_not_fit_together_are_refused_by_name(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        recipe(tmp_path, *overrides)


def test_a_siglip_embedding_is_the_vision_width(tmp_path):
    from vlmkit.embeddings.training import build_siglip, vlm_tower
    from vlmkit.processing.clip_tokenizer import train_clip_bpe

    tower, _ = vlm_tower("tiny-random")
    tokenizer = train_clip_bpe(["a red circle"] * 4, 300, model_max_length=16)
    with pytest.raises(ConfigError, match=r"projection_dim: 32, but a SigLIP embedding is the vision width \(64\)"):
        build_siglip(check_recipe(recipe(tmp_path, *SIGLIP, "projection_dim=32")), tokenizer, tower)
    with pytest.raises(ConfigError, match="image_size: 96, but the vision_init tower reads 64 px"):
        build_siglip(check_recipe(recipe(tmp_path, *SIGLIP, "image_size=96")), tokenizer, tower)


def test_losses_match_their_definitions():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised: e1, e2
    text = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # e1, (e1 + e2) / sqrt 2
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-2.0)
    sims = np.array([[1.0, 0.0], [2**-0.5, 2**-0.5]])  # rows: texts
    logits = 10 * sims
    log_softmax_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    log_softmax_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    expected = -(np.trace(log_softmax_rows) + np.trace(log_softmax_cols)) / 4
    assert float(contrastive_loss(image, text, scale)) == pytest.approx(expected, rel=1e-5)
    signs = 2 * np.eye(2) - 1
    pairwise = np.log1p(np.exp(-signs * (logits + bias.item())))
    assert float(sigmoid_loss(image, text, scale, bias)) == pytest.approx(pairwise.sum() / 2, rel=1e-5)


def test_a_locked_image_run_trains_the_head_and_text_tower_only_and_ships_a_siglip_folder(tmp_path):
    from safetensors.torch import load_file

    from vlmkit.embeddings.encoder import load_encoder
    from vlmkit.embeddings.training import vlm_tower

    settings = [*SIGLIP, f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "train_scenes=48",
                "steps=3", "batch_size=8", "eval_scenes=8", "eval_single=6", "workers=1", "max_length=80",
                "text.hidden_size=32", "text.intermediate_size=64", "text.num_hidden_layers=1",
                "text.num_attention_heads=2", "freeze_vision=body", "save_dtype=fp16",
                "lr=1e-2"]  # fmt: skip
    summary = train(recipe(tmp_path, *settings), progress=False)
    assert summary["step"] == 3 and 0 <= summary["zeroshot_shape"] <= 1
    final = tmp_path / "run" / "final"
    saved = load_file(final / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float16}
    start = {k: v.half() for k, v in vlm_tower("tiny-random")[0].state_dict().items()}
    body = [k for k in start if not k.startswith("head.")]
    assert body and all(torch.equal(saved[f"vision_model.{k}"], start[k]) for k in body)  # locked
    assert not torch.equal(saved["vision_model.head.probe"], start["head.probe"])  # the pooling head trained
    encoder = load_encoder(str(final), device="cpu")
    assert encoder.model_type == "siglip" and encoder.dim == 64 and encoder.max_length == 80
    assert encoder.dtype == torch.float32
    vectors = encoder.embed_texts(["There is one object: a small red circle in the top left cell."])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert encoder.text_inputs(["a red circle"])["input_ids"].shape == (1, 80)  # padded as in training


def test_a_tower_unlocked_late_trains_from_that_step(tmp_path):
    from safetensors.torch import load_file

    from vlmkit.embeddings.training import vlm_tower

    settings = [*SIGLIP, f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "train_scenes=32",
                "steps=3", "batch_size=8", "eval_scenes=8", "eval_single=6", "workers=1", "max_length=80",
                "text.hidden_size=32", "text.intermediate_size=64", "text.num_hidden_layers=1",
                "text.num_attention_heads=2", "freeze_vision=body", "unfreeze_at=2", "vision_lr_scale=0.5",
                "loss=sigmoid", "lr=1e-2"]  # fmt: skip
    train(recipe(tmp_path, *settings), progress=False)
    saved = load_file(tmp_path / "run" / "final" / "model.safetensors")
    start = vlm_tower("tiny-random")[0].state_dict()
    key = "encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(saved[f"vision_model.{key}"], start[key])  # trained in the last step
