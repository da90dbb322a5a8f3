"""``vlmkit describe`` robustness (issue 14): odd file names, resume by any spelling of a path, --retry-errors."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import compose_tiny
from test_describe import make_images
from vlmkit.api import VLM
from vlmkit.cli import main
from vlmkit.inference import describe as describe_module
from vlmkit.inference.describe import describe, read_done


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM(*compose_tiny())


def records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def undecodable(folder: Path, name: bytes) -> Path:
    """A path in ``folder`` whose file name is not valid UTF-8 (a surrogate-escaped str, as os.listdir gives)."""
    path = Path(os.fsdecode(os.fsencode(folder) + b"/" + name))
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take file names that are not UTF-8")
    return path


# ---------------------------------------------------------------------------------------------------- names


def test_non_utf8_file_names_are_recorded_and_the_run_goes_on(vlm, tmp_path):
    folder = tmp_path / "imgs"
    images = make_images(folder, 2)
    readable = undecodable(folder, b"bad\xff.png")
    Image.new("RGB", (18, 12), (10, 200, 10)).save(readable)
    corrupt = undecodable(folder, b"worse\xfe.png")
    corrupt.write_bytes(b"not a png at all")
    out = tmp_path / "out.jsonl"
    summary = describe(vlm, [folder], out, batch_size=2, max_new_tokens=4, progress=False)
    out.read_bytes().decode("utf-8")  # the whole file is valid UTF-8
    rows = records(out)
    assert len(rows) == 4 and (summary.described, summary.errors) == (3, 1)
    by_image = {r["image"]: r for r in rows}
    good = by_image[str(folder) + "/bad\\xff.png"]  # the undecodable byte written as \xff
    assert good["error"] is None and isinstance(good["text"], str)
    bad = by_image[str(folder) + "/worse\\xfe.png"]
    assert bad["text"] is None and "worse\\xfe.png" in bad["error"] and "not an image" in bad["error"]
    assert all(by_image[str(p)]["error"] is None for p in images)
    again = describe(vlm, [folder], out, batch_size=2, max_new_tokens=4, progress=False)
    assert (again.skipped, again.described, again.errors) == (4, 0, 0) and len(records(out)) == 4


def test_cli_describe_prints_a_non_utf8_file_name(tmp_path, capsys):
    folder = tmp_path / "imgs"
    make_images(folder, 1)
    Image.new("RGB", (18, 12)).save(undecodable(folder, b"caf\xe9.png"))  # a Latin-1 name
    out = tmp_path / "d.jsonl"
    argv = ["describe", str(folder), "--model", "tiny-random", "--out", str(out), "--max-new-tokens", "3"]
    assert main([*argv, "--quiet", "--print"]) == 0
    captured = capsys.readouterr()
    assert "2 described, 0 failed, 0 already done" in captured.err
    assert captured.out.count('"image"') == 2 and "caf\\\\xe9.png" in captured.out  # JSON escapes the backslash


# ---------------------------------------------------------------------------------------------------- resume


def test_resume_by_a_relative_path_after_an_absolute_one_writes_nothing_new(vlm, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    images = make_images(folder, 5)
    out = tmp_path / "out.jsonl"
    first = describe(vlm, [folder], out, batch_size=2, max_new_tokens=3, progress=False)
    assert first.described == 5 and len(records(out)) == 5
    written = out.read_bytes()
    monkeypatch.chdir(folder)
    for spelling in (".", "./", "../imgs", "img0003.png"):
        again = describe(vlm, [spelling], out, batch_size=2, max_new_tokens=3, progress=False)
        assert again.described == 0 and again.errors == 0 and again.skipped == again.total >= 1, spelling
    assert out.read_bytes() == written and len(records(out)) == len(images)
    # relative first, then absolute (and through a symlink): the same
    monkeypatch.chdir(tmp_path)
    out2 = tmp_path / "out2.jsonl"
    describe(vlm, ["imgs"], out2, batch_size=2, max_new_tokens=3, progress=False)
    (tmp_path / "link").symlink_to(folder)
    for spelling in (folder, tmp_path / "link", tmp_path / "imgs" / ".." / "imgs"):
        assert describe(vlm, [spelling], out2, batch_size=2, max_new_tokens=3, progress=False).described == 0
    rows = records(out2)
    assert len(rows) == 5
    assert [r["image"] for r in rows] == [f"imgs/{p.name}" for p in images]  # as given, still
    assert [r["path"] for r in rows] == [str(p.resolve()) for p in images]


def test_output_files_of_earlier_versions_still_resume(vlm, tmp_path, monkeypatch):
    """Rows without ``path``: absolute ones match by their resolved path, relative ones from the same folder."""
    folder = tmp_path / "imgs"
    images = make_images(folder, 4)
    out = tmp_path / "old.jsonl"
    old = [{"image": str(images[0]), "text": "a", "tokens": 1, "error": None},
           {"image": str(tmp_path / "imgs" / ".." / "imgs" / images[1].name), "text": "b", "tokens": 1, "error": None},
           {"image": f"imgs/{images[2].name}", "text": "c", "tokens": 1, "error": None}]  # fmt: skip
    out.write_text("".join(json.dumps(r) + "\n" for r in old))
    monkeypatch.chdir(tmp_path)
    assert read_done(out) == {str(p) for p in images[:3]}
    summary = describe(vlm, ["imgs"], out, max_new_tokens=3, progress=False)
    assert (summary.skipped, summary.described) == (3, 1)
    rows = records(out)
    assert rows[:3] == old and len(rows) == 4 and rows[3]["image"] == f"imgs/{images[3].name}"


# ---------------------------------------------------------------------------------------------------- retry


def test_retry_errors_describes_a_fixed_image_again_leaving_one_row_per_image(vlm, tmp_path):
    folder = tmp_path / "imgs"
    images = make_images(folder, 3)
    broken = folder / "img0001.png"
    good_bytes = broken.read_bytes()
    broken.write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated in the first run
    out = tmp_path / "out.jsonl"
    first = describe(vlm, [folder], out, batch_size=2, max_new_tokens=3, progress=False)
    assert (first.described, first.errors) == (2, 1)
    error_row = next(r for r in records(out) if r["error"])
    assert error_row["image"] == str(broken)
    broken.write_bytes(good_bytes)  # fixed before the second run
    # without the flag the error row stays and is not retried
    kept = describe(vlm, [folder], out, batch_size=2, max_new_tokens=3, progress=False)
    assert (kept.skipped, kept.described, kept.retried) == (3, 0, 0) and records(out)[1] == error_row
    retried = describe(vlm, [folder], out, batch_size=2, max_new_tokens=3, retry_errors=True, progress=False)
    assert (retried.skipped, retried.described, retried.errors, retried.retried) == (2, 1, 0, 1)
    rows = records(out)
    assert [r["image"] for r in rows] == [str(p) for p in images]  # one row per image, in its old place
    assert rows[1]["error"] is None and rows[1]["text"] == vlm.chat("Describe the image.", images=[broken],
                                                                   max_new_tokens=3).strip()  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name not in ("imgs", "out.jsonl")], "no temporary file left"
    again = describe(vlm, [folder], out, batch_size=2, max_new_tokens=3, retry_errors=True, progress=False)
    assert (again.skipped, again.described, again.retried) == (3, 0, 0) and records(out) == rows


def test_a_retry_killed_midway_loses_nothing(vlm, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    images = make_images(folder, 4)
    originals = {p: p.read_bytes() for p in images[1:3]}
    for path in originals:
        path.write_bytes(b"garbage")
    out = tmp_path / "out.jsonl"
    describe(vlm, [folder], out, batch_size=1, max_new_tokens=3, progress=False)
    for path, data in originals.items():
        path.write_bytes(data)
    real_generate = vlm.engine.generate
    calls = []

    def killed_on_the_second_batch(convs, options):
        calls.append(len(convs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(convs, options)

    monkeypatch.setattr(vlm.engine, "generate", killed_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        describe(vlm, [folder], out, batch_size=1, max_new_tokens=3, retry_errors=True, progress=False)
    monkeypatch.undo()
    rows = records(out)
    assert len(rows) == 5 and rows[4]["image"] == str(images[1]) and rows[4]["error"] is None  # appended
    assert read_done(out) == {str(p) for p in images}
    # the last row of an image wins: a plain rerun retries nothing and keeps the described row
    plain = describe(vlm, [folder], out, batch_size=1, max_new_tokens=3, progress=False)
    assert (plain.skipped, plain.described) == (4, 0)
    rows = records(out)
    assert [r["image"] for r in rows] == [str(p) for p in images] and rows[1]["error"] is None
    assert rows[2]["error"] is not None
    finished = describe(vlm, [folder], out, batch_size=1, max_new_tokens=3, retry_errors=True, progress=False)
    assert (finished.retried, finished.described) == (1, 1)
    assert [r["error"] for r in records(out)] == [None] * 4 and len(records(out)) == 4


def test_cli_retry_errors_flag(tmp_path, capsys):
    folder = tmp_path / "imgs"
    make_images(folder, 2)
    (folder / "late.png").write_bytes(b"")
    out = tmp_path / "d.jsonl"
    argv = ["describe", str(folder), "--model", "tiny-random", "--out", str(out), "--max-new-tokens", "3", "--quiet"]
    assert main(argv) == 0
    assert "2 described, 1 failed, 0 already done" in capsys.readouterr().err
    Image.new("RGB", (12, 12)).save(folder / "late.png")
    assert main(argv) == 0
    assert "0 described, 0 failed, 3 already done" in capsys.readouterr().err
    assert main([*argv, "--retry-errors"]) == 0
    assert "1 described, 0 failed, 2 already done, 1 retried" in capsys.readouterr().err
    rows = records(out)
    assert len(rows) == 3 and all(r["error"] is None for r in rows)


def test_compaction_is_atomic(vlm, tmp_path, monkeypatch):
    """A failure while the superseded rows are dropped leaves the appended file as it was."""
    folder = tmp_path / "imgs"
    images = make_images(folder, 2)
    images[0].write_bytes(b"")
    out = tmp_path / "out.jsonl"
    describe(vlm, [folder], out, max_new_tokens=3, progress=False)
    Image.new("RGB", (12, 12)).save(images[0])

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(describe_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        describe(vlm, [folder], out, max_new_tokens=3, retry_errors=True, progress=False)
    monkeypatch.undo()
    rows = records(out)
    assert len(rows) == 3 and rows[0]["error"] and rows[2]["image"] == str(images[0]) and rows[2]["error"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out.jsonl"]
    assert describe(vlm, [folder], out, max_new_tokens=3, progress=False).described == 0
    assert [r["error"] for r in records(out)] == [None, None]


def test_an_image_whose_generation_fails_fails_alone(vlm, tmp_path, monkeypatch):
    """A failure inside the batched generation costs only the image it belongs to, not its batch."""
    images = make_images(tmp_path / "imgs", 5)
    real = vlm.engine.generate
    poison_width = Image.open(images[2]).width  # img0002 is the only image this wide

    def generate(convs, options):
        widths = [c[0]["content"][0]["image"].width for c in convs]
        if poison_width in widths:
            raise RuntimeError("a failure for this image only")
        return real(convs, options)

    monkeypatch.setattr(vlm.engine, "generate", generate)
    out = tmp_path / "out.jsonl"
    summary = describe(vlm, [tmp_path / "imgs"], out, batch_size=4, max_new_tokens=4, progress=False)
    rows = {Path(r["image"]).name: r for r in records(out)}
    assert summary.described == 4 and summary.errors == 1 and len(rows) == 5
    assert "a failure for this image only" in rows["img0002.png"]["error"]
    assert all(rows[p.name]["text"] is not None for i, p in enumerate(images) if i != 2)
