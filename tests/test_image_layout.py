"""Image layouts: where a processor puts image tokens (vlmkit.processing.chat.place_images), in training and
generation, saved with the processor, and the same in the transformers LLaVA export's chat template."""

import pytest
import torch
from transformers import AutoProcessor

from conftest import compose_tiny, make_tokenizer, solid_image
from vlmkit.errors import ProcessingError
from vlmkit.interop.hf_llava import export_hf_llava, load_hf_llava, template_layout
from vlmkit.processing.chat import IMAGE_TOKEN, place_images
from vlmkit.processing.images import ImageTransformConfig
from vlmkit.processing.processor import VLMProcessor

RED, BLUE = solid_image((200, 30, 30)), solid_image((30, 30, 200))


def msgs(*pairs):
    return [{"role": role, "content": text} for role, text in pairs]


def test_as_written_keeps_everything():
    messages = msgs(("user", "<image>\nWhat is it?"), ("assistant", "A square."))
    assert place_images(messages, "as_written") == (messages, [0])


def test_after_each_question_moves_and_shows_again():
    messages = msgs(
        ("system", "Be brief."),
        ("user", "<image>\nWhat colour?"),
        ("assistant", "Red."),
        ("user", "And the shape?"),
        ("assistant", "A square."),
        ("user", "Compare  <image>  with it."),
        ("assistant", "Blue."),
        ("user", "Which is larger?"),
    )
    out, order = place_images(messages, "after_each_question")
    assert [m["content"] for m in out] == [
        "Be brief.",
        "What colour?\n<image>",
        "Red.",
        "And the shape?\n<image>",  # no image of its own: the latest user turn's image again
        "A square.",
        "Compare\nwith it.\n<image>",  # its own image, after its text
        "Blue.",
        "Which is larger?\n<image>",
    ]
    assert order == [0, 0, 1, 1]


def test_text_only_turns_before_any_image_stay_text():
    out, order = place_images(msgs(("user", "Hello"), ("assistant", "Hi"), ("user", "<image>")), "after_each_question")
    assert [m["content"] for m in out] == ["Hello", "Hi", "<image>"] and order == [0]


def test_unknown_layout_is_refused_by_name():
    with pytest.raises(ProcessingError, match="unknown image layout 'sideways'.*after_each_question"):
        place_images(msgs(("user", "x")), "sideways")
    with pytest.raises(ProcessingError, match="unknown image_layout 'sideways'"):
        VLMProcessor(make_tokenizer(), ImageTransformConfig(size=32), tokens_per_image=4, image_layout="sideways")


def layout_processor(layout="after_each_question"):
    return VLMProcessor(make_tokenizer(), ImageTransformConfig(size=32), tokens_per_image=4, image_layout=layout)


def test_processor_repeats_pixels_and_placeholders_per_question():
    processor = layout_processor()
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": RED}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Shape?"},
        {"role": "assistant", "content": "square"},
    ]
    encoded = processor.encode(conversation, train=True)
    assert encoded.image_token_counts == [4, 4] and encoded.image_order == [0, 0]
    assert encoded.pixel_values.shape == (2, 3, 32, 32) and torch.equal(*encoded.pixel_values)
    ids = encoded.input_ids
    text = processor.tokenizer.decode(ids)
    # each question comes before its image tokens, and the image tokens before the answer
    assert text.index("Colour?") < text.index(IMAGE_TOKEN) < text.index("red") < text.index("Shape?")
    assert text.count(IMAGE_TOKEN) == 8
    image_id = processor.image_token_id
    assert sum(1 for t, label in zip(ids, encoded.labels, strict=True) if t == image_id and label != -100) == 0
    plain = layout_processor("as_written").encode(conversation, train=True)
    assert plain.image_token_counts == [4] and plain.input_ids.count(image_id) == 4


def test_layout_is_saved_with_the_processor(tmp_path):
    layout_processor().save_pretrained(tmp_path)
    assert VLMProcessor.from_pretrained(tmp_path).image_layout == "after_each_question"


def test_training_samples_carry_the_repeated_images(tmp_path):
    from vlmkit.data.formats import Record, open_writer
    from vlmkit.data.shapes import render_png, sample_scene
    from vlmkit.training.config import DataSource
    from vlmkit.training.data import Collator, encode_source

    png = render_png(sample_scene("train", 0, 0))
    messages = [{"role": "user", "content": "<image>\nQ1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]  # fmt: skip
    with open_writer(tmp_path / "d", "jsonl", "train") as writer:
        writer.write(Record("s0", messages, [png], "multiturn", {}))
    processor = layout_processor()
    data = encode_source(DataSource(path=str(tmp_path / "d" / "train.jsonl")), processor, None, "test")
    sample = data.samples[0]
    assert len(sample.images) == 2 and sample.images[0] is sample.images[1]
    batch = Collator(processor)([sample])
    assert batch["pixel_values"].shape[0] == 2
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 8


@pytest.fixture(scope="module")
def exported_layout(tmp_path_factory):
    torch.manual_seed(0)
    model, processor = compose_tiny()
    processor.image_layout = "after_each_question"
    out = tmp_path_factory.mktemp("layout")
    export_hf_llava(model.eval(), processor, out)
    return model, processor, out


def two_turns(image_in_every_turn: bool, path):
    image = {"type": "image", "path": str(path)}
    return [
        {"role": "user", "content": [image, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [*([image] if image_in_every_turn else []), {"type": "text", "text": "Shape?"}]},
    ]


def test_exported_template_lays_out_images_like_vlmkit(exported_layout, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, processor, out = exported_layout
    path = tmp_path / "red.png"
    RED.save(path)
    hf_processor = AutoProcessor.from_pretrained(out)
    # rendering: the same text whether or not the user repeats the image
    for every in (False, True):
        theirs = hf_processor.apply_chat_template(two_turns(every, path), add_generation_prompt=True, tokenize=False)
        mine = processor.tokenizer.decode(processor.encode(two_turns(False, path)).input_ids)
        assert theirs.replace(IMAGE_TOKEN, "") == mine.replace(IMAGE_TOKEN, "")
        assert theirs.count(IMAGE_TOKEN) == 2
    # tokens and logits: transformers pairs each <image> with one given image, so the image goes in every turn
    theirs = hf_processor.apply_chat_template(
        two_turns(True, path), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    mine = processor([two_turns(False, path)])
    assert theirs["input_ids"].tolist() == mine["input_ids"].tolist()
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (llava(**theirs).logits - model(**mine).logits).abs().max() <= 1e-4


def test_import_restores_the_layout(exported_layout, tmp_path):
    _, processor, out = exported_layout
    _, imported = load_hf_llava(out)
    assert imported.image_layout == "after_each_question"
    conversation = two_turns(False, solid_image())
    conversation[0]["content"][0] = {"type": "image", "image": RED}
    assert imported.encode(conversation).input_ids == processor.encode(conversation).input_ids
    assert template_layout("{{ messages }}") == "as_written"
