"""The transformers backend: tiny random Qwen2-VL, InternVL and Gemma 3 checkpoints, built offline and loaded by path.

Each checkpoint has a locally trained tokenizer with the family's special tokens and a compact version of the
family's real chat template; vlmkit's outputs are compared with a direct transformers call on the same messages.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import is_torchvision_available

import vlmkit
from conftest import CORPUS
from vlmkit.api import VLM
from vlmkit.errors import ImageError, ProcessingError
from vlmkit.inference.describe import describe
from vlmkit.interop.hf_backend import is_transformers_vlm
from vlmkit.interop.hf_engine import HFEngine
from vlmkit.interop.hf_processor import _images_only
from vlmkit.processing.tokenizer_training import train_bpe_tokenizer

QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n你是书生·万象，英文名是InternVL，是一个多模态大语言模型。<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TEXT.update(max_position_embeddings=512, initializer_range=0.2)
ARCHS = ("qwen2_vl", "internvl", "gemma3")


def _tokenizer(specials: list[str], named: dict[str, str] | None = None, eos: str = "</s>") -> PreTrainedTokenizerFast:
    """A locally trained byte-level BPE tokenizer with the family's special tokens (named ones as attributes)."""
    trained = train_bpe_tokenizer(CORPUS * 20, vocab_size=400, chat=False)
    trained.add_special_tokens({"additional_special_tokens": specials})
    backend = Tokenizer.from_str(trained.backend_tokenizer.to_str())
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token=eos,
        pad_token="<pad>",
        extra_special_tokens=named or specials,
    )


def _ids(tok, common: dict) -> dict:
    return dict(common, vocab_size=len(tok), bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)


def build_qwen2_vl(folder) -> None:
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(specials, eos="<|im_end|>")
    ids = dict(zip(specials, tok.convert_tokens_to_ids(specials), strict=True))
    rope = {"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0}  # head_dim 12
    config = Qwen2VLConfig(
        text_config=_ids(tok, TEXT) | {"eos_token_id": ids["<|im_end|>"], "rope_parameters": rope},
        vision_config=dict(depth=2, embed_dim=32, hidden_size=48, num_heads=2, patch_size=14, spatial_merge_size=2),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    # transformers can't build Qwen2-VL's video processor without torchvision: save the processor without it
    processor = _images_only(Qwen2VLProcessor)(image_processor=images, tokenizer=tok, chat_template=QWEN2_VL_TEMPLATE)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def build_internvl(folder) -> None:
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
    named["video_token"] = "<video>"
    tok = _tokenizer(["<|im_start|>", "<|im_end|>", *named.values()], named, eos="<|im_end|>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = InternVLConfig(
        vision_config=vision | {"image_size": [32, 32], "patch_size": [8, 8]},  # 16 patches → 4 tokens per tile
        text_config=_ids(tok, TEXT) | {"model_type": "qwen2", "eos_token_id": tok.eos_token_id},
        image_token_id=tok.context_image_token_id,
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    images = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=2)
    processor = _images_only(InternVLProcessor)(
        image_processor=images, tokenizer=tok, image_seq_length=4, chat_template=INTERNVL_TEMPLATE
    )
    InternVLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def build_gemma3(folder) -> None:
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _tokenizer(["<start_of_turn>", "<end_of_turn>", *named.values()], named)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    text = _ids(tok, TEXT) | {"head_dim": 12, "query_pre_attn_scalar": 12, "sliding_window": 64}
    config = Gemma3Config(
        text_config=text | {"eos_token_id": [tok.eos_token_id, end_of_turn]},
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        | {"image_size": 32, "patch_size": 8},
        mm_tokens_per_image=4,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(
        image_processor=images, tokenizer=tok, image_seq_length=4, chat_template=GEMMA3_TEMPLATE
    )
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # Gemma's init (zero projector, zero-centred norms) makes a tiny random model say nothing
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


BUILDERS = {"qwen2_vl": build_qwen2_vl, "internvl": build_internvl, "gemma3": build_gemma3}
PROCESSORS = {"qwen2_vl": Qwen2VLProcessor, "internvl": InternVLProcessor, "gemma3": Gemma3Processor}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf-vlms")
    for name, build in BUILDERS.items():
        build(root / name)
    return root


def load_vlm(folder) -> VLM:
    """Through ``vlmkit.load``, as a user would: the folder is recognised as a transformers VLM."""
    vlm = vlmkit.load(str(folder), device="cpu", dtype="fp32")
    assert type(vlm.engine).__name__ == "HFEngine"
    return vlm


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request, folders) -> VLM:
    loaded = load_vlm(folders / request.param)
    loaded.arch = request.param
    return loaded


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    colours = [(200, 30, 30), (20, 40, 220), (30, 180, 60)]
    sizes = [(60, 40), (32, 48), (90, 90)]
    for i, (colour, size) in enumerate(zip(colours, sizes, strict=True)):
        image = Image.new("RGB", size, colour)
        image.paste((255, 255, 0), (5, 5, 20, 15))
        image.save(folder / f"img{i}.png")
    return folder


def turn(text: str, *images) -> dict:
    return {
        "role": "user",
        "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}],
    }


def direct_transformers(folder, conversation: list[dict], max_new_tokens: int) -> tuple[list[int], str, int]:
    """Greedy token ids (up to the first EOS), their text and the prompt length, with transformers alone."""
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    if is_torchvision_available():
        processor = AutoProcessor.from_pretrained(folder)
    else:  # AutoProcessor would need torchvision for Qwen2-VL's and InternVL's video processors
        processor = _images_only(PROCESSORS[folder.name]).from_pretrained(folder)
    inputs = processor.apply_chat_template(
        [conversation], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
    return new, processor.decode(new, skip_special_tokens=True), inputs["input_ids"].shape[1]


def test_detection(folders, tmp_path):
    assert all(is_transformers_vlm(folders / name) for name in ARCHS)
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / "vlmkit").mkdir()
    (tmp_path / "vlmkit" / "config.json").write_text(json.dumps({"format_version": 1}))
    assert not is_transformers_vlm(tmp_path / "llava")
    assert not is_transformers_vlm(tmp_path / "vlmkit")
    assert not is_transformers_vlm(tmp_path / "missing")


def test_greedy_equals_transformers(vlm, folders, images):
    path = images / "img0.png"
    vlmkit_conv = [turn("Describe the image.", str(path))]
    direct_conv = [turn("Describe the image.", Image.open(path).convert("RGB"))]
    expected, text, prompt_tokens = direct_transformers(folders / vlm.arch, direct_conv, max_new_tokens=10)
    result = vlm.generate_batch([vlmkit_conv], max_new_tokens=10)[0]
    assert result.token_ids == expected and len(set(expected)) > 2
    assert result.text == text
    assert result.prompt_tokens == prompt_tokens
    assert result.finish_reason == ("length" if len(expected) == 10 else "stop")
    assert vlm.chat("Describe the image.", images=[str(path)], max_new_tokens=10) == result.text


@pytest.fixture(scope="module")
def qwen(folders) -> VLM:
    return load_vlm(folders / "qwen2_vl")


def test_describe_a_folder(qwen, images, tmp_path):
    out = tmp_path / "descriptions.jsonl"
    summary = describe(qwen, [images], out, batch_size=2, max_new_tokens=6, progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.described == 3 and summary.errors == 0
    assert [r["error"] for r in records] == [None] * 3 and all(r["text"] is not None for r in records)
    assert (
        records[0]["text"] == qwen.chat("Describe the image.", images=[records[0]["image"]], max_new_tokens=6).strip()
    )


def test_image_and_prompt_errors(qwen, images, tmp_path, monkeypatch):
    with pytest.raises(ImageError, match="not found"):
        qwen.chat("Describe the image.", images=[str(tmp_path / "missing.png")])
    with pytest.raises(ImageError, match="remote"):
        qwen.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}])
    with pytest.raises(ProcessingError, match="unknown content part type 'video'"):
        qwen.chat([{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}])
    with pytest.raises(ProcessingError, match="unknown role"):
        qwen.chat([{"role": "robot", "content": "hi"}])
    monkeypatch.setattr(qwen.engine, "context_length", 20)
    with pytest.raises(ProcessingError, match="context is 20 tokens"):
        qwen.chat("Describe the image.", images=[str(images / "img0.png")])


def test_image_forms_are_equivalent(qwen, images):
    import base64

    path = images / "img2.png"
    data = base64.b64encode(path.read_bytes()).decode()
    forms = [
        {"type": "image", "image": str(path)},
        {"type": "image", "path": str(path)},
        {"type": "image", "base64": data},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
    ]
    results = [
        qwen.generate_batch(
            [[{"role": "user", "content": [form, {"type": "text", "text": "What?"}]}]], max_new_tokens=5
        )[0]
        for form in forms
    ]
    assert len({tuple(r.token_ids) for r in results}) == 1


def test_closing_a_stream_early_stops_the_worker(qwen, images):
    import threading

    stream = qwen.stream("Describe the image.", images=[str(images / "img0.png")], max_new_tokens=200)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "vlmkit-hf-generate"]
    assert isinstance(qwen.engine, HFEngine)


def test_template_errors_are_processing_errors(folders):
    gemma = load_vlm(folders / "gemma3")
    with pytest.raises(ProcessingError, match="roles must alternate"):
        gemma.chat([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}])
    system = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}]
    assert gemma.generate_batch([system], max_new_tokens=3)[0].completion_tokens >= 1
