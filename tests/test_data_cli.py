"""``vlmkit data``: synth, check, convert and export-eval through the real CLI entry point."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.data.formats import FORMATS, open_dataset
from vlmkit.data.shapes import split_of_image
from vlmkit.data.tasks import POPE_CATEGORIES


def _section(out: str, title: str) -> dict[str, int]:
    """The ``name  count`` rows printed under ``title:``."""
    rows = {}
    for line in out.split(f"{title}:\n")[1].splitlines():
        if not line.startswith("  "):
            break
        name, count = line.split()[:2]
        rows[name] = int(count)
    return rows


@pytest.mark.parametrize("fmt", FORMATS.names())
def test_synth_then_check_every_format(run, tmp_path, fmt):
    code, out, _ = run("data", "synth", "--out", tmp_path, "--split", "val", "--n", 24, "--format", fmt,
                       "--workers", 1, "--no-progress")  # fmt: skip
    assert code == 0 and "wrote 24 val samples" in out
    code, out, _ = run("data", "check", tmp_path)
    assert code == 0, out
    assert "24 records, 24 valid, 24 images" in out and "no problems found" in out
    tasks = _section(out, "tasks")
    assert sum(tasks.values()) == 24 and "caption" in tasks


def test_synth_options(run, tmp_path):
    args = ["data", "synth", "--out", tmp_path, "--n", 40, "--format", "jsonl", "--tasks", "exist,count", "--seed", 9,
            "--no-progress"]  # fmt: skip
    assert run(*args, "--workers", 1)[0] == 0
    first = (tmp_path / "train.jsonl").read_bytes()
    records = [json.loads(line) for line in first.splitlines()]
    assert {r["task"] for r in records} == {"exist", "count"}
    assert records[0]["id"] == "train-s9-0000000"
    code, _, err = run(*args, "--workers", 2)
    assert code == 1 and "already exists" in err
    assert run(*args, "--workers", 2, "--overwrite")[0] == 0
    assert (tmp_path / "train.jsonl").read_bytes() == first, "same output with any number of workers"
    code, _, err = run("data", "synth", "--out", tmp_path, "--n", 1, "--tasks", "exist,colours", "--no-progress")
    assert code == 1 and err.startswith("error: unknown task(s) colours")
    code, _, err = run("data", "synth", "--out", tmp_path / "t", "--n", 1, "--turns", "8-3", "--no-progress")
    assert code == 1 and "--turns: expected FEWEST-MOST" in err
    assert run("data", "synth", "--out", tmp_path / "t", "--n", 4, "--tasks", "multiturn", "--turns", "5",
               "--no-progress")[0] == 0  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "t" / "train.jsonl").read_text().splitlines()]
    assert [len(r["conversations"]) for r in rows] == [10] * 4


def _broken_jsonl(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    ok = {"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHi?"},
                                                          {"from": "gpt", "value": "Yes"}]}  # fmt: skip
    Image.new("RGB", (8, 8), "red").save(tmp_path / "src" / "a.png")
    lines = [ok, {**ok, "id": "m", "image": "gone.png"}, {**ok, "id": "e", "image": "../../etc/passwd"}]
    path = tmp_path / "src" / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{not json\n" + json.dumps({**ok, "id": "ok2"}) + "\n")
    return path


def test_check_reports_problems_per_reason(run, tmp_path):
    path = _broken_jsonl(tmp_path)
    code, out, _ = run("data", "check", path)
    assert code == 1
    assert "5 records, 2 valid" in out
    assert _section(out, "problems") == {"bad_json": 1, "missing_image": 1, "path_escape": 1}
    assert "3 bad record(s)" in out


def test_convert_with_and_without_skip_bad(run, tmp_path):
    path = _broken_jsonl(tmp_path)
    code, _, err = run("data", "convert", path, "--out", tmp_path / "out", "--to", "hf")
    assert code == 1 and f"error: {path}: line 2 (id 'm'): image 'gone.png' not found" in err
    code, out, _ = run("data", "convert", path, "--out", tmp_path / "out", "--to", "hf", "--skip-bad", "--overwrite")
    assert code == 0 and "wrote 2 samples (hf)" in out
    assert _section(out, "skipped") == {"bad_json": 1, "missing_image": 1, "path_escape": 1}
    assert [s.id for s in open_dataset(tmp_path / "out" / "mixed")] == ["ok", "ok2"]


def test_export_eval(run, tmp_path):
    code, out, _ = run("data", "export-eval", "--out", tmp_path, "--n", 12, "--workers", 1, "--no-progress")
    assert code == 0 and "pope.jsonl" in out
    rows = {name: [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]
            for name in ("pope.jsonl", "vqa.jsonl", "grounding.jsonl", "caption.jsonl")}  # fmt: skip
    pope = rows["pope.jsonl"]
    assert len(pope) == 12 * 6 and set(pope[0]) == {"question_id", "image", "text", "label", "category"}
    for category in POPE_CATEGORIES:
        assert Counter(r["label"] for r in pope if r["category"] == category) == {"yes": 12, "no": 12}
    assert {"question_id", "image", "question", "answers"} <= set(rows["vqa.jsonl"][0])
    assert {r["task"] for r in rows["vqa.jsonl"]} >= {"attribute", "position", "count"}
    ground = rows["grounding.jsonl"]
    assert len(ground) == 12 and all(len(r["bbox"]) == 4 and r["expression"].startswith("the ") for r in ground)
    assert len(rows["caption.jsonl"]) == 12 and all(len(r["captions"]) >= 2 for r in rows["caption.jsonl"])
    ids = [r["question_id"] for name in ("pope.jsonl", "vqa.jsonl", "grounding.jsonl") for r in rows[name]]
    assert len(ids) == len(set(ids))
    images = {r["image"] for r in pope}
    assert len(images) == 12
    for image in images:
        with Image.open(tmp_path / image) as im:
            assert im.size == (128, 128) and split_of_image(im) == "test"
    code, _, err = run("data", "export-eval", "--out", tmp_path, "--n", 2, "--no-progress")
    assert code == 1 and "already exists" in err


def test_data_without_subcommand_prints_help(run):
    code, out, _ = run("data")
    assert code == 2 and "synth" in out and "export-eval" in out
