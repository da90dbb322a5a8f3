"""The image-views seam: a strategy registered in a test (two views per image and a learned separator) runs
through the processor, the model, the engine, training collation and save/load, with per-image token counts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from PIL import Image, ImageOps
from torch import nn

from conftest import compose_tiny, image_turn, llama_config, siglip_config
from vlmkit.api import VLM
from vlmkit.config import ViewsConfig
from vlmkit.errors import ConfigError, RegistryError
from vlmkit.inference.options import GenerationOptions
from vlmkit.models.compose import load_pretrained, save_pretrained
from vlmkit.views import VIEWS, Assembler, Views, ViewsSpec


@dataclass
class MirrorOptions:
    separator: bool = True


class MirrorViews(Views):
    """The image and its mirror image; wide images get a third view (so counts differ per image)."""

    def pixels(self, image: Image.Image, name: str) -> torch.Tensor:
        views = [image, ImageOps.mirror(image)] + ([image.rotate(90)] if image.width > 2 * image.height else [])
        return torch.stack([self.transform(v, name) for v in views])

    def num_views(self, size) -> int:
        height, width = size
        return 3 if width > 2 * height else 2

    def num_tokens(self, size) -> int:
        return self.num_views(size) * self.geometry.tokens_per_view + int(self.options.separator)


class MirrorAssembler(Assembler):
    def __init__(self, options, geometry) -> None:
        super().__init__(options, geometry)
        self.separator = nn.Parameter(torch.randn(geometry.lm_dim) * 0.02)

    def num_views(self, size) -> int:
        height, width = size
        return 3 if width > 2 * height else 2

    def after_projector(self, projected, size):
        flat = projected.reshape(-1, projected.shape[-1])
        if not self.options.separator:
            return flat
        return torch.cat([flat[: self.geometry.tokens_per_view], self.separator[None].to(flat.dtype),
                          flat[self.geometry.tokens_per_view :]])  # fmt: skip


@pytest.fixture(scope="module")
def mirror():
    with VIEWS.temporary("test_mirror", ViewsSpec(MirrorOptions, MirrorViews, MirrorAssembler)):
        yield ViewsConfig("test_mirror")


def wide_turn(text):
    return {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (90, 30), (10, 200, 10))},
                                        {"type": "text", "text": text}]}  # fmt: skip


def test_token_counts_follow_each_image(mirror):
    torch.manual_seed(0)
    model, processor = compose_tiny(siglip_config(), llama_config(), views=mirror)
    per_view = processor.tokens_per_image
    square = processor.encode([image_turn("a")])
    wide = processor.encode([wide_turn("b")])
    assert square.image_token_counts == [2 * per_view + 1] and wide.image_token_counts == [3 * per_view + 1]
    assert square.pixel_values.shape[0] == 2 and wide.pixel_values.shape[0] == 3
    batch = processor.collate([square, wide], padding_side="left")
    assert batch["image_sizes"].tolist() == [[30, 40], [30, 90]]
    features = model.encode_images(batch["pixel_values"], batch["image_sizes"])
    assert [f.shape[0] for f in features] == [2 * per_view + 1, 3 * per_view + 1]
    assert torch.equal(features[0][per_view], model.image_views.separator.to(features[0].dtype))


def test_generation_batched_equals_alone_and_survives_save_and_load(mirror, tmp_path):
    torch.manual_seed(0)
    vlm = VLM(*compose_tiny(siglip_config(), llama_config(initializer_range=0.3), views=mirror))
    conversations = [[image_turn("What is it?")], [wide_turn("And this?")], [{"role": "user", "content": "hi"}]]
    options = GenerationOptions(max_new_tokens=6)
    batched = vlm.engine.generate(conversations, options)
    alone = [vlm.engine.generate([c], options)[0] for c in conversations]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    save_pretrained(vlm.model, vlm.processor, tmp_path / "m")
    reloaded = VLM(*load_pretrained(tmp_path / "m"))
    assert reloaded.processor.views_config.name == "test_mirror"
    assert torch.equal(reloaded.model.image_views.separator, vlm.model.image_views.separator)
    assert [r.token_ids for r in reloaded.engine.generate(conversations, options)] == [r.token_ids for r in alone]


def test_training_collation_carries_image_sizes(mirror):
    from vlmkit.training.data import Collator, TrainSample

    torch.manual_seed(0)
    model, processor = compose_tiny(siglip_config(), llama_config(), views=mirror)
    image = Image.new("RGB", (90, 30), (200, 0, 0))
    conversation = [wide_turn("What colour?"), {"role": "assistant", "content": "red"}]
    encoded = processor.encode(conversation, train=True, pixels=False)
    assert encoded.image_token_counts == [3 * processor.tokens_per_image + 1]
    sample = TrainSample(encoded.input_ids, encoded.labels, encoded.image_token_counts, [image])
    for packing in (False, True):
        batch = Collator(processor, packing=packing)([sample, sample])
        assert batch["image_sizes"].tolist() == [[30, 90], [30, 90]] and batch["pixel_values"].shape[0] == 6
        out = model(batch["input_ids"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                    labels=batch["labels"], supervised_loss=True)  # fmt: skip
        out["loss_sum"].backward()
        assert model.image_views.separator.grad is not None
        model.zero_grad()


def test_unknown_strategies_and_options_are_refused():
    with pytest.raises(RegistryError, match="unknown image views strategy 'tiles'; valid names: .*single"):
        compose_tiny(views=ViewsConfig("tiles"))
    with pytest.raises(ConfigError, match="unknown config key.*views.options.grid"):
        compose_tiny(views=ViewsConfig("single", {"grid": 2}))


def test_a_multi_view_model_is_not_exported_as_plain_llava(mirror):
    from vlmkit.interop.hf_llava import check_expressible

    model, _ = compose_tiny(views=mirror)
    with pytest.raises(ConfigError, match="one view per image; this model uses the 'test_mirror'"):
        check_expressible(model)


def test_an_image_token_budget_is_checked_before_any_view_is_built(mirror, monkeypatch):
    from vlmkit.errors import ProcessingError

    _, processor = compose_tiny(siglip_config(), llama_config(), views=mirror)
    built = []
    real = processor.views.pixels
    monkeypatch.setattr(processor.views, "pixels", lambda image, name: built.append(name) or real(image, name))
    per_image = 2 * processor.tokens_per_image + 1
    processor.max_image_tokens = 2 * per_image - 1
    with pytest.raises(ProcessingError, match=f"make {2 * per_image} image tokens .* over the budget"):
        processor.encode([image_turn("two images", 2)])
    assert built == []
    processor.max_image_tokens = 2 * per_image
    assert processor.encode([image_turn("two images", 2)]).image_token_counts == [per_image, per_image]


def test_the_server_applies_its_image_token_budget(mirror):
    import httpx

    from test_server import LiveServer, image_message
    from vlmkit.serving.server import ServerSettings

    vlm = VLM(*compose_tiny(siglip_config(), llama_config(), views=mirror))
    live = LiveServer(vlm, ServerSettings(model_name="tiny", max_image_tokens=vlm.processor.tokens_per_image))
    try:
        body = {"model": "tiny", "messages": image_message(), "max_tokens": 2}
        answer = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 400 and "over the budget" in answer.json()["error"]["message"]
        text_only = {**body, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{live.url}/v1/chat/completions", json=text_only, timeout=30).status_code == 200
    finally:
        live.stop()


def test_the_strategys_parameters_train_freeze_and_travel_with_the_projector(mirror, tmp_path):
    from types import SimpleNamespace

    from vlmkit.training.model import merged_view, param_groups

    torch.manual_seed(0)
    model, _ = compose_tiny(siglip_config(), llama_config(), views=mirror)
    model.set_trainable(vision=False, projector=False, language_model=False)
    assert not model.image_views.separator.requires_grad
    assert model.parameter_summary()["projector"].frozen >= model.image_views.separator.numel()
    model.set_trainable(projector=True)
    assert model.image_views.separator.requires_grad
    stage = SimpleNamespace(module_lr={}, lr=1e-3, weight_decay=0.0)
    grouped = {id(p) for group in param_groups(model, stage) for p in group["params"]}
    assert id(model.image_views.separator) in grouped
    assert merged_view(model).image_views is model.image_views
    with torch.no_grad():
        model.image_views.separator.fill_(0.5)
    model.save_projector(tmp_path / "proj")
    other, _ = compose_tiny(siglip_config(), llama_config(), views=mirror)
    other.load_projector(tmp_path / "proj")
    assert torch.equal(other.image_views.separator, model.image_views.separator)
    single, _ = compose_tiny(siglip_config(), llama_config())
    with pytest.raises(ConfigError, match="trained with 'test_mirror' image views, but this model uses 'single'"):
        single.load_projector(tmp_path / "proj")
