"""Dataset formats: round trips, format detection and every bad-data case of every reader."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from vlmkit.data.formats import FORMATS, PROBLEMS, Record, RecordError, detect_format, open_dataset, open_writer
from vlmkit.data.sample import Sample
from vlmkit.data.synth import SynthConfig, generate
from vlmkit.errors import DataError
from vlmkit.processing.images import load_image


def _png(colour=(200, 30, 30, 255), size=(20, 14), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour[: len(mode)]).save(buffer, format="PNG")
    return buffer.getvalue()


def _turns(question="<image>\nWhat is this?", answer="A square.") -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _records() -> list[Record]:
    records = list(generate(SynthConfig("val", seed=5), 6))
    records.append(
        Record("multi/1", _turns("<image>\n<image>\nCompare the images.", "Both are red."),
               [_png(), _png((10, 200, 10, 128), mode="RGBA")], "compare", {"k": [1, 2]})
    )  # fmt: skip
    records.append(Record("text-only", _turns("Say hi.", "Hi!")))
    records.append(Record("7", [{"role": "system", "content": "Be brief."}, *_turns()], [_png(size=(5, 9))]))
    return records


def _assert_same(samples: list[Sample], records: list[Record]) -> None:
    assert [s.id for s in samples] == [r.id for r in records]
    for sample, record in zip(samples, records, strict=True):
        assert sample.messages == record.messages
        assert sample.task == record.task and sample.meta == record.meta
        assert len(sample.images) == len(record.images)
        for image, data in zip(sample.images, record.images, strict=True):
            assert image.mode == "RGB"
            assert np.array_equal(np.asarray(image), np.asarray(load_image(data))), "pixel-identical"


@pytest.mark.parametrize("fmt", FORMATS.names())
def test_round_trip_gives_identical_samples(tmp_path, fmt):
    records = _records()
    with open_writer(tmp_path, fmt, "rt") as writer:
        for record in records:
            writer.write(record)
    assert writer.count == len(records)
    dataset = open_dataset(writer.path)
    assert dataset.format == fmt and len(dataset) == len(records)
    _assert_same(list(dataset), records)
    _assert_same(list(dataset), records)  # re-iterable
    assert open_dataset(tmp_path).format == fmt, "a folder holding one dataset is detected"
    assert not dataset.problems
    raw = list(open_dataset(writer.path, decode_images=False))  # text only: images stay undecoded references
    assert [s.messages for s in raw] == [r.messages for r in records]
    for sample, record in zip(raw, records, strict=True):
        assert len(sample.images) == len(record.images)
        for ref, data in zip(sample.images, record.images, strict=True):
            assert not isinstance(ref, Image.Image)
            assert np.array_equal(np.asarray(load_image(ref)), np.asarray(load_image(data)))


def test_conversion_through_every_format_is_lossless(tmp_path):
    records = _records()
    samples = [r.to_sample() for r in records]
    for i, fmt in enumerate([*FORMATS, "llava"]):
        with open_writer(tmp_path / str(i), fmt, "hop") as writer:
            for sample in samples:
                writer.write_sample(sample)
        samples = list(open_dataset(writer.path))
    _assert_same(samples, records)


def test_layouts(tmp_path):
    records = _records()
    for fmt in ("llava", "jsonl"):
        with open_writer(tmp_path, fmt, "lay") as writer:
            for r in records:
                writer.write(r)
    llava = json.loads((tmp_path / "lay.json").read_text())
    assert llava[0]["conversations"][0]["from"] == "human" and llava[0]["conversations"][1]["from"] == "gpt"
    assert llava[0]["image"] == "images/lay/val-s5-0000000.png" and (tmp_path / llava[0]["image"]).is_file()
    assert llava[6]["image"] == ["images/lay/multi_1-0.png", "images/lay/multi_1-1.png"]
    assert "image" not in llava[7] and llava[8]["conversations"][0]["from"] == "system"
    lines = (tmp_path / "lay.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == llava
    with open_writer(tmp_path, "wds", "lay", shard_size=4) as writer:
        for r in records:
            writer.write(r)
    shards = sorted(p.name for p in tmp_path.glob("lay-*.tar"))
    assert shards == ["lay-000000.tar", "lay-000001.tar", "lay-000002.tar"]
    with tarfile.open(tmp_path / "lay-000001.tar") as tar:
        names = tar.getnames()
    assert "multi_1.0.png" in names and "multi_1.1.png" in names and "multi_1.json" in names
    assert "val-s5-0000004.png" in names and "val-s5-0000004.json" in names


def test_writers_refuse_to_overwrite(tmp_path):
    records = _records()
    with open_writer(tmp_path, "wds", "w", shard_size=3) as writer:
        for r in records:
            writer.write(r)
    assert len(list(tmp_path.glob("w-*.tar"))) == 3
    with pytest.raises(DataError, match="already exists"):
        open_writer(tmp_path, "wds", "w")
    with open_writer(tmp_path, "wds", "w", overwrite=True) as writer:
        writer.write(records[0])
    assert len(list(tmp_path.glob("w-*.tar"))) == 1 and len(open_dataset(writer.path)) == 1
    for fmt in ("llava", "jsonl", "hf"):
        open_writer(tmp_path, fmt, "x").close()
        with pytest.raises(DataError, match="already exists"):
            open_writer(tmp_path, fmt, "x")
        assert len(open_dataset(open_writer(tmp_path, fmt, "x", overwrite=True).close())) == 0


def test_format_detection(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    assert detect_format(tmp_path) == ("llava", tmp_path / "a.json")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(DataError, match=r"several datasets \(a.json, b.jsonl\)"):
        open_dataset(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset found"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "c.txt").write_text("")
    with pytest.raises(DataError, match="unknown dataset format"):
        open_dataset(tmp_path / "c.txt")
    with pytest.raises(DataError, match="unknown dataset format 'csv'"):
        open_dataset(tmp_path / "a.json", "csv")
    with pytest.raises(DataError, match="no such file"):
        open_dataset(tmp_path / "nope.json")


def test_image_root_is_configurable(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(_png())
    (tmp_path / "meta").mkdir()
    path = tmp_path / "meta" / "d.json"
    path.write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": _llava_turns()}]))
    (sample,) = open_dataset(path, image_root=tmp_path / "pics")
    assert sample.id == "1" and sample.images[0].size == (20, 14)
    with pytest.raises(RecordError, match="not found") as info:
        list(open_dataset(path))
    assert info.value.reason == "missing_image"


def test_llava_file_that_is_not_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"id": 1,\n "conversations": oops}\n]')
    with pytest.raises(DataError, match=r"broken.json: line 3, column 19: malformed JSON"):
        list(open_dataset(path, skip_bad=True))
    path.write_text('{"id": 1}')
    with pytest.raises(DataError, match="must hold a list"):
        len(open_dataset(path))


# ------------------------------------------------------------------------------------------------ bad data


def _llava_turns(question="<image>\nWhat is it?", answer="A circle.", role="human") -> list[dict[str, str]]:
    return [{"from": role, "value": question}, {"from": "gpt", "value": answer}]


def _good(key: str, image: str) -> dict:
    return {"id": key, "image": image, "conversations": _llava_turns()}


# case → (record change, reason). The records use image "images/ok.png" (llava, jsonl) or "<id>.png" (wds).
FILE_CASES = {
    "missing_image": ({"image": "images/nope.png"}, "missing_image"),
    "unreadable_image": ({"image": "images/corrupt.png"}, "unreadable_image"),
    "dotdot_escape": ({"image": "../outside.png"}, "path_escape"),
    "absolute_escape": ({"image": "ABSOLUTE"}, "path_escape"),
    "symlink_escape": ({"image": "images/link.png"}, "path_escape"),
    "missing_conversations": ({"conversations": None}, "missing_field"),
    "empty_conversation": ({"conversations": []}, "empty_conversation"),
    "image_count_mismatch": ({"conversations": _llava_turns("What is it?")}, "image_count_mismatch"),
    "two_markers_one_image": ({"conversations": _llava_turns("<image><image>What?")}, "image_count_mismatch"),
    "bad_role": ({"conversations": _llava_turns(role="robot")}, "bad_role"),
    "turn_without_text": ({"conversations": [{"from": "human"}]}, "missing_field"),
    "not_an_object": ("JUST A STRING", "bad_record"),
}


def _bad_record(case: str, root: Path) -> dict | str:
    change, _ = FILE_CASES[case]
    if isinstance(change, str):
        return change
    record = _good("bad", "images/ok.png")
    for key, value in change.items():
        if value is None:
            del record[key]
        else:
            record[key] = str(root.parent / "outside.png") if value == "ABSOLUTE" else value
    return record


def _file_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.png").write_bytes(_png())
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (tmp_path / "outside.png").write_bytes(_png())
    (root / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    return root


def _check_bad(dataset, location: str, reason: str) -> None:
    with pytest.raises(DataError) as info:
        list(dataset)
    assert isinstance(info.value, RecordError) and info.value.reason == reason
    assert str(info.value).startswith(location), str(info.value)
    dataset.skip_bad = True
    assert [s.id for s in dataset] == ["good", "after"]
    assert dict(dataset.problems) == {reason: 1}


@pytest.mark.parametrize("case", FILE_CASES)
@pytest.mark.parametrize("fmt", ["llava", "jsonl"])
def test_bad_records_in_json_files(tmp_path, fmt, case):
    root = _file_root(tmp_path)
    records = [_good("good", "images/ok.png"), _bad_record(case, root), _good("after", "images/ok.png")]
    if fmt == "llava":
        path = root / "d.json"
        path.write_text(json.dumps(records, indent=1))
        location = f"{path}: record 1"
    else:
        path = root / "d.jsonl"
        lines = [json.dumps(r) for r in records]
        path.write_text(f"{lines[0]}\n\n{lines[1]}\n{lines[2]}\n")
        location = f"{path}: line 3"
    _check_bad(open_dataset(path), location, FILE_CASES[case][1])


def test_malformed_json_lines(tmp_path):
    root = _file_root(tmp_path)
    path = root / "d.jsonl"
    good = json.dumps(_good("good", "images/ok.png"))
    path.write_bytes(f'{good}\n{{"id": "x", oops\n'.encode() + b'"\xff\xfe"\n' + good.replace("good", "after").encode())
    with pytest.raises(RecordError, match=rf"{path}: line 2: malformed JSON"):
        list(open_dataset(path))
    dataset = open_dataset(path, skip_bad=True)
    assert [s.id for s in dataset] == ["good", "after"] and dataset.problems == {"bad_json": 2}
    assert len(dataset) == 4


def test_skip_bad_counts_every_reason(tmp_path):
    root = _file_root(tmp_path)
    bad = [_bad_record(case, root) for case in FILE_CASES]
    path = root / "all.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [_good("good", "images/ok.png"), *bad]) + "\n{broken\n")
    dataset = open_dataset(path, skip_bad=True)
    assert [s.id for s in dataset] == ["good"]
    expected = {"missing_image": 1, "unreadable_image": 1, "path_escape": 3, "missing_field": 2, "bad_json": 1,
                "empty_conversation": 1, "image_count_mismatch": 2, "bad_role": 1, "bad_record": 1}  # fmt: skip
    assert dict(dataset.problems) == expected
    assert set(expected) <= set(PROBLEMS)


def test_check_mode_validates_images_but_keeps_them_undecoded(tmp_path):
    """Training reads with ``decode_images="check"``: a broken image is still caught, a good one stays a path."""
    root = _file_root(tmp_path)
    path = root / "d.jsonl"
    records = [_good("good", "images/ok.png"), _good("bad", "images/corrupt.png"), _good("after", "images/ok.png")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(RecordError) as info:
        list(open_dataset(path, decode_images="check"))
    assert info.value.reason == "unreadable_image" and "corrupt.png" in str(info.value)
    kept = list(open_dataset(path, decode_images="check", skip_bad=True))
    assert [s.id for s in kept] == ["good", "after"]
    for sample in kept:
        (ref,) = sample.images
        assert not isinstance(ref, Image.Image) and Path(ref) == root / "images" / "ok.png"
    assert list(open_dataset(path, decode_images=False))[1].images == [root / "images" / "corrupt.png"]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _wds_sample(key: str, record: dict | None = None, image: bytes | None = None) -> list[tuple[str, bytes]]:
    record = record if record is not None else {"id": key, "image": f"{key}.png", "conversations": _llava_turns()}
    members = [(f"{key}.json", json.dumps(record).encode())]
    return members + ([(f"{key}.png", image if image is not None else _png())] if image != b"" else [])


WDS_CASES = {
    "missing_image": (_wds_sample("bad", image=b""), "missing_image"),
    "unreadable_image": (_wds_sample("bad", image=b"GIF89a broken"), "unreadable_image"),
    "escape": (_wds_sample("bad", {"id": "bad", "image": "../x.png", "conversations": _llava_turns()}), "path_escape"),
    "bad_json": ([("bad.json", b'{"id": "bad", oops'), ("bad.png", _png())], "bad_json"),
    "no_json_member": ([("bad.png", _png())], "missing_field"),
    "empty_conversation": (_wds_sample("bad", {"id": "bad", "image": "bad.png", "conversations": []}),
                           "empty_conversation"),
    "image_count_mismatch": (_wds_sample("bad", {"id": "bad", "conversations": _llava_turns("Hi?")}),
                             "image_count_mismatch"),
    "bad_role": (_wds_sample("bad", {"id": "bad", "conversations": _llava_turns(role="bot")}), "bad_role"),
}  # fmt: skip


@pytest.mark.parametrize("case", WDS_CASES)
def test_bad_samples_in_tar_shards(tmp_path, case):
    members, reason = WDS_CASES[case]
    shard = tmp_path / "d-000000.tar"
    _tar(shard, [*_wds_sample("good"), *members, *_wds_sample("after")])
    _check_bad(open_dataset(shard), f"{shard}: sample 'bad'", reason)


def test_wds_images_found_without_an_image_field(tmp_path):
    shard = tmp_path / "d-000000.tar"
    record = {"id": "k", "conversations": _llava_turns("<image> and <image>?")}
    _tar(shard, [("k.json", json.dumps(record).encode()), ("k.1.png", _png((0, 0, 255, 255))), ("k.0.png", _png())])
    (sample,) = open_dataset(tmp_path)
    assert [im.getpixel((0, 0)) for im in sample.images] == [(200, 30, 30), (0, 0, 255)]


def test_truncated_shard(tmp_path):
    shard = tmp_path / "d-000000.tar"
    _tar(shard, [*_wds_sample("good"), *_wds_sample("after", image=bytes(range(256)) * 64)])
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError, match=rf"{shard}: truncated or corrupt tar shard") as info:
        list(open_dataset(shard))
    assert info.value.reason == "bad_shard"
    dataset = open_dataset(shard, skip_bad=True)
    assert [s.id for s in dataset] == ["good"] and dataset.problems == {"bad_shard": 1}


HF_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "images": datasets.List({"bytes": datasets.Value("binary"), "path": datasets.Value("string")}),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "meta": datasets.Value("string"),
    }
)
HF_CASES = {
    "unreadable_image": ({"images": [{"bytes": b"nope", "path": None}]}, "unreadable_image"),
    "missing_image": ({"images": [{"bytes": None, "path": "nope.png"}]}, "missing_image"),
    "no_bytes_no_path": ({"images": [{"bytes": None, "path": None}]}, "missing_image"),
    "path_escape": ({"images": [{"bytes": None, "path": "../outside.png"}]}, "path_escape"),
    "empty_conversation": ({"messages": []}, "empty_conversation"),
    "image_count_mismatch": ({"messages": _turns("<image><image>Two markers?")}, "image_count_mismatch"),
    "bad_role": ({"messages": [{"role": "bot", "content": "<image>"}]}, "bad_role"),
    "bad_meta": ({"meta": "{oops"}, "bad_json"),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_bad_rows_in_hf_datasets(tmp_path, case):
    (tmp_path / "outside.png").write_bytes(_png())

    def row(key, **change):
        base = {"id": key, "images": [{"bytes": _png(), "path": None}], "messages": _turns(), "meta": "{}"}
        return {**base, **change}

    rows = [row("good"), row("bad", **HF_CASES[case][0]), row("after")]
    path = tmp_path / "hf"
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows, features=HF_FEATURES).save_to_disk(str(path))
    _check_bad(open_dataset(path), f"{path}: row 1", HF_CASES[case][1])


def test_hf_folder_with_several_splits_is_refused(tmp_path):
    datasets.disable_progress_bars()
    split = datasets.Dataset.from_dict({"id": ["a"]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="several splits"):
        open_dataset(tmp_path / "dd", "hf").__len__()


PARQUET_CASES = {
    "unreadable_image": ({"images": [{"bytes": b"nope", "path": None}]}, "unreadable_image"),
    "no_bytes_no_path": ({"images": [{"bytes": None, "path": None}]}, "missing_image"),
    "image_count_mismatch": ({"messages": _turns("<image><image>Two markers?")}, "image_count_mismatch"),
    "no_conversation": ({"messages": None}, "missing_field"),
    "bad_meta": ({"meta": "{oops"}, "bad_json"),
}


@pytest.mark.parametrize("case", PARQUET_CASES)
def test_bad_rows_in_parquet_files(tmp_path, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def row(key, **change):
        base = {"id": key, "images": [{"bytes": _png(), "path": None}], "messages": _turns(), "meta": "{}"}
        return {**base, **change}

    path = tmp_path / "d.parquet"
    rows = [row("good"), row("bad", **PARQUET_CASES[case][0]), row("after")]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    _check_bad(open_dataset(path), f"{path}: row 1", PARQUET_CASES[case][1])


def test_truncated_parquet_file(tmp_path):
    path = tmp_path / "d.parquet"
    with open_writer(tmp_path, "parquet", "d") as writer:
        for record in _records():
            writer.write(record)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(RecordError, match=rf"{path}: row 0: truncated or corrupt parquet file") as info:
        list(open_dataset(path))
    assert info.value.reason == "bad_shard"
    dataset = open_dataset(path, skip_bad=True)
    assert list(dataset) == [] and dataset.problems == {"bad_shard": 1} and len(dataset) == 0


def test_wds_sample_of_an_image_and_a_caption_only(tmp_path):
    """A webdataset of ``KEY.jpg`` + ``KEY.txt`` pairs (no JSON; e.g. webdataset's own caption examples)."""
    shard = tmp_path / "caps-000000.tar"
    _tar(shard, [("a.jpg", _png()), ("a.txt", b"a red square")])
    (sample,) = open_dataset(shard)
    assert sample.id == "a" and sample.messages[1] == {"role": "assistant", "content": "a red square"}
