"""The chat page at ``/``, driven in a real headless Chromium (Debian's ``chromium`` package) through Playwright.

Every answer the page shows is compared with the API's answer to the very request the page sent (replayed
without streaming), so the page is checked to be a plain client of ``/v1/chat/completions``.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

import vlmkit
from test_server import LiveServer
from vlmkit.data.shapes import render_png, sample_scene
from vlmkit.inference.engine import DecodeBatch
from vlmkit.serving.server import ServerSettings

KEY = "sk-page"
CHROMIUM = os.environ.get("VLMKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "chat-page.png"
ANSWERS = ".message.assistant .text"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        message = "no Chromium to drive: apt-get install -y chromium (or set VLMKIT_CHROMIUM); .ci/run installs it"
        if os.environ.get("CI") or os.environ.get("VLMKIT_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def vlm():
    return vlmkit.load("default")


@pytest.fixture(scope="module")
def server(vlm):
    live = LiveServer(vlm, ServerSettings(model_name="default", api_key=KEY))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "scene.png"
    path.write_bytes(render_png(sample_scene("val", 0, 0)))
    return path


class Page:
    """One browser tab on the chat page, with the requests it sent."""

    def __init__(self, browser, server):
        self.server = server
        self.page = browser.new_page(viewport={"width": 960, "height": 760})
        self.requests: list = []
        self.errors: list[str] = []  # uncaught exceptions and Content-Security-Policy refusals
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda m: "Content Security Policy" in m.text and self.errors.append(m.text))
        self.page.goto(f"{server.url}/")
        self.page.wait_for_selector("body[data-ready=true]")

    def send(self, text: str, images=(), key: str | None = KEY, **options) -> str:
        """Type ``text``, attach ``images``, send, wait for the answer (or error) and return what it shows."""
        page = self.page
        if key is not None:
            page.fill("#key", key)
        for name, value in {"temperature": 0, "max-tokens": 96, **options}.items():
            page.fill(f"#{name}", str(value))
        if images:
            before = page.locator("#attachments figure").count()
            page.set_input_files("#files", [str(p) for p in images])
            page.wait_for_function(
                "(n) => document.querySelectorAll('#attachments figure').length === n", arg=before + len(images)
            )
        page.fill("#prompt", text)
        n = page.locator(".message.assistant, .message.error").count()
        page.click("#send")
        page.wait_for_function(
            "(n) => document.querySelectorAll('.message.assistant, .message.error').length === n"
            " && document.body.dataset.busy === 'false'",
            arg=n + 1,
        )
        return page.locator(".message.assistant, .message.error").nth(n).locator(".text").text_content()

    def chat_requests(self) -> list:
        return [r for r in self.requests if r.url == f"{self.server.url}/v1/chat/completions"]

    def replay(self, request) -> httpx.Response:
        """The API's answer to the page's ``request``, asked again without streaming."""
        body = {**request.post_data_json, "stream": False}
        return httpx.post(request.url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def data_url(path: Path, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def test_page_streams_the_apis_answers_and_goes_on_with_the_conversation(browser, server, vlm, scene_png, tmp_path):
    tab = Page(browser, server)
    page = tab.page
    assert page.text_content("#model") == "default"
    assert page.text_content("#notice") == vlm.notice and "ShapesWorld" in vlm.notice
    assert page.is_visible("#key")

    # no key yet: the API's 401 is shown, the message goes back into the composer, the key field asks for it
    shown = tab.send("Describe the image.", [scene_png], key="")
    assert shown == "Error 401: missing or incorrect API key"
    assert page.input_value("#prompt") == "Describe the image." and page.locator("#attachments img").count() == 1
    assert page.evaluate("document.activeElement.id") == "key"
    page.click("#new-chat")  # start over: nothing of that attempt is left
    assert page.locator("#transcript > *").count() == 0 and page.locator("#attachments > *").count() == 0

    first = tab.send("Describe the image.", [scene_png])
    request = tab.chat_requests()[-1]
    headers = request.all_headers()
    assert headers["content-type"] == "application/json" and headers["authorization"] == f"Bearer {KEY}"
    body = request.post_data_json
    assert body["stream"] is True and body["model"] == "default" and body["temperature"] == 0
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(scene_png)}},
        {"type": "text", "text": "Describe the image."},
    ]
    assert body["messages"] == [{"role": "user", "content": parts}]
    assert first and first == tab.replay(request).json()["choices"][0]["message"]["content"]

    second = tab.send("How many shapes are there?")
    request = tab.chat_requests()[-1]
    messages = request.post_data_json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"] and messages[1]["content"] == first
    assert second == tab.replay(request).json()["choices"][0]["message"]["content"]

    assert all(r.url.startswith(f"{server.url}/") for r in tab.requests)  # nothing from any other origin (no CDN)
    shot = tmp_path / "chat-page.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size < 300_000
    if os.environ.get("VLMKIT_UPDATE_SCREENSHOT") or not SCREENSHOT.exists():
        shutil.copyfile(shot, SCREENSHOT)  # docs/serving.md shows it
    assert tab.errors == []
    page.close()


def test_errors_show_the_apis_message_and_the_page_goes_on(browser, server, scene_png, tmp_path):
    tab = Page(browser, server)
    page = tab.page
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")

    shown = tab.send("What is this?", [notes])
    answer = tab.replay(tab.chat_requests()[-1])
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_image"
    assert shown == f"Error 400: {answer.json()['error']['message']}" and "not image/*" in shown
    assert page.locator(".message.error[role=alert]").count() == 1

    page.click("#attachments .remove")  # the refused file came back to the composer: take it out
    shown = tab.send("word " * 3000)
    answer = tab.replay(tab.chat_requests()[-1])
    assert answer.json()["error"]["code"] == "context_length_exceeded"
    assert shown == f"Error 400: {answer.json()['error']['message']}"

    # an image dropped on the page and one pasted into the prompt are attached too
    png = base64.b64encode(scene_png.read_bytes()).decode()
    for kind in ["drop", "paste"]:
        page.evaluate(
            """([png, kind]) => {
                const data = new DataTransfer();
                data.items.add(new File([Uint8Array.from(atob(png), (c) => c.charCodeAt(0))], `${kind}.png`,
                                        { type: "image/png" }));
                const init = { bubbles: true, cancelable: true };
                if (kind === "drop") document.getElementById("transcript").dispatchEvent(
                    new DragEvent("drop", { ...init, dataTransfer: data }));
                else document.getElementById("prompt").dispatchEvent(
                    new ClipboardEvent("paste", { ...init, clipboardData: data }));
            }""",
            [png, kind],
        )
    page.wait_for_function("() => document.querySelectorAll('#attachments img').length === 2")
    shown = tab.send("Which colours are there?")
    request = tab.chat_requests()[-1]
    messages = request.post_data_json["messages"]
    assert len(messages) == 1  # the refused messages are not part of the conversation
    assert [p["image_url"]["url"] for p in messages[0]["content"][:2]] == [data_url(scene_png)] * 2
    assert shown and shown == tab.replay(request).json()["choices"][0]["message"]["content"]
    assert tab.errors == []
    page.close()


def test_stop_keeps_the_partial_answer_and_the_server_goes_on(browser, server, scene_png, monkeypatch):
    real_step = DecodeBatch.step

    def slow_step(self):
        time.sleep(0.1)  # the answer (about 60 tokens) would take 6 s
        return real_step(self)

    monkeypatch.setattr(DecodeBatch, "step", slow_step)
    tab = Page(browser, server)
    page = tab.page
    page.fill("#key", KEY)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "400")
    page.set_input_files("#files", str(scene_png))
    page.wait_for_selector("#attachments img")
    page.fill("#prompt", "Describe the image.")
    page.click("#send")
    page.wait_for_function("(s) => document.querySelector(s)?.textContent.length > 0", arg=ANSWERS)
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.click("#stop")
    page.wait_for_selector("body[data-busy=false]")
    partial = page.text_content(ANSWERS)
    assert partial and page.text_content(".message.assistant .note") == "stopped"
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/health").json()["active"] != 0:
        assert time.monotonic() < deadline, "the stopped answer kept decoding"
        time.sleep(0.05)
    assert page.text_content(ANSWERS) == partial  # nothing more arrived

    monkeypatch.undo()
    full = tab.replay(tab.chat_requests()[-1]).json()["choices"][0]["message"]["content"]
    assert full.startswith(partial) and len(partial) < len(full)
    answer = tab.send("How many shapes are there?")  # the conversation goes on, with the partial answer in it
    messages = tab.chat_requests()[-1].post_data_json["messages"]
    assert messages[1] == {"role": "assistant", "content": partial}
    assert answer and answer == tab.replay(tab.chat_requests()[-1]).json()["choices"][0]["message"]["content"]
    assert tab.errors == []
    page.close()


def test_no_ui_serves_only_the_api(vlm):
    live = LiveServer(vlm, ServerSettings(model_name="default", ui=False))
    try:
        for path in ["/", "/ui/chat.js", "/ui/config.json"]:
            assert httpx.get(f"{live.url}{path}").status_code == 404
        assert httpx.get(f"{live.url}/v1/models").status_code == 200
    finally:
        live.stop()
