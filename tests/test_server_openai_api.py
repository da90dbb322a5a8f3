"""The OpenAI API surface of issue 19, driven by the official ``openai`` client: legacy ``/v1/completions``
(streaming included), ``n`` > 1, ``logprobs`` / ``top_logprobs`` in OpenAI's response shapes, ``models.retrieve``
and JSON mode (``response_format``). Shapes: OpenAI's API reference (chat.completion, chat.completion.chunk,
text_completion) as the ``openai`` client's own types parse them."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from conftest import compose_tiny, qwen2_config, siglip_config
from test_server import LiveServer, image_message
from vlmkit.api import VLM
from vlmkit.inference.options import GenerationOptions
from vlmkit.serving.server import ServerSettings

USER = [{"role": "user", "content": "How many stars are there?"}]


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM(*compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3)))


@pytest.fixture(scope="module")
def server(vlm):
    live = LiveServer(vlm, ServerSettings(model_name="tiny", api_key="sk-test", max_batch=8))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_models_retrieve(client, server):
    model = client.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "vlmkit")
    with pytest.raises(openai.NotFoundError, match="model 'gpt-9' not found"):
        client.models.retrieve("gpt-9")
    assert httpx.get(f"{server.url}/v1/models/tiny").status_code == 401  # the key applies here too


def test_completions_match_the_engine_on_the_raw_prompt(client, vlm):
    """``prompt`` is raw text (no chat template); OpenAI's default ``max_tokens`` of this endpoint is 16."""
    response = client.completions.create(model="tiny", prompt="How many stars", temperature=0)
    expected = vlm.engine.generate([vlm.engine.encode_prompt("How many stars")], GenerationOptions(max_new_tokens=16))
    choice = response.choices[0]
    assert response.object == "text_completion" and choice.index == 0 and choice.logprobs is None
    assert choice.text == expected[0].text and choice.finish_reason == expected[0].finish_reason
    assert response.usage.prompt_tokens == expected[0].prompt_tokens
    assert response.usage.completion_tokens == expected[0].completion_tokens


def test_completions_several_prompts_and_n(client, vlm):
    """Choices are grouped by prompt: index = prompt × n + choice; usage counts each prompt once."""
    prompts = ["How many stars", "hi"]
    response = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=5, temperature=1, seed=9)
    options = GenerationOptions(max_new_tokens=5, temperature=1.0, seed=9, n=2)
    expected = vlm.engine.generate([vlm.engine.encode_prompt(p) for p in prompts], options)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == [r.text for r in expected]
    assert response.usage.prompt_tokens == expected[0].prompt_tokens + expected[2].prompt_tokens
    assert response.usage.completion_tokens == sum(r.completion_tokens for r in expected)


def test_completions_stream_concatenates_per_choice(client):
    kwargs = {"model": "tiny", "prompt": ["How many stars", "hi"], "n": 2, "max_tokens": 8, "temperature": 1,
              "seed": 3}  # fmt: skip
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_logprobs_in_the_legacy_shape(client):
    """Legacy ``logprobs: k``: tokens, token_logprobs, top_logprobs (the k likeliest plus the chosen token) and
    text_offset, one entry per token."""
    response = client.completions.create(model="tiny", prompt="hi", max_tokens=6, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and top[token] == value and max(top.values()) == value  # greedy: the top one
    streamed = client.completions.create(model="tiny", prompt="hi", max_tokens=6, temperature=0, logprobs=2,
                                         stream=True)  # fmt: skip
    tokens = [t for chunk in streamed for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    assert tokens == logprobs.tokens


def test_chat_n_matches_the_engine(client, vlm):
    response = client.chat.completions.create(model="tiny", messages=image_message(), n=3, max_tokens=6,
                                              temperature=1, seed=21)  # fmt: skip
    expected = vlm.generate_batch([image_message()], n=3, max_new_tokens=6, temperature=1.0, seed=21)[0]
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == [r.text for r in expected]
    assert response.usage.prompt_tokens == expected[0].prompt_tokens  # the prompt once
    assert response.usage.completion_tokens == sum(r.completion_tokens for r in expected)


def test_chat_stream_with_n(client):
    kwargs = {"model": "tiny", "messages": USER, "n": 2, "max_tokens": 8, "temperature": 1, "seed": 4}
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert roles == [0, 1] and texts == {c.index: c.message.content for c in full.choices}


def test_chat_logprobs_in_openai_shape(client):
    response = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3)  # fmt: skip
    content = response.choices[0].logprobs.content
    text = bytes(b for t in content for b in t.bytes).decode("utf-8", errors="replace")
    assert len(content) == 6 and text == response.choices[0].message.content  # exact bytes, even mid-character
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    streamed = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True)  # fmt: skip
    pieces = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in pieces] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, logprobs=True)
    assert all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)


def test_json_mode(client):
    """``response_format`` json_object and json_schema, enforced by constrained decoding (llguidance)."""
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}, "count": {"type": "integer",
              "minimum": 0, "maximum": 5}}, "required": ["colour", "count"], "additionalProperties": False}  # fmt: skip
    response = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=40, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "scene", "schema": schema, "strict": True}},
    )  # fmt: skip
    value = json.loads(response.choices[0].message.content)
    assert value["colour"] in ("red", "blue") and 0 <= value["count"] <= 5
    loose = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10,
                                           response_format={"type": "json_object"})  # fmt: skip
    assert loose.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError, match="response_format json_schema needs") as err:
        no_schema = {"type": "json_schema", "json_schema": {"name": "x"}}
        client.chat.completions.create(model="tiny", messages=USER, response_format=no_schema)
    assert err.value.response.json()["error"]["param"] == "response_format"


@pytest.mark.parametrize(
    "path, body, status, param, match",
    [
        ("chat/completions", {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs: true"),
        ("chat/completions", {"messages": USER, "top_logprobs": 21, "logprobs": True}, 422, "top_logprobs", "20"),
        ("completions", {"prompt": [[1, 2, 3]]}, 400, "prompt", "token ids is not supported"),
        ("completions", {"prompt": "x", "echo": True}, 400, "echo", "echo is not supported"),
        ("completions", {"prompt": "x", "best_of": 3}, 400, "best_of", "best_of is not supported"),
        ("completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "suffix is not supported"),
        ("completions", {"prompt": "x", "temprature": 1}, 400, "temprature", "unknown field"),
        ("completions", {"prompt": "a <image> b"}, 400, "prompt", "image placeholder"),
        ("completions", {"prompt": ["a"] * 5, "n": 2}, 400, "prompt", "over this server's limit of 8"),
        ("completions", {"prompt": "x", "logprobs": 21}, 422, "logprobs", "20"),
        ("completions", {"prompt": ""}, 400, "prompt", "empty"),
    ],
)
def test_refusals(server, path, body, status, param, match):
    answer = httpx.post(f"{server.url}/v1/{path}", json={"model": "tiny", **body},
                        headers={"Authorization": "Bearer sk-test"}, timeout=60)  # fmt: skip
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and match in error["message"]


def test_neutral_completion_fields_are_accepted(client):
    response = client.completions.create(model="tiny", prompt="hi", max_tokens=2, echo=False, best_of=1,
                                         presence_penalty=0, frequency_penalty=0, logit_bias={}, user="u")  # fmt: skip
    assert response.choices[0].finish_reason in ("stop", "length")
