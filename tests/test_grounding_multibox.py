"""The ``grounding`` task with several labelled boxes per answer (Qwen-VL's
``<ref>label</ref><box>(x1,y1),(x2,y2)</box>``, corners in [0, 1000): its README and tokenizer), scored over every
reference box, on a fixture whose scores were computed by hand (below)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmkit.data.grounding import LabeledBox
from vlmkit.errors import DataError
from vlmkit.evaluation.runner import evaluate
from vlmkit.evaluation.tasks import get_task
from vlmkit.evaluation.tasks.grounding import match_boxes, normalize_label

# (row, the model's answer); every image is 100 × 100 except the third (200 × 100)
FIXTURE = [
    # one reference box (RefCOCO): the first box is scored, Qwen-VL's (100,100),(500,500) → (10, 10, 50, 50): IoU 1
    ({"question_id": "one", "expression": "the square", "bbox": [10, 10, 50, 50]},
     "<ref>the square</ref><box>(100,100),(500,500)</box><box>(0,0),(50,50)</box>"),
    # two dogs and a cat: dog (60, 60, 100, 100) finds dog B (IoU 1); dog (0, 0, 20, 40) finds dog A with
    # IoU 800 / 1600 = 0.5; the cat box (50, 0, 90, 40) misses the cat (IoU 0)
    ({"question_id": "pets", "question": "Find every dog and cat.",
      "boxes": [{"label": "dog", "bbox": [0, 0, 40, 40]}, {"label": "dog", "bbox": [60, 60, 100, 100]},
                {"label": "cat", "bbox": [0, 60, 40, 100]}]},
     "<ref>Dog</ref><box>(600,600),(1000,1000)</box><box>(0,0),(200,400)</box>"
     "<ref>cat</ref><box>(500,0),(900,400)</box>"),
    # the reference as Qwen-VL text, 200 × 100: (100,100),(300,300) → (20, 10, 60, 30); an unlabelled pixel box
    # counts as the only label: (20, 10, 60, 40) → IoU 800 / 1200 = 2/3
    ({"question_id": "text", "expression": "the red circle", "width": 200,
      "answer": "<ref>the red circle</ref><box>(100,100),(300,300)</box>"},
     "[20, 10, 60, 40]"),
    # no box in the answer: a parse failure, IoU 0
    ({"question_id": "none", "expression": "a star", "boxes": [{"label": "star", "bbox": [0, 0, 10, 10]}]},
     "I cannot see it."),
]  # fmt: skip


@pytest.fixture
def fixture_file(tmp_path):
    rows = []
    for row, _ in FIXTURE:
        size = (row.get("width", 100), 100)
        Image.new("RGB", size, (255, 255, 255)).save(tmp_path / f"{row['question_id']}.png")
        rows.append({**row, "image": f"{row['question_id']}.png", "width": size[0], "height": size[1]})
    path = tmp_path / "grounding.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def predict(conversations):
    by_prompt = {}
    for row, answer in FIXTURE:
        prompt = row.get("question") or (
            "Please provide the bounding box coordinate of the region this sentence describes: " + row["expression"]
        )
        by_prompt[prompt] = answer
    return [by_prompt[c[-1]["content"][-1]["text"]] for c in conversations]


def test_every_reference_box_is_scored_by_label(fixture_file, tmp_path):
    report = evaluate(predict, "grounding", fixture_file, batch_size=2, progress=False, out_dir=tmp_path / "run")
    metrics = report["metrics"]
    ious = [1.0, 0.5, 1.0, 0.0, 2 / 3, 0.0]  # the six reference boxes, in order (see FIXTURE)
    assert metrics["boxes"] == 6 and metrics["n"] == 4
    assert metrics["acc@0.5"] == pytest.approx(4 / 6)
    assert metrics["miou"] == pytest.approx(sum(ious) / 6)
    assert metrics["acc@0.6"] == pytest.approx(3 / 6) and metrics["acc@0.7"] == pytest.approx(2 / 6)
    assert metrics["acc@0.1"] == pytest.approx(4 / 6)
    assert metrics["precision@0.5"] == pytest.approx(4 / 5)  # 5 boxes scored: 1 (first only) + 3 + 1 + 0
    assert metrics["parse_failures"] == 1
    assert metrics["by_label"] == {
        "dog": {"acc@0.5": 1.0, "boxes": 2},
        "cat": {"acc@0.5": 0.0, "boxes": 1},
        "the red circle": {"acc@0.5": 1.0, "boxes": 1},
        "star": {"acc@0.5": 0.0, "boxes": 1},
    }
    assert report["summary"] == {"acc@0.5": pytest.approx(4 / 6), "miou": pytest.approx(sum(ious) / 6),
                                 "parse_failures": 1}  # fmt: skip
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "run" / "predictions.jsonl").read_text().splitlines())}
    assert [rows[k]["score"] for k in ("one", "pets", "text", "none")] == pytest.approx([1.0, 0.5, 2 / 3, 0.0])
    assert rows["pets"]["refs"] == [["dog", 0.5], ["dog", 1.0], ["cat", 0.0]]
    assert rows["pets"]["boxes"][0] == {"label": "Dog", "bbox": [60.0, 60.0, 100.0, 100.0]}


def test_matching_takes_the_best_pairs_first():
    """In answer order the first box would take the first reference (IoU 1/3) and leave the second the other box
    (IoU 1/3); best-first finds both references exactly. Labels differ only by case and spaces."""
    refs = [LabeledBox("a box", (0, 0, 10, 10)), LabeledBox("a box", (5, 0, 15, 10))]
    preds = [LabeledBox("A  box.", (5, 0, 15, 10)), LabeledBox("a box", (0, 0, 10, 10))]
    assert match_boxes(refs, preds) == [(0, 1, 1.0), (1, 0, 1.0)]
    assert match_boxes(refs, [LabeledBox("a circle", (0, 0, 10, 10))]) == []
    assert normalize_label("  The  Dog. ") == "the dog" and normalize_label(None) is None


def test_a_row_gives_one_kind_of_reference(tmp_path):
    task = get_task("grounding")
    base = {"question_id": "q", "expression": "x", "width": 10, "height": 10}
    with pytest.raises(DataError, match="f:1: a grounding row needs exactly one of 'bbox', 'boxes' or 'answer', got"):
        task.read({**base, "bbox": [0, 0, 1, 1], "boxes": [{"label": "x", "bbox": [0, 0, 1, 1]}]}, "f:1", tmp_path)
    with pytest.raises(DataError, match="'answer' holds no box"):
        task.read({**base, "answer": "a dog"}, "f:1", tmp_path)
    with pytest.raises(DataError, match=r"boxes\[0\]: 'bbox' must be"):
        task.read({**base, "boxes": [{"label": "x", "bbox": [0, 0, 1]}]}, "f:1", tmp_path)
