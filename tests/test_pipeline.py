"""``vlmkit.pipeline("image-text-to-text")``: seed 004's call as written, transformers' output structure, the
streamer, generation settings resolved as transformers resolves them, and ``pipe.model.dispose()``."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, TextStreamer

import vlmkit
from conftest import compose_tiny, image_turn, qwen2_config, siglip_config
from vlmkit.api import VLM
from vlmkit.errors import ConfigError, ProcessingError


@pytest.fixture
def vlm() -> VLM:
    torch.manual_seed(0)
    return VLM(*compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3)))


@pytest.fixture
def messages():
    return [image_turn("Describe the image.", 1, (0, 0, 255))]


class Recorder(TextStreamer):
    """transformers' TextStreamer, keeping what it prints and the shapes ``put`` received."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.printed = ""
        self.shapes: list[tuple[int, ...]] = []
        self.ended = False

    def put(self, value):
        self.shapes.append(tuple(value.shape))
        super().put(value)

    def on_finalized_text(self, text, stream_end=False):
        self.printed += text
        self.ended = self.ended or stream_end


def test_seed_004_call_as_written(vlm, messages):
    pipe = vlmkit.pipeline("image-text-to-text", model=vlm)
    pipe.generation_config.max_new_tokens = None  # the seed lifts the pipeline's 256-token default
    streamer = Recorder(tokenizer=pipe.tokenizer, skip_prompt=False)
    out = pipe(text=messages, generate_kwargs={"max_length": 512, "streamer": streamer, "repetition_penalty": 1.1})
    prompt = vlm.engine.encode(messages)
    expected = vlm.chat(messages, max_new_tokens=512 - len(prompt.input_ids), repetition_penalty=1.1)
    # transformers' structure: one dict per answer, the conversation with the new assistant message
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"input_text", "generated_text"}
    assert out[0]["input_text"] == messages
    assert out[0]["generated_text"] == [*messages, {"role": "assistant", "content": expected}]
    # the streamer got the prompt's ids as (1, L), then each new token as (1,), then end(): it printed both
    assert streamer.shapes[0] == (1, len(prompt.input_ids)) and set(streamer.shapes[1:]) == {(1,)}
    assert streamer.ended
    answer = vlm.engine.generate([prompt], vlmkit.GenerationOptions(max_length=512, repetition_penalty=1.1))[0]
    assert len(streamer.shapes) == 1 + len(answer.token_ids)
    decoded_prompt = pipe.tokenizer.decode(prompt.input_ids)
    assert streamer.printed == pipe.tokenizer.decode(prompt.input_ids + answer.token_ids)
    assert streamer.printed.startswith(decoded_prompt)
    pipe.model.dispose()
    with pytest.raises(ConfigError, match="was closed"):
        vlm.chat("hi")


def test_skip_prompt_streams_the_answer_only_and_equals_chat(vlm, messages):
    pipe = vlmkit.pipeline("image-text-to-text", model=vlm)
    streamer = Recorder(tokenizer=pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = pipe(text=messages, max_new_tokens=20, generate_kwargs={"streamer": streamer}, return_full_text=False)
    assert out == [{"input_text": messages, "generated_text": vlm.chat(messages, max_new_tokens=20)}]
    assert streamer.printed == out[0]["generated_text"]


def test_generation_settings_resolve_as_in_transformers(vlm, messages, caplog):
    pipe = vlmkit.pipeline("image-text-to-text", model=vlm)
    assert isinstance(pipe.generation_config, GenerationConfig) and pipe.generation_config.max_new_tokens == 256
    prompt = len(vlm.engine.encode(messages).input_ids)

    def new_text(**kwargs):
        return pipe(text=messages, return_full_text=False, **kwargs)[0]["generated_text"]

    assert new_text(max_new_tokens=7) == vlm.chat(messages, max_new_tokens=7)
    # max_new_tokens (the pipeline's 256 default included) wins over max_length, as in transformers
    assert new_text(generate_kwargs={"max_length": prompt + 3}) == vlm.chat(messages, max_new_tokens=256)
    pipe.generation_config.max_new_tokens = None
    assert new_text(generate_kwargs={"max_length": prompt + 3}) == vlm.chat(messages, max_new_tokens=3)
    assert prompt >= 20  # neither set: transformers' max_length of 20, which this prompt (16 image tokens) fills
    with pytest.raises(ProcessingError, match="max_length=20"):
        new_text()
    # temperature without do_sample is greedy (transformers warns); with it, vlmkit's sampler with top_k 50
    with caplog.at_level("WARNING"):
        assert new_text(max_new_tokens=6, generate_kwargs={"temperature": 0.7}) == vlm.chat(messages, max_new_tokens=6)
    assert "only apply when sampling" in caplog.text
    sampled = new_text(max_new_tokens=6, generate_kwargs={"do_sample": True, "temperature": 0.9, "seed": 4})
    assert sampled == vlm.chat(messages, max_new_tokens=6, temperature=0.9, top_k=50, seed=4)
    pipe.generation_config.do_sample = True
    pipe.generation_config.top_k = 5
    assert new_text(max_new_tokens=6, generate_kwargs={"seed": 4}) == vlm.chat(
        messages, max_new_tokens=6, temperature=1.0, top_k=5, seed=4
    )


def test_inputs_batches_prompts_and_prefills(vlm, messages):
    pipe = vlmkit.pipeline("image-text-to-text", model=vlm)
    other = [{"role": "user", "content": "How many stars are there?"}]
    batch = pipe(text=[messages, other], max_new_tokens=5)
    assert [b[0]["generated_text"][-1]["content"] for b in batch] == [
        vlm.chat(messages, max_new_tokens=5), vlm.chat(other, max_new_tokens=5)
    ]  # fmt: skip
    assert pipe(messages, max_new_tokens=5) == batch[0]  # a chat as the first argument, as transformers
    image = messages[0]["content"][0]["image"]
    by_prompt = pipe(images=image, text="Describe the image.", max_new_tokens=5)
    answer = vlm.chat("Describe the image.", images=[image], max_new_tokens=5)
    assert by_prompt == [{"input_text": "Describe the image.", "generated_text": "Describe the image." + answer}]
    prefill = [*other, {"role": "assistant", "content": "There are"}]
    continued = pipe(text=prefill, max_new_tokens=4)[0]["generated_text"]
    assert continued[:-1] == other and continued[-1]["content"].startswith("There are")
    assert continued[-1]["content"] == "There are" + vlm.chat(prefill, max_new_tokens=4, continue_final_message=True)
    three = pipe(text=other, max_new_tokens=4, generate_kwargs={"num_return_sequences": 3, "do_sample": True,
                                                                "seed": 1})  # fmt: skip
    assert len(three) == 3 and all(set(r) == {"input_text", "generated_text"} for r in three)
    base = vlm.chat(other, max_new_tokens=30)
    stop = base[len(base) // 2 :][:2]
    cut = pipe(text=other, max_new_tokens=30, stop_sequence=stop, return_full_text=False)[0]["generated_text"]
    assert cut == base[: base.find(stop)]


def test_what_the_pipeline_refuses(vlm, messages):
    with pytest.raises(ConfigError, match="unknown pipeline task 'summarization'"):
        vlmkit.pipeline("summarization", model=vlm)
    with pytest.raises(ConfigError, match="carry their own processor"):
        vlmkit.pipeline("image-text-to-text", model=vlm, processor=object())
    pipe = vlmkit.pipeline("image-text-to-text", model=vlm)
    with pytest.raises(ConfigError, match="generate_kwargs: unsupported output_scores"):
        pipe(text=messages, generate_kwargs={"output_scores": True})
    with pytest.raises(ConfigError, match="'max_new_tokens' is defined twice"):
        pipe(text=messages, max_new_tokens=3, generate_kwargs={"max_new_tokens": 4})
    with pytest.raises(ConfigError, match="beam search"):
        pipe(text=messages, generate_kwargs={"num_beams": 2})
    with pytest.raises(ConfigError, match="images go inside the messages"):
        pipe(images="x.png", text=messages)
    with pytest.raises(ConfigError, match="a streamer takes one answer at a time"):
        pipe(text=[messages, messages], generate_kwargs={"streamer": TextStreamer(pipe.tokenizer)})


def test_a_pipeline_by_name_loads_the_model(tmp_path):
    from vlmkit.models.compose import save_pretrained

    torch.manual_seed(0)
    save_pretrained(*compose_tiny(), tmp_path / "ckpt")
    pipe = vlmkit.pipeline("image-text-to-text", model=str(tmp_path / "ckpt"))
    assert pipe.model.name == str(tmp_path / "ckpt")  # pipe.model reads through to the VLM
    out = pipe(text=[{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    pipe.model.dispose()
