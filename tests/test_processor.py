import base64
import io

import pytest
import torch

from conftest import compose_tiny, image_turn, make_tokenizer, siglip_config, solid_image
from vlmkit.errors import ImageError, ImageTokenMismatchError, ProcessingError
from vlmkit.processing.chat import DEFAULT_CHAT_TEMPLATE
from vlmkit.processing.images import ImageTransformConfig
from vlmkit.processing.processor import VLMProcessor, prepare_tokenizer

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
UNSTABLE_TEMPLATE = (  # earlier turns are upper-cased, like templates that strip reasoning from old turns
    "{% for message in messages %}{{ message['role'] + ': ' }}{% if loop.last %}{{ message['content'] }}"
    "{% else %}{{ message['content'] | upper }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You describe shapes."},
    image_turn("What is in the image?"),
    {"role": "assistant", "content": "A red square."},
    {"role": "user", "content": "And its colour?"},
    {"role": "assistant", "content": "Red, naïve façade 東京."},
]


def processor_with(template=None, extra_tokens=()):
    tokenizer = make_tokenizer(template)
    if extra_tokens:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(extra_tokens)}, replace_extra_special_tokens=False
        )
    return VLMProcessor(tokenizer, ImageTransformConfig(size=32), tokens_per_image=4)


def supervised_spans(ids, labels):
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


@pytest.mark.parametrize(
    "template,extra,end",
    [
        (None, (), "<|im_end|>"),
        (QWEN_TEMPLATE, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
        (LLAMA3_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    ],
)
def test_label_mask_is_exactly_the_assistant_turns(template, extra, end):
    processor = processor_with(template, extra)
    encoded = processor.encode(CONVERSATION, train=True)
    spans = supervised_spans(encoded.input_ids, encoded.labels)
    decoded = [processor.tokenizer.decode(s, skip_special_tokens=False) for s in spans]
    assert decoded == [f"A red square.{end}", f"Red, naïve façade 東京.{end}"]
    assert end in [processor.tokenizer.convert_ids_to_tokens(i) for i in processor.stop_token_ids]
    # images expand to tokens_per_image placeholders, never supervised
    image_positions = [i for i, t in enumerate(encoded.input_ids) if t == processor.image_token_id]
    assert len(image_positions) == 4 and all(encoded.labels[i] == -100 for i in image_positions)


def test_tokenizer_template_is_used_and_default_otherwise():
    own = processor_with(LLAMA3_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    text = own.chat.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text.startswith("<s><|start_header_id|>user") and text.endswith("assistant<|end_header_id|>\n\n")
    default = processor_with()
    assert default.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert (
        default.chat.render([{"role": "user", "content": "hi"}], True)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_generation_prompt_and_no_labels_for_inference():
    processor = processor_with()
    encoded = processor.encode(CONVERSATION[:2])
    assert encoded.labels is None
    text = processor.tokenizer.decode(encoded.input_ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")


def test_no_supervised_token_is_an_error_naming_the_sample():
    processor = processor_with()
    with pytest.raises(ProcessingError, match="sample-17: no assistant token"):
        processor.encode([{"role": "user", "content": "hi"}], train=True, name="sample-17")
    with pytest.raises(ProcessingError, match="sample-18: assistant turn 1 is empty"):
        processor.encode(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
            train=True,
            name="sample-18",
        )


def test_template_that_is_not_prefix_stable_is_refused():
    processor = processor_with(UNSTABLE_TEMPLATE)
    with pytest.raises(ProcessingError, match="rec-3: the chat template renders turn 1 differently"):
        processor.encode(
            [*CONVERSATION[3:], {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            train=True,
            name="rec-3",
        )


def test_image_marker_mismatches():
    processor = processor_with()
    with pytest.raises(ImageTokenMismatchError, match="1 <image> marker.*0 image"):
        processor.encode([{"role": "user", "content": "<image>\nWhat is it?"}])
    with pytest.raises(ImageTokenMismatchError, match="0 <image> marker.*1 image"):
        processor.encode([{"role": "user", "content": "What is it?"}], images=[solid_image()])
    with pytest.raises(ProcessingError, match="either inside the messages or in 'images'"):
        processor.encode([image_turn("x")], images=[solid_image()])


def test_string_markers_with_images_argument_equal_content_parts():
    processor = processor_with()
    a = processor.encode([{"role": "user", "content": "<image>\nWhat is it?"}], images=[solid_image()])
    b = processor.encode([image_turn("What is it?")])
    assert a.input_ids == b.input_ids and torch.equal(a.pixel_values, b.pixel_values)


def test_encoding_without_pixels_gives_the_same_tokens():
    processor = processor_with()
    messages = [image_turn("What is it?", n_images=2), {"role": "assistant", "content": "Two squares."}]
    full = processor.encode(messages, train=True)
    lazy = processor.encode(messages, train=True, pixels=False)
    assert lazy.pixel_values is None and full.pixel_values.shape[0] == 2
    assert (lazy.input_ids, lazy.labels, lazy.image_token_counts) == (full.input_ids, full.labels,
                                                                       full.image_token_counts)  # fmt: skip


def test_openai_image_url_parts_and_bad_parts():
    processor = processor_with()
    buffer = io.BytesIO()
    solid_image().save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    message = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is it?"},
        ],
    }
    encoded = processor.encode([message])
    assert torch.equal(encoded.pixel_values, processor.encode([image_turn("What is it?")]).pixel_values)
    with pytest.raises(ProcessingError, match="unknown content part type 'audio'"):
        processor.encode([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}])
    with pytest.raises(ProcessingError, match="unknown role 'bot'"):
        processor.encode([{"role": "bot", "content": "hi"}])
    with pytest.raises(ProcessingError, match="non-empty list"):
        processor.encode([])
    with pytest.raises(ImageError, match="not found"):
        processor.encode([{"role": "user", "content": [{"type": "image", "image": "/no/such.png"}]}])


def test_collation_right_and_left_padding():
    processor = processor_with()
    convs = [
        [image_turn("Describe.", 2), {"role": "assistant", "content": "Two squares."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ]
    encoded = [processor.encode(c, train=True) for c in convs]
    lengths = [len(e.input_ids) for e in encoded]
    right = processor.collate(encoded, "right")
    left = processor.collate(encoded, "left")
    width = max(lengths)
    for row, n in enumerate(lengths):
        assert right["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert left["attention_mask"][row].tolist() == [0] * (width - n) + [1] * n
        assert right["input_ids"][row, :n].tolist() == encoded[row].input_ids
        assert left["input_ids"][row, width - n :].tolist() == encoded[row].input_ids
        assert (right["input_ids"][row, n:] == processor.pad_token_id).all()
        assert (right["labels"][row, n:] == -100).all()
    assert right["pixel_values"].shape == (2, 3, 32, 32) and right["image_counts"].tolist() == [2, 0]
    with pytest.raises(ProcessingError, match="empty batch"):
        processor.collate([])


def test_max_length_is_enforced():
    processor = processor_with()
    with pytest.raises(ProcessingError, match=r"x: \d+ tokens \(images included\) is over the limit of 5"):
        processor.encode([image_turn("hello")], name="x", max_length=5)


def test_processor_round_trip_and_tower_normalisation(tmp_path):
    _, processor = compose_tiny(siglip_config())
    assert processor.image_config.mean == (0.5, 0.5, 0.5) and processor.tokens_per_image == 16
    processor.save_pretrained(tmp_path)
    again = VLMProcessor.from_pretrained(tmp_path)
    a, b = processor.encode(CONVERSATION, train=True), again.encode(CONVERSATION, train=True)
    assert a.input_ids == b.input_ids and a.labels == b.labels and torch.equal(a.pixel_values, b.pixel_values)
    assert (
        again.stop_token_ids == processor.stop_token_ids
        and again.tokenizer.chat_template == processor.tokenizer.chat_template
    )


def test_tokenizer_gets_image_token_once():
    tokenizer = make_tokenizer()
    n = len(tokenizer)
    assert prepare_tokenizer(tokenizer) == ["<image>", "<|im_start|>", "<|im_end|>"]
    assert len(tokenizer) == n + 3 and prepare_tokenizer(tokenizer) == []
    assert (
        tokenizer.decode(
            tokenizer("<image>hi<|im_end|>", add_special_tokens=False)["input_ids"], skip_special_tokens=True
        )
        == "hi"
    )


def test_trained_tokenizer_round_trips_any_text():
    from vlmkit.processing.tokenizer_training import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["a red circle", "a blue square"] * 10, vocab_size=300)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    for token in ("<image>", "<|im_start|>", "<|im_end|>", "<pad>", "</s>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    text = "a red circle — naïve 東京 👍"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert prepare_tokenizer(tokenizer) == []
