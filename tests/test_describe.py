import json
import os

import psutil
import pytest
import torch
from PIL import Image

from conftest import compose_tiny, make_tokenizer
from vlmkit.api import VLM
from vlmkit.errors import ConfigError, DataError
from vlmkit.inference.describe import collect_images, describe, fit_to_budget, read_done


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM(*compose_tiny())


def make_images(folder, n, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:04d}.png"
        Image.new("RGB", (20 + i % 7, 16), (i * 37 % 255, 90, 200)).save(path)
        paths.append(path)
    return paths


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_collect_files_folders_globs(tmp_path):
    make_images(tmp_path / "a", 2)
    make_images(tmp_path / "a" / "deep", 2, start=10)
    (tmp_path / "a" / "notes.txt").write_text("x")
    single = make_images(tmp_path / "b", 1)[0]
    found = collect_images([tmp_path / "a", str(tmp_path / "b" / "*.png"), single])
    names = [str(p.relative_to(tmp_path)) for p in found]
    assert names == ["a/deep/img0010.png", "a/deep/img0011.png", "a/img0000.png", "a/img0001.png", "b/img0000.png"]
    with pytest.raises(ConfigError, match="no such file or folder"):
        collect_images([tmp_path / "missing"])
    with pytest.raises(ConfigError, match="matches no file"):
        collect_images([str(tmp_path / "*.jpg")])


def test_describe_records_bad_images_and_goes_on(vlm, tmp_path):
    images = make_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out.jsonl"
    summary = describe(vlm, [tmp_path / "imgs"], out, batch_size=2, max_new_tokens=6, progress=False)
    rows = records(out)
    assert [r["image"] for r in rows] == sorted(str(p) for p in [*images, tmp_path / "imgs" / "broken.png"])
    broken = next(r for r in rows if r["image"].endswith("broken.png"))
    assert broken["text"] is None and "broken.png" in broken["error"] and "not an image" in broken["error"]
    good = [r for r in rows if r["error"] is None]
    assert len(good) == 3 and all(isinstance(r["text"], str) and r["tokens"] >= 0 for r in good)
    assert (summary.described, summary.errors, summary.skipped) == (3, 1, 0)
    # the batch output equals one-image-at-a-time chat
    alone = vlm.chat("Describe the image.", images=[images[0]], max_new_tokens=6).strip()
    assert next(r for r in rows if r["image"] == str(images[0]))["text"] == alone


def test_resume_after_kill_loses_and_duplicates_nothing(vlm, tmp_path):
    images = make_images(tmp_path / "imgs", 7)
    out = tmp_path / "out.jsonl"
    describe(vlm, images[:3], out, batch_size=2, max_new_tokens=4, progress=False)
    complete = out.read_text()
    out.write_text(complete + '{"image": "' + str(images[3]) + '", "te')  # killed mid-line
    summary = describe(vlm, [tmp_path / "imgs"], out, batch_size=2, max_new_tokens=4, progress=False)
    rows = records(out)
    assert sorted(r["image"] for r in rows) == sorted(str(p) for p in images)
    assert len(rows) == 7 and summary.skipped == 3 and summary.described == 4
    assert out.read_text().startswith(complete)
    again = describe(vlm, [tmp_path / "imgs"], out, batch_size=2, max_new_tokens=4, progress=False)
    assert again.skipped == 7 and again.described == 0 and len(records(out)) == 7


def test_corrupt_output_file_is_refused_untouched(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"image": "a"}\nGARBAGE\n{"image": "b"}\n')
    before = out.read_bytes()
    with pytest.raises(DataError, match=r"out\.jsonl, line 2: not a describe record"):
        read_done(out)
    assert out.read_bytes() == before


def test_token_budget_cuts_at_word_boundary():
    tokenizer = make_tokenizer()
    text = "There is a red circle in the top left and a blue square in the center of the image"
    for budget in (5, 9, 14):
        cut = fit_to_budget(text, tokenizer, budget)
        assert len(tokenizer(cut)["input_ids"]) <= budget
        assert text.startswith(cut) and (cut == text or text[len(cut)] == " ")
        longer = text[: text.index(" ", len(cut) + 1)] if " " in text[len(cut) + 1 :] else text
        assert len(tokenizer(longer)["input_ids"]) > budget  # the next word would not fit
    assert fit_to_budget("short", tokenizer, 50) == "short"


def test_describe_with_budget_and_errors(vlm, tmp_path):
    images = make_images(tmp_path / "imgs", 2)
    out = tmp_path / "out.jsonl"
    describe(vlm, images, out, max_new_tokens=30, token_budget=6, progress=False)
    assert all(r["tokens"] <= 6 for r in records(out))
    with pytest.raises(ConfigError, match="prompt is empty"):
        describe(vlm, images, out, prompt="  ", progress=False)
    with pytest.raises(ConfigError, match="max_new_tokens must be a positive integer"):
        describe(vlm, images, out, max_new_tokens=0, progress=False)


@pytest.mark.slow
def test_memory_stays_flat_over_many_images(vlm, tmp_path):
    images = make_images(tmp_path / "imgs", 520)
    out = tmp_path / "out.jsonl"
    describe(vlm, images[:40], out, batch_size=8, max_new_tokens=3, progress=False)  # warm-up
    process = psutil.Process(os.getpid())
    before = process.memory_info().rss
    summary = describe(vlm, images, out, batch_size=8, max_new_tokens=3, progress=False)
    growth = process.memory_info().rss - before
    assert summary.described == 480 and len(records(out)) == 520
    assert growth < 50 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB"
