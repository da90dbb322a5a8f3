"""``teach`` against a fault-injecting OpenAI-compatible server: 429 with Retry-After, 500s, timeouts, truncated
bodies and streams, malformed JSON, 4xx, in a fixed pattern per item; budgets; a run killed midway and resumed."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from vlmkit.data.formats import open_dataset
from vlmkit.data.teach import (
    PRESETS,
    ClientConfig,
    TeachConfig,
    TeacherClient,
    TeacherError,
    item_key,
    resolve_tasks,
    teach,
)
from vlmkit.data.teach.client import parse_retry_after

TASKS = ("detailed_description", "reasoning", "conversation")
TASK_OF_PROMPT = {PRESETS[name].prompt: name for name in TASKS}


def _default_answer(image: int, task: str) -> str:
    return {
        "detailed_description": f"Image {image} is one flat colour.",
        "reasoning": f"Image {image} has no objects, so it is probably a colour swatch.",
        "conversation": f"Question: What is image {image}?\nAnswer: A flat colour.\nQuestion: Anything on it?\n"
        "Answer: No.",
    }[task]


class FaultServer:
    """An OpenAI-compatible chat server whose answer to an item's N-th attempt is ``script[(image, task)][N]``
    (then ``ok``). The image index is the red channel of the image's first pixel / 10; the task is found from the
    prompt. Actions: ok, (429, retry_after), 500, 503, 400, timeout, truncated, malformed. Every answer reports
    10 prompt and 5 completion tokens."""

    def __init__(self, script=None, answers=None, api_key=None, delay=0.0):
        self.script = dict(script or {})
        self.answers = dict(answers or {})
        self.api_key = api_key
        self.delay = delay
        self.attempts: Counter[tuple[int, str]] = Counter()
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.auth.append(self.headers.get("Authorization"))
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._json(401, {"error": {"message": "bad key", "type": "auth", "code": "invalid"}})
                parts = body["messages"][-1]["content"]
                url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
                prompt = next(p["text"] for p in parts if p["type"] == "text")
                image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
                key = (image.getpixel((0, 0))[0] // 10, TASK_OF_PROMPT.get(prompt, "custom"))
                with server.lock:
                    attempt = server.attempts[key]
                    server.attempts[key] += 1
                steps = server.script.get(key, [])
                action = steps[attempt] if attempt < len(steps) else "ok"
                if server.delay:
                    time.sleep(server.delay)
                self._act(action, key, body.get("stream", False))

            def _json(self, status, data, headers=()):
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(raw)

            def _act(self, action, key, stream):
                if isinstance(action, tuple):  # (429, retry_after)
                    status, after = action
                    return self._json(status, {"error": {"message": "slow down"}}, [("Retry-After", after)])
                if action in ("500", "503", "400"):
                    return self._json(int(action), {"error": {"message": f"injected {action}"}})
                if action == "timeout":
                    time.sleep(1.5)  # the client gave up before
                    return
                text, finish = server.answers.get(key, (_default_answer(*key), "stop"))
                usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                if stream:
                    return self._stream(text, finish, usage, action)
                data = {"id": "x", "object": "chat.completion", "model": "fault", "usage": usage,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": finish}]}  # fmt: skip
                raw = json.dumps(data).encode()
                if action == "malformed":
                    raw = raw[: len(raw) // 2]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw) + (100 if action == "truncated" else 0)))
                self.end_headers()
                self.wfile.write(raw)  # truncated: 100 bytes short of what was announced, then closed

            def _stream(self, text, finish, usage, action):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()

                def send(data):
                    self.wfile.write(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())

                half = len(text) // 2
                send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": text[:half]}}]})
                if action == "truncated":
                    return  # the connection closes before the answer ends
                if action == "malformed":
                    return send('{"choices": [{"delta": ')
                send({"choices": [{"index": 0, "delta": {"content": text[half:]}, "finish_reason": finish}]})
                send({"choices": [], "usage": usage})
                send("[DONE]")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(*args, **kwargs):
        servers.append(FaultServer(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def images(tmp_path):
    """Six 16 px images whose first pixel's red channel is 10 × their index."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (10 * i, 80, 160)).save(folder / f"img{i}.png")
    return folder


class FakeSleep:
    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, delay):
        self.delays.append(delay)


def _id(images, i, task):
    return f"{item_key(images / f'img{i}.png')}-{task}"


def _run(server, images, out, *, sleep=None, on_item=None, concurrency=3, stream=False, max_retries=3, timeout=0.5,
         **options):  # fmt: skip
    budget = {k: options.pop(k) for k in ("max_requests", "max_tokens") if k in options}
    client = ClientConfig(server.url, "fault", concurrency=concurrency, timeout=timeout, max_retries=max_retries,
                          backoff=0.5, stream=stream, temperature=0, **budget)  # fmt: skip
    config = TeachConfig(resolve_tasks(TASKS), **{"max_chars": 1000, **options})
    return teach([images], out, client, config, progress=False, sleep=sleep or FakeSleep(), on_item=on_item)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


SCRIPT = {
    (0, "detailed_description"): [(429, "7"), "ok"],
    (1, "reasoning"): ["500", "500", "ok"],
    (2, "conversation"): ["timeout", "ok"],
    (3, "detailed_description"): ["truncated", "ok"],
    (4, "reasoning"): ["malformed", "ok"],
    (5, "conversation"): ["500"] * 10,  # still failing after 3 retries: left for a later run
    (2, "reasoning"): ["400"],  # refused for good: rejected
}
ANSWERS = {
    (0, "reasoning"): ("The image shows", "length"),
    (0, "conversation"): ("Question: What is <image>?\nAnswer: A swatch.", "stop"),
    (1, "conversation"): ("Here is a chat about the picture.", "stop"),
    (3, "conversation"): ("Question: What is it?\nQuestion: And then?", "stop"),
    (4, "detailed_description"): ("   ", "stop"),
    (5, "detailed_description"): ("word " * 300, "stop"),
}
REJECTED = {
    (0, "reasoning"): "truncated",
    (0, "conversation"): "image_marker",
    (1, "conversation"): "unparseable_conversation",
    (2, "reasoning"): "teacher_refused",
    (3, "conversation"): "unparseable_conversation",
    (4, "detailed_description"): "empty",
    (5, "detailed_description"): "too_long",
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_fixed_fault_pattern_exact_records_rejects_and_retries(serve, images, tmp_path, stream):
    server = serve(SCRIPT, ANSWERS)
    sleep = FakeSleep()
    summary = _run(server, images, tmp_path / "out", sleep=sleep, stream=stream)

    written = {row["id"] for row in _rows(tmp_path / "out" / "teach.jsonl")}
    rejects = {row["id"]: row["reason"] for row in _rows(tmp_path / "out" / "teach.teach" / "rejects.jsonl")}
    everything = {(i, task) for i in range(6) for task in TASKS}
    assert rejects == {_id(images, i, task): reason for (i, task), reason in REJECTED.items()}
    assert written == {_id(images, *key) for key in everything - set(REJECTED) - {(5, "conversation")}}
    assert summary.written == 10 and summary.rejected == Counter(REJECTED.values())
    assert summary.failed == 1 and summary.left == 1 and summary.stopped is None
    # retries: 429 once, 500 twice, timeout, truncated, malformed once each, 3 for the item that kept failing
    assert summary.retries == 9 and summary.requests == 18 + 9
    assert (summary.tokens_in, summary.tokens_out) == (10 * 16, 5 * 16)  # the 16 answers report their usage
    assert server.attempts == Counter({key: 1 for key in everything}) + Counter(
        {(0, "detailed_description"): 1, (1, "reasoning"): 2, (2, "conversation"): 1,
         (3, "detailed_description"): 1, (4, "reasoning"): 1, (5, "conversation"): 3}
    )  # fmt: skip
    # Retry-After: 7 was waited exactly; the other 8 waits are backoff 0.5 · 2^(k-1) · [0.5, 1] for retry k
    assert sorted(sleep.delays)[-1] == 7.0 and len(sleep.delays) == 9
    assert all(0.25 <= d <= 2.0 for d in sorted(sleep.delays)[:-1])
    assert summary.waited_s == pytest.approx(sum(sleep.delays))

    # every written record is the teacher's answer as a LLaVA conversation that the dataset reader accepts
    dataset = open_dataset(tmp_path / "out", skip_bad=True)
    samples = {s.id: s for s in dataset}
    assert set(samples) == written and not dataset.problems
    conv = samples[_id(images, 4, "conversation")]
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[0]["content"] == "<image>\nWhat is image 4?" and conv.messages[-1]["content"] == "No."
    desc = samples[_id(images, 1, "detailed_description")]
    assert desc.messages[1]["content"] == "Image 1 is one flat colour." and desc.task == "detailed_description"
    assert desc.images[0].getpixel((0, 0)) == (10, 80, 160)

    # the failed item is tried again by the next run, and only it
    server.script.pop((5, "conversation"))
    again = _run(server, images, tmp_path / "out", stream=stream)
    assert (again.done_before, again.written, again.requests, again.failed, again.left) == (17, 1, 1, 0, 0)
    assert len(_rows(tmp_path / "out" / "teach.jsonl")) == 11


def test_retry_after_forms_and_backoff_jitter():
    assert parse_retry_after("7") == 7.0 and parse_retry_after("0.5") == 0.5 and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    client = TeacherClient(ClientConfig("http://x", "m", backoff=1.0, max_backoff=5.0))
    for retry, (low, high) in {1: (0.5, 1), 2: (1, 2), 3: (2, 4), 4: (2.5, 5), 9: (2.5, 5)}.items():
        delays = {client.backoff_delay(retry) for _ in range(50)}
        assert all(low <= d <= high for d in delays) and len(delays) > 1  # jittered
    assert ClientConfig("http://h:1", "m").endpoint == "http://h:1/v1/chat/completions"
    assert ClientConfig("http://h:1/v1/", "m").endpoint == "http://h:1/v1/chat/completions"
    assert ClientConfig("http://h:1/api/chat/completions", "m").endpoint == "http://h:1/api/chat/completions"


def test_a_retry_after_longer_than_allowed_fails_the_item(serve, images, tmp_path):
    server = serve({(0, "reasoning"): [(429, "3600")]})
    sleep = FakeSleep()
    summary = _run(server, images, tmp_path / "out", sleep=sleep)
    assert summary.failed == 1 and summary.written == 17 and sleep.delays == []


@pytest.mark.parametrize("budget", ["requests", "tokens"])
def test_budget_stops_the_run_cleanly_and_a_rerun_finishes_it(serve, images, tmp_path, budget):
    reference = _run(serve(), images, tmp_path / "ref", concurrency=1)
    assert reference.written == 18
    server = serve()
    limit = {"max_requests": 5} if budget == "requests" else {"max_tokens": 60}  # 15 tokens an answer: 4 answers
    summary = _run(server, images, tmp_path / "out", concurrency=1, **limit)
    n = 5 if budget == "requests" else 4
    assert summary.requests == n == summary.written == sum(server.attempts.values())
    assert summary.left == 18 - n and summary.failed == 0 and not summary.rejected
    assert summary.stopped is not None and f"{budget[:-1]} budget" in summary.stopped
    assert f"stopped early: the {budget[:-1]} budget" in "\n".join(summary.lines())
    rows = _rows(tmp_path / "out" / "teach.jsonl")
    expected = [_id(images, i, task) for i in range(6) for task in TASKS][:n]
    assert [row["id"] for row in rows] == expected  # one slot: items are asked in input order
    rest = _run(server, images, tmp_path / "out", concurrency=1)
    assert (rest.done_before, rest.written, rest.stopped) == (n, 18 - n, None)
    assert (tmp_path / "out" / "teach.jsonl").read_bytes() == (tmp_path / "ref" / "teach.jsonl").read_bytes()


KILL_SCRIPT = {(1, "reasoning"): ["500", "ok"], (2, "detailed_description"): [(429, "2"), "ok"],
               (4, "conversation"): ["timeout", "ok"]}  # fmt: skip
KILL_ANSWERS = {(3, "conversation"): ("no turns here", "stop")}


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


class Killed(Exception):
    pass


def test_a_run_killed_midway_and_resumed_ends_with_the_same_dataset(serve, images, tmp_path):
    _run(serve(KILL_SCRIPT, KILL_ANSWERS), images, tmp_path / "ref")
    reference = _files(tmp_path / "ref")
    server = serve(KILL_SCRIPT, KILL_ANSWERS)
    seen = []

    def kill_after_seven(outcome):
        seen.append(outcome.id)
        if len(seen) == 7:
            raise Killed

    with pytest.raises(Killed):
        _run(server, images, tmp_path / "out", on_item=kill_after_seven)
    out = tmp_path / "out"
    # an image's items are written together: the 7th item is the third image's first
    assert len(_rows(out / "teach.jsonl")) + len(_rows(out / "teach.teach" / "rejects.jsonl")) == 9
    with (out / "teach.jsonl").open("ab") as handle:  # and a torn line, as a kill mid-write leaves
        handle.write(b'{"id": "img5-half')
    resumed = _run(server, images, out)
    assert resumed.done_before == 9 and resumed.written + sum(resumed.rejected.values()) == 9
    files = _files(out)
    assert files.keys() == reference.keys()
    for name, data in reference.items():
        if name != "teach.teach/run.json":  # it names the teacher's URL: another port
            assert files[name] == data, name
    ids = [row["id"] for row in _rows(out / "teach.jsonl")]
    assert len(ids) == len(set(ids)) == 17


def test_a_real_kill_during_a_cli_run_resumes_to_the_same_dataset(serve, images, tmp_path):
    server = serve(KILL_SCRIPT, KILL_ANSWERS, delay=0.2)
    _run(server, images, tmp_path / "ref", timeout=0.8)
    reference = _files(tmp_path / "ref")
    server.attempts.clear()
    command = [sys.executable, "-m", "vlmkit", "data", "teach", str(images), "--teacher-url", server.url,
               "--teacher-model", "fault", "--out", str(tmp_path / "out"), "--max-chars", "1000", "--timeout", "0.8",
               "--temperature", "0", "--concurrency", "3", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    dataset = tmp_path / "out" / "teach.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if dataset.exists() and dataset.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.01)
    assert process.poll() is None, process.communicate()[0].decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = dataset.read_bytes().count(b"\n") + (tmp_path / "out" / "teach.teach" / "rejects.jsonl").read_bytes().count(
        b"\n"
    )
    assert 4 <= done < 18
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"items: 18 (6 images × 3 tasks), {done} done before this run" in result.stdout
    for name, data in reference.items():
        if name != "teach.teach/run.json":
            assert _files(tmp_path / "out")[name] == data, name


def test_failures_in_a_row_stop_the_run(serve, images, tmp_path):
    server = serve({(i, task): ["500"] * 5 for i in range(6) for task in TASKS})
    with pytest.raises(TeacherError, match="3 items in a row failed"):
        _run(server, images, tmp_path / "out", concurrency=1, max_retries=1, max_failures_in_row=3)
    assert sum(server.attempts.values()) < 18 * 2 and not _rows(tmp_path / "out" / "teach.jsonl")


def test_a_wrong_api_key_stops_the_run_and_the_key_is_sent_only_as_a_header(serve, images, tmp_path, run, caplog,
                                                                             monkeypatch):  # fmt: skip
    server = serve(api_key="sk-right")
    monkeypatch.setenv("VLMKIT_TEACHER_API_KEY", "sk-wrong")
    args = ["data", "teach", images, "--teacher-url", server.url, "--teacher-model", "fault", "--out", tmp_path / "o",
            "--no-progress", "--tasks", "reasoning", "--temperature", "0"]  # fmt: skip
    code, out, err = run(*args)
    assert code == 1 and "refused the API key" in err and 1 <= len(server.auth) <= 4  # those already in flight
    monkeypatch.setenv("VLMKIT_TEACHER_API_KEY", "sk-right")
    code, out, err = run(*args)
    assert code == 0, err
    assert "written: 6" in out and "requests: 6, retries: 0" in out and "tokens in/out: 60/30" in out
    assert server.auth.count("Bearer sk-right") == 6
    for text in [out, err, caplog.text, *(p.read_text() for p in (tmp_path / "o").rglob("*.json*"))]:
        assert "sk-right" not in text and "sk-wrong" not in text
    code, _, err = run(*args, "--api-key-env", "MY_TEACHER_KEY")
    assert code == 1 and "$MY_TEACHER_KEY is not set" in err


def test_transport_is_pluggable_for_callers(images, tmp_path):
    """Library callers may hand in an httpx transport (here a mock): no server needed."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["model"] == "mock" and body["max_tokens"] == PRESETS["reasoning"].max_tokens
        return httpx.Response(200, json={"choices": [{"message": {"content": "Because."}, "finish_reason": "stop"}]})

    client = ClientConfig("http://mock", "mock", max_retries=0)
    summary = teach([images], tmp_path / "o", client, TeachConfig(resolve_tasks(["reasoning"])), progress=False,
                    transport=httpx.MockTransport(handler))  # fmt: skip
    assert summary.written == 6 and summary.tokens_in == 0  # no usage reported: nothing counted
