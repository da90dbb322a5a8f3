"""The evaluation runner with fake predictors: oracle scores, hand-computed POPE, resume after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.errors import ConfigError, DataError, RegistryError, VlmkitError
from vlmkit.evaluation import evaluate, evaluate_suite, format_table, get_task, read_predictions, task_names
from vlmkit.evaluation.shapesworld import caption_objects, iter_suite_samples
from vlmkit.evaluation.tasks import SHORT_ANSWER

POPE_ROWS = [
    ("yes", "random"),
    ("no", "random"),
    ("yes", "popular"),
    ("no", "popular"),
    ("no", "popular"),
    ("yes", "adversarial"),
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (200, 100), (240, 240, 240)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (64, 32), (10, 20, 30)).save(tmp_path / "images" / "b.png")
    return tmp_path


def _pope(data_dir: Path) -> Path:
    rows = [
        {
            "question_id": i,
            "image": "images/a.png",
            "text": f"Is there a thing {i} in the image?",
            "label": label,
            "category": cat,
        }
        for i, (label, cat) in enumerate(POPE_ROWS)
    ]
    return _write(data_dir / "pope.jsonl", rows)


def _task_files(data_dir: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    """A data file per task and the oracle's answer for each prompt."""
    files: dict[str, tuple[Path, dict[str, str]]] = {}

    def add(name: str, rows: list[dict], answers: list[str]) -> None:
        path = _write(data_dir / f"{name}.jsonl", rows)
        task = get_task(name)
        prompts = [task.read(r, "x", data_dir).prompt for r in rows]
        files[name] = (path, dict(zip(prompts, answers, strict=True)))

    add(
        "pope",
        [
            {"question_id": i, "image": "images/a.png", "text": f"Is there a {i}?", "label": lab}
            for i, lab in enumerate(["yes", "no", "yes"])
        ],
        ["Yes", "No.", "Yes, there is."],
    )
    add(
        "vqa",
        [
            {"question_id": 1, "image": "images/a.png", "question": "How many?", "answers": ["2"] * 10},
            {
                "question_id": 2,
                "image": "images/b.png",
                "question": "What?",
                "answers": [{"answer": "dog"}] * 7 + [{"answer": "cat"}] * 3,
            },
        ],
        ["Two.", "a dog"],
    )
    add(
        "textvqa",
        [{"question_id": 1, "image": "images/a.png", "question": "Read it", "answers": ["STOP."] * 10}],
        ["stop"],
    )
    add("gqa", [{"question_id": "g1", "image": "images/a.png", "question": "Colour?", "answer": "red"}], ["Red."])
    add(
        "docvqa", [{"question_id": 1, "image": "images/b.png", "question": "Total?", "answers": ["$12.50"]}], ["$12.50"]
    )
    add(
        "grounding",
        [
            {"question_id": 1, "image": "images/a.png", "expression": "the left half", "bbox": [0, 0, 100, 100]},
            {
                "question_id": 2,
                "image": "images/b.png",
                "expression": "all",
                "bbox": [0, 0, 64, 32],
                "question": "Where is everything?",
            },
        ],
        ["<box>(0,0),(500,1000)</box>", "[0.0, 0.0, 1.0, 1.0]"],
    )
    add(
        "mcq",
        [
            {
                "question_id": 1,
                "image": "images/a.png",
                "question": "Which?",
                "options": ["cat", "dog"],
                "answer": "dog",
            },
            {"question_id": 2, "image": "images/b.png", "question": "And?", "options": ["a", "b", "c"], "answer": "A"},
        ],
        ["(B) dog", "The answer is A"],
    )
    return files


def _oracle(answers: dict[str, str]):
    def predict(conversations):
        return [answers[conv[0]["content"][-1]["text"]] for conv in conversations]

    return predict


def _constant(text: str, log: list | None = None):
    def predict(conversations):
        if log is not None:
            log.extend(c[0]["content"][-1]["text"] for c in conversations)
        return [text] * len(conversations)

    return predict


def test_registry_lists_names():
    assert task_names() == ["pope", "vqa", "gqa", "textvqa", "docvqa", "grounding", "caption", "mcq", "mme", "mmbench",
                            "chartqa", "seedbench", "mmstar"]  # fmt: skip
    with pytest.raises(RegistryError, match="choose from pope, vqa, gqa"):
        get_task("Pope")
    with pytest.raises(ConfigError, match="invalid option"):
        get_task("pope", box_format="pixels")


@pytest.mark.parametrize("name", ["pope", "vqa", "textvqa", "gqa", "docvqa", "grounding", "mcq"])
def test_oracle_scores_one(data_dir, name):
    path, answers = _task_files(data_dir)[name]
    report = evaluate(_oracle(answers), name, path, batch_size=2, progress=False)
    summary = report["summary"]
    headline = {"docvqa": "anls", "grounding": "acc@0.5", "pope": "f1"}.get(name, "accuracy")
    assert summary[headline] == 1.0
    if name == "grounding":
        assert report["metrics"]["miou"] == 1.0


def test_conversation_shape(data_dir):
    seen = []

    def predict(conversations):
        seen.extend(conversations)
        return ["yes"] * len(conversations)

    evaluate(predict, "pope", _pope(data_dir), limit=1, progress=False)
    assert seen == [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(data_dir / "images" / "a.png")},
                    {"type": "text", "text": "Is there a thing 0 in the image?" + SHORT_ANSWER},
                ],
            }
        ]
    ]


def test_constant_yes_pope_by_hand(data_dir, tmp_path):
    out = tmp_path / "run"
    report = evaluate(
        _constant("Yes"), "pope", _pope(data_dir), batch_size=4, out_dir=out, model_name="const", progress=False
    )
    m = report["metrics"]
    assert (m["overall"]["accuracy"], m["overall"]["precision"], m["overall"]["recall"]) == (0.5, 0.5, 1.0)
    assert m["overall"]["f1"] == pytest.approx(2 / 3) and m["overall"]["yes_ratio"] == 1.0
    assert m["random"]["f1"] == pytest.approx(2 / 3)
    assert m["popular"]["accuracy"] == pytest.approx(1 / 3) and m["popular"]["f1"] == pytest.approx(0.5)
    assert m["adversarial"]["accuracy"] == 1.0
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(m))
    assert saved["model"] == "const" and saved["counts"] == {"samples": 6, "resumed": 0, "new": 6}
    assert len(saved["data_sha256"]) == 64 and saved["samples_per_s"] > 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(6)]
    assert rows[1] == {"id": "1", "prompt": rows[1]["prompt"], "prediction": "Yes", "score": 0.0, "parsed": "yes"}
    table = format_table(saved)
    assert "f1 (popular)" in table and "0.5000" in table and "const" in table


def test_resume_after_crash(data_dir, tmp_path):
    data = _pope(data_dir)
    out = tmp_path / "run"
    calls = []

    def crashing(conversations):
        calls.append(len(conversations))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return ["No"] * len(conversations)

    with pytest.raises(RuntimeError):
        evaluate(crashing, "pope", data, batch_size=2, out_dir=out, progress=False)
    path = out / "predictions.jsonl"
    assert len(path.read_text().splitlines()) == 2  # the first batch was flushed
    with path.open("a") as f:  # a crash in the middle of a write
        f.write('{"id": "2", "prompt": "Is th')
    asked: list[str] = []
    report = evaluate(_constant("No", asked), "pope", data, batch_size=2, out_dir=out, progress=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [str(i) for i in range(6)]  # no duplicate, none lost
    assert len(asked) == 4 and report["counts"] == {"samples": 6, "resumed": 2, "new": 4}
    assert report["metrics"]["overall"]["accuracy"] == 0.5  # answered "No" throughout
    again: list[str] = []
    evaluate(_constant("Yes", again), "pope", data, out_dir=out, progress=False)
    assert again == []  # everything already predicted: nothing is asked, predictions are kept


def test_read_predictions_repairs(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prediction": "x"}\n{"id": "b", "prediction": "y"}')  # newline missing
    assert list(read_predictions(path)) == ["a", "b"]
    assert path.read_text().endswith("}\n")
    path.write_text('{"id": "a", "prediction": "x"}\nnot json\n{"id": "b", "prediction": "y"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2"):
        read_predictions(path)


def test_resume_refuses_another_run(data_dir, tmp_path):
    out = tmp_path / "run"
    evaluate(_constant("Yes"), "pope", _pope(data_dir), out_dir=out, limit=2, progress=False)
    other = _write(data_dir / "other.jsonl", [{"question_id": 1, "image": "images/a.png", "text": "?", "label": "no"}])
    with pytest.raises(ConfigError, match="data_sha256"):
        evaluate(_constant("Yes"), "pope", other, out_dir=out, progress=False)
    with pytest.raises(ConfigError, match="blank_images"):
        evaluate(_constant("Yes"), "pope", _pope(data_dir), out_dir=out, blank_images=True, progress=False)
    report = evaluate(_constant("Yes"), "pope", _pope(data_dir), out_dir=out, progress=False)  # larger limit: ok
    assert report["counts"] == {"samples": 6, "resumed": 2, "new": 4}


def test_data_errors_name_file_and_line(data_dir):
    bad = data_dir / "bad.jsonl"
    rows = [
        {"question_id": 1, "image": "images/a.png", "text": "?", "label": "yes"},
        {"question_id": 2, "image": "images/a.png", "text": "?", "label": "maybe"},
    ]
    _write(bad, rows)
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'label' must be 'yes' or 'no'"):
        evaluate(_constant("x"), "pope", bad, progress=False)
    _write(bad, [rows[0], rows[0]])
    with pytest.raises(DataError, match=r"bad.jsonl:2: duplicate id '1' \(first at .*bad.jsonl:1\)"):
        evaluate(_constant("x"), "pope", bad, progress=False)
    _write(bad, [{**rows[0], "image": "images/missing.png"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: image .*missing.png not found"):
        evaluate(_constant("x"), "pope", bad, progress=False)
    bad.write_text('{"question_id": 1,\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: invalid JSON"):
        evaluate(_constant("x"), "pope", bad, progress=False)
    _write(bad, [{"question_id": 1, "image": "images/a.png", "question": "?", "options": ["a", "b"], "answer": "C"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'answer' 'C' is neither"):
        evaluate(_constant("x"), "mcq", bad, progress=False)
    with pytest.raises(DataError, match="not found"):
        evaluate(_constant("x"), "pope", data_dir / "nope.jsonl", progress=False)


def test_predictor_must_return_one_string_each(data_dir):
    with pytest.raises(VlmkitError, match="returned 1 answers for 2"):
        evaluate(lambda convs: ["yes"], "pope", _pope(data_dir), batch_size=2, progress=False)
    with pytest.raises(VlmkitError, match="returned a string"):
        evaluate(lambda convs: "yes", "pope", _pope(data_dir), batch_size=2, progress=False)


def test_blank_images_keep_size_and_background(data_dir):
    seen = []

    def predict(conversations):
        seen.extend(c[0]["content"][0]["image"] for c in conversations)
        return ["no"] * len(conversations)

    rows = [{"question_id": 1, "image": "images/b.png", "text": "?", "label": "no"}]
    evaluate(predict, "pope", _write(data_dir / "one.jsonl", rows), blank_images=True, progress=False)
    assert seen[0].size == (64, 32) and seen[0].getcolors() == [(64 * 32, (10, 20, 30))]


def test_caption_task(data_dir):
    rows = [
        {"image": "images/a.png", "captions": ["a red circle on the left side", "red circle at left"]},
        {"image": "images/b.png", "captions": ["two blue squares at the top"]},
    ]
    path = _write(data_dir / "caption.jsonl", rows)
    answers = {"images/a.png": "A red circle on the left side.", "images/b.png": "two blue squares at the top"}

    def predict(conversations):
        return [answers[str(Path(c[0]["content"][0]["image"]).relative_to(data_dir))] for c in conversations]

    report = evaluate(predict, "caption", path, progress=False)
    assert report["metrics"]["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert report["metrics"]["rouge_l"] == pytest.approx(1.0)
    assert report["metrics"]["cider"] > 0


# --------------------------------------------------------------------------------------------- ShapesWorld


def test_caption_objects():
    text = 'There are two objects: a large red circle at the top and two Blue squares. The word "cat" is written.'
    assert caption_objects(text) == [("large", "red", "circle"), (None, "blue", "square")]


def _suite_oracle():
    samples = list(iter_suite_samples(4, seed=0))
    answers = {(s.image.tobytes(), s.prompt): s.reference["answers"][0] for s in samples}

    def predict(conversations):
        return [answers[(c[0]["content"][0]["image"].tobytes(), c[0]["content"][1]["text"])] for c in conversations]

    return predict


def test_suite_oracle_and_blank_ablation(tmp_path):
    out = tmp_path / "suite"
    report = evaluate_suite(
        _suite_oracle(), n=4, seed=0, batch_size=16, out_dir=out, model_name="oracle", progress=False
    )
    assert set(report["metrics"]) == {"exist", "attribute", "position", "count", "grounding", "text", "caption"}
    assert all(
        value == 1.0 for key, value in report["summary"].items() if "yes-ratio" not in key and "CIDEr" not in key
    )
    assert report["summary"]["existence yes-ratio"] == 0.5  # every category is half positive
    assert report["metrics"]["caption"]["objects_exact"] == 1.0

    def yes(conversations):
        return ["Yes"] * len(conversations)

    blank_out = tmp_path / "blank"
    ablated = evaluate_suite(yes, n=4, seed=0, blank_images=True, batch_size=16, out_dir=blank_out, progress=False)
    blank = ablated["ablation"]["blank_images"]
    assert blank["metrics"]["exist"]["overall"]["accuracy"] == 0.5
    assert blank["metrics"]["exist"]["overall"]["yes_ratio"] == 1.0
    assert blank["metrics"]["caption"]["objects_exact"] == 0.0
    assert (blank_out / "blank" / "predictions.jsonl").exists()
    table = format_table(json.loads((blank_out / "report.json").read_text()))
    assert "blank images" in table and "existence F1 (adversarial)" in table and "grounding acc@0.5" in table


def test_suite_later_turns_ask_the_same_questions_after_gold_turns(tmp_path):
    first = list(iter_suite_samples(4, seed=0))
    later = list(iter_suite_samples(4, seed=0, later_turns=True))
    assert [s.id for s in later] == [s.id for s in first] and [s.prompt for s in later] == [s.prompt for s in first]
    assert {s.reference["turn"] for s in later} == {2, 3, 4, 5}
    gold = {(s.image.tobytes(), s.prompt): s.reference["answers"][0] for s in first}
    for sample in later:
        conversation = sample.conversation()
        users = [m for m in conversation if m["role"] == "user"]
        assert len(users) == sample.reference["turn"] and users[-1]["content"] == [
            {"type": "text", "text": sample.prompt}
        ]
        assert users[0]["content"][0]["type"] == "image"  # the image once, first, as users give it
        assert all(len(u["content"]) == 1 for u in users[1:])
        for (question, answer), assistant in zip(sample.history, conversation[1::2], strict=True):
            assert assistant == {"role": "assistant", "content": answer}
            assert question != sample.prompt and gold[(sample.image.tobytes(), question)] == answer

    def oracle(conversations):  # answers the last question from the image and the question alone
        return [gold[(c[0]["content"][0]["image"].tobytes(), c[-1]["content"][-1]["text"])] for c in conversations]

    report = evaluate_suite(oracle, n=4, seed=0, later_turns=True, batch_size=16, out_dir=tmp_path, progress=False)
    assert report["later_turns"]["summary"] == report["summary"]
    assert (tmp_path / "turns" / "predictions.jsonl").exists()
    table = format_table(report)
    assert "first turn" in table and "later turns" in table


def test_suite_with_tiny_model_through_the_engine():
    api = pytest.importorskip("vlmkit.api")
    vlm = api.load("tiny-random", device="cpu")

    def predict(conversations):
        return [r.text for r in vlm.generate_batch(conversations, max_new_tokens=6, temperature=0)]

    report = evaluate_suite(predict, n=1, seed=0, batch_size=16, model_name="tiny-random", progress=False)
    assert report["counts"]["new"] == report["counts"]["samples"] > 0
    assert 0.0 <= report["summary"]["existence accuracy"] <= 1.0
