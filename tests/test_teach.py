"""``teach`` with ``vlmkit serve`` itself as the teacher (the built-in model over HTTP on 127.0.0.1), then
``data check`` and ``train`` on the result; and the presets, prompt files and answer validation."""

from __future__ import annotations

import base64
import json

import pytest
import torch

import vlmkit
from conftest import compose_tiny
from test_server import LiveServer
from vlmkit.data.formats import open_dataset
from vlmkit.data.shapes import encode_png
from vlmkit.data.synth import SynthConfig, generate
from vlmkit.data.teach import (
    DEFAULT_TASKS,
    PRESETS,
    ClientConfig,
    Rejection,
    TeachConfig,
    item_key,
    load_prompt_file,
    parse_conversation_text,
    resolve_tasks,
    teach,
    validate_answer,
)
from vlmkit.errors import ConfigError, DataError
from vlmkit.models.compose import save_pretrained
from vlmkit.processing.images import load_image
from vlmkit.serving.server import ServerSettings

KEY = "sk-teach-test"


# --- presets and prompt files ---------------------------------------------------------------------------------


def test_presets_and_prompt_files(tmp_path):
    assert [t.name for t in resolve_tasks(None)] == list(DEFAULT_TASKS)
    assert {"detailed_description", "reasoning", "conversation", "car_design"} <= set(PRESETS)
    assert PRESETS["conversation"].kind == "conversation" and PRESETS["car_design"].max_tokens == 120
    (tmp_path / "count.txt").write_text("How many objects are there?\n")
    (tmp_path / "more.yaml").write_text(
        "colours: What colours do you see?\n"
        'reasoning: {prompt: "Why?", question: Explain., max_tokens: 64}\n'
        "chat: {prompt: Talk about it., kind: conversation, system: Be brief.}\n"
    )
    [count] = load_prompt_file(tmp_path / "count.txt")
    assert (count.name, count.prompt, count.kind) == ("count", "How many objects are there?", "answer")
    assert count.human_turn == count.prompt
    tasks = resolve_tasks(None, [tmp_path / "count.txt", tmp_path / "more.yaml"])
    assert [t.name for t in tasks] == ["count", "colours", "reasoning", "chat"]
    assert tasks[2].human_turn == "Explain." and tasks[2].max_tokens == 64  # a file's task replaces the preset
    assert tasks[3].system == "Be brief." and tasks[3].kind == "conversation"
    assert [t.name for t in resolve_tasks(["car_design", "count"], [tmp_path / "count.txt"])] == ["car_design", "count"]
    assert tasks[2].fingerprint() != PRESETS["reasoning"].fingerprint()
    with pytest.raises(ConfigError, match="unknown task.*nope; expected one of detailed_description"):
        resolve_tasks(["nope"])
    (tmp_path / "bad.yaml").write_text("x: {prompt: hi, tempo: 3}\n")
    with pytest.raises(ConfigError, match="unknown key.*tempo; valid keys: prompt, question, kind"):
        load_prompt_file(tmp_path / "bad.yaml")
    (tmp_path / "kind.yaml").write_text("x: {prompt: hi, kind: essay}\n")
    with pytest.raises(ConfigError, match="kind must be one of answer, conversation"):
        load_prompt_file(tmp_path / "kind.yaml")


# --- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Question: What is it?\nAnswer: A red circle.\nQuestion: Where?\nAnswer: At the top\nleft.",
        "Here is a conversation:\n\n**User:** What is it?\n**Assistant:** A red circle.\n**User:** Where?\n"
        "**Assistant:** At the top\nleft.",
        "Q1: What is it?\nA1: A red circle.\nQ2: Where?\nA2: At the top\nleft.",
        '[{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A red circle."}, '
        '{"from": "human", "value": "Where?"}, {"from": "gpt", "value": "At the top\\nleft."}]',
        '```json\n{"conversations": [{"role": "user", "content": "What is it?"}, {"role": "assistant", '
        '"content": "A red circle."}, {"role": "user", "content": "Where?"}, {"role": "assistant", '
        '"content": "At the top\\nleft."}]}\n```',
    ],
    ids=["question-answer", "markdown-user-assistant", "numbered-q-a", "json", "fenced-json"],
)
def test_conversations_parse_from_every_common_spelling(text):
    assert parse_conversation_text(text) == [
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "At the top\nleft."},
    ]


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("There is a red circle.", "no 'Question:'/'Answer:' turns found"),
        ("Question: What?\nQuestion: Why?\nAnswer: No.", "turn 2 is a user turn; expected assistant"),
        ("Answer: Yes.", "turn 1 is a assistant turn; expected user"),
        ("Question: What?\nAnswer:\nQuestion: Why?\nAnswer: No.", "turn 2 (assistant) is empty"),
        ("Question: What?\nAnswer: A circle.\nQuestion: Why?", "the last question has no answer"),
    ],
)
def test_unparseable_conversations_are_rejected_with_the_reason(text, detail):
    assert parse_conversation_text(text) == Rejection("unparseable_conversation", detail)
    assert validate_answer(PRESETS["conversation"], text, "stop") == Rejection("unparseable_conversation", detail)


def test_answers_are_validated():
    task = PRESETS["detailed_description"]
    assert validate_answer(task, "  A red circle. ", "stop") == [
        {"role": "user", "content": "<image>\nDescribe this image in detail."},
        {"role": "assistant", "content": "A red circle."},
    ]
    assert validate_answer(task, " \n", "stop").reason == "empty"
    assert validate_answer(task, "A red", "length").reason == "truncated"
    assert validate_answer(task, "x" * 11, "stop", max_chars=10).reason == "too_long"
    assert isinstance(validate_answer(task, "x" * 10, "stop", max_chars=10), list)
    assert validate_answer(task, "See <image> here.", "stop").reason == "image_marker"
    conv = validate_answer(PRESETS["conversation"], "Question: Is it red?\nAnswer: Yes.", None)
    assert conv == [{"role": "user", "content": "<image>\nIs it red?"}, {"role": "assistant", "content": "Yes."}]


# --- the built-in model as the teacher, over HTTP ---------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher():
    vlm = vlmkit.load("default")
    live = LiveServer(vlm, ServerSettings(model_name="default", api_key=KEY))
    live.vlm = vlm
    yield live
    live.stop()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Three ShapesWorld test images as PNG files."""
    folder = tmp_path_factory.mktemp("shapes")
    for record in generate(SynthConfig(split="test", tasks=("caption",)), 3):
        (folder / f"{record.id}.png").write_bytes(record.images[0])
    return folder


def _expected(teacher, shapes, tasks):
    """What the teacher must say for each item, asked directly (greedy), and what validation makes of it."""
    written, rejected = {}, {}
    for path in sorted(shapes.glob("*.png")):
        url = "data:image/png;base64," + base64.b64encode(encode_png(load_image(path))).decode()
        for task in tasks:
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": task.prompt}]}]  # fmt: skip
            [result] = teacher.vlm.generate_batch([messages], max_new_tokens=task.max_tokens, temperature=0)
            checked = validate_answer(task, result.text, result.finish_reason)
            item = f"{item_key(path)}-{task.name}"
            if isinstance(checked, Rejection):
                rejected[item] = (checked.reason, result.text)
            else:
                written[item] = checked
    return written, rejected


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_teach_with_the_built_in_model_as_teacher(teacher, shapes, tmp_path):
    (tmp_path / "count.txt").write_text("How many objects are there?")
    tasks = resolve_tasks([*DEFAULT_TASKS, "count"], [tmp_path / "count.txt"])
    client = ClientConfig(teacher.url + "/v1", "default", concurrency=1, temperature=0)
    summary = teach([shapes], tmp_path / "out", client, TeachConfig(tasks), api_key=KEY, progress=False)

    written, rejected = _expected(teacher, shapes, tasks)
    # the built-in model describes and counts, but it cannot write a conversation: every one is rejected
    assert set(written) == {f"{item_key(p)}-{t}" for p in shapes.glob("*.png")
                            for t in ("detailed_description", "reasoning", "count")}  # fmt: skip
    assert {item: reason for item, (reason, _) in rejected.items()} == {
        f"{item_key(p)}-conversation": "unparseable_conversation" for p in shapes.glob("*.png")
    }
    rows = _rows(tmp_path / "out" / "teach.jsonl")
    assert [row["id"] for row in rows] == [item for item in written]  # input order
    for row in rows:
        messages = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                    for t in row["conversations"]]  # fmt: skip
        assert messages == written[row["id"]] and row["meta"]["teacher"] == "default"
        assert row["image"] == f"images/teach/{row['id'][: -len(row['task']) - 1]}.png"
    count = next(row for row in rows if row["task"] == "count")
    assert count["conversations"][1]["value"].isdigit()
    rejects = _rows(tmp_path / "out" / "teach.teach" / "rejects.jsonl")
    assert {r["id"]: (r["reason"], r["answer"]) for r in rejects} == rejected
    assert summary.written == 9 and summary.rejected == {"unparseable_conversation": 3} and summary.failed == 0
    assert summary.requests == 12 and summary.retries == 0 and summary.tokens_in > 0 and summary.tokens_out > 0

    # the dataset reader takes it as it is; its images are the teacher's images
    dataset = open_dataset(tmp_path / "out")
    samples = list(dataset)
    assert len(samples) == 9 and not dataset.problems
    originals = {item_key(p): load_image(p) for p in shapes.glob("*.png")}  # item_key: the id less the task
    for sample in samples:
        key = sample.id[: -len(sample.task) - 1]
        assert sample.images[0].tobytes() == originals[key].tobytes()


def test_cli_teach_check_and_resume(teacher, shapes, tmp_path, run, monkeypatch):
    monkeypatch.setenv("VLMKIT_TEACHER_API_KEY", KEY)
    args = ["data", "teach", shapes, "--teacher-url", teacher.url, "--teacher-model", "default", "--out",
            tmp_path / "out", "--format", "llava", "--stream", "--concurrency", "4", "--temperature", "0",
            "--no-progress"]  # fmt: skip
    code, out, err = run(*args)
    assert code == 0, err
    assert "items: 9 (3 images × 3 tasks), 0 done before this run" in out
    assert f"written: 6 to {tmp_path / 'out' / 'teach.json'}" in out
    assert "rejected: 3 (unparseable_conversation 3)" in out and "requests: 9, retries: 0" in out
    records = json.loads((tmp_path / "out" / "teach.json").read_text())
    assert sorted(r["task"] for r in records) == ["detailed_description"] * 3 + ["reasoning"] * 3
    code, out, err = run("data", "check", tmp_path / "out" / "teach.json")
    assert code == 0, out + err
    assert "6 records, 6 valid, 6 images, 6 questions" in out and "no problems found" in out
    code, out, _ = run(*args)  # everything is done: nothing is asked again
    assert code == 0 and "9 done before this run" in out and "requests: 0" in out
    assert json.loads((tmp_path / "out" / "teach.json").read_text()) == records

    monkeypatch.delenv("VLMKIT_TEACHER_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, _, err = run(*args, "--overwrite")
    assert code == 1 and "refused the API key" in err


def test_resume_refuses_changed_prompts_and_foreign_datasets(teacher, shapes, tmp_path):
    client = ClientConfig(teacher.url, "default", temperature=0)
    first = teach([shapes], tmp_path, client, TeachConfig(resolve_tasks(["count"], [_txt(tmp_path, "count", "N?")])),
                  api_key=KEY, progress=False)  # fmt: skip
    assert first.written == 3
    changed = TeachConfig(resolve_tasks(["count"], [_txt(tmp_path, "count", "How many?")]))
    with pytest.raises(ConfigError, match="task.s. count changed since this run began"):
        teach([shapes], tmp_path, client, changed, api_key=KEY, progress=False)
    added = teach([shapes], tmp_path, client, TeachConfig(resolve_tasks(["count", "reasoning"],
                                                                         [_txt(tmp_path, "count", "N?")])),
                  api_key=KEY, progress=False)  # fmt: skip
    assert (added.done_before, added.written) == (3, 3)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "teach.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="is not a teacher run's"):
        teach([shapes], tmp_path / "other", client, changed, api_key=KEY, progress=False)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    mixed = teach([tmp_path / "broken.png"], tmp_path / "b", client, changed, api_key=KEY, progress=False)
    assert mixed.rejected == {"unreadable_image": 1} and mixed.requests == 0


def _txt(folder, name, prompt):
    path = folder / "prompts" / f"{name}.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(prompt)
    return path


def test_vlmkit_train_trains_on_teacher_data_as_it_is(teacher, shapes, tmp_path):
    from vlmkit.training import train

    client = ClientConfig(teacher.url, "default", temperature=0, concurrency=2)
    teach([shapes], tmp_path / "data", client, TeachConfig(resolve_tasks(None)), api_key=KEY, progress=False)
    torch.manual_seed(0)
    save_pretrained(*compose_tiny(), tmp_path / "student")
    policy = {"vision": "frozen", "projector": "full", "language_model": "full"}
    stage = {"name": "instruct", "data": [{"path": str(tmp_path / "data" / "teach.jsonl")}], "steps": 2,
             "batch_size": 2, "lr": 1e-3, "policy": policy}  # fmt: skip
    result = train({"model": {"checkpoint": str(tmp_path / "student")}, "stages": [stage], "progress": False,
                    "output_dir": str(tmp_path / "run"), "save_every": None})  # fmt: skip
    assert len(result.losses) == 2 and all(loss > 0 for loss in result.losses)
    assert (result.final_dir / "model.safetensors").is_file()
