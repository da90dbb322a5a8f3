"""The OpenAI-compatible server, driven by the official openai client over loopback."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from PIL import Image

from conftest import compose_tiny, qwen2_config, siglip_config
from vlmkit.api import VLM
from vlmkit.serving.http import uvicorn_config
from vlmkit.serving.server import ServerSettings, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, vlm, settings):
        self.port = free_port()
        config = uvicorn_config(create_app(vlm, settings), settings, "127.0.0.1", self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="sk-test"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def png_url(color=(200, 30, 30), size=(40, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(text="Describe the image.", n=1):
    parts = [{"type": "image_url", "image_url": {"url": png_url((40 * i, 90, 200))}} for i in range(n)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM(*compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3)))


@pytest.fixture(scope="module")
def server(vlm, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    Image.new("RGB", (20, 20), (0, 200, 0)).save(media / "green.png")
    live = LiveServer(vlm, ServerSettings(model_name="tiny", api_key="sk-test", max_images_per_request=2,
                                          max_body_mb=0.5, allowed_local_media_path=str(media)))  # fmt: skip
    live.media = media
    yield live
    live.stop()


def test_non_streaming_with_images_and_usage(server, vlm):
    response = server.client().chat.completions.create(
        model="tiny", messages=image_message(n=2), max_tokens=12, temperature=0
    )
    choice = response.choices[0]
    expected = vlm.generate_batch([image_message(n=2)], max_new_tokens=12)[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens  # image tokens included
    assert response.usage.completion_tokens == expected.completion_tokens
    assert response.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    assert response.usage.prompt_tokens_details.image_tokens == 2 * vlm.processor.tokens_per_image


def test_streaming_concatenates_to_non_streaming(server):
    client = server.client()
    messages = image_message("What colour is it?")
    full = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stop_seed_and_models(server):
    client = server.client()
    a = client.chat.completions.create(model="tiny", messages=image_message(), max_tokens=10, temperature=1, seed=5)
    b = client.chat.completions.create(model="tiny", messages=image_message(), max_tokens=10, temperature=1, seed=5)
    assert a.choices[0].message.content == b.choices[0].message.content
    base = client.chat.completions.create(model="tiny", messages=image_message(), max_tokens=20, temperature=0)
    text = base.choices[0].message.content
    stop = text[4:6]
    cut = client.chat.completions.create(
        model="tiny", messages=image_message(), max_tokens=20, temperature=0, stop=stop
    )
    assert cut.choices[0].message.content == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_local_media_policy(server):
    client = server.client()
    inside = f"file://{server.media / 'green.png'}"
    message = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": inside}}, {"type": "text", "text": "x"}],
        }
    ]
    assert client.chat.completions.create(model="tiny", messages=message, max_tokens=2).choices
    for url, match in [(f"file://{server.media}/../secret.png", "outside the allowed media folder"),
                       ("/etc/hostname", "local paths are not allowed"),
                       ("http://127.0.0.1:1/x.png", "remote .* disabled")]:  # fmt: skip
        message[0]["content"][0]["image_url"]["url"] = url
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(model="tiny", messages=message, max_tokens=2)


def bomb_url() -> str:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    "content,match",
    [
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "invalid base64"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}],
         "not an image"),
        ([{"type": "image_url", "image_url": {"url": "BOMB"}}], "limit|too large|bomb"),
        ([{"type": "input_audio", "input_audio": {"data": "x"}}], "unknown content part type 'input_audio'"),
        ([{"type": "image_url", "image_url": {"url": png_url()}}] * 3, "At most 2 image"),
        ("word " * 600, "context"),
    ],
)  # fmt: skip
def test_bad_input_is_400_and_server_keeps_serving(server, content, match):
    if isinstance(content, list) and content[0].get("image_url", {}).get("url") == "BOMB":
        content = [{"type": "image_url", "image_url": {"url": bomb_url()}}]
    client = server.client()
    with pytest.raises(openai.BadRequestError, match=match) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=2)
    body = err.value.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_protocol_errors(server):
    headers = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
    post = lambda body, h=headers: httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=h)  # noqa: E731
    bad_json = post(b'{"model": "tiny", "messages": [')
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    schema = post(json.dumps({"model": "tiny", "messages": []}).encode())
    assert schema.status_code == 422 and schema.json()["error"]["param"] == "messages"
    temperature = post(
        json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode()
    )
    assert temperature.status_code == 422 and "temperature" in temperature.json()["error"]["message"]
    big = post(json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 600_000}]}).encode())
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    route = httpx.get(f"{server.url}/v2/nothing", headers=headers)
    assert route.status_code == 404 and route.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError, match="model 'gpt-9' not found"):
        server.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="n=33 is over this server's limit of 32"):
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=33)


def test_api_key(server):
    with pytest.raises(openai.AuthenticationError, match="API key"):
        server.client(key="wrong").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    missing = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_disconnect_mid_stream_frees_the_slot(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": True,
            "temperature": 0}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer sk-test"}) as response:  # fmt: skip
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.get(f"{server.url}/health").json()["active"] == 1
    deadline = time.time() + 10
    while httpx.get(f"{server.url}/health").json()["active"] != 0:
        assert time.time() < deadline, "the disconnected request kept its slot"
        time.sleep(0.05)


def test_overload_answers_429_with_retry_after(vlm):
    live = LiveServer(vlm, ServerSettings(model_name="tiny", max_batch=1, max_queue=1))
    try:
        client = live.client()

        def ask(_):
            try:
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=150, temperature=0)  # fmt: skip
                return "ok"
            except openai.RateLimitError as exc:
                assert exc.response.headers["retry-after"] == "1"
                assert exc.response.json()["error"]["type"] == "rate_limit_error"
                return "429"

        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(ask, range(6)))
        assert "429" in outcomes and "ok" in outcomes
    finally:
        live.stop()


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vlmkit", "serve", "--model", "tiny-random", "--port", str(port)],
                               stderr=subprocess.PIPE, env=env, text=True)  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and process.poll() is None, "server did not start"
            time.sleep(0.2)
        body = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300,
                "stream": True, "temperature": 0}  # fmt: skip
        received = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    received.append(line)
                if len(received) == 2:
                    process.send_signal(signal.SIGTERM)
        assert received[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in received[1:-1]]
        assert finish[-1] in ("stop", "length")
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
