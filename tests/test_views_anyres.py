"""AnyRes (LLaVA-NeXT) views: token counts against transformers' processor and the assembler, the options, and
export parity with transformers' LlavaNextForConditionalGeneration, on a random and on a trained tiny model."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaNextProcessor

from conftest import clip_config, compose_tiny, llama_config, make_tokenizer, qwen2_config, siglip_config
from vlmkit.api import VLM
from vlmkit.cli import main
from vlmkit.config import ViewsConfig
from vlmkit.errors import ConfigError
from vlmkit.interop.hf_llava import export_hf_llava
from vlmkit.interop.hf_llava_next import export_hf_llava_next
from vlmkit.models.compose import load_pretrained, save_pretrained

ANYRES = ViewsConfig("anyres")
# (width, height) on the tiny 32-px tower: square, LLaVA-NeXT's 2016x336 ratio (6:1) wide and tall, 3:1, odd
# ratios, a tiny image and one larger than every pinpoint
SIZES = [(40, 40), (192, 32), (32, 192), (96, 32), (50, 37), (37, 61), (5, 3), (300, 200), (64, 64), (33, 100)]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 240, 20), (20, 20, 20)]
PROMPTS = ["Describe the image.", "What colour is it?", "How many stars are there?", "Where is the square?",
           "Is there a red circle?", "Name every object."]  # fmt: skip


def striped(size, colour):
    """A non-uniform image, so that resizing, padding and tiling all show in the pixels."""
    image = Image.new("RGB", size, colour)
    for x in range(0, size[0], 7):
        for y in range(size[1]):
            image.putpixel((x, y), (255 - colour[0], (x * 5) % 256, (y * 9) % 256))
    return image


def conversations():
    out = []
    for i, prompt in enumerate(PROMPTS):
        sizes = [SIZES[(2 * i) % len(SIZES)]] + ([SIZES[(2 * i + 1) % len(SIZES)]] if i % 2 else [])
        parts = [{"type": "image", "image": striped(s, COLOURS[(i + k) % 5])} for k, s in enumerate(sizes)]
        out.append([{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}])
    return out


def tiny_anyres(**options):
    return compose_tiny(clip_config(), llama_config(initializer_range=0.3), views=ViewsConfig("anyres", options))


# ------------------------------------------------------------------------------------------------- layout


def test_token_counts_equal_the_assembler_and_transformers_within_a_batch(tmp_path):
    torch.manual_seed(0)
    model, processor = tiny_anyres()
    assert processor.tokens_per_image == 16 and model.image_views.pinpoints == [[32, 64], [64, 32], [64, 64],
                                                                                [96, 32], [32, 96]]  # fmt: skip
    export_hf_llava_next(model, processor, tmp_path)
    hf = LlavaNextProcessor.from_pretrained(tmp_path)
    sizes = [(h, w) for w, h in SIZES]
    theirs = hf._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    samples = [
        processor.encode([{"role": "user", "content": [{"type": "image", "image": striped(s, (9, 99, 199))},
                                                       {"type": "text", "text": "hi"}]}])
        for s in SIZES
    ]  # fmt: skip
    mine = [s.image_token_counts[0] for s in samples]
    assert mine == theirs == [processor.views.num_tokens(size) for size in sizes]
    assert len(set(mine)) > 4  # the sizes really lay out differently
    batch = processor.collate(samples, padding_side="left")
    assert batch["image_sizes"].tolist() == [list(s) for s in sizes]
    assert batch["pixel_values"].shape[0] == sum(processor.views.num_views(s) for s in sizes)
    with torch.no_grad():
        features = model.encode_images(batch["pixel_values"], batch["image_sizes"])
    assert [f.shape[0] for f in features] == mine
    # the grid's rows end with LLaVA-NeXT's newline; the base view's 16 tokens come first
    # 192x32 (6:1) fits 1×3 tiles: a 4×12 feature grid, of which the padding (rows 0 and 3) is dropped
    newline = model.image_views.image_newline
    assert mine[1] == 16 + 2 * (12 + 1)
    assert torch.equal(features[1][16 + 12], newline) and torch.equal(features[1][-1], newline)
    assert not torch.equal(features[1][16 + 11], newline)


def test_max_tiles_drops_the_larger_pinpoints():
    _, processor = tiny_anyres(max_tiles=2)
    assert processor.views.pinpoints == [[32, 64], [64, 32]]
    assert processor.views.num_views((64, 64)) == 3  # a 2×2 image now fits 1×2 tiles (+ the base view)
    _, unbounded = tiny_anyres()
    assert unbounded.views.num_views((64, 64)) == 5
    with pytest.raises(ConfigError, match="max_tiles 1: every grid pinpoint has more tiles"):
        tiny_anyres(max_tiles=1)
    with pytest.raises(ConfigError, match="max_tiles: expected a positive number"):
        tiny_anyres(max_tiles=0)
    _, custom = tiny_anyres(grid_pinpoints=[[32, 32], [64, 96]], max_tiles=6)
    assert custom.views.pinpoints == [[32, 32], [64, 96]] and custom.views.num_views((60, 90)) == 7


def test_bad_options_and_towers_are_refused():
    with pytest.raises(ConfigError, match=r"\[30, 64\] is not a \[height, width\] of positive multiples of .* 32"):
        tiny_anyres(grid_pinpoints=[[30, 64]])
    with pytest.raises(ConfigError, match="unknown config key.*views.options.tiles"):
        tiny_anyres(tiles=4)
    with pytest.raises(ConfigError, match="17 tokens.*CLS token"):
        compose_tiny(clip_config(), llama_config(), select_strategy="full", views=ANYRES)
    _, processor = compose_tiny(siglip_config(), llama_config(), views=ANYRES)  # no CLS: all 16 are patches
    assert processor.views.num_tokens((32, 32)) == 16 + 4 * (4 + 1)  # 1×2 tiles, half of the 4×8 grid is padding


def test_the_newline_survives_save_and_load_and_trains(tmp_path):
    torch.manual_seed(0)
    model, processor = tiny_anyres(max_tiles=3)
    save_pretrained(model, processor, tmp_path / "m")
    reloaded, again = load_pretrained(tmp_path / "m")
    assert torch.equal(reloaded.image_views.image_newline, model.image_views.image_newline)
    assert again.views.pinpoints == processor.views.pinpoints == [[32, 64], [64, 32], [96, 32], [32, 96]]
    batch = processor([[*conversations()[1], {"role": "assistant", "content": "red"}]], train=True)
    out = model(**batch, supervised_loss=True)
    out["loss_sum"].backward()
    assert model.image_views.image_newline.grad is not None


# ------------------------------------------------------------------------------------------------- export


def train_tiny_anyres(root):
    """A tiny anyres model composed from a training config (``model.views``) and trained a few steps on
    ShapesWorld scenes and some wide and tall images; returns it, its processor and its initial weights."""
    from vlmkit.config import config_from_dict
    from vlmkit.data.formats import Record, open_writer
    from vlmkit.data.synth import SynthConfig, generate
    from vlmkit.training import train
    from vlmkit.training.config import ModelSpec
    from vlmkit.training.model import build_model

    make_tokenizer().save_pretrained(root / "tokenizer")
    with open_writer(root / "data", "jsonl", "train") as writer:
        for record in generate(SynthConfig(tasks=("exist", "attribute", "count"), image_size=64), 12):
            writer.write(record)
        for i, size in enumerate([(96, 32), (32, 96), (50, 37), (192, 32)]):
            buffer = io.BytesIO()
            striped(size, COLOURS[i]).save(buffer, format="PNG")
            messages = [{"role": "user", "content": "<image>\nWhat colour is it?"},
                        {"role": "assistant", "content": "red" if i % 2 else "blue"}]  # fmt: skip
            writer.write(Record(f"odd-{i}", messages, [buffer.getvalue()]))
    spec = {"vision": clip_config().to_dict(), "lm": llama_config(initializer_range=0.3).to_dict(),
            "tokenizer": str(root / "tokenizer"), "views": {"name": "anyres", "options": {"max_tiles": 3}}}  # fmt: skip
    config = {
        "model": spec,
        "stages": [{"name": "sft", "data": [{"path": str(root / "data" / "train.jsonl")}],
                    "policy": {"vision": "frozen", "projector": "full", "language_model": "full"},
                    "lr": 3e-3, "steps": 4, "batch_size": 4, "warmup_steps": 0}],
        "output_dir": str(root / "run"), "seed": 0, "save_every": None, "keep_last": None, "progress": False,
    }  # fmt: skip
    torch.manual_seed(0)  # as the trainer builds it
    initial = build_model(config_from_dict(ModelSpec, spec, "model."))[0].state_dict()
    result = train(config)
    assert len(result.losses) == 4 and result.final_dir is not None
    return (*load_pretrained(result.final_dir), initial)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_anyres(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module", params=["random", "trained"])
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "random":
        model, processor = tiny_anyres()
    else:
        model, processor, _ = request.getfixturevalue("trained")
    out = export_hf_llava_next(model.eval(), processor, tmp_path_factory.mktemp(request.param) / "hf")
    hf_model = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    return VLM(model, processor), out, hf_model, AutoProcessor.from_pretrained(out)


def test_the_trained_model_did_train(trained):
    model, processor, initial = trained
    assert model.config.views.name == "anyres"
    assert processor.views.pinpoints == [[32, 64], [64, 32], [96, 32], [32, 96]]  # max_tiles 3 dropped the 2×2
    state = model.state_dict()
    assert set(state) == set(initial)
    for name in ("projector.0.weight", "language_model.model.layers.0.mlp.up_proj.weight"):
        assert not torch.allclose(state[name], initial[name]), name
    frozen = "vision_tower.model.embeddings.patch_embedding.weight"
    assert torch.equal(state[frozen], initial[frozen])


def test_on_disk_layout_and_config(exported):
    vlm, out, hf_model, hf_processor = exported
    keys = set(load_file(str(out / "model.safetensors")))
    assert "image_newline" in keys and "multi_modal_projector.linear_1.weight" in keys
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["image_token_index"] == vlm.processor.image_token_id
    assert config["image_grid_pinpoints"] == vlm.model.image_views.pinpoints
    assert config["vision_feature_select_strategy"] == "default" and config["vision_feature_layer"] == -2
    assert torch.equal(hf_model.model.image_newline, vlm.model.image_views.image_newline)
    assert isinstance(hf_processor, LlavaNextProcessor)
    assert hf_processor.image_processor.image_grid_pinpoints == vlm.model.image_views.pinpoints


def _hf_inputs(hf_processor, conversation):
    return hf_processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def test_inputs_and_logits_match_transformers(exported):
    vlm, _, hf_model, hf_processor = exported
    worst = 0.0
    for conversation in conversations():
        mine = vlm.processor([conversation])
        theirs = _hf_inputs(hf_processor, conversation)
        assert theirs["input_ids"].tolist() == mine["input_ids"].tolist()
        assert theirs["image_sizes"].tolist() == mine["image_sizes"].tolist()
        views = [vlm.processor.views.num_views(tuple(s)) for s in mine["image_sizes"].tolist()]
        unpadded = torch.cat([pixels[:n] for pixels, n in zip(theirs["pixel_values"], views, strict=True)])
        assert unpadded.shape == mine["pixel_values"].shape
        assert torch.allclose(unpadded, mine["pixel_values"], atol=1e-6, rtol=0)
        with torch.no_grad():
            a = vlm.model(**mine).logits
            b = hf_model(**theirs).logits
        worst = max(worst, float((a - b).abs().max()))
    assert worst <= 1e-4, worst


def test_a_batch_of_different_sizes_matches_each_alone(exported):
    vlm, _, hf_model, hf_processor = exported
    batch = vlm.processor(conversations(), padding_side="left")
    with torch.no_grad():
        logits = vlm.model(**batch).logits
    for row, conversation in enumerate(conversations()):
        theirs = _hf_inputs(hf_processor, conversation)
        n = theirs["input_ids"].shape[1]
        with torch.no_grad():
            reference = hf_model(**theirs).logits[0]
        assert (logits[row, -n:] - reference).abs().max() <= 1e-4


def test_greedy_generations_match(exported):
    vlm, _, hf_model, hf_processor = exported
    stop = vlm.processor.stop_token_ids
    for conversation in conversations():
        inputs = _hf_inputs(hf_processor, conversation)
        with torch.no_grad():
            generated = hf_model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=stop)
        theirs = generated[0, inputs["input_ids"].shape[1] :].tolist()
        mine = vlm.generate_batch([conversation], max_new_tokens=24)[0]
        # transformers keeps the end-of-turn token in its output; vlmkit counts it but leaves it out of token_ids
        assert theirs[: len(mine.token_ids)] == mine.token_ids and len(theirs) == mine.completion_tokens
        text = hf_processor.decode(theirs, skip_special_tokens=True)
        assert text == vlm.chat(conversation, max_new_tokens=24)


def test_a_siglip_tower_with_tied_embeddings_and_two_layers_matches_too(tmp_path):
    torch.manual_seed(0)
    model, processor = compose_tiny(
        siglip_config(), qwen2_config(initializer_range=0.3), feature_layer=[-3, -1], views=ANYRES
    )
    out = export_hf_llava_next(model.eval(), processor, tmp_path)
    hf_model = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert hf_model.config.vision_feature_select_strategy == "full"
    hf_processor = AutoProcessor.from_pretrained(out)
    for conversation in conversations()[:3]:
        mine = processor([conversation])
        theirs = _hf_inputs(hf_processor, conversation)
        assert theirs["input_ids"].tolist() == mine["input_ids"].tolist()
        with torch.no_grad():
            assert (model(**mine).logits - hf_model(**theirs).logits).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------------- refusals, CLI


def test_each_format_points_to_the_other(tmp_path):
    model, processor = tiny_anyres()
    with pytest.raises(ConfigError, match="one view per image; this model uses the 'anyres' .*hf-llava-next"):
        export_hf_llava(model, processor, tmp_path / "a")
    single, single_processor = compose_tiny()
    with pytest.raises(ConfigError, match="AnyRes; this model uses the 'single' views strategy .*hf-llava\\)"):
        export_hf_llava_next(single, single_processor, tmp_path / "b")
    linear, linear_processor = compose_tiny(projector="linear", views=ANYRES)
    with pytest.raises(ConfigError, match="Linear-GELU-Linear.*'linear'"):
        export_hf_llava_next(linear, linear_processor, tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_cli_export(tmp_path, capsys):
    torch.manual_seed(0)
    save_pretrained(*tiny_anyres(), tmp_path / "m")
    assert main(["export", "--model", str(tmp_path / "m"), "--to", "hf-llava-next", str(tmp_path / "out")]) == 0
    assert "transformers LLaVA-NeXT format" in capsys.readouterr().err
    assert LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "out").config.image_grid_pinpoints
    assert main(["export", "--model", str(tmp_path / "m"), "--to", "hf-llava", str(tmp_path / "x")]) == 1
    assert "export it as hf-llava-next" in capsys.readouterr().err
    assert main(["export", "--model", "tiny-random", "--to", "hf-llava-next", str(tmp_path / "y")]) == 1
    assert "export it as hf-llava)" in capsys.readouterr().err
