"""The server against hostile and careless clients: every field applied or refused, bodies bounded while they
arrive, no 500s from odd JSON, hosts and origins checked, slow clients timed out, gone clients cancelled."""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import pytest
import torch

from conftest import compose_tiny, qwen2_config, siglip_config
from test_server import LiveServer, image_message
from vlmkit.api import VLM
from vlmkit.inference.engine import DecodeBatch
from vlmkit.inference.options import GenerationOptions
from vlmkit.serving.server import ServerSettings

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM(*compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3)))


@pytest.fixture(scope="module")
def server(vlm):
    live = LiveServer(vlm, ServerSettings(model_name="tiny", api_key=KEY, max_body_mb=0.5, body_timeout_s=1.0,
                                          header_timeout_s=1.0))  # fmt: skip
    yield live
    live.stop()


def post(server, body, headers=None, raw=False):
    data = body if raw else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=data,
                      headers={**AUTH, "Content-Type": "application/json", **(headers or {})}, timeout=60)  # fmt: skip


def ask(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **fields}


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"temprature": 0.2}, "temprature"),
    ],
)
def test_fields_that_would_be_ignored_are_refused_by_name(server, fields, param):
    answer = post(server, ask(**fields))
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and param in error["message"] and error["code"] == "unsupported_parameter"


def test_neutral_values_and_metadata_are_accepted(server):
    neutral = ask(logprobs=False, presence_penalty=0, frequency_penalty=0.0, response_format={"type": "text"},
                  tools=[], user="someone", metadata={"k": "v"})  # fmt: skip
    assert post(server, neutral).status_code == 200


def test_message_fields_that_would_be_ignored_are_refused(server):
    body = ask(messages=[{"role": "user", "content": "hi", "name": "mallory"}])
    answer = post(server, body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages[0].name"


@pytest.mark.parametrize("fields", [{"stream": "yes"}, {"max_tokens": "5"}, {"temperature": "0.5"}])
def test_types_are_strict(server, fields):
    answer = post(server, ask(**fields))
    assert answer.status_code == 422 and answer.json()["error"]["param"] == next(iter(fields))


def test_top_k_and_repetition_penalty_are_applied(server, vlm):
    messages = image_message()

    def served(**options):
        answer = post(server, {"model": "tiny", "messages": messages, "max_tokens": 16, **options})
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["message"]["content"]

    def direct(**options):
        return vlm.engine.generate([messages], GenerationOptions(max_new_tokens=16, **options))[0].text

    # top_k=1 makes sampling at temperature 1 greedy; without it, this seed samples something else
    assert served(temperature=1.0, seed=3, top_k=1) == direct() != served(temperature=1.0, seed=3)
    assert served(temperature=1.0, seed=3, top_k=5) == direct(temperature=1.0, seed=3, top_k=5)
    assert served(temperature=0, repetition_penalty=1.8) == direct(repetition_penalty=1.8) != direct()


def test_odd_json_is_a_400_not_a_500(server):
    deep = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = post(server, deep, raw=True)
    assert answer.status_code == 400 and "nested deeper" in answer.json()["error"]["message"]
    nested = ask(
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "x", "x": [[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]}]}
        ]
    )
    assert post(server, nested).status_code != 500
    surrogate = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    answer = post(server, surrogate, raw=True)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_unicode"
    assert answer.json()["error"]["param"] == "messages[0].content"
    for body in [b"[1, 2]", b'"text"', b"null"]:
        assert post(server, body, raw=True).status_code == 400
    assert post(server, ask()).status_code == 200  # still serving


def test_a_huge_text_is_refused_before_tokenizing(server):
    # under the body limit, far over what the 512-token context could hold: refused by its character count
    answer = post(server, ask(messages=[{"role": "user", "content": "word " * 90_000}]))
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in answer.json()["error"]["message"]


def raw_request(server, head: bytes, body_chunks=(), timeout=10.0) -> tuple[bytes, int]:
    """Send a request by hand; stops sending body chunks as soon as the server has answered.

    Returns the reply and the number of body chunks sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head)
        sent = 0
        for chunk in body_chunks:
            if select.select([sock], [], [], 0.01)[0]:
                break  # an answer is waiting
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server answered and closed
            sent += 1
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and b"}" in data.split(b"\r\n\r\n", 1)[1]:
                break
        return data, sent


def test_chunked_body_is_limited_while_it_arrives(server):
    def chunks():
        for _ in range(2000):  # 2000 x 64 KiB = 125 MiB if the server read it all before answering
            piece = b"x" * 65536
            yield b"%x\r\n%s\r\n" % (len(piece), piece)

    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-test\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    reply, sent = raw_request(server, head, chunks())
    assert reply.startswith(b"HTTP/1.1 413") and b"request_too_large" in reply
    assert sent < 100  # answered right after the 0.5 MB limit (8 chunks), not after reading 125 MiB


def test_a_slow_body_times_out(server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-test\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")  # fmt: skip
    start = time.monotonic()
    reply, _ = raw_request(server, head, [b'{"model": '])
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
    assert time.monotonic() - start < 8


def test_slowloris_connections_are_closed_and_others_are_served(server):
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(24)]
    try:
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 40
        start = time.monotonic()
        closed = set()
        for i in range(len(head)):
            for k, sock in enumerate(sockets):
                if k not in closed:
                    try:
                        sock.sendall(head[i : i + 1])
                    except OSError:
                        closed.add(k)
            if len(closed) == len(sockets):
                break
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200  # others are served meanwhile
            time.sleep(0.1)
        for k, sock in enumerate(sockets):
            sock.settimeout(5)
            try:
                if sock.recv(1) == b"":
                    closed.add(k)
            except OSError:
                closed.add(k)
        assert len(closed) == len(sockets)
        assert time.monotonic() - start < 10  # a 1 s head deadline, not 24 connections held for good
    finally:
        for sock in sockets:
            sock.close()


def test_a_non_streaming_request_whose_client_left_is_cancelled(server, monkeypatch):
    real_step = DecodeBatch.step

    def slow_step(self):
        time.sleep(0.05)  # 400 tokens would take 20 s
        return real_step(self)

    monkeypatch.setattr(DecodeBatch, "step", slow_step)
    body = json.dumps({**ask(), "max_tokens": 400, "temperature": 0}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-test\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(head + body)
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health").json()["active"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sock.close()
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/health").json()["active"] != 0:
        assert time.monotonic() < deadline, "the request of a client that left kept decoding"
        time.sleep(0.05)


def test_docs_need_the_key_or_are_off(server, vlm):
    for path in ["/docs", "/redoc", "/openapi.json"]:
        assert httpx.get(f"{server.url}{path}").status_code == 404
    open_server = LiveServer(vlm, ServerSettings(model_name="tiny"))
    try:
        assert httpx.get(f"{open_server.url}/openapi.json").status_code == 200
    finally:
        open_server.stop()


def test_api_key_edge_cases(server):
    for value in ["Bearer sk-tesT", "Bearer sk-tes", "bearer sk-test", "Bearer sk-test\u00e9".encode()]:
        headers = {"Authorization": value}
        assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401


def test_other_hosts_are_refused(server):
    answer = httpx.get(f"{server.url}/v1/models", headers={**AUTH, "Host": "evil.example"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_host"
    for host in ["127.0.0.1", f"127.0.0.1:{server.port}", "localhost:1234", "[::1]:80"]:
        assert httpx.get(f"{server.url}/v1/models", headers={**AUTH, "Host": host}).status_code == 200


def test_cross_site_requests_are_refused(server):
    answer = post(server, ask(), headers={"Origin": "https://evil.example"})
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "origin_not_allowed"
    assert post(server, ask(), headers={"Origin": "null"}).status_code == 403
    assert post(server, ask(), headers={"Origin": f"http://127.0.0.1:{server.port}"}).status_code == 200
    # a form or text/plain POST (what a page can send without asking) never runs
    simple = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(ask()),
                        headers={**AUTH, "Content-Type": "text/plain"})  # fmt: skip
    assert simple.status_code == 415


def test_listed_origins_and_any_host(vlm):
    live = LiveServer(vlm, ServerSettings(model_name="tiny", allowed_hosts=None,
                                          allowed_origins=("https://app.example",)))  # fmt: skip
    try:
        url = f"{live.url}/v1/chat/completions"
        ok = httpx.post(url, json=ask(), headers={"Origin": "https://app.example", "Host": "anything.example"})
        assert ok.status_code == 200
        assert httpx.post(url, json=ask(), headers={"Origin": "https://other.example"}).status_code == 403
    finally:
        live.stop()


def test_served_hosts_follow_the_bound_address():
    from vlmkit.commands.serve import allowed_hosts

    assert allowed_hosts("127.0.0.1", None) == ("127.0.0.1", "localhost", "::1")
    assert allowed_hosts("0.0.0.0", None) is None
    assert allowed_hosts("192.168.1.5", None) == ("192.168.1.5", "127.0.0.1", "localhost", "::1")
    assert allowed_hosts("0.0.0.0", "vlm.example, 10.0.0.2") == ("vlm.example", "10.0.0.2")


def test_the_chat_page_is_guarded_cannot_be_framed_and_loads_nothing_from_elsewhere(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{server.url}/", headers={"Host": "evil.example"}).status_code == 400  # DNS rebinding
    config = httpx.get(f"{server.url}/ui/config.json").json()  # no key needed: nothing /health does not tell
    assert config == {"model": "tiny", "notice": None, "api_key_required": True}
    for text in [page.text, *(httpx.get(f"{server.url}/ui/{name}").text for name in ["chat.js", "chat.css"])]:
        assert "://" not in text  # no CDN, no other origin: the page works offline
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the API itself still needs the key
