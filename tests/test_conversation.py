"""The one conversation model (vlmkit.processing.conversation): every spelling parses to it, both backends
render from it, errors say where."""

from __future__ import annotations

import base64
import pickle

import pytest
import torch
from PIL import Image

from conftest import compose_tiny, solid_image
from test_hf_backend import build_qwen2_vl, load_vlm
from vlmkit.api import VLM
from vlmkit.errors import ImageError, ImageTokenMismatchError, ProcessingError
from vlmkit.processing.conversation import (
    Conversation,
    ConversationError,
    ImagePart,
    Message,
    TextPart,
    parse_conversation,
    prompt_conversation,
)
from vlmkit.processing.images import ImageAccess
from vlmkit.serving.errors import APIError
from vlmkit.serving.schemas import ChatCompletionRequest
from vlmkit.serving.server import _messages

SYSTEM = {"role": "system", "content": "Be brief."}
QUESTION = {"type": "text", "text": "What is it?"}


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("conversation") / "red.png"
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    image.paste((255, 255, 0), (5, 5, 20, 15))
    image.save(path)
    return path


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


# -- parsing ---------------------------------------------------------------------------------------------------
def test_every_spelling_parses_to_the_same_model(png):
    p = str(png)
    expected = Conversation(
        (Message("system", (TextPart("Be brief."),)), Message("user", (ImagePart(p), TextPart("What is it?"))))
    )
    spellings = [
        ([SYSTEM, user({"type": "image", "image": p}, QUESTION)], None),
        ([SYSTEM, user({"type": "image", "url": p}, QUESTION)], None),
        ([SYSTEM, user({"type": "image", "path": p}, QUESTION)], None),
        ([SYSTEM, user({"type": "image_url", "image_url": {"url": p}}, QUESTION)], None),
        ([SYSTEM, user({"type": "image_url", "image_url": p}, QUESTION)], None),
        ([SYSTEM, {"role": "user", "content": "<image>\nWhat is it?"}], [p]),
        ([SYSTEM, user({"type": "text", "text": "<image>"}, QUESTION)], [p]),
        ([{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
          user({"type": "image", "image": p}, QUESTION)], None),
    ]  # fmt: skip
    for messages, images in spellings:
        assert parse_conversation(messages, images) == expected, (messages, images)
    assert parse_conversation(expected) is expected
    assert prompt_conversation("What is it?", [p]) == Conversation(expected.messages[1:])
    assert parse_conversation([SYSTEM, user({"type": "image", "image": p}, QUESTION)], openai=False).images == (p,)


def test_bare_base64_is_a_data_url_and_other_sources_are_kept(png):
    payload = base64.b64encode(png.read_bytes()).decode()
    bare = parse_conversation([user({"type": "image", "base64": payload})])
    assert bare.images == (f"data:;base64,{payload}",)
    assert bare == parse_conversation([user({"type": "image_url", "image_url": {"url": f"data:;base64,{payload}"}})])
    url = f"data:image/png;base64,{payload}"
    assert parse_conversation([user({"type": "image", "base64": url})]).images == (url,)
    image, data = solid_image(), png.read_bytes()
    assert parse_conversation([user({"type": "image", "image": image}, QUESTION)]) == parse_conversation(
        [{"role": "user", "content": "<image>\nWhat is it?"}], [image]
    )
    assert parse_conversation([user({"type": "image", "image": data})]).images == (data,)


def test_lenient_and_openai_forms():
    # vlmkit's own form: a text part without text is empty text, as before
    assert parse_conversation([user({"type": "text"})]).messages[0].parts == (TextPart(""),)
    openai = parse_conversation([{"role": "assistant", "content": None}], openai=True)
    assert openai.messages[0] == Message("assistant", (TextPart(""),))
    assert parse_conversation([{"role": "user", "content": []}]).messages[0].parts == ()


# -- rendering -------------------------------------------------------------------------------------------------
def test_strings_renderer_keeps_the_exact_native_text():
    a, b = solid_image(), solid_image((0, 0, 255))
    parts = parse_conversation(
        [user({"type": "image", "image": a}, {"type": "image", "image": b}, {"type": "text", "text": "Describe."}),
         {"role": "assistant", "content": "Two."}]
    )  # fmt: skip
    flat, images = parts.to_strings()
    assert flat[0] == {"role": "user", "content": "<image>\n<image>\nDescribe."}
    assert flat[1] == {"role": "assistant", "content": "Two."}
    assert images == [a, b]
    for text in [
        "Compare <image> and <image>.",
        "<image><image>\nWhich?",
        "x\n<image>\ny\n<image>",
        "<image>\n\n<image>",
    ]:
        conversation = parse_conversation([{"role": "user", "content": text}], [a, b])
        assert conversation.to_strings() == ([{"role": "user", "content": text}], [a, b])
    inline = parse_conversation([{"role": "user", "content": "Compare <image> and <image>."}], [a, b]).messages[0]
    assert inline.inline and inline.parts == (TextPart("Compare "), ImagePart(a), TextPart(" and "), ImagePart(b),
                                              TextPart("."))  # fmt: skip
    custom = parse_conversation([{"role": "user", "content": "<img>\nWhat?"}], [a], image_token="<img>")
    assert custom.to_strings("<img>") == ([{"role": "user", "content": "<img>\nWhat?"}], [a])
    with pytest.raises(ImageTokenMismatchError, match="1 <image> marker.*0 image"):
        parse_conversation([{"role": "user", "content": "<image>\nWhat?"}]).to_strings()


def test_transformers_renderer_loads_images_under_the_policy(png):
    conversation = parse_conversation(
        [SYSTEM, user({"type": "image", "image": str(png)}, {"type": "image", "image": png.read_bytes()}, QUESTION)],
    )
    seen = []
    out = conversation.to_transformers(check_text=lambda text, where: seen.append(where) or text.upper(), name="conv")
    assert seen == ["conv, message 0, part 0", "conv, message 1, part 2"]
    assert out[0] == {"role": "system", "content": [{"type": "text", "text": "BE BRIEF."}]}
    images = [p["image"] for p in out[1]["content"][:2]]
    assert all(isinstance(i, Image.Image) and i.mode == "RGB" and i.size == (40, 30) for i in images)
    assert images[0].tobytes() == images[1].tobytes()
    assert out[1]["content"][2] == {"type": "text", "text": "WHAT IS IT?"}
    with pytest.raises(ImageError, match="local paths are not allowed"):
        conversation.to_transformers(access=ImageAccess(allow_local=False))
    with pytest.raises(ImageError, match="pixel"):
        conversation.to_transformers(max_pixels=100)


def test_messages_renderer_parses_back_to_the_same_conversation(png):
    conversation = parse_conversation(
        [SYSTEM, user({"type": "image_url", "image_url": {"url": str(png)}}, QUESTION), {"role": "assistant",
         "content": ""}]
    )  # fmt: skip
    messages = conversation.to_messages()
    assert messages[1] == user({"type": "image", "image": str(png)}, QUESTION)
    assert parse_conversation(messages) == conversation


# -- the base64 bug, on both backends ---------------------------------------------------------------------------
def image_forms(png) -> list[dict]:
    payload = base64.b64encode(png.read_bytes()).decode()
    return [
        {"type": "image", "base64": payload},
        {"type": "image", "image": str(png)},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{payload}"}},
    ]


def answers(vlm: VLM, png) -> list:
    return [vlm.generate_batch([[user(form, QUESTION)]], max_new_tokens=4)[0] for form in image_forms(png)]


def test_a_bare_base64_image_works_on_a_native_model(png):
    torch.manual_seed(0)
    model, processor = compose_tiny()
    results = answers(VLM(model, processor), png)  # the base64 form used to fail: "file not found"
    assert results[0].completion_tokens == 4
    assert len({tuple(r.token_ids) for r in results}) == 1


def test_a_bare_base64_image_works_on_the_transformers_backend(png, tmp_path):
    torch.manual_seed(0)
    build_qwen2_vl(tmp_path / "qwen2_vl")
    results = answers(load_vlm(tmp_path / "qwen2_vl"), png)
    assert results[0].completion_tokens >= 1
    assert len({tuple(r.token_ids) for r in results}) == 1


# -- errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "messages, images, kwargs, match, path, code",
    [
        ([], None, {}, "conversation: a conversation must be a non-empty list", "messages", None),
        ("hi", None, {}, "conversation: a conversation must be a non-empty list", "messages", None),
        (["hi"], None, {}, "conversation, message 0: needs 'role' and 'content'", "messages[0]", None),
        ([{"role": "bot", "content": "hi"}], None, {}, "message 0: unknown role 'bot'", "messages[0].role", None),
        ([{"role": "user", "content": 5}], None, {}, "message 0: content must be a string", "messages[0].content",
         None),
        ([user({"type": "audio"})], None, {},
         "message 0, part 0: unknown content part type 'audio'; supported: text, image, image_url",
         "messages[0].content[0].type", "invalid_content_part"),
        ([SYSTEM, user(QUESTION, {"type": "image"})], None, {"name": "sample-3"},
         "sample-3, message 1, part 1: image part without 'image', 'url', 'path' or 'base64'",
         "messages[1].content[1]", None),
        ([user({"type": "image_url", "image_url": {}})], None, {}, "part 0: image_url part without a url",
         "messages[0].content[0].image_url", None),
        ([user({"type": "image", "image": "a.png"})], ["b.png"], {}, "either inside the messages or in 'images'",
         "images", None),
        ([user({"type": "image", "image": "a.png"})], None, {"openai": True},
         "unknown content part type 'image'; supported: text, image_url", "messages[0].content[0].type",
         "invalid_content_part"),
        ([user({"type": "text", "text": 3})], None, {"openai": True}, "part 0: text part without text",
         "messages[0].content[0].text", None),
        ([user({"type": "text"})], None, {"openai": True}, "text part without text", "messages[0].content[0].text",
         None),
        ([user({"type": "image_url", "image_url": {"url": 5}})], None, {"openai": True}, "image_url part without a url",
         "messages[0].content[0].image_url", None),
    ],
)  # fmt: skip
def test_errors_say_where(messages, images, kwargs, match, path, code):
    with pytest.raises(ConversationError, match=match) as caught:
        parse_conversation(messages, images, **kwargs)
    error = caught.value
    assert isinstance(error, ProcessingError) and (error.path, error.code) == (path, code)
    assert str(error).endswith(f": {error.reason}") and not error.reason.startswith(("conversation", "sample"))
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_marker_count_mismatch_with_images():
    with pytest.raises(ImageTokenMismatchError, match="0 <image> marker.*1 image"):
        parse_conversation([{"role": "user", "content": "What?"}], [solid_image()])
    with pytest.raises(ImageTokenMismatchError, match="2 <image> marker.*1 image"):
        parse_conversation([{"role": "user", "content": "<image> <image>"}], [solid_image()])


def test_server_errors_keep_their_params_and_codes():
    def request(*messages) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate({"model": "m", "messages": list(messages)})

    ok = _messages(request({"role": "developer", "content": None}, user({"type": "image_url", "image_url": "u"})), 1)
    assert ok == [{"role": "system", "content": [{"type": "text", "text": ""}]},
                  user({"type": "image", "image": "u"})]  # fmt: skip
    cases = [
        (user(QUESTION, {"type": "input_audio"}), "unknown content part type 'input_audio'; supported: text, image_url",
         "messages[1].content[1].type", "invalid_content_part"),
        (user({"type": "image_url", "image_url": {"url": ""}}), "image_url part without a url",
         "messages[1].content[0].image_url", None),
        (user({"type": "text", "text": None}), "text part without text", "messages[1].content[0].text", None),
        (user(*[{"type": "image_url", "image_url": "u"}] * 2), "At most 1 image(s) may be provided in one prompt",
         "messages", "too_many_images"),
    ]  # fmt: skip
    for message, text, param, code in cases:
        with pytest.raises(APIError) as caught:
            _messages(request(SYSTEM, message), 1)
        error = caught.value
        assert (error.status, error.message, error.param, error.code) == (400, text, param, code)


def test_text_chars_counts_text_parts_only(png):
    from vlmkit.processing.limits import text_chars

    assert text_chars([SYSTEM, user({"type": "image", "image": str(png)}, QUESTION)]) == len("Be brief.What is it?")
    assert text_chars("not a conversation") == text_chars([user({"type": "video"})]) == 0
