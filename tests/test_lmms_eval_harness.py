"""``lmms-eval --model vlmkit`` end to end: lmms-eval's own CLI (0.7.3: ``python -m lmms_eval``, what the
``lmms-eval`` script runs) finds the plugin through its entry point, loads a local task fixture and scores the
built-in ``default`` model on it.

The fixture is an lmms-eval task folder as its task YAML format has it (``lmms_eval/tasks/pope/pope.yaml``:
``dataset_path``, ``test_split``, ``output_type``, ``doc_to_visual``/``doc_to_text`` as ``!function utils.…``,
``generation_kwargs``, ``process_results``, ``metric_list``, ``lmms_eval_specific_kwargs``), with the dataset a
local ``DatasetDict`` folder (``dataset_kwargs: load_from_disk: True``, which ``ConfigurableTask.download``
reads with ``datasets.load_from_disk``), passed with ``--include_path``. Two tasks over one set of ShapesWorld
existence questions: ``generate_until`` scored by exact match, and ``multiple_choice`` (Yes/No, scored by
lmms-eval from the plugin's ``loglikelihood``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest

import vlmkit
from vlmkit.data.shapes import render_scene, sample_scene
from vlmkit.data.tasks import eval_items

pytestmark = pytest.mark.slow

COMMON = """\
dataset_path: {data}
dataset_kwargs:
  load_from_disk: True
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: ""
metadata:
  - version: 0.0
"""
GENERATE = """\
task: vlmkit_fixture_gen
output_type: generate_until
generation_kwargs:
  until: ["\\n\\n"]
  max_new_tokens: 8
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
CHOICE = """\
task: vlmkit_fixture_mc
output_type: multiple_choice
doc_to_choice: ["Yes", "No"]
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
UTILS = """\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs):
    return lmms_eval_specific_kwargs["pre_prompt"] + doc["question"] + lmms_eval_specific_kwargs["post_prompt"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}
"""


def fixture_rows():
    """Every existence question (3 POPE categories × yes/no) of two held-out ShapesWorld scenes."""
    rows = {"question_id": [], "image": [], "question": [], "answer": []}
    for index in range(2):
        scene = sample_scene("test", 0, index)
        image = render_scene(scene)
        for item in eval_items(scene, np.random.default_rng(index)):
            if item.task == "exist":
                rows["question_id"].append(item.question_id)
                rows["image"].append(image)
                rows["question"].append(item.question)
                rows["answer"].append(item.answer)
    return rows


def test_lmms_eval_cli_runs_vlmkit_on_a_local_task(tmp_path):
    rows = fixture_rows()
    text = datasets.Value("string")
    features = datasets.Features({"question_id": text, "image": datasets.Image(), "question": text, "answer": text})
    tasks = tmp_path / "tasks"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(tasks / "data")
    (tasks / "utils.py").write_text(UTILS)
    for name, body in [("gen", GENERATE), ("mc", CHOICE)]:
        (tasks / f"vlmkit_fixture_{name}.yaml").write_text(COMMON.format(data=tasks / "data") + body)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "vlmkit", "--model_args", "model=default,device=cpu",
               "--tasks", "vlmkit_fixture_gen,vlmkit_fixture_mc", "--include_path", str(tasks), "--batch_size", "4",
               "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]
    samples = {}
    for task in ("vlmkit_fixture_gen", "vlmkit_fixture_mc"):
        (path,) = (tmp_path / "out").rglob(f"*_samples_{task}.jsonl")
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples[task]] == list(range(len(rows["question"])))

    # generate_until: each answer is vlmkit's own greedy answer to the question with its image, scored by the task
    vlm = vlmkit.load("default", device="cpu")
    expected = [vlm.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": question}]}],
                         max_new_tokens=8, stop=["\n\n"]) for image, question in zip(rows["image"], rows["question"],
                                                                                     strict=True)]  # fmt: skip
    assert [s["filtered_resps"] for s in samples["vlmkit_fixture_gen"]] == expected
    hits = [a.strip().lower() == g.lower() for a, g in zip(expected, rows["answer"], strict=True)]
    assert results["vlmkit_fixture_gen"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))
    assert sum(hits) >= 9  # the default model answers ShapesWorld existence questions (docs/default-model.md)

    # multiple_choice: lmms-eval picks the choice of lowest loss; the answer vlmkit generates greedily is that
    # choice, with is_greedy true, wherever it is one of the choices
    chosen = []
    for sample, answer in zip(samples["vlmkit_fixture_mc"], expected, strict=True):
        # the samples file writes each (loss, is_greedy) as strings
        (yes_loss, yes_greedy), (no_loss, no_greedy) = [(float(x), g == "True") for x, g in sample["filtered_resps"]]
        chosen.append("Yes" if yes_loss < no_loss else "No")
        assert yes_loss > 0 and no_loss > 0
        if answer in ("Yes", "No"):
            assert chosen[-1] == answer and (yes_greedy, no_greedy) == (answer == "Yes", answer == "No")
    correct = [float(c == g) for c, g in zip(chosen, rows["answer"], strict=True)]
    assert [s["acc"] for s in samples["vlmkit_fixture_mc"]] == correct
    accuracy = np.mean(correct)
    assert results["vlmkit_fixture_mc"]["acc,none"] == pytest.approx(accuracy)
