"""The ``hd`` views strategy (Phi-3-vision's HD transform): crop grids, token counts, pixels and feature layout
against Phi-3's own code, other tower sizes, and a tiny model end to end."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from conftest import clip_config, compose_tiny, llama_config, siglip_config
from vlmkit.api import VLM
from vlmkit.config import ViewsConfig
from vlmkit.errors import ConfigError
from vlmkit.inference.options import GenerationOptions
from vlmkit.models.compose import load_pretrained, save_pretrained
from vlmkit.processing.images import ImageTransform, ImageTransformConfig
from vlmkit.views import Geometry, build_assembler, build_views

PHI3 = Geometry(view_size=336, tokens_per_view=576, tower_dim=8, lm_dim=16)
"""Phi-3-vision's CLIP-L/336: 24×24 patch tokens per 336-px view (small channel sizes: only the layout matters)."""


def phi3_tokens(rows: int, cols: int) -> int:
    """Phi-3's ``num_img_tokens`` for an image of ``rows × cols`` crops."""
    return (rows * cols + 1) * 144 + 1 + (rows + 1) * 12


def phi3_padded_size(width: int, height: int, hd_num: int) -> tuple[int, int]:
    """Phi-3's ``calc_hd_transform_size`` (``image_processing_phi3_v.py``), as written there."""
    transposed = False
    if width < height:
        width, height = height, width
        transposed = True
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_width = int(scale * 336)
    new_height = int(new_width / ratio)
    padded_width, padded_height = new_width, int(np.ceil(new_height / 336) * 336)
    return (padded_height, padded_width) if transposed else (padded_width, padded_height)


def phi3_pixels(image: Image.Image, hd_num: int, mean, std) -> torch.Tensor:
    """Phi-3's ``HD_transform`` + ``padding_336`` + normalisation + global view + crops, for one image."""
    width, height = image.size
    trans = width < height
    if trans:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    diff = int(np.ceil(new_h / 336) * 336) - new_h
    image = ImageOps.expand(image, border=(0, int(diff / 2), 0, diff - int(diff / 2)), fill=(255, 255, 255))
    if trans:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    array = (np.asarray(image, dtype=np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    im = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    glb = F.interpolate(im[None].float(), size=(336, 336), mode="bicubic")
    h, w = im.shape[1:]
    crops = im.reshape(1, 3, h // 336, 336, w // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336)
    return torch.cat([glb, crops])


def phi3_features(img_features, h, w, sub_gn, glb_gn, order):
    """Phi-3's ``hd_feature_transform`` for one image (``image_embedding_phi3_v.py``): ``(1 + h·w, 576, C)``."""
    H, C = 24, img_features.shape[-1]
    glb_img = (
        img_features[:1].reshape(1, H, H, C).reshape(1, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
        .reshape(1, H // 2, H // 2, 4 * C)
    )  # fmt: skip
    glb_img = torch.cat([glb_img, sub_gn.repeat(1, H // 2, 1, 1)], dim=2).reshape(1, -1, 4 * C)
    sub_img = img_features[1:]
    B_ = h * w
    sub_img = (
        sub_img.reshape(B_, H, H, C).reshape(B_, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
        .reshape(B_, -1, 4 * C)
    )  # fmt: skip
    sub_img = sub_img.reshape(1, h, w, 12, 12, -1).permute(0, 1, 3, 2, 4, 5).reshape(1, h * 12, w * 12, 4 * C)
    sub_img = torch.cat([sub_img, sub_gn.repeat(1, h * 12, 1, 1)], dim=2).reshape(1, -1, 4 * C)
    parts = [glb_img, glb_gn, sub_img] if order == "glb_sub" else [sub_img, glb_gn, glb_img]
    return torch.cat(parts, dim=1)[0]


def views_of(geometry: Geometry, **options):
    transform = ImageTransform(ImageTransformConfig(size=geometry.view_size))
    return build_views(ViewsConfig("hd", options), geometry, transform)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# (height, width) of the seed sizes → crop grid and tokens with Phi-3's default 16 crops, and with max_crops set
# to the grid that the size fills exactly
SEED_SIZES = [
    ((336, 336), (4, 4), 2509, 1, (1, 1), 313),
    ((1344, 672), (5, 3), 2377, 8, (4, 2), 1357),
    ((672, 1344), (3, 5), 2353, 8, (2, 4), 1333),
    ((2016, 336), (8, 2), 2557, 6, (6, 1), 1093),
]


@pytest.mark.parametrize(("size", "grid16", "tokens16", "exact_crops", "exact_grid", "exact_tokens"), SEED_SIZES)
def test_seed_sizes_take_phi3s_token_counts(size, grid16, tokens16, exact_crops, exact_grid, exact_tokens):
    for max_crops, grid, tokens in ((16, grid16, tokens16), (exact_crops, exact_grid, exact_tokens)):
        views = views_of(PHI3, max_crops=max_crops)
        assert views.num_tokens(size) == tokens == phi3_tokens(*grid)
        assert views.num_views(size) == grid[0] * grid[1] + 1
        padded_w, padded_h = phi3_padded_size(size[1], size[0], max_crops)
        assert (padded_h // 336, padded_w // 336) == grid


def test_crop_grids_follow_phi3_for_any_size():
    rng = random.Random(0)
    for _ in range(500):
        height, width, max_crops = rng.randint(1, 4000), rng.randint(1, 4000), rng.randint(1, 40)
        if max(height, width) > 200 * min(height, width):
            continue
        padded_w, padded_h = phi3_padded_size(width, height, max_crops)
        grid = (padded_h // 336, padded_w // 336)
        views = views_of(PHI3, max_crops=max_crops)
        assert views.num_tokens((height, width)) == phi3_tokens(*grid), (height, width, max_crops)
        assert grid[0] * grid[1] <= max_crops


@pytest.mark.parametrize("size", [(500, 900), (900, 500), (336, 336), (100, 1500)])
def test_pixels_equal_phi3s_preprocessing(size):
    height, width = size
    image = noise(width, height)
    views = views_of(PHI3, max_crops=4)
    config = views.transform.config
    pixels = views.pixels(image, "noise")
    expected = phi3_pixels(image, 4, config.mean, config.std)
    assert pixels.shape == expected.shape == (views.num_views(size), 3, 336, 336)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", ["sub_glb", "glb_sub"])
@pytest.mark.parametrize("size", [(336, 336), (1344, 672), (672, 1344), (2016, 336)])
def test_feature_layout_equals_phi3s(order, size):
    assembler = build_assembler(ViewsConfig("hd", {"max_crops": 16, "order": order}), PHI3)
    with torch.no_grad():
        assembler.sub_GN.normal_()
        assembler.glb_GN.normal_()
    views = assembler.num_views(size)
    features = torch.randn(views, 576, PHI3.tower_dim)
    out = assembler.before_projector(features, size)
    padded_w, padded_h = phi3_padded_size(size[1], size[0], 16)
    expected = phi3_features(features, padded_h // 336, padded_w // 336, assembler.sub_GN, assembler.glb_GN, order)
    assert torch.equal(out, expected)
    assert out.shape == (views_of(PHI3).num_tokens(size), 4 * PHI3.tower_dim)


@pytest.mark.parametrize(
    ("view_size", "tokens", "merged"), [(32, 16, 2), (336, 576, 12), (384, 729, None), (448, 1024, 16)]
)
def test_other_towers_scale(view_size, tokens, merged):
    geometry = Geometry(view_size=view_size, tokens_per_view=tokens, tower_dim=4, lm_dim=8)
    if merged is None:
        with pytest.raises(ConfigError, match=f"even square number of tokens.*gives {tokens}"):
            views_of(geometry)
        return
    rng = random.Random(1)
    views = views_of(geometry, max_crops=6)
    assembler = build_assembler(ViewsConfig("hd", {"max_crops": 6}), geometry)
    for _ in range(30):
        size = (rng.randint(10, 3000), rng.randint(10, 3000))
        rows, cols = views.layout(size)[:2]
        n = views.num_views(size)
        out = assembler.before_projector(torch.randn(n, tokens, 4), size)
        assert n == assembler.num_views(size) == rows * cols + 1
        assert out.shape[0] == views.num_tokens(size) == (rows * cols + 1) * merged**2 + 1 + (rows + 1) * merged


def test_towers_with_odd_or_cls_grids_are_refused():
    with pytest.raises(ConfigError, match="even square number of tokens.*gives 17.*select_strategy 'default'"):
        compose_tiny(clip_config(), select_strategy="full", views=ViewsConfig("hd"))
    with pytest.raises(ConfigError, match="even square number of tokens.*gives 25"):
        compose_tiny(siglip_config(image_size=40), views=ViewsConfig("hd"))


def test_a_token_reducing_projector_is_refused():
    model, processor = compose_tiny(siglip_config(image_size=64), projector="pixel_shuffle2x", views=ViewsConfig("hd"))
    batch = processor([[{"role": "user", "content": [{"type": "image", "image": noise(40, 30)}]}]])
    with pytest.raises(ConfigError, match="expected 16 tower tokens per view but got 64.*pixel shuffle"):
        model.encode_images(batch["pixel_values"], batch["image_sizes"])


def test_options():
    size = (30, 40)
    plain = views_of(Geometry(32, 16, 4, 8), max_crops=4, separators=False)
    assert plain.num_tokens(size) == 5 * 4  # 2×2 crops + the global view, 2×2 tokens each
    assembler = build_assembler(ViewsConfig("hd", {"max_crops": 4, "separators": False}), Geometry(32, 16, 4, 8))
    assert not list(assembler.parameters())
    assert assembler.before_projector(torch.randn(5, 16, 4), size).shape == (20, 16)
    for bad, match in (({"max_crops": 0}, "max_crops must be a whole number"), ({"order": "x"}, "order.*'x'"),
                       ({"crops": 4}, "unknown config key.*views.options.crops")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            compose_tiny(views=ViewsConfig("hd", bad))


def image_turn(text: str, size: tuple[int, int], seed: int = 0) -> dict:
    """A user turn with a noise image of ``size`` = (width, height)."""
    return {
        "role": "user",
        "content": [{"type": "image", "image": noise(*size, seed=seed)}, {"type": "text", "text": text}],
    }


HD4 = ViewsConfig("hd", {"max_crops": 4})


def test_seed_sizes_through_a_24x24_patch_tower():
    """A one-layer CLIP at 336 px / 14 px patches (24×24): the model's tokens per image equal the processor's."""
    tower = clip_config(image_size=336, patch_size=14, num_hidden_layers=1)
    model, processor = compose_tiny(tower, llama_config(), views=ViewsConfig("hd"))
    assert processor.tokens_per_image == 576
    samples = [processor.encode([image_turn("hi", (w, h))]) for (h, w), *_ in SEED_SIZES]
    assert [s.image_token_counts for s in samples] == [[tokens] for _, _, tokens, *_ in SEED_SIZES]
    batch = processor.collate(samples, padding_side="left")
    with torch.no_grad():
        features = model.encode_images(batch["pixel_values"], batch["image_sizes"])
    assert [f.shape for f in features] == [(tokens, 48) for _, _, tokens, *_ in SEED_SIZES]


def test_chat_batched_equals_alone_and_survives_save_and_load(tmp_path):
    vlm = VLM(*compose_tiny(clip_config(), llama_config(initializer_range=0.3), views=HD4))
    with torch.no_grad():
        vlm.model.image_views.sub_GN.normal_()
        vlm.model.image_views.glb_GN.normal_()
    conversations = [[image_turn("What is it?", (40, 30))], [image_turn("And this?", (90, 30), seed=1)],
                     [image_turn("Tall?", (30, 90), seed=2)], [{"role": "user", "content": "hi"}]]  # fmt: skip
    counts = [vlm.processor.encode(c).image_token_counts for c in conversations]
    assert counts == [[27], [21], [25], []]  # 2×2, 1×3 and 3×1 crops of 2×2 tokens
    options = GenerationOptions(max_new_tokens=6)
    batched = vlm.engine.generate(conversations, options)
    alone = [vlm.engine.generate([c], options)[0] for c in conversations]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    save_pretrained(vlm.model, vlm.processor, tmp_path / "m")
    reloaded = VLM(*load_pretrained(tmp_path / "m"))
    assert reloaded.processor.views_config.name == "hd"
    assert reloaded.processor.views.options.max_crops == 4
    assert torch.equal(reloaded.model.image_views.sub_GN, vlm.model.image_views.sub_GN)
    assert [r.token_ids for r in reloaded.engine.generate(conversations, options)] == [r.token_ids for r in alone]


def test_one_training_step():
    from vlmkit.training.data import Collator, TrainSample

    model, processor = compose_tiny(siglip_config(), llama_config(), views=HD4)
    samples = []
    for size, colour in (((40, 30), "red"), ((30, 90), "blue")):
        conversation = [image_turn("What colour?", size), {"role": "assistant", "content": colour}]
        encoded = processor.encode(conversation, train=True, pixels=False)
        image = conversation[0]["content"][0]["image"]
        samples.append(TrainSample(encoded.input_ids, encoded.labels, encoded.image_token_counts, [image]))
    assert [s.image_token_counts for s in samples] == [[27], [25]]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.image_views.sub_GN.detach().clone()
    for packing in (False, True):
        batch = Collator(processor, packing=packing)(samples)
        assert batch["image_sizes"].tolist() == [[30, 40], [90, 30]] and batch["pixel_values"].shape[0] == 5 + 4
        out = model(batch["input_ids"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                    labels=batch["labels"], supervised_loss=True)  # fmt: skip
        assert torch.isfinite(out["loss_sum"])
        out["loss_sum"].backward()
        assert model.image_views.sub_GN.grad is not None and model.image_views.glb_GN.grad is not None
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(model.image_views.sub_GN, before)


def test_hd_models_are_not_exported_as_llava():
    from vlmkit.interop.hf_llava import check_expressible

    model, _ = compose_tiny(views=HD4)
    with pytest.raises(ConfigError, match="one view per image; this model uses the 'hd' views strategy"):
        check_expressible(model)
    llava_next = pytest.importorskip("vlmkit.interop.hf_llava_next")
    with pytest.raises(ConfigError, match="uses the 'hd' views strategy"):
        llava_next.check_expressible(model)
