"""MME, MMBench (CircularEval), ChartQA, SEED-Bench and MMStar, each on a small fixture whose score is worked out
by hand in the test, read from the shapes those benchmarks ship in (parquet with image bytes as on the hub,
a datasets DatasetDict folder, JSONL/TSV-style rows)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmkit.errors import ConfigError, DataError
from vlmkit.evaluation import evaluate, get_task
from vlmkit.evaluation.metrics import can_infer, mme_parse, mmstar_exact_match, relaxed_correctness
from vlmkit.evaluation.runner import load_samples


def png(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A parquet file as the hub stores image datasets: images as ``struct<bytes, path>``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def oracle(task_name: str, path: Path, answers: dict[str, str], **options: Any):
    """A predictor that answers each prompt from ``answers``, keyed by a substring of the prompt."""

    def predict(conversations: list[list[dict[str, Any]]]) -> list[str]:
        out = []
        for conversation in conversations:
            prompt = conversation[-1]["content"][-1]["text"]
            hits = [answer for key, answer in answers.items() if key in prompt]
            assert len(hits) == 1, prompt
            out.append(hits[0])
        return out

    return evaluate(predict, task_name, path, progress=False, task_options=options or None)


# -- MME ------------------------------------------------------------------------------------------------------
def test_mme_parsing_is_the_official_tools():
    """MME ``eval_tool/calculation.py`` ``parse_pred_ans`` on the lower-cased answer, no stripping."""
    assert [mme_parse(a) for a in ["Yes", "NO", "yes.", "Yes, it is", " yes", "  yes", "Not at all", "I think so"]] == [
        "yes", "no", "yes", "yes", "yes", "other", "no", "other"
    ]  # fmt: skip


def test_mme_scores_from_hub_parquet(tmp_path):
    """Rows as lmms-lab/MME's parquet (question_id = the image's name shared by its two questions, image bytes,
    answer Yes/No, category = subtask). By hand, with MME's acc (per question) and acc+ (per image):

    existence, image e1: yes→"Yes" ✓, no→"No." ✓ (prefix has "no"); image e2: yes→"yes, there is" ✓, no→"Yes" ✗
      acc 3/4 = 0.75, acc+ 1/2 = 0.5, score 75 + 50 = 125
    count, image c1: yes→"I don't know" ✗ (other), no→"  no" ✓ ("  no"[:4] holds "no"): acc 1/2, acc+ 0 → 50
    code_reasoning, image r1: yes→"Yes" ✓, no→"no" ✓: acc 1, acc+ 1 → 200
    perception = 125 + 50 = 175; cognition = 200; total = 375.
    """
    image = {"bytes": png(), "path": "x.png"}
    rows = [
        ("existence", "e1.png", "Is there a cat? Please answer yes or no.", "Yes", "Yes"),
        ("existence", "e1.png", "Is there a dog? Please answer yes or no.", "No", "No."),
        ("existence", "e2.png", "Is there a bird? Please answer yes or no.", "Yes", "yes, there is"),
        ("existence", "e2.png", "Is there a fish? Please answer yes or no.", "No", "Yes"),
        ("count", "c1.png", "Are there two cats? Please answer yes or no.", "Yes", "I don't know"),
        ("count", "c1.png", "Are there five cats? Please answer yes or no.", "No", "  no"),
        ("code_reasoning", "r1.png", "Does it print 3? Please answer yes or no.", "Yes", "Yes"),
        ("code_reasoning", "r1.png", "Does it print 4? Please answer yes or no.", "No", "no"),
    ]
    data = write_parquet(tmp_path / "mme.parquet", [
        {"question_id": f"{task}/{img}", "image": image, "question": q, "answer": a, "category": task}
        for task, img, q, a, _ in rows
    ])  # fmt: skip
    report = oracle("mme", data, {q: pred for _, _, q, _, pred in rows})
    metrics = report["metrics"]
    assert metrics["subtasks"]["existence"] | {} == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0, "questions": 4,
                                                     "images": 2, "other": 0}  # fmt: skip
    assert metrics["subtasks"]["count"]["score"] == 50.0 and metrics["subtasks"]["count"]["other"] == 1
    assert (metrics["perception"], metrics["cognition"], metrics["total"]) == (175.0, 200.0, 375.0)
    assert report["summary"]["total"] == 375.0
    sample = load_samples(get_task("mme"), data)[0]
    assert isinstance(sample.image, bytes) and sample.prompt.endswith("yes or no.\nAnswer the question using a "
                                                                      "single word or phrase.")  # fmt: skip


# -- MMBench --------------------------------------------------------------------------------------------------
def test_vlmevalkit_choice_extraction():
    """VLMEvalKit ``vlmeval/utils/matching_util.py`` ``can_infer`` (option letter, then option text)."""
    choices = {"A": "cat", "B": "dog", "C": "bird"}
    assert can_infer("B", dict(choices)) == "B"
    assert can_infer("The answer is (C).", dict(choices)) == "C"
    assert can_infer("a dog, I think", dict(choices)) == "B"  # no lone letter; one option's text
    assert can_infer("A or B", dict(choices)) is None  # two letters
    assert can_infer("a cat or a dog", dict(choices)) is None  # two texts
    assert can_infer("Z", dict(choices)) == "Z"
    assert can_infer("Cannot determine the answer", dict(choices)) == "Z"


def test_mmbench_circular_eval(tmp_path):
    """MMBench TSV rows (index, hint, question, A..D, answer, category); rotations as LLaVA's
    ``model_vqa_mmbench`` (``options[1:] + options[:1]``), a question right only if every pass is (CircularEval).

    q0 options cat/dog/bird, answer B(dog): pass 0 [cat,dog,bird] → B: "B" ✓; pass 1 [dog,bird,cat] → A:
      "The answer is A." ✓; pass 2 [bird,cat,dog] → C: "dog" ✓ (option text) → q0 right
    q1 options red/blue, answer A(red), with a hint: pass 0 [red,blue] → A: "A" ✓; pass 1 [blue,red] → B: "A" ✗
    circular = 1/2 = 0.5; vanilla (pass 0 only) = 2/2 = 1.0; by category: animals 1.0, colours 0.0.
    """
    rows = [
        {"index": 0, "question": "Which animal barks?", "hint": None, "A": "cat", "B": "dog", "C": "bird", "D": None,
         "answer": "B", "category": "animals", "l2-category": "perception"},
        {"index": 1, "question": "Which colour is the sky at dusk?", "hint": "Look closely.", "A": "red",
         "B": "blue", "C": "nan", "D": "nan", "answer": "A", "category": "colours", "l2-category": "perception"},
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "mmbench.jsonl", rows)
    answers = {"barks?\nA. cat\nB. dog": "B", "barks?\nA. dog\nB. bird": "The answer is A.",
               "barks?\nA. bird\nB. cat": "dog", "Look closely.\nWhich colour": "A"}  # fmt: skip
    report = oracle("mmbench", data, answers)
    metrics = report["metrics"]
    assert (metrics["circular_accuracy"], metrics["vanilla_accuracy"], metrics["questions"], metrics["n"]) == (
        0.5, 1.0, 2, 5
    )  # fmt: skip
    assert metrics["by_category"] == {"animals": 1.0, "colours": 0.0} and metrics["unparsed"] == 0
    prompts = [s.prompt for s in load_samples(get_task("mmbench"), data)]
    assert prompts[3] == ("Look closely.\nWhich colour is the sky at dusk?\nA. red\nB. blue\n"
                          "Answer with the option's letter from the given choices directly.")  # fmt: skip


def test_mmbench_with_vlmevalkit_circular_copies(tmp_path):
    """A file that already holds the copies (VLMEvalKit: index i + r × 1e6, grouped by index % 1e6) is used as
    given: q0 [cat,dog] answer A and its copy [dog,cat] answer B. Answers A, A: the copy is wrong → 0/1.
    circular=False scores every row as a question of its own: (1 + 0) / 2 = 0.5."""
    rows = [
        {"index": 0, "question": "Which purrs?", "A": "cat", "B": "dog", "answer": "A"},
        {"index": 1_000_000, "question": "Which purrs?", "A": "dog", "B": "cat", "answer": "B"},
    ]
    data = write_jsonl(tmp_path / "circular.jsonl", rows)
    assert oracle("mmbench", data, {"purrs": "A"})["metrics"]["circular_accuracy"] == 0.0
    assert oracle("mmbench", data, {"purrs": "A"}, circular=False)["metrics"]["vanilla_accuracy"] == 0.5
    with pytest.raises(DataError, match="already holds circular copies"):
        load_samples(get_task("mmbench", circular="generate"), data)
    with pytest.raises(ConfigError, match="circular must be"):
        get_task("mmbench", circular="yes")


# -- ChartQA --------------------------------------------------------------------------------------------------
def test_relaxed_correctness_is_pix2structs():
    """pix2struct ``pix2struct/metrics.py`` ``relaxed_correctness(target, prediction)``, 5%."""
    assert relaxed_correctness("12", "12.5") and not relaxed_correctness("12", "12.7")  # 4.2% vs 5.8%
    assert relaxed_correctness("40%", "0.41")  # 40% is 0.4; 0.41 is 2.5% off
    assert not relaxed_correctness("0", "0.0")  # a zero target falls back to string match
    assert relaxed_correctness("Yes", "yes") and not relaxed_correctness("Brazil", "Brazil.")


def test_chartqa_from_a_datasets_dict_folder(tmp_path):
    """Rows as HuggingFaceM4/ChartQA (query, label list, human_or_machine, an Image feature; no id: the row's
    position is its id), saved with ``save_to_disk`` as a DatasetDict. By hand:

    human (0): "12"←"12.5" ✓ (4.2%), "40%"←"0.41" ✓ (2.5%), "Brazil"←"Brazil." ✗ → 2/3
    augmented (1): "Yes"←"yes" ✓, "0"←"0.0" ✗ (zero target: string match), "100"←"94" ✗ (6%) → 1/3
    overall 3/6 = 0.5; the two splits' mean (2/3 + 1/3) / 2 = 0.5.
    """
    from datasets import Dataset, DatasetDict
    from datasets import Image as ImageFeature

    rows = [("How many bars?", "12", 0, "12.5"), ("What share is blue?", "40%", 0, "0.41"),
            ("Which country leads?", "Brazil", 0, "Brazil."), ("Is it rising?", "Yes", 1, "yes"),
            ("What is the minimum?", "0", 1, "0.0"), ("What is the maximum?", "100", 1, "94")]  # fmt: skip
    test = Dataset.from_dict({
        "image": [{"bytes": png(), "path": None}] * len(rows), "query": [r[0] for r in rows],
        "label": [[r[1]] for r in rows], "human_or_machine": [r[2] for r in rows],
    }).cast_column("image", ImageFeature())  # fmt: skip
    DatasetDict({"train": test.select([0]), "test": test}).save_to_disk(str(tmp_path / "chartqa"))
    with pytest.raises(DataError, match="holds the splits train, test; choose one with --split"):
        load_samples(get_task("chartqa"), tmp_path / "chartqa")
    predict = {r[0]: r[3] for r in rows}

    def predictor(conversations):
        return [predict[c[-1]["content"][-1]["text"].split("\n")[0]] for c in conversations]

    report = evaluate(predictor, "chartqa", tmp_path / "chartqa", split="test", progress=False)
    metrics = report["metrics"]
    assert metrics["relaxed_accuracy"] == 0.5 and metrics["relaxed_average"] == pytest.approx(0.5)
    assert metrics["relaxed_human"] == pytest.approx(2 / 3) and metrics["relaxed_augmented"] == pytest.approx(1 / 3)
    assert report["data"].endswith("chartqa[test]") and report["counts"]["samples"] == 6
    assert isinstance(load_samples(get_task("chartqa"), tmp_path / "chartqa", split="test")[0].image, bytes)


# -- SEED-Bench and MMStar ------------------------------------------------------------------------------------
def test_seedbench_as_llava_scores_it(tmp_path):
    """SEED-Bench rows (question_id, choice_a..d, answer, question_type_id, data_type); LLaVA's
    ``convert_seed_for_submission.py``: the (stripped) answer must equal the letter. By hand:

    type 1: "A" for A ✓, "B." for B ✗ (not exactly the letter); type 2: " C\\n" for C ✓; type 9: "The answer is D"
    for D ✗ → accuracy 2/4 = 0.5; Scene Understanding 1/2, Instance Identity 1/1, Text Understanding 0/1.
    lmms-eval's first character rule (parse="first_char"): "B." → B ✓, "The…" → T ✗ → 3/4 = 0.75.
    """
    preds = ["A", "B.", " C\n", "The answer is D"]
    rows = [{"question_id": f"q{i}", "question": f"Question {i}?", "choice_a": "w", "choice_b": "x", "choice_c": "y",
             "choice_d": "z", "answer": "ABCD"[i], "question_type_id": t, "data_type": "image"}
            for i, t in enumerate([1, 1, 2, 9])]  # fmt: skip
    data = write_jsonl(tmp_path / "seed.jsonl", rows)
    answers = {f"Question {i}?": p for i, p in enumerate(preds)}
    metrics = oracle("seedbench", data, answers)["metrics"]
    assert metrics["accuracy"] == 0.5
    assert metrics["by_group"] == {"Scene Understanding": 0.5, "Instance Identity": 1.0, "Text Understanding": 0.0}
    assert oracle("seedbench", data, answers, parse="first_char")["metrics"]["accuracy"] == 0.75
    write_jsonl(tmp_path / "video.jsonl", [{**rows[0], "data_type": "video"}])
    with pytest.raises(DataError, match="video question"):
        load_samples(get_task("seedbench"), tmp_path / "video.jsonl")


def test_mmstar_exact_match_is_mmstars():
    """MMStar's ``exact_match`` (lmms-eval ``tasks/mmstar/utils.py``, "Brought from MMStar")."""
    assert [mmstar_exact_match(p, "B") for p in ["B", "b) dog", "(B)", "Option B", "The answer is B", "", "A"]] == [
        1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0
    ]  # fmt: skip


def test_mmstar_from_a_hub_parquet_folder(tmp_path):
    """Rows as Lin-Chen/MMStar (index, question with its options, answer, category, l2_category, image bytes) in
    the hub's layout (data/val-00000-of-00001.parquet). lmms-eval's aggregation: a category's score is the mean
    of its sub-categories' accuracies; ``average`` is the mean over all sub-categories. By hand:

    coarse perception / image scene and topic: "A"→A ✓, "(B) dog"→B ✓ → 1.0; image emotion: "D"→C ✗ → 0.0
    math / geometry: "the answer is A" ✓, "" ✗, "c"→C ✓ → 2/3
    coarse perception = (1 + 0) / 2 = 0.5; math = 2/3; average = (1 + 0 + 2/3) / 3 = 5/9; accuracy = 4/6.
    """
    image = {"bytes": png((10, 200, 10)), "path": None}
    spec = [("coarse perception", "image scene and topic", "A", "A"), ("coarse perception", "image scene and topic",
            "B", "(B) dog"), ("coarse perception", "image emotion", "C", "D"), ("math", "geometry", "A",
            "the answer is A"), ("math", "geometry", "B", ""), ("math", "geometry", "C", "c")]  # fmt: skip
    write_parquet(tmp_path / "mmstar" / "data" / "val-00000-of-00001.parquet", [
        {"index": i, "question": f"Question {i}?\nOptions: A: w, B: x, C: y, D: z", "answer": ans, "category": cat,
         "l2_category": l2, "image": image, "meta_info": {"source": "test"}}
        for i, (cat, l2, ans, _) in enumerate(spec)
    ])  # fmt: skip
    metrics = oracle("mmstar", tmp_path / "mmstar", {f"Question {i}?": s[3] for i, s in enumerate(spec)})["metrics"]
    assert metrics["average"] == pytest.approx(5 / 9) and metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["by_category"] == pytest.approx({"coarse perception": 0.5, "math": 2 / 3})


def test_source_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a datasets dataset"):
        load_samples(get_task("mmstar"), tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        load_samples(get_task("mmstar"), tmp_path / "none.jsonl")
    write_parquet(tmp_path / "two" / "test-0.parquet", [{"index": 0}])
    write_parquet(tmp_path / "two" / "val-0.parquet", [{"index": 0}])
    with pytest.raises(DataError, match="holds the splits test, val"):
        load_samples(get_task("mmstar"), tmp_path / "two")
    with pytest.raises(DataError, match="no split 'dev'"):
        load_samples(get_task("mmstar"), tmp_path / "two", split="dev")


def test_textvqa_with_or_without_ocr_tokens():
    """lmms-eval ``tasks/textvqa/utils.py`` (``ocr: true``) and LLaVA-1.5's ``llava_textvqa_val_v051_ocr.jsonl``
    write the OCR tokens into the prompt as ``\\nReference OCR token: a, b``; lmms-eval's default leaves them out."""
    row = {"question_id": 1, "question": "what brand is it?", "answers": ["dakota"] * 10,
           "ocr_tokens": ["Dakota", "Digital"]}  # fmt: skip
    suffix = "\nAnswer the question using a single word or phrase."
    assert get_task("textvqa").read(row, "x", Path(".")).prompt == "what brand is it?" + suffix
    assert get_task("textvqa", ocr=True).read(row, "x", Path(".")).prompt == (
        "what brand is it?\nReference OCR token: Dakota, Digital" + suffix
    )
