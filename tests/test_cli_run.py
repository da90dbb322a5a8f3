"""The describe, chat and demo commands, run in-process through vlmkit.cli.main."""

import io
import json

import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit.cli import main
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.builtin import BUILTIN_MODELS


@pytest.fixture(scope="module")
def tiny():
    return vlmkit.load("tiny-random")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (30, 20), (220, 20, 20)).save(path)
    return path


def test_api_load_names_devices_dtypes(tiny, tmp_path):
    assert tiny.notice and "UNTRAINED" in tiny.notice
    with pytest.raises(CheckpointError, match="unknown model 'nope'.*default, tiny-random"):
        vlmkit.load("nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        vlmkit.load(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        vlmkit.load("tiny-random", device="tpu")
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        vlmkit.load("tiny-random", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            vlmkit.load("tiny-random", device="cuda")
    bf16 = vlmkit.load("tiny-random", dtype="bf16")
    assert bf16.model.dtype == torch.bfloat16 and isinstance(bf16.chat("hi", max_new_tokens=3), str)


def test_api_chat_stream_batch_and_saved_checkpoint(tiny, image, tmp_path):
    text = tiny.chat("What colour?", images=[image], max_new_tokens=12)
    assert "".join(tiny.stream("What colour?", images=[image], max_new_tokens=12)) == text
    messages = [
        {"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "What colour?"}]}
    ]
    assert tiny.chat(messages, max_new_tokens=12) == text
    results = tiny.generate_batch([messages, [{"role": "user", "content": "hi"}]], max_new_tokens=12)
    assert results[0].text == text and results[0].finish_reason in ("stop", "length")
    multi = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": "And the shape?"}]
    assert isinstance(tiny.chat(multi, max_new_tokens=5), str)
    vlmkit.save_pretrained(tiny.model, tiny.processor, tmp_path / "ckpt")
    again = vlmkit.load(str(tmp_path / "ckpt"))
    assert again.notice is None and again.chat("What colour?", images=[image], max_new_tokens=12) == text


def test_cli_describe_folder(image, tmp_path, capsys):
    Image.new("RGB", (10, 10)).save(tmp_path / "blue.png")
    out = tmp_path / "d.jsonl"
    code = main(["describe", str(tmp_path), "--model", "tiny-random", "--out", str(out), "--max-new-tokens", "5",
                 "--token-budget", "4", "--quiet", "--print"])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == sorted([str(tmp_path / "blue.png"), str(image)])
    assert all(r["tokens"] <= 4 and r["error"] is None for r in rows)
    captured = capsys.readouterr()
    assert "UNTRAINED" in captured.err and "2 described, 0 failed, 0 already done" in captured.err
    assert captured.out.count('"image"') == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["describe", "/no/such/dir"], "no such file or folder"),
        (["describe", "{img}", "--model", "nope"], "unknown model 'nope'"),
        (["describe", "{img}", "--model", "tiny-random", "--prompt", " "], "the prompt is empty"),
        (["chat", "--model", "tiny-random", " "], "the prompt is empty"),
        (["chat", "hi", "--image", "/no/such.png"], "not found"),
        (["chat", "hi", "--model", "tiny-random", "--temperature", "-1"], "temperature must be ≥ 0"),
    ],
)
def test_cli_errors_are_clear(argv, message, image, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([a.replace("{img}", str(image)) for a in argv]) == 1
    assert message in capsys.readouterr().err


def test_cli_max_new_tokens_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["describe", ".", "--max-new-tokens", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_cli_chat_one_shot_equals_api(tiny, image, capsys):
    assert main(["chat", "--model", "tiny-random", "--image", str(image), "--max-new-tokens", "8", "What colour?"]) == 0
    assert capsys.readouterr().out == tiny.chat("What colour?", images=[image], max_new_tokens=8) + "\n"


def test_cli_chat_interactive_session(tiny, image, capsys, monkeypatch):
    script = f"/image {image}\nWhat colour?\n/image /no/such.png\n/bogus\n/reset\nhi\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--model", "tiny-random", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    first = tiny.chat("What colour?", images=[image], max_new_tokens=6)
    after_reset = tiny.chat("hi", max_new_tokens=6)
    assert f"vlm> {first}\n" in captured.out and f"vlm> {after_reset}\n" in captured.out
    assert "image attached" in captured.err and "not found" in captured.err and "unknown command /bogus" in captured.err
    assert "conversation cleared" in captured.err


def test_demo_runs_on_shipped_examples(capsys):
    assert main(["demo"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("shapes-") == 4
    assert captured.err.count(BUILTIN_MODELS.get("default").notice) == 1 and "UNTRAINED" not in captured.err


def test_cli_eval_suite_and_resume(tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["eval", "--model", "tiny-random", "--suite", "shapesworld", "--n", "3", "--out", str(out), "--quiet",
            "--max-new-tokens", "4", "--batch-size", "8"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "existence F1 (random)" in first and "counting accuracy" in first
    report = json.loads((out / "report.json").read_text())
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert report["model"] == "tiny-random" and len(lines) > 3
    assert main(argv) == 0  # resumes: nothing new to predict, nothing duplicated
    assert "0 resumed" not in capsys.readouterr().out
    assert (out / "predictions.jsonl").read_text().splitlines() == lines


def test_cli_eval_needs_task_or_suite(capsys):
    assert main(["eval", "--model", "tiny-random"]) == 1
    assert "give either --task" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-random", "--task", "pope"]) == 1
    assert "needs --data" in capsys.readouterr().err


def test_cli_eval_on_exported_files(tmp_path, capsys):
    assert main(["data", "export-eval", "--out", str(tmp_path / "exp"), "--n", "3", "--workers", "1",
                 "--no-progress"]) == 0  # fmt: skip
    for task, name, metric in [("pope", "pope", "f1 (adversarial)"), ("gqa", "vqa", "accuracy"),
                               ("grounding", "grounding", "acc@0.5"), ("caption", "caption", "cider")]:  # fmt: skip
        out = tmp_path / task
        data = str(tmp_path / "exp" / f"{name}.jsonl")
        argv = ["eval", "--model", "tiny-random", "--task", task, "--data", data, "--image-root",
                str(tmp_path / "exp"), "--out", str(out), "--quiet", "--max-new-tokens", "4"]  # fmt: skip
        assert main(argv) == 0
        assert metric in capsys.readouterr().out
        report = json.loads((out / "report.json").read_text())
        rows = (out / "predictions.jsonl").read_text().splitlines()
        assert report["task"] == task and report["model"] == "tiny-random" and len(report["data_sha256"]) == 64
        assert report["counts"]["samples"] == len(rows) > 0 and report["samples_per_s"] > 0
        assert rows and all({"id", "prompt", "prediction", "score"} <= set(json.loads(r)) for r in rows)
