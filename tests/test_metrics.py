"""Evaluation metrics against hand-checked values (and POPE against scikit-learn)."""

from __future__ import annotations

import math
import random

import pytest

from vlmkit.errors import DataError
from vlmkit.evaluation.metrics import (
    anls,
    binary_metrics,
    caption_metrics,
    caption_tokenize,
    gqa_exact_match,
    grounding_metrics,
    iou,
    levenshtein,
    mcq_accuracy,
    mcq_parse,
    parse_box,
    pope_metrics,
    pope_parse,
    rouge_l,
    vqa_accuracy,
    vqa_normalize_answer,
    vqa_process_punctuation,
)

# --------------------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        ("", "yes"),  # empty counts as yes
        ("Yes", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("no,", "no"),
        ("not sure", "no"),
        ("Yes, there is no cat.", "no"),
        ("There is a cat. No.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # LLaVA matches only No / no / not
        ("Nope", "yes"),
        ("  no  ", "no"),
        ("I do not see one", "no"),
    ],
)
def test_pope_parse(answer, parsed):
    assert pope_parse(answer) == parsed


def test_pope_metrics_constant_yes_by_hand():
    labels = ["yes", "no", "yes", "no", "no", "yes"]
    cats = ["random", "random", "popular", "popular", "popular", "adversarial"]
    m = pope_metrics(["Yes"] * 6, labels, cats)
    assert list(m) == ["overall", "random", "popular", "adversarial"]
    assert m["overall"]["accuracy"] == 0.5
    assert m["overall"]["precision"] == 0.5
    assert m["overall"]["recall"] == 1.0
    assert m["overall"]["f1"] == pytest.approx(2 / 3)
    assert m["overall"]["yes_ratio"] == 1.0
    assert m["popular"]["accuracy"] == pytest.approx(1 / 3)
    assert m["popular"]["f1"] == pytest.approx(0.5)
    assert m["adversarial"]["f1"] == 1.0


def test_pope_yes_ratio_counts_predictions_not_labels():
    m = binary_metrics(["no", "no", "no", "yes"], ["yes", "yes", "yes", "yes"])
    assert m["yes_ratio"] == 0.25
    assert m["precision"] == 1.0 and m["recall"] == 0.25
    empty = binary_metrics(["no", "no"], ["no", "no"])  # no positive at all: zero-division ratios are 0
    assert (empty["precision"], empty["recall"], empty["f1"], empty["accuracy"]) == (0.0, 0.0, 0.0, 1.0)


def test_pope_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    rng = random.Random(0)
    words = ["Yes", "No", "no.", "Yes, it is.", "not sure", "", "I think so"]
    answers = [rng.choice(words) for _ in range(300)]
    labels = [rng.choice(["yes", "no"]) for _ in range(300)]
    cats = [rng.choice(["random", "popular", "adversarial"]) for _ in range(300)]
    m = pope_metrics(answers, labels, cats)
    parsed = [pope_parse(a) for a in answers]
    for name in ["overall", "random", "popular", "adversarial"]:
        idx = [i for i in range(300) if name == "overall" or cats[i] == name]
        y = [labels[i] for i in idx]
        p = [parsed[i] for i in idx]
        got = m[name]
        assert got["accuracy"] == pytest.approx(accuracy_score(y, p))
        assert got["precision"] == pytest.approx(precision_score(y, p, pos_label="yes", zero_division=0))
        assert got["recall"] == pytest.approx(recall_score(y, p, pos_label="yes", zero_division=0))
        assert got["f1"] == pytest.approx(f1_score(y, p, pos_label="yes", zero_division=0))
        assert got["yes_ratio"] == pytest.approx(p.count("yes") / len(p))
        assert got["n"] == len(idx)


def test_pope_bad_label():
    with pytest.raises(DataError, match="yes"):
        pope_metrics(["yes"], ["maybe"])


# ---------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("Two dogs.", "2 dogs"),
        ("2 dogs", "2 dogs"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("A dog", "dog"),
        ("none", "0"),
        ("Ten", "10"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("end.", "end"),
        ("yes , it is", "yes it is"),  # a mark touching a space is deleted
        ("hello-world", "hello world"),  # otherwise it becomes a space
        ("red,blue", "red blue"),
        ("1,000 red,blue", "1000 redblue"),  # digit,digit anywhere: every mark is deleted
        ("it's", "it's"),  # apostrophes are not in the punctuation list
        ("Yes!\n", "yes"),
        ("\tWhite   and   black", "white and black"),
        ("youre", "you're"),
        ("Im", "im"),  # the official table's capitalised keys never match after lower-casing
    ],
)
def test_vqa_normalize(text, normal):
    assert vqa_normalize_answer(text) == normal


def test_vqa_punctuation_only_on_answers():
    assert vqa_process_punctuation("Two dogs.") == "Two dogs"  # no lower-casing, no digits


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out(matches, expected):
    # k of 10 humans agree: each of them sees k-1 others, each of the rest sees k; mean of min(1, ./3)
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_examples():
    assert vqa_accuracy("Two dogs.", ["2 dogs"] * 10) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0
    assert vqa_accuracy("the cat", ["cat"] * 10) == 1.0
    # identical answers are left unprocessed (official), so "Yes." can never be matched ...
    assert vqa_accuracy("yes", ["Yes."] * 10) == 0.0
    # ... but once answers differ they get processPunctuation (only: no lower-casing)
    assert vqa_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("yes", ["Yes."] * 9 + ["no"]) == 0.0
    # TextVQA normalises the answers fully
    assert vqa_accuracy("yes", ["Yes."] * 10, textvqa=True) == 1.0


def test_vqa_fewer_answers():
    assert vqa_accuracy("cat", ["cat"]) == 0.0  # leave-one-out leaves nothing to match
    assert vqa_accuracy("cat", ["cat", "cat"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("cat", ["cat"] * 4) == 1.0
    with pytest.raises(DataError):
        vqa_accuracy("cat", [])


# ---------------------------------------------------------------------------------------------- GQA, ANLS


def test_gqa_exact_match():
    assert gqa_exact_match("Yes.", "yes") == 1.0
    assert gqa_exact_match(" Red. ", ["blue", "red"]) == 1.0
    assert gqa_exact_match("a red", "red") == 0.0
    assert gqa_exact_match("red!", "red") == 0.0


def test_anls():
    assert levenshtein("kitten", "sitting") == 3
    assert anls("helo", ["hello"]) == pytest.approx(0.8)
    assert anls("  Hello   World ", ["hello world"]) == 1.0
    assert anls("abc", ["xyz"]) == 0.0
    assert anls("ab", ["abcd"]) == 0.5  # exactly 0.5 is kept
    assert anls("a", ["abc"]) == 0.0  # 1/3 < 0.5
    assert anls("helo", ["xyz", "hello"]) == pytest.approx(0.8)  # best answer counts
    assert anls("", [""]) == 1.0


# ------------------------------------------------------------------------------------------------ grounding


def test_iou_corner_cases():
    box = (0, 0, 10, 10)
    assert iou(box, box) == 1.0
    assert iou(box, (20, 20, 30, 30)) == 0.0  # no overlap
    assert iou(box, (10, 0, 20, 10)) == 0.0  # touching edges
    assert iou(box, (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou(box, (0, 0, 5, 10)) == 0.5  # contained
    assert iou(box, (5, 5, 5, 5)) == 0.0  # zero area
    assert iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # empty union
    assert iou((10, 10, 0, 0), box) == 0.0  # inverted
    assert iou((0, 10, 10, 0), box) == 0.0


def test_parse_box_formats():
    w, h = 640, 480
    assert parse_box("<ref>the dog</ref><box>(100,200),(500,600)</box>", w, h) == (64.0, 96.0, 320.0, 288.0)
    qwen_vl = parse_box("<box>(999,999),(999,999)</box>", w, h, qwen_scale=999)
    assert qwen_vl == (640.0, 480.0, 640.0, 480.0)
    assert parse_box("<|box_start|>(0,0),(500,1000)<|box_end|>", w, h) == (0.0, 0.0, 320.0, 480.0)
    assert parse_box("[0.1, 0.25, 0.5, 1.0]", w, h) == pytest.approx((64.0, 120.0, 320.0, 480.0))
    assert parse_box("The box is [12, 30, 50, 77].", w, h) == (12.0, 30.0, 50.0, 77.0)
    assert parse_box("[0, 0, 1, 1]", w, h) == (0.0, 0.0, 1.0, 1.0)  # integers are pixels
    assert parse_box("[0, 0, 1, 1]", w, h, box_format="normalized") == (0.0, 0.0, 640.0, 480.0)
    assert parse_box("[0.5, 0.5, 0.9, 0.9]", w, h, box_format="pixels") == (0.5, 0.5, 0.9, 0.9)
    qwen25 = '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}]\n```'
    assert parse_box(qwen25, w, h) == (10.0, 20.0, 30.0, 40.0)
    assert parse_box(qwen25, w, h, input_size=(320, 240)) == (20.0, 40.0, 60.0, 80.0)
    assert parse_box("[10.5, 20, 30, 40.25]", w, h) == (10.5, 20.0, 30.0, 40.25)
    assert parse_box("no box here", w, h) is None
    assert parse_box("[1, 2, 3]", w, h) is None


def test_grounding_metrics():
    m = grounding_metrics([1.0, 0.5, 0.49, None])
    assert m["acc@0.5"] == 0.5
    assert m["miou"] == pytest.approx((1.0 + 0.5 + 0.49) / 4)
    assert m["acc@0.1"] == 0.75
    assert m["acc@0.9"] == 0.25
    assert m["parse_failures"] == 1 and m["n"] == 4
    assert [k for k in m if k.startswith("acc@")] == ["acc@0.5"] + [f"acc@0.{k}" for k in range(1, 10) if k != 5]


# ------------------------------------------------------------------------------------------------- captions


def test_caption_tokenize():
    assert caption_tokenize("A dog's toy, don't (really) \"black-and-white\" 3.5 ... OK.") == (
        "a dog 's toy do n't really black-and-white 3.5 ok"
    )


def test_rouge_l_by_hand():
    assert rouge_l("a b c d", ["a c d e"]) == pytest.approx(0.75)  # LCS 3: P = R = 3/4
    # LCS 2: P = 1, R = 1/2; F = (1 + 1.2^2) P R / (R + 1.2^2 P)
    assert rouge_l("a b", ["a b c d"]) == pytest.approx(2.44 * 0.5 / (0.5 + 1.44))
    assert rouge_l("x y", ["a b c d", "a b"]) == 0.0


def test_caption_metrics_by_hand():
    # Every n-gram precision is 1; brevity penalty exp(1 - 5/3).
    m = caption_metrics(["The cat sat."], [["the cat sat on mats"]])
    assert m["bleu1"] == pytest.approx(math.exp(1 - 5 / 3), rel=1e-6)
    assert m["bleu3"] == pytest.approx(math.exp(1 - 5 / 3), rel=1e-6)
    # Exact captions whose n-grams no other image shares: every n-gram cosine is 1, so CIDEr = 10.
    preds = ["Red circle, on the left.", "blue square at top right"]
    refs = [["red circle on the left"], ["blue square at top right"]]
    m = caption_metrics(preds, refs)
    assert m["cider"] == pytest.approx(10.0)
    assert m["rouge_l"] == pytest.approx(1.0)
    assert m["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert m["n"] == 2
    with pytest.raises(DataError):
        caption_metrics(["x"], [[""]])


# ------------------------------------------------------------------------------------------ multiple choice


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B. dog", "B"),
        ("B) dog", "B"),
        ("The answer is B", "B"),
        ("The answer is (C).", "C"),
        ("Answer: D", "D"),
        ("I think it is D", "D"),
        ("dog", "B"),  # the text of one option
        ("It is a fish.", "D"),
        ("A cat", "A"),  # "A" + option A's text
        ("A bird", "C"),  # "A" is an article here
        ("A", "A"),
        ("E", None),  # not an option
        ("I think", None),
        ("", None),
        ("cat or dog", None),
    ],
)
def test_mcq_parse(answer, letter):
    assert mcq_parse(answer, ["cat", "dog", "bird", "fish"]) == letter


def test_mcq_accuracy():
    assert mcq_accuracy(["B", "(A)", "The answer is C", "D"], ["B", "A", "D", "d"]) == 0.75
    assert mcq_parse("C", 2) is None
