"""Real datasets' record shapes read as they are: each test builds a sample in the exact shape its tool writes
(cited in its docstring) and checks the conversation and images vlmkit reads from it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmkit.data.formats import (
    FORMATS,
    Record,
    RecordError,
    derive_id,
    detect_format,
    llava_preprocess,
    open_dataset,
    open_writer,
    parse_columns,
)
from vlmkit.errors import DataError

datasets.disable_progress_bars()


def _png(colour=(200, 30, 30), size=(12, 10), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _colours(sample) -> list[tuple[int, int, int]]:
    return [image.getpixel((0, 0)) for image in sample.images]


# ------------------------------------------------------------------------------------------- LLaMA-Factory


def _demo_images(root: Path) -> None:
    (root / "mllm_demo_data").mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)], 1):
        (root / "mllm_demo_data" / f"{i}.jpg").write_bytes(_png(colour, fmt="JPEG"))


def test_llamafactory_mllm_demo_with_markers(tmp_path):
    """LLaMA-Factory ``data/mllm_demo.json`` (hiyouga/LLaMA-Factory, 2025-03 onwards), its first record as written:
    ``messages`` of role/content, one ``<image>`` at the start of turn 0 and one trailing turn 2, two images.
    Its ``messages`` are not LLaVA data: the trailing marker stays where it is."""
    _demo_images(tmp_path)
    record = {
        "messages": [
            {"content": "<image>Who are they?", "role": "user"},
            {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
            {"content": "What are they doing?<image>", "role": "user"},
            {"content": "They are celebrating on the soccer field.", "role": "assistant"},
        ],
        "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/1.jpg"],
    }
    path = tmp_path / "mllm_demo.json"
    path.write_text(json.dumps([record], indent=2))
    (sample,) = open_dataset(tmp_path)
    assert sample.messages[2] == _user("What are they doing?<image>")
    assert sample.messages[0] == _user("<image>Who are they?") and len(sample.images) == 2
    assert sample.id == derive_id(record) and len(sample.id) == 16
    assert next(iter(open_dataset(path))).id == sample.id, "the derived id is stable"


def test_llamafactory_demo_without_markers(tmp_path):
    """LLaMA-Factory ``data/mllm_demo.json`` as of release v0.7.0 (2024-04): ``images`` but no ``<image>`` marker
    in the text. The images go before the first user turn's text, as LLaMA-Factory's engines place them."""
    _demo_images(tmp_path)
    record = {
        "messages": [
            {"content": "Who are they?", "role": "user"},
            {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
            {"content": "What are they doing?", "role": "user"},
            {"content": "They are celebrating on the soccer field.", "role": "assistant"},
        ],
        "images": ["mllm_demo_data/1.jpg"],
    }
    (tmp_path / "mllm_demo.json").write_text(json.dumps([record]))
    (sample,) = open_dataset(tmp_path)
    assert sample.messages[0] == _user("<image>\nWho are they?") and sample.messages[2] == _user("What are they doing?")
    assert _colours(sample)[0][0] > 200


def test_llamafactory_v1_content_parts(tmp_path):
    """LLaMA-Factory v1 ``data/v1_multimodal_demo.jsonl`` (its current form): content is a list of
    ``{"type": "image_url" | "text", "value": ...}`` parts, images inline, no ``images`` field, no marker."""
    _demo_images(tmp_path / "data")
    line = {"messages": [
        {"role": "user", "content": [{"type": "image_url", "value": "data/mllm_demo_data/1.jpg"},
                                     {"type": "text", "value": "Who are they?"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "They're Kane and Gretzka from Bayern Munich."}]},
        {"role": "user", "content": [{"type": "text", "value": "What are they doing?"},
                                     {"type": "image_url", "value": "data/mllm_demo_data/2.jpg"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "They are celebrating on the soccer field."}]},
    ]}  # fmt: skip
    path = tmp_path / "v1_multimodal_demo.jsonl"
    path.write_text(json.dumps(line, ensure_ascii=False) + "\n")
    (sample,) = open_dataset(path)
    assert sample.messages[0] == _user("<image>\nWho are they?")
    assert sample.messages[2] == _user("What are they doing?\n<image>")
    assert sample.messages[1] == _bot("They're Kane and Gretzka from Bayern Munich.")
    assert _colours(sample)[0][0] > 200 and _colours(sample)[1][1] > 200


# ------------------------------------------------------------------------------------------------ ms-swift


def test_ms_swift_messages_system_text_only_and_absolute_paths(tmp_path):
    """ms-swift ``docs/source_en/Customization/Custom-dataset.md`` ("Multimodal", "Supervised Fine-tuning"):
    text-only rows, ``<image><image>`` with absolute paths (``/xxx/x.jpg``), a system turn, pre-training rows of
    one assistant turn. Absolute paths are refused unless allowed."""
    pics = tmp_path / "xxx"
    pics.mkdir()
    (pics / "x.jpg").write_bytes(_png((255, 0, 0), fmt="JPEG"))
    (pics / "x.png").write_bytes(_png((0, 0, 255)))
    x_jpg, x_png = str(pics / "x.jpg"), str(pics / "x.png")
    lines = [
        {"messages": [{"role": "user", "content": "Where is the capital of Zhejiang?"},
                      {"role": "assistant", "content": "The capital of Zhejiang is Hangzhou."}]},
        {"messages": [{"role": "user", "content": "<image><image>What is the difference between the two images?"},
                      {"role": "assistant", "content": "The first one is a kitten, and the second one is a puppy."}],
         "images": [x_jpg, x_png]},
        {"messages": [{"role": "system", "content": "You are a helpful and harmless assistant."},
                      {"role": "user", "content": "<image>What is in the image?"},
                      {"role": "assistant", "content": "The image shows an elephant."}], "images": [x_jpg]},
        {"messages": [{"role": "assistant", "content": "<image>is a puppy, <image>is a kitten"}],
         "images": [x_jpg, x_png]},
    ]  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    path = data / "swift.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(RecordError, match="absolute paths need allow_absolute_paths") as info:
        list(open_dataset(path))
    assert info.value.reason == "path_escape" and str(info.value).startswith(f"{path}: line 2")
    text, two, system, pretrain = open_dataset(path, allow_absolute_paths=True)
    assert text.images == [] and text.messages[1] == _bot("The capital of Zhejiang is Hangzhou.")
    assert two.messages[0]["content"].startswith("<image><image>What") and _colours(two)[1] == (0, 0, 255)
    assert system.messages[0] == {"role": "system", "content": "You are a helpful and harmless assistant."}
    assert pretrain.messages == [_bot("<image>is a puppy, <image>is a kitten")] and len(pretrain.images) == 2


def test_ms_swift_other_input_formats(tmp_path):
    """ms-swift's ``Custom-dataset.md`` other AutoPreprocessor inputs: OpenAI multimodal parts (``image_url``
    with a base64 data URL), ShareGPT ``{"system", "conversation": [{"human", "assistant"}]}``, query-response."""
    import base64

    data_url = "data:image/png;base64," + base64.b64encode(_png((0, 255, 0))).decode()
    lines = [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Compare these images."},
                                                   {"type": "image_url", "image_url": {"url": data_url}}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "I will inspect them."}]}]},
        {"system": "<system>", "conversation": [{"human": "<query1>", "assistant": "<response1>"},
                                                {"human": "<query2>", "assistant": "<response2>"}]},
        {"system": "<system>", "query": "<query2>", "response": "<response2>"},
    ]  # fmt: skip
    path = tmp_path / "swift.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    parts, sharegpt, qa = open_dataset(path)
    assert parts.messages[0] == _user("Compare these images.\n<image>") and _colours(parts) == [(0, 255, 0)]
    assert [m["role"] for m in sharegpt.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert sharegpt.messages[3] == _user("<query2>")
    assert qa.messages == [{"role": "system", "content": "<system>"}, _user("<query2>"), _bot("<response2>")]


# ------------------------------------------------------------------------------ the_cauldron, LLaVA-OneVision

CAULDRON_ROW = {
    "texts": [{"user": "Question: What do respiration and combustion give out\nChoices:\nA. Oxygen\nB. Carbon "
               "dioxide\nC. Nitrogen\nD. Heat\nAnswer with the letter.", "assistant": "Answer: B", "source": "AI2D"}],
}  # fmt: skip
"""The example row of HuggingFaceM4/the_cauldron's dataset card (config ``ai2d``), with one image in ``images``."""


def _cauldron_table(n: int = 3) -> pa.Table:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    texts = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))
    rows = [{"images": [{"bytes": _png((10 * i, 0, 0)), "path": None}], **CAULDRON_ROW} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=pa.schema([("images", pa.list_(image)), ("texts", texts)]))


def test_the_cauldron_parquet_as_on_the_hub(tmp_path):
    """HuggingFaceM4/the_cauldron: parquet files ``ai2d/train-00000-of-00001-<hash>.parquet`` of ``images`` (a
    list of ``{bytes, path}`` image structs) and ``texts`` (``{user, assistant, source}`` turns, no markers), as
    its dataset card shows. The images go before the first question; ``source`` is kept in ``meta``."""
    folder = tmp_path / "the_cauldron" / "ai2d"
    folder.mkdir(parents=True)
    pq.write_table(_cauldron_table(), folder / "train-00000-of-00001-2ce340398c113b79.parquet")
    assert detect_format(tmp_path / "the_cauldron") == ("parquet", folder)
    dataset = open_dataset(tmp_path / "the_cauldron")
    assert dataset.format == "parquet" and len(dataset) == 3
    samples = list(dataset)
    first = samples[0]
    assert first.messages[0]["content"].startswith("<image>\nQuestion: What do respiration")
    assert first.messages[1] == _bot("Answer: B") and first.meta == {"source": "AI2D"}
    assert [s.images[0].getpixel((0, 0))[0] for s in samples] == [0, 10, 20]
    assert len({s.id for s in samples}) == 3, "ids hash the record, image bytes included"


def test_the_cauldron_as_a_datasets_folder(tmp_path):
    """the_cauldron loaded with ``datasets`` and saved with ``save_to_disk``: features ``images:
    Sequence(Image())``, ``texts: [{user, assistant, source}]`` (its dataset card's features)."""
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                   "source": datasets.Value("string")}],
    })  # fmt: skip
    rows = [{"images": [{"bytes": _png(), "path": None}], **CAULDRON_ROW}]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "ai2d"))
    (sample,) = open_dataset(tmp_path / "ai2d")
    assert sample.messages[1] == _bot("Answer: B") and _colours(sample) == [(200, 30, 30)]


def test_llava_onevision_hub_parquet_with_text_only_rows(tmp_path):
    """lmms-lab/LLaVA-OneVision-Data: one folder per config (``CLEVR-Math(MathV360K)/train-0000N-of-00002.parquet``)
    of ``id``, ``image`` (an image struct, null for text-only rows), ``conversations`` (``{from, value}``) and
    ``data_source``, as its upload script writes them. ``data_source`` is kept in ``meta``."""
    folder = tmp_path / "LLaVA-OneVision-Data" / "CLEVR-Math(MathV360K)"
    folder.mkdir(parents=True)
    question = ("<image>\nHint: Please answer the question and provide the final answer at the end.\nQuestion: "
                "Subtract all red things. Subtract all tiny matte balls. How many objects are left?")  # fmt: skip
    rows = [
        {"id": "identity_1", "image": {"bytes": _png(), "path": "1.png"}, "data_source": "CLEVR-Math(MathV360K)",
         "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "The answer is 5"}]},
        {"id": "identity_2", "image": None, "data_source": "CLEVR-Math(MathV360K)",
         "conversations": [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "5"}]},
    ]  # fmt: skip
    for i, row in enumerate(rows):
        pq.write_table(pa.Table.from_pylist([row]), folder / f"train-0000{i}-of-00002.parquet")
    image_row, text_row = open_dataset(tmp_path / "LLaVA-OneVision-Data")
    assert image_row.id == "identity_1" and image_row.messages[0] == _user(question) and len(image_row.images) == 1
    assert image_row.meta == {"data_source": "CLEVR-Math(MathV360K)"}
    assert text_row.images == [] and text_row.messages[1] == _bot("5")


# ---------------------------------------------------------------------------------------------- img2dataset


def _img2dataset(root: Path, shards: int = 2, per_shard: int = 2) -> None:
    """img2dataset's ``output_format="webdataset"`` writer: ``{shard:05d}.tar`` of ``KEY.jpg``, ``KEY.txt``,
    ``KEY.json`` (the url, caption, key, status, sizes ...) and, beside each tar, ``{shard:05d}.parquet`` (every
    input row and its status) and ``{shard:05d}_stats.json``; keys are the shard id then the sample index."""
    root.mkdir(parents=True)
    for shard in range(shards):
        members, meta_rows = [], []
        for i in range(per_shard):
            key = f"{shard:05d}{i:04d}"
            meta = {"url": f"https://example.com/{key}.jpg", "caption": f"a photo number {key}", "key": key,
                    "status": "success", "error_message": None, "width": 12, "height": 10, "original_width": 24,
                    "original_height": 20, "exif": "{}", "sha256": "0" * 64}  # fmt: skip
            members += [(f"{key}.jpg", _png((shard * 100, i * 100, 0), fmt="JPEG")),
                        (f"{key}.txt", meta["caption"].encode()),
                        (f"{key}.json", json.dumps(meta, indent=4).encode())]  # fmt: skip
            meta_rows.append(meta)
        meta_rows.append({**meta_rows[0], "key": f"{shard:05d}9999", "status": "failed_to_download"})
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        pq.write_table(pa.Table.from_pylist(meta_rows), root / f"{shard:05d}.parquet")
        stats = {"count": per_shard + 1, "successes": per_shard, "failed_to_download": 1, "failed_to_resize": 0}
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))


def test_img2dataset_webdataset_reads_as_captions(tmp_path):
    """img2dataset's webdataset output (its ``writer.py``, ``WebDatasetSampleWriter``): the folder is one dataset
    (the ``.parquet`` and ``_stats.json`` beside the tars are not), ``len`` comes from the stats, each sample is
    a caption: the prompt, then the ``.txt`` as the answer; the key is the id and the JSON fields go to meta."""
    root = tmp_path / "laion"
    _img2dataset(root)
    assert detect_format(root) == ("wds", root / "[0-9][0-9][0-9][0-9][0-9].tar")
    dataset = open_dataset(root)
    assert len(dataset) == 4
    samples = list(dataset)
    assert [s.id for s in samples] == ["000000000", "000000001", "000010000", "000010001"]
    first = samples[0]
    assert first.messages == [_user("<image>\nDescribe the image."), _bot("a photo number 000000000")]
    assert first.meta["url"] == "https://example.com/000000000.jpg" and first.meta["original_width"] == 24
    assert "error_message" not in first.meta and "key" in first.meta
    prompt = next(iter(open_dataset(root, caption_prompt="Write a short caption.")))
    assert prompt.messages[0] == _user("<image>\nWrite a short caption.")


def test_img2dataset_parquet_output(tmp_path):
    """img2dataset's ``output_format="parquet"`` (``ParquetSampleWriter``): rows of ``key``, the image bytes
    under its encode format (``jpg``), ``txt`` and the metadata columns; failed rows have no image and are bad."""
    ok = {"key": "000000000", "jpg": _png(fmt="JPEG"), "txt": "a red thing", "url": "https://example.com/a.jpg",
          "status": "success", "width": 12, "height": 10}  # fmt: skip
    failed = {**ok, "key": "000000001", "jpg": None, "txt": None, "status": "failed_to_download"}
    pq.write_table(pa.Table.from_pylist([ok, failed]), tmp_path / "00000.parquet")
    dataset = open_dataset(tmp_path / "00000.parquet", skip_bad=True)
    (sample,) = dataset
    assert sample.id == "000000000" and sample.messages[1] == _bot("a red thing") and len(sample.images) == 1
    assert sample.meta == {"key": "000000000", "url": ok["url"], "status": "success", "width": 12, "height": 10}
    assert dataset.problems == {"missing_field": 1}


# ------------------------------------------------------------------------------------- HF datasets folders


def test_datasetdict_folder_needs_a_split(tmp_path, run):
    """A ``DatasetDict.save_to_disk`` folder (``dataset_dict.json``, one folder per split): ``--split`` picks one;
    the rows use the old ``Sequence({"from", "value"})`` feature (a dict of lists per row), as LLaVA datasets
    converted with ``datasets`` < 3 have it."""
    features = datasets.Features({
        "id": datasets.Value("string"),
        "conversations": datasets.Sequence({"from": datasets.Value("string"), "value": datasets.Value("string")}),
    })  # fmt: skip
    splits = {}
    for split in ("train", "test"):
        data = {"id": [f"{split}-0"], "conversations": [{"from": ["human", "gpt"], "value": ["Hi?", f"{split}!"]}]}
        splits[split] = datasets.Dataset.from_dict(data, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    assert detect_format(tmp_path / "dd") == ("hf", tmp_path / "dd")
    with pytest.raises(DataError, match=r"several splits \(train, test\); pick one with split \(--split\)"):
        len(open_dataset(tmp_path / "dd"))
    (sample,) = open_dataset(tmp_path / "dd", split="test")
    assert sample.id == "test-0" and sample.messages == [_user("Hi?"), _bot("test!")]
    code, out, _ = run("data", "check", tmp_path / "dd", "--split", "train")
    assert code == 0 and "1 records, 1 valid" in out


def test_trl_vision_chat_rows(tmp_path):
    """TRL's vision SFT data (HuggingFaceH4/llava-instruct-mix-vsft, TRL's ``sft_vlm`` example): ``messages``
    whose content parts are ``{index, text, type}`` structs, an ``{"type": "image", "text": null}`` part standing
    for the next image of the ``images`` column."""
    part = {"index": datasets.Value("int64"), "text": datasets.Value("string"), "type": datasets.Value("string")}
    features = datasets.Features({
        "messages": [{"content": [part], "role": datasets.Value("string")}],
        "images": datasets.Sequence(datasets.Image()),
    })  # fmt: skip
    row = {
        "messages": [
            {"content": [{"index": None, "text": "Who wrote this book?\n", "type": "text"},
                         {"index": 0, "text": None, "type": "image"}], "role": "user"},
            {"content": [{"index": None, "text": "Donna Jo Napoli", "type": "text"}], "role": "assistant"},
        ],
        "images": [{"bytes": _png(), "path": None}],
    }  # fmt: skip
    datasets.Dataset.from_list([row], features=features).save_to_disk(str(tmp_path / "vsft"))
    (sample,) = open_dataset(tmp_path / "vsft")
    assert sample.messages == [_user("Who wrote this book?\n\n<image>"), _bot("Donna Jo Napoli")]
    assert _colours(sample) == [(200, 30, 30)]


def test_hub_parquet_splits_and_image_bytes(tmp_path):
    """The hub's parquet layout (``data/train-00000-of-00001.parquet``, ``data/test-...``: images as ``{bytes,
    path}`` structs, or raw bytes in a binary column) with vlmkit's ``messages``; a split must be chosen."""
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    row = {"messages": [_user("<image>\nWhat colour?"), _bot("Red.")]}
    pq.write_table(pa.Table.from_pylist([{**row, "image": {"bytes": _png(), "path": None}}]),
                   data / "train-00000-of-00001.parquet")  # fmt: skip
    pq.write_table(pa.Table.from_pylist([{**row, "images": [_png((0, 0, 255))]}]), data / "test-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"several splits \(test, train\)"):
        list(open_dataset(tmp_path / "repo"))
    (train,) = open_dataset(tmp_path / "repo", split="train")
    (test,) = open_dataset(data, split="test")
    assert _colours(train) == [(200, 30, 30)] and _colours(test) == [(0, 0, 255)]
    with pytest.raises(DataError, match="no split 'val'"):
        list(open_dataset(data, split="val"))


# ---------------------------------------------------------------------------------------- columns, ids, LLaVA


def test_columns_rename_any_fields(tmp_path, run):
    """``--columns`` / ``columns=``: a dataset with its own names (here ``picture``, ``dialog`` of
    ``speaker``/``text`` turns, ``uid``) reads once its fields are mapped onto vlmkit's."""
    (tmp_path / "a.png").write_bytes(_png())
    record = {"uid": "r1", "picture": "a.png",
              "dialog": [{"speaker": "user", "text": "<image>\nColour?"},
                         {"speaker": "assistant", "text": "Red."}]}  # fmt: skip
    path = tmp_path / "own.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(RecordError, match="no conversation"):
        list(open_dataset(path))
    mapping = "uid=id,picture=image,dialog=messages,speaker=role,text=content"
    (sample,) = open_dataset(path, columns=mapping)
    assert sample.id == "r1" and sample.messages[1] == _bot("Red.") and len(sample.images) == 1
    assert parse_columns('{"uid": "id"}') == {"uid": "id"}
    with pytest.raises(DataError, match="unknown target field"):
        parse_columns("uid=identifier")
    code, out, _ = run("data", "check", path, "--columns", mapping)
    assert code == 0 and "1 valid, 1 images" in out


def test_llava_compatibility(tmp_path):
    """LLaVA's ``preprocess_multimodal`` / ``preprocess`` (haotian-liu/LLaVA ``llava/train/train.py``): a turn's
    ``<image>`` moves to its start (a trailing one too), and a conversation that starts with the assistant loses
    that turn. On by default for LLaVA-format records only; ``llava_compat`` says otherwise."""
    (tmp_path / "a.png").write_bytes(_png())
    records = [
        {"id": "trailing", "image": "a.png",
         "conversations": [{"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "Red."}]},
        {"id": "gpt-first", "image": "a.png",
         "conversations": [{"from": "gpt", "value": "<image>\nHello!"}, {"from": "human", "value": "Colour?"},
                           {"from": "gpt", "value": "Red."}]},
    ]  # fmt: skip
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    trailing, first = open_dataset(path)
    assert trailing.messages[0] == _user("<image>\nWhat is shown?")
    assert first.messages == [_user("<image>\nColour?"), _bot("Red.")], "the image moves, the greeting goes"
    trailing, first = open_dataset(path, llava_compat="off")
    assert trailing.messages[0] == _user("What is shown?\n<image>") and first.messages[0] == _bot("<image>\nHello!")
    swift = tmp_path / "swift.jsonl"
    swift.write_text(json.dumps({"messages": [_user("What is shown?\n<image>"), _bot("Red.")], "images": ["a.png"]}))
    (as_written,) = open_dataset(swift)
    assert as_written.messages[0] == _user("What is shown?\n<image>"), "auto: LLaVA records only"
    (moved,) = open_dataset(swift, llava_compat="on")
    assert moved.messages[0] == _user("<image>\nWhat is shown?")
    interleaved = [_user("<image> and <image>: same?"), _bot("No.")]
    assert llava_preprocess(interleaved) == interleaved, "several markers in a turn stay as written"


@pytest.mark.parametrize("fmt", ["llava", "jsonl", "wds"])
def test_writers_keep_what_llava_compat_would_change(tmp_path, fmt):
    """A conversation LLaVA's preprocessing would change is written in the ``messages`` schema, so converting
    data from another tool to a LLaVA-style file and back loses nothing."""
    record = Record("t", [_user("What is shown?\n<image>"), _bot("Red.")], [_png()])
    plain = Record("p", [_user("<image>\nWhat is shown?"), _bot("Red.")], [_png()])
    with open_writer(tmp_path, fmt, "w") as writer:
        writer.write(record)
        writer.write(plain)
    back = list(open_dataset(writer.path))
    assert [s.messages for s in back] == [record.messages, plain.messages]
    if fmt == "jsonl":
        first, second = (json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines())
        assert "messages" in first and "images" in first and "conversations" in second


def test_convert_between_shapes_on_the_command_line(tmp_path, run):
    """``vlmkit data convert``: the_cauldron parquet → ms-swift / LLaMA-Factory JSONL (``--schema messages``) →
    every other format, the samples unchanged at each hop."""
    (tmp_path / "src").mkdir()
    pq.write_table(_cauldron_table(2), tmp_path / "src" / "train-00000-of-00001.parquet")
    original = list(open_dataset(tmp_path / "src"))
    code, out, _ = run("data", "convert", tmp_path / "src", "--out", tmp_path / "swift", "--to", "jsonl",
                       "--schema", "messages")  # fmt: skip
    assert code == 0 and "wrote 2 samples (jsonl)" in out, out
    line = json.loads((tmp_path / "swift" / "src.jsonl").read_text().splitlines()[0])
    assert set(line) == {"id", "messages", "images", "meta"} and line["images"][0].startswith("images/src/")
    previous = tmp_path / "swift"
    for fmt in FORMATS.names():
        code, out, err = run("data", "convert", previous, "--out", tmp_path / fmt, "--to", fmt)
        assert code == 0, err
        previous = tmp_path / fmt
        samples = list(open_dataset(previous))
        assert [(s.id, s.messages, s.meta) for s in samples] == [(s.id, s.messages, s.meta) for s in original]
        assert [_colours(s) for s in samples] == [_colours(s) for s in original]
    code, _, err = run("data", "convert", previous, "--out", tmp_path / "x", "--to", "hf", "--schema", "messages")
    assert code == 1 and "schema applies to formats holding JSON records" in err
