"""Export to transformers' LLaVA format and back: logits, greedy generations and pipeline parity."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

import vlmkit
from conftest import clip_config, compose_tiny, llama_config, qwen2_config, siglip_config, solid_image
from vlmkit.api import VLM
from vlmkit.cli import main
from vlmkit.errors import ConfigError
from vlmkit.interop.hf_llava import export_hf_llava, load_hf_llava
from vlmkit.models.builtin import BUILTIN_DIR
from vlmkit.models.compose import load_pretrained

PROMPTS = ["Describe the image.", "What colour is it?", "How many stars are there?", "Is there a red circle?",
           "Where is the square?", "What word is written?", "Name every object.", "Is it large?",
           "What shape is in the center?", "Count the objects."]  # fmt: skip
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 240, 20), (20, 20, 20)]


def conversations():
    return [
        [{"role": "user", "content": [
            *[{"type": "image", "image": solid_image(COLOURS[(i + k) % 5], (40 + 8 * i, 30))}
              for k in range(1 + i % 2)],
            {"type": "text", "text": prompt}]}]
        for i, prompt in enumerate(PROMPTS)
    ]  # fmt: skip


COMPOSITES = {
    "clip-llama": lambda: compose_tiny(clip_config(), llama_config(initializer_range=0.3)),
    "siglip-qwen2-tied": lambda: compose_tiny(
        siglip_config(), qwen2_config(initializer_range=0.3), feature_layer=[-3, -1]
    ),
    "builtin-default": lambda: load_pretrained(BUILTIN_DIR),  # the shipped model: SigLIP + Llama, 96-px resize
}


@pytest.fixture(scope="module", params=sorted(COMPOSITES))
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    model, processor = COMPOSITES[request.param]()
    model.eval()
    out = tmp_path_factory.mktemp(request.param)
    export_hf_llava(model, processor, out)
    return VLM(model, processor), out


def test_on_disk_layout(exported):
    vlm, out = exported
    keys = set(load_file(str(out / "model.safetensors")))
    assert any(k.startswith("vision_tower.vision_model.embeddings.") for k in keys)
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias"} <= keys
    assert any(k.startswith("language_model.model.layers.0.") for k in keys)
    tied = vlm.model.language_model.config.tie_word_embeddings
    assert ("language_model.lm_head.weight" in keys) == (not tied)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["image_token_index"] == vlm.processor.image_token_id


def test_logits_match_transformers(exported):
    vlm, out = exported
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    hf_processor = AutoProcessor.from_pretrained(out)
    for conversation in conversations():
        mine = vlm.processor([conversation])
        theirs = hf_processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        assert theirs["input_ids"].tolist() == mine["input_ids"].tolist()
        assert torch.allclose(theirs["pixel_values"], mine["pixel_values"], atol=1e-5)
        with torch.no_grad():
            a = vlm.model(**mine).logits
            b = llava(**theirs).logits
        assert (a - b).abs().max() <= 1e-4


def test_greedy_generations_match(exported):
    vlm, out = exported
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    hf_processor = AutoProcessor.from_pretrained(out)
    stop = vlm.processor.stop_token_ids
    for conversation in conversations()[:4]:
        inputs = hf_processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            generated = llava.generate(**inputs, max_new_tokens=32, do_sample=False, eos_token_id=stop)
        theirs = generated[0, inputs["input_ids"].shape[1] :].tolist()
        mine = vlm.generate_batch([conversation], max_new_tokens=32)[0]
        # transformers keeps the end-of-turn token in its output; vlmkit counts it but leaves it out of token_ids
        assert theirs[: len(mine.token_ids)] == mine.token_ids and len(theirs) == mine.completion_tokens


def test_pipeline_equals_vlmkit_chat(exported, tmp_path):
    vlm, out = exported
    path = tmp_path / "scene.png"
    solid_image((30, 200, 30), (50, 40)).save(path)
    messages = [
        {"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "Describe it."}]}
    ]
    pipe = pipeline("image-text-to-text", model=str(out))
    result = pipe(text=messages, generate_kwargs={"max_new_tokens": 24, "do_sample": False}, return_full_text=False)
    assert result[0]["generated_text"] == vlm.chat(messages, max_new_tokens=24)


def test_import_both_layouts_gives_same_logits(exported, tmp_path):
    vlm, out = exported
    batch = vlm.processor(conversations()[:3])
    with torch.no_grad():
        reference = vlm.model(**batch).logits
    imported = vlmkit.load(str(out))
    with torch.no_grad():
        assert torch.equal(imported.model(**batch).logits, reference)
    # the `model.`-prefixed layout: the keys of transformers' in-memory Llava (4.52+ and 5.x)
    prefixed = tmp_path / "prefixed"
    shutil.copytree(out, prefixed)
    llava = LlavaForConditionalGeneration.from_pretrained(out)
    state = llava.state_dict()
    assert any(k.startswith("model.vision_tower.") for k in state)
    tied = llava.config.tie_word_embeddings
    weights = {k: v.contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}
    save_file(weights, str(prefixed / "model.safetensors"))
    model, processor = load_hf_llava(prefixed)
    with torch.no_grad():
        assert (model(**processor(conversations()[:3])).logits - reference).abs().max() <= 1e-6


def test_models_llava_cannot_express_are_refused(tmp_path):
    model, processor = compose_tiny(projector="linear")
    with pytest.raises(ConfigError, match="Linear-GELU-Linear.*'linear'"):
        export_hf_llava(model, processor, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_export(tmp_path, capsys):
    assert main(["export", "--model", "tiny-random", "--to", "hf-llava", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "transformers LLaVA format" in capsys.readouterr().err
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert llava.config.vision_feature_select_strategy == "full"  # the tiny model's tower is SigLIP
