"""The eval-task seam: a task registered from outside the package runs through the runner like the built-in
ones; unknown and duplicate names are refused; the ShapesWorld suite scores through the registered tasks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmkit.errors import RegistryError
from vlmkit.evaluation import evaluate
from vlmkit.evaluation.shapesworld import ShapesWorldSuite
from vlmkit.evaluation.tasks import TASKS, EvalSample, Task, get_task, register_task, task_names
from vlmkit.evaluation.tasks.rows import get_field

BUILT_IN = [
    "pope",
    "vqa",
    "gqa",
    "textvqa",
    "docvqa",
    "grounding",
    "caption",
    "mcq",
    "mme",
    "mmbench",
    "chartqa",
    "seedbench",
    "mmstar",
]


class KeywordTask(Task):
    """Right when the answer contains the row's ``keyword``; accuracy (the base aggregate)."""

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        return self._qa_sample(row, where, image_root, {"keyword": get_field(row, ("keyword",), where).lower()})

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return {"score": float(sample.reference["keyword"] in prediction.lower())}


@pytest.fixture
def keyword() -> Iterator[type[Task]]:
    KeywordTask.name = "keyword"
    with TASKS.temporary("keyword", KeywordTask):  # other tests see the built-in tasks only
        yield KeywordTask


def test_a_registered_task_runs_through_the_runner(tmp_path, keyword):
    assert task_names() == [*BUILT_IN, "keyword"] and KeywordTask.name == "keyword"
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = [{"id": i, "image": "a.png", "question": f"Colour {i}?", "keyword": "red"} for i in range(4)]
    data = tmp_path / "keyword.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def predict(conversations: list[list[dict[str, Any]]]) -> list[str]:
        return ["It is red." if "0" in c[0]["content"][-1]["text"] else "Blue." for c in conversations]

    out = tmp_path / "run"
    report = evaluate(predict, "keyword", data, out_dir=out, batch_size=3, progress=False)
    assert report["task"] == "keyword" and report["summary"] == {"accuracy": 0.25}
    assert report["metrics"] == {"accuracy": 0.25, "n": 4}
    saved = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["score"] for r in saved] == [1.0, 0.0, 0.0, 0.0]
    assert get_task("keyword", prompt_suffix=" Answer briefly.").read(rows[0], "x", tmp_path).prompt == (
        "Colour 0? Answer briefly."
    )


def test_unknown_task_names_are_refused_listing_the_valid_ones(tmp_path):
    listed = ", ".join(BUILT_IN)
    with pytest.raises(RegistryError, match=f"unknown evaluation task 'keyword'; choose from {listed}$"):
        get_task("keyword")
    with pytest.raises(RegistryError, match=f"unknown evaluation task 'keyword'; valid names: {listed}$"):
        TASKS.get("keyword")
    with pytest.raises(RegistryError, match="choose from pope, vqa"):
        evaluate(lambda convs: [], "keyword", tmp_path / "none.jsonl", progress=False)


def test_a_task_name_is_registered_once():
    class Twice(Task):
        """A second 'pope'."""

    with pytest.raises(RegistryError, match="evaluation task 'pope' is already registered"):
        register_task("pope")(Twice)
    assert Twice.name == "" and task_names() == BUILT_IN and TASKS.get("pope").__name__ == "PopeTask"


def test_the_suite_scores_through_the_registered_tasks():
    parts = ShapesWorldSuite().parts
    assert list(parts) == ["exist", "attribute", "position", "count", "grounding", "text", "caption"]
    assert type(parts["exist"]) is TASKS.get("pope") and type(parts["grounding"]) is TASKS.get("grounding")
    assert type(parts["caption"].captions) is TASKS.get("caption")
