"""Evaluation metrics exactly as the field defines them: pure functions, no model, no files.

Sources: POPE parsing and metrics from LLaVA's ``llava/eval/eval_pope.py``; VQA accuracy from the official
``vqaEval.py`` (GT-Vision-Lab/VQA); GQA exact match from LLaVA; ANLS from DocVQA; grounding from RefCOCO-style
evaluation; captions through pycocoevalcap's pure-Python BLEU, ROUGE-L and CIDEr scorers; MME from its
``eval_tool/calculation.py``; MMBench/MMStar choice extraction from VLMEvalKit's ``matching_util.py`` and MMStar's
``exact_match``; ChartQA's relaxed accuracy from pix2struct's ``metrics.py``. See
``docs/evaluation.md`` for every rule in words.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Literal

from vlmkit.errors import DataError
from vlmkit.evaluation import _vqa_tables as vqa_tables

Box = tuple[float, float, float, float]

# ----------------------------------------------------------------------------------------------------- POPE


def pope_parse(answer: str) -> str:
    """LLaVA's POPE parsing: ``"yes"`` or ``"no"``.

    The text (stripped of surrounding whitespace, as LLaVA strips generations) is cut at the first ``.``,
    commas are dropped and it is split on spaces; any word ``No``, ``no`` or ``not`` makes it ``"no"``,
    anything else (an empty answer included) is ``"yes"``.
    """
    text = answer.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(word in ("No", "no", "not") for word in words) else "yes"


def _yes_no(label: str) -> str:
    value = str(label).strip().lower()
    if value not in ("yes", "no"):
        raise DataError(f"POPE label must be 'yes' or 'no', got {label!r}")
    return value


def binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 and yes-ratio of parsed ``yes``/``no`` answers, ``yes`` positive.

    The yes-ratio is the share of *predictions* that are yes (LLaVA). A ratio with a zero denominator is 0.
    """
    if len(predictions) != len(labels):
        raise DataError(f"{len(predictions)} predictions for {len(labels)} labels")
    preds = [_yes_no(p) for p in predictions]
    gold = [_yes_no(g) for g in labels]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, gold, strict=True))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gold, strict=True))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, gold, strict=True))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gold, strict=True))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def pope_metrics(
    answers: Sequence[str], labels: Sequence[str], categories: Sequence[str | None] | None = None
) -> dict[str, dict[str, float | int]]:
    """POPE metrics ``{"overall": ..., <category>: ...}`` from raw model answers (parsed by :func:`pope_parse`).

    Categories appear in order of first occurrence; samples whose category is None count only in ``overall``.
    """
    parsed = [pope_parse(a) for a in answers]
    out = {"overall": binary_metrics(parsed, labels)}
    if categories is not None:
        if len(categories) != len(parsed):
            raise DataError(f"{len(categories)} categories for {len(parsed)} answers")
        for category in dict.fromkeys(c for c in categories if c is not None):
            idx = [i for i, c in enumerate(categories) if c == category]
            out[str(category)] = binary_metrics([parsed[i] for i in idx], [labels[i] for i in idx])
    return out


# ------------------------------------------------------------------------------------------------------ VQA


def vqa_process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each listed mark is deleted if it touches a space (or the text holds
    ``digit,digit``), else replaced by a space; then periods not followed by a digit are removed."""
    out = text
    comma_number = vqa_tables.COMMA_STRIP.search(text) is not None
    for p in vqa_tables.PUNCTUATION:
        delete = p + " " in text or " " + p in text or comma_number
        out = out.replace(p, "" if delete else " ")
    return vqa_tables.PERIOD_STRIP.sub("", out, count=vqa_tables.PERIOD_STRIP_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words → digits, drop articles, contractions."""
    words = [vqa_tables.MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in vqa_tables.ARTICLES]
    return " ".join(vqa_tables.CONTRACTIONS.get(word, word) for word in words)


def vqa_normalize_answer(text: str) -> str:
    """Full VQA normalisation of a prediction: ``\\n``/``\\t`` → space, strip, punctuation, digits and articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, textvqa: bool = False) -> float:
    """VQA accuracy of one prediction against the human answers (usually 10).

    For each human answer, ``min(1, matches among the other answers / 3)``; the mean over all answers. VQAv2
    applies only ``processPunctuation`` to the answers, and only when they are not all identical; TextVQA
    (``textvqa=True``) normalises the answers fully, like the prediction. With fewer than 10 answers the same
    leave-one-out runs over those given (so fewer than 4 identical answers can never reach 1).
    """
    if not answers:
        raise DataError("VQA accuracy needs at least one ground-truth answer")
    pred = vqa_normalize_answer(prediction)
    if textvqa:
        gts = [vqa_normalize_answer(a) for a in answers]
    elif len(set(answers)) > 1:
        gts = [vqa_process_punctuation(a) for a in answers]
    else:
        gts = list(answers)
    matches = sum(gt == pred for gt in gts)
    scores = [min(1.0, (matches - (gt == pred)) / 3) for gt in gts]
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------- GQA, ANLS


def gqa_exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the prediction, stripped, with trailing periods removed and lower-cased, equals an answer (LLaVA)."""
    options = [answers] if isinstance(answers, str) else list(answers)
    pred = prediction.strip().rstrip(".").lower()
    return float(any(pred == a.strip().lower() for a in options))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions and substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one question: ``1 - min over answers of Levenshtein / max length`` after lower-casing and
    collapsing whitespace; a value below ``threshold`` counts as 0."""
    if not answers:
        raise DataError("ANLS needs at least one ground-truth answer")

    def norm(text: str) -> str:
        return " ".join(text.strip().lower().split())

    pred = norm(prediction)
    distances = []
    for answer in answers:
        gt = norm(answer)
        length = max(len(pred), len(gt))
        distances.append(levenshtein(pred, gt) / length if length else 0.0)
    value = 1.0 - min(distances)
    return 0.0 if value < threshold else value


# ------------------------------------------------------------------------------------------------ grounding

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_BBOX_2D = re.compile(r"[\"']?bbox_2d[\"']?\s*:\s*\[([^\]]*)\]")
_QWEN_PAIRS = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_LIST = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")


def _scale(box: Sequence[float], sx: float, sy: float) -> Box:
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def parse_box(
    text: str,
    width: float,
    height: float,
    *,
    box_format: Literal["auto", "pixels", "normalized"] = "auto",
    qwen_scale: float = 1000.0,
    input_size: tuple[float, float] | None = None,
) -> Box | None:
    """The first box in a model answer, as ``(x1, y1, x2, y2)`` pixels of a ``width`` × ``height`` image.

    Recognised, in this order: Qwen2.5-VL JSON ``"bbox_2d": [x1, y1, x2, y2]`` (absolute pixels); Qwen-VL /
    Qwen2-VL ``(x1,y1),(x2,y2)`` (inside ``<box>`` or not), normalised to ``[0, qwen_scale)`` (1000 for
    Qwen2-VL; Qwen-VL's own evaluation divides by 999); ``[x1, y1, x2, y2]``, read as 0-1 fractions when
    ``box_format`` is ``normalized`` or, under ``auto``, when all four lie in [0, 1] and one is written with a
    decimal point, else as pixels. Absolute pixel boxes refer to ``input_size`` (the model's resized input,
    ``(w, h)``) when given and are rescaled to the image. Returns None when no box is found. Boxes are not
    reordered or clipped.
    """
    pixel_scale = (1.0, 1.0) if input_size is None else (width / input_size[0], height / input_size[1])
    match = _BBOX_2D.search(text)
    if match:
        values = re.findall(_NUM, match.group(1))
        if len(values) == 4:
            return _scale([float(v) for v in values], *pixel_scale)
    match = _QWEN_PAIRS.search(text)
    if match:
        return _scale([float(v) for v in match.groups()], width / qwen_scale, height / qwen_scale)
    match = _LIST.search(text)
    if match is None:
        return None
    raw = match.groups()
    values = [float(v) for v in raw]
    normalized = box_format == "normalized" or (
        box_format == "auto" and all(0.0 <= v <= 1.0 for v in values) and any("." in v for v in raw)
    )
    return _scale(values, width, height) if normalized else _scale(values, *pixel_scale)


def iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes in continuous coordinates.

    A box with ``x2 <= x1`` or ``y2 <= y1`` (zero-area or inverted) has no area; when the union is empty the
    IoU is 0.
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a)
    bx1, by1, bx2, by2 = (float(v) for v in box_b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


GROUNDING_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))


def grounding_metrics(ious: Sequence[float | None]) -> dict[str, float | int]:
    """``acc@0.5`` (share with IoU ≥ 0.5), mean IoU, ``acc@0.1`` .. ``acc@0.9`` and the count of answers with
    no parsable box (``None``, scored as IoU 0)."""
    values = [0.0 if v is None else float(v) for v in ious]
    n = len(values)
    out: dict[str, float | int] = {
        "acc@0.5": sum(v >= 0.5 for v in values) / n if n else 0.0,
        "miou": sum(values) / n if n else 0.0,
    }
    for t in GROUNDING_THRESHOLDS:
        out[f"acc@{t}"] = sum(v >= t for v in values) / n if n else 0.0
    out["parse_failures"] = sum(v is None for v in ious)
    out["n"] = n
    return out


# ------------------------------------------------------------------------------------------------- captions

# Tokens that pycocoevalcap's PTBTokenizer removes after tokenising; brackets and quotes are first turned into
# -LRB-/`` etc. by the Java tokenizer and then removed, so they are dropped here too.
_PTB_DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]", "{", "}", '"'}
_CAPTION_TOKEN = re.compile(
    r"[^\W_]+?(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,:]\d+)+|[^\W_]+(?:-[^\W_]+)*|\.\.\.|--|\S"
)


def caption_tokenize(text: str) -> str:
    """Pure-Python stand-in for the Java PTB tokenizer: lower-case, split off punctuation and clitics
    (``don't`` → ``do n't``, ``dog's`` → ``dog 's``), drop the punctuation tokens PTBTokenizer drops."""
    tokens = _CAPTION_TOKEN.findall(text.lower().replace("\n", " "))
    return " ".join(t for t in tokens if t not in _PTB_DROP)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L (pycocoevalcap, beta 1.2) of one tokenised caption against its references."""
    from pycocoevalcap.rouge.rouge import Rouge

    return float(Rouge().calc_score([caption_tokenize(prediction)], [caption_tokenize(r) for r in references]))


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """Corpus BLEU-1..4, ROUGE-L and CIDEr (pycocoevalcap's ``Cider``: CIDEr-D, clipped with the length
    penalty, sigma 6) over tokenised captions. CIDEr's IDF comes from the references of this set."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} captions for {len(references)} reference sets")
    n = len(predictions)
    if n == 0:
        return {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0, "rouge_l": 0.0, "cider": 0.0, "n": 0}
    res = {i: [caption_tokenize(p)] for i, p in enumerate(predictions)}
    gts = {}
    for i, refs in enumerate(references):
        tokenised = [caption_tokenize(r) for r in refs]
        if not tokenised or not any(tokenised):
            raise DataError(f"caption {i} has no non-empty reference")
        gts[i] = tokenised
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out: dict[str, float | int] = {f"bleu{k + 1}": float(bleu[k]) for k in range(4)}
    out.update(rouge_l=float(rouge), cider=float(cider), n=n)
    return out


# ------------------------------------------------------------------------------------------ multiple choice

_LETTERS = string.ascii_uppercase


def _option_letters(options: int | Sequence[str]) -> str:
    count = options if isinstance(options, int) else len(options)
    if not 1 <= count <= len(_LETTERS):
        raise DataError(f"a multiple-choice question needs 1 to {len(_LETTERS)} options, got {count}")
    return _LETTERS[:count]


def _norm_words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def mcq_parse(answer: str, options: int | Sequence[str] = 4) -> str | None:
    """The option letter an answer picks, or None.

    ``options`` is the number of options or their texts (which also lets an answer name the option). Tried in
    order: a leading letter (``B``, ``(B)``, ``B.``, ``B) cat``, ``B cat``; a leading ``A``/``I`` followed by a
    word counts only if the rest is that option's text); ``answer is B`` / ``Answer: (B)`` / ``option B``; a
    single letter in parentheses; the text of exactly one option; a single option letter standing alone.
    """
    letters = _option_letters(options)
    texts = None if isinstance(options, int) else [_norm_words(str(o)) for o in options]
    text = answer.strip()
    if not text:
        return None
    lead = re.match(r"^[\(\[]?([A-Z])(?=[\)\]]|[.:,](?!\d)|\s|$)", text)
    if lead and lead.group(1) in letters:
        letter, rest = lead.group(1), text[lead.end() :]
        ambiguous = letter in "AI" and re.match(r"\s+[a-z]", rest) is not None  # "A cat", "I think"
        if not ambiguous or (texts and _norm_words(rest) == texts[letters.index(letter)]):
            return letter
    said = re.search(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?:?\s*[\(\[]?([A-Z])(?![A-Za-z])", text)
    if said and said.group(1) in letters:
        return said.group(1)
    bracketed = set(re.findall(r"\(([A-Z])\)", text)) & set(letters)
    if len(bracketed) == 1:
        return bracketed.pop()
    if texts:
        pred = _norm_words(text)
        if pred in texts:
            return letters[texts.index(pred)]
        named = {i for i, t in enumerate(texts) if t and re.search(rf"\b{re.escape(t)}\b", pred)}
        if len(named) == 1:
            return letters[named.pop()]
    alone = {
        m.group(1)
        for m in re.finditer(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])", text)
        if m.group(1) in letters and not (m.group(1) in "AI" and re.match(r"\s+[a-z]", text[m.end() :]))
    }
    return alone.pop() if len(alone) == 1 else None


def mcq_accuracy(answers: Sequence[str], targets: Sequence[str], options: int | Sequence[str] = 4) -> float:
    """Share of answers whose :func:`mcq_parse` letter equals the target letter."""
    if len(answers) != len(targets):
        raise DataError(f"{len(answers)} answers for {len(targets)} targets")
    if not answers:
        return 0.0
    return sum(mcq_parse(a, options) == t.strip().upper() for a, t in zip(answers, targets, strict=True)) / len(answers)


# ------------------------------------------------------------------------------------------------------ MME


def mme_parse(answer: str) -> str:
    """MME's ``eval_tool/calculation.py`` ``parse_pred_ans`` on the lower-cased answer: exactly ``yes`` / ``no``,
    else ``yes`` if its first 4 characters contain "yes", else ``no`` if they contain "no", else ``other``.
    (No stripping: " yes" reads yes, "  yes" is other, "Not sure" is no, as in the official tool.)"""
    text = answer.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


MME_CATEGORIES = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}  # fmt: skip
"""MME's subtasks per category (``eval_type_dict`` of the official tool)."""


def mme_scores(rows: Sequence[tuple[str, str, str, str]]) -> dict[str, object]:
    """MME's scores from ``(subtask, image, label, prediction)`` rows: per subtask ``acc`` (share of questions
    right; an ``other`` answer is wrong), ``acc_plus`` (share of images whose questions are all right) and
    ``score = 100 × (acc + acc_plus)``; ``perception`` and ``cognition`` sum their subtasks' scores (max 2000 and
    800 with every subtask present); ``total`` is their sum."""
    by_task: dict[str, dict[str, list[bool]]] = {}
    others: dict[str, int] = {}
    for task, image, label, prediction in rows:
        parsed = mme_parse(prediction)
        by_task.setdefault(task, {}).setdefault(image, []).append(parsed == _yes_no(label))
        others[task] = others.get(task, 0) + (parsed == "other")
    subtasks: dict[str, dict[str, float | int]] = {}
    for task, images in by_task.items():
        answers = [right for per_image in images.values() for right in per_image]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(per_image) for per_image in images.values()) / len(images)
        subtasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus,
                          "questions": len(answers), "images": len(images), "other": others[task]}  # fmt: skip
    out: dict[str, object] = {}
    for category, names in MME_CATEGORIES.items():
        out[category] = sum(float(subtasks[n]["score"]) for n in names if n in subtasks)
    out["total"] = float(out["perception"]) + float(out["cognition"])  # type: ignore[arg-type]
    known = {n for names in MME_CATEGORIES.values() for n in names}
    out["unknown_subtasks"] = sorted(set(subtasks) - known)
    out["subtasks"] = subtasks
    return out


# ---------------------------------------------------------------------------------------------- MMBench / MMStar


def can_infer_option(answer: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_option`` (``vlmeval/utils/matching_util.py``, VERBOSE unset): the option letter
    standing alone in the answer once ``.()[],:;!*#{}`` are spaces, when exactly one option letter does; ``Z``
    for a refusal (or a lone "Z" and no letter); None otherwise."""
    if "Failed to obtain answer via API" in answer:
        return None
    refusals = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                "I'm sorry, but without the image provided", "Cannot determine the answer")  # fmt: skip
    if any(refusal in answer for refusal in refusals):
        return "Z"
    text = answer
    for char in ".()[],:;!*#{}":
        text = text.replace(char, " ")
    splits = [x.strip() for x in text.split()]
    count = sum(letter in splits for letter in choices)
    if count == 1:
        return next(letter for letter in choices if letter in splits)
    if count == 0 and "Z" in splits:
        return "Z"
    return None


def can_infer_text(answer: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_text``: the letter of the only option whose (lower-cased) text is in the
    (lower-cased) answer."""
    low = answer.lower()
    found = [letter for letter, text in choices.items() if str(text).lower() in low]
    return found[0] if len(found) == 1 else None


def can_infer(answer: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit's rule-based choice extraction (its ``exact_matching`` path, no LLM judge): the option letter,
    then the option text; None when neither decides (scored wrong, like VLMEvalKit's 'Z' fallback)."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def mmstar_exact_match(prediction: str, answer: str) -> float:
    """MMStar's ``exact_match`` (as lmms-eval carries it, "Brought from MMStar"): both lower-cased and stripped,
    newlines as spaces; right if the answer letter is the first character, or follows "(", "option " or "the
    answer is " at the start. An empty prediction is wrong."""
    gt = answer.lower().strip().replace("\n", " ")
    pred = prediction.lower().strip().replace("\n", " ")
    try:
        if gt == pred[0]:
            return 1.0
        if pred[0] == "(" and gt == pred[1]:
            return 1.0
        if pred[0:7] == "option " and gt == pred[7]:
            return 1.0
        if pred[0:14] == "the answer is " and gt == pred[14]:
            return 1.0
    except IndexError:
        return 0.0
    return 0.0


# ---------------------------------------------------------------------------------------------------- ChartQA


def _chart_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """pix2struct's ``relaxed_correctness`` (``pix2struct/metrics.py``, the ChartQA metric): numbers (a trailing
    ``%`` divides by 100) within 5% of a non-zero target, else exact string match ignoring case. No stripping:
    ``float`` ignores surrounding whitespace, the string comparison does not."""
    pred, gold = _chart_float(prediction), _chart_float(target)
    if pred is not None and gold:
        return abs(pred - gold) / abs(gold) <= max_relative_change
    return prediction.lower() == target.lower()


__all__ = [
    "GROUNDING_THRESHOLDS",
    "MME_CATEGORIES",
    "anls",
    "binary_metrics",
    "can_infer",
    "can_infer_option",
    "can_infer_text",
    "caption_metrics",
    "caption_tokenize",
    "gqa_exact_match",
    "grounding_metrics",
    "iou",
    "levenshtein",
    "mcq_accuracy",
    "mcq_parse",
    "mme_parse",
    "mme_scores",
    "mmstar_exact_match",
    "parse_box",
    "pope_metrics",
    "pope_parse",
    "relaxed_correctness",
    "rouge_l",
    "vqa_accuracy",
    "vqa_normalize_answer",
    "vqa_process_digit_article",
    "vqa_process_punctuation",
]
