"""Evaluation tasks: how a data row becomes a prompt, how one answer is scored, how scores aggregate.

Each task reads one JSON object per line (formats in ``docs/evaluation.md``), turns it into an
:class:`EvalSample` (id, prompt, image, reference), scores one prediction (``{"score": float, ...}``, written to
``predictions.jsonl``) and aggregates all predictions into nested metrics plus a flat ``summary`` of headline
numbers. Tasks are looked up by exact name with :func:`get_task`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, UnidentifiedImageError

from vlmkit.errors import ConfigError, DataError, RegistryError
from vlmkit.evaluation.metrics import (
    anls,
    caption_metrics,
    gqa_exact_match,
    grounding_metrics,
    iou,
    mcq_parse,
    parse_box,
    pope_metrics,
    pope_parse,
    rouge_l,
    vqa_accuracy,
)

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
"""LLaVA-1.5's prompt suffix for short-answer benchmarks (VQAv2, GQA, POPE, TextVQA, DocVQA)."""
MCQ_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {expression}"
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."

logger = logging.getLogger(__name__)

Metrics = dict[str, Any]


@dataclass
class EvalSample:
    """One evaluation question: its id, prompt text, image (path string, PIL image or None) and reference."""

    id: str
    prompt: str
    image: Any
    reference: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    """``file:line`` (or another origin) for error messages."""
    history: tuple[tuple[str, str], ...] = ()
    """Earlier (question, answer) turns about the same image: the prompt is then asked as a later turn."""

    def conversation(self) -> list[dict[str, Any]]:
        """The conversation in content-parts form: the image (if any) in the first user turn, then the earlier
        turns of ``history``, then the prompt as the last user turn."""
        questions = [q for q, _ in self.history] + [self.prompt]
        answers = [a for _, a in self.history]
        messages: list[dict[str, Any]] = []
        for i, question in enumerate(questions):
            content: list[dict[str, Any]] = []
            if i == 0 and self.image is not None:
                content.append({"type": "image", "image": self.image})
            content.append({"type": "text", "text": question})
            messages.append({"role": "user", "content": content})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        return messages


# ------------------------------------------------------------------------------------------- row validation


def _get(row: dict[str, Any], keys: Sequence[str], where: str, kind: type | tuple[type, ...] = str) -> Any:
    for key in keys:
        if row.get(key) is not None:
            value = row[key]
            if not isinstance(value, kind):
                raise DataError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
            return value
    raise DataError(f"{where}: missing field {' or '.join(repr(k) for k in keys)}")


def _answers(row: dict[str, Any], where: str, keys: Sequence[str] = ("answers",)) -> list[str]:
    """A non-empty list of answer strings; VQAv2-style ``{"answer": ...}`` dicts are accepted."""
    raw = _get(row, keys, where, (list, tuple, str))
    items = [raw] if isinstance(raw, str) else list(raw)
    out = [a.get("answer") if isinstance(a, dict) else a for a in items]
    answers = [a for a in out if isinstance(a, str)]
    if not out or len(answers) != len(out):
        raise DataError(f"{where}: {keys[0]!r} must be a non-empty list of strings")
    return answers


def _sample_id(row: dict[str, Any], where: str, fallback: str | None = None) -> str:
    for key in ("question_id", "id"):
        value = row.get(key)
        if value is not None and not isinstance(value, dict | list):
            return str(value)
    if fallback is not None:
        return fallback
    raise DataError(f"{where}: missing field 'question_id'")


def _image(row: dict[str, Any], where: str, root: Path) -> str | None:
    value = row.get("image")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: field 'image' must be a path string")
    if value.startswith(("data:", "http://", "https://")):
        return value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"{where}: image {path} not found")
    return str(path)


def _image_size(row: dict[str, Any], image: Any, where: str) -> tuple[int, int]:
    if isinstance(row.get("width"), int | float) and isinstance(row.get("height"), int | float):
        return int(row["width"]), int(row["height"])
    if isinstance(image, Image.Image):
        return image.size
    if not isinstance(image, str) or image.startswith(("data:", "http://", "https://")):
        raise DataError(f"{where}: grounding needs the image size; give 'width' and 'height'")
    try:
        with Image.open(image) as img:  # header only: no decoding
            return img.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{where}: cannot read the size of image {image} ({exc})") from exc


def _box(value: Any, where: str) -> list[float]:
    if not isinstance(value, list | tuple) or len(value) != 4 or not all(isinstance(v, int | float) for v in value):
        raise DataError(f"{where}: 'bbox' must be [x1, y1, x2, y2] numbers, got {value!r}")
    return [float(v) for v in value]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _grouped_accuracy(scores: Sequence[float], groups: Sequence[str | None]) -> Metrics:
    out: Metrics = {"accuracy": _mean(scores), "n": len(scores)}
    names = [g for g in dict.fromkeys(groups) if g is not None]
    if names:
        out["by_group"] = {g: _mean([s for s, h in zip(scores, groups, strict=True) if h == g]) for g in names}
    return out


# ---------------------------------------------------------------------------------------------------- tasks


class Task:
    """Base class: subclasses set ``name`` and implement :meth:`read`, :meth:`score` and :meth:`aggregate`."""

    name: ClassVar[str] = ""
    default_suffix: ClassVar[str] = ""

    def __init__(self, prompt_suffix: str | None = None) -> None:
        self.prompt_suffix = self.default_suffix if prompt_suffix is None else prompt_suffix

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        """Validate one data row and turn it into a sample; raises DataError naming ``where``."""
        raise NotImplementedError

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        """Per-sample score: ``{"score": float, ...}`` plus whatever was parsed from the answer."""
        raise NotImplementedError

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        """Nested metrics over all samples (predictions in the same order)."""
        return _grouped_accuracy(
            [self.score(s, p)["score"] for s, p in zip(samples, predictions, strict=True)],
            [s.reference.get("group") for s in samples],
        )

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        """The headline numbers of ``metrics``, label → value, in display order."""
        return {"accuracy": metrics["accuracy"]}

    def _question(self, row: dict[str, Any], where: str, keys: Sequence[str] = ("question",)) -> str:
        return _get(row, keys, where) + self.prompt_suffix

    def _qa_sample(self, row: dict[str, Any], where: str, image_root: Path, reference: dict[str, Any]) -> EvalSample:
        """A question-about-an-image sample: id, question (+ suffix), image and the task's reference."""
        return EvalSample(
            _sample_id(row, where), self._question(row, where), _image(row, where, image_root), reference, where
        )

    @staticmethod
    def _group(row: dict[str, Any], keys: Sequence[str]) -> str | None:
        """The first of ``keys`` present in ``row``, as the sample's reporting group."""
        return next((str(row[k]) for k in keys if row.get(k) is not None), None)


class PopeTask(Task):
    """POPE: yes/no object existence, LLaVA parsing, metrics per category."""

    name = "pope"
    default_suffix = SHORT_ANSWER

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        raw = _get(row, ("label", "answer"), where)
        label = raw.strip().lower()
        if label not in ("yes", "no"):
            raise DataError(f"{where}: 'label' must be 'yes' or 'no', got {raw!r}")
        category = row.get("category")
        reference = {"label": label, "category": None if category is None else str(category)}
        return EvalSample(
            _sample_id(row, where),
            self._question(row, where, ("text", "question")),
            _image(row, where, image_root),
            reference,
            where,
        )

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        parsed = pope_parse(prediction)
        return {"score": float(parsed == sample.reference["label"]), "parsed": parsed}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        categories = [s.reference["category"] for s in samples]
        return pope_metrics(predictions, [s.reference["label"] for s in samples], categories)

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        overall = metrics["overall"]
        out = {key: overall[key] for key in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
        out.update({f"f1 ({name})": m["f1"] for name, m in metrics.items() if name != "overall"})
        return out


class VqaTask(Task):
    """VQAv2 accuracy (official normalisation, leave-one-out min(n/3, 1)); ``textvqa`` normalises answers fully."""

    name = "vqa"
    default_suffix = SHORT_ANSWER
    textvqa: ClassVar[bool] = False

    def __init__(self, prompt_suffix: str | None = None) -> None:
        super().__init__(prompt_suffix)
        self._warned = False

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        answers = _answers(row, where)
        if len(answers) < 4 and not self._warned:
            self._warned = True
            logger.warning(
                "%s: %d answer(s); VQA accuracy needs 3 matching *other* answers for full credit, so rows with fewer "
                "than 4 answers can never score 1 (use task 'gqa' for single-answer data)",
                where,
                len(answers),
            )
        group = self._group(row, ("answer_type", "task", "category"))
        return self._qa_sample(row, where, image_root, {"answers": answers, "group": group})

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return {"score": vqa_accuracy(prediction, sample.reference["answers"], textvqa=self.textvqa)}


class TextVqaTask(VqaTask):
    """TextVQA: the VQA formula with the full normalisation applied to the answers too."""

    name = "textvqa"
    textvqa = True


class GqaTask(Task):
    """GQA: exact match after stripping, removing trailing periods and lower-casing (LLaVA)."""

    name = "gqa"
    default_suffix = SHORT_ANSWER

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        answers = _answers(row, where, ("answer", "answers"))
        group = self._group(row, ("task", "category"))
        return self._qa_sample(row, where, image_root, {"answers": answers, "group": group})

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return {"score": gqa_exact_match(prediction, sample.reference["answers"])}


class DocVqaTask(Task):
    """DocVQA: ANLS (threshold 0.5)."""

    name = "docvqa"
    default_suffix = SHORT_ANSWER

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        return self._qa_sample(row, where, image_root, {"answers": _answers(row, where)})

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return {"score": anls(prediction, sample.reference["answers"])}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        values = [self.score(s, p)["score"] for s, p in zip(samples, predictions, strict=True)]
        return {"anls": _mean(values), "n": len(values)}

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        return {"anls": metrics["anls"]}


class GroundingTask(Task):
    """Referring-expression grounding: accuracy at IoU ≥ 0.5, mean IoU, accuracy at 0.1 .. 0.9."""

    name = "grounding"

    def __init__(self, prompt_suffix: str | None = None, box_format: str = "auto", qwen_scale: float = 1000.0):
        super().__init__(prompt_suffix)
        if box_format not in ("auto", "pixels", "normalized"):
            raise ConfigError(f"unknown box format {box_format!r}; choose from auto, pixels, normalized")
        self.box_format, self.qwen_scale = box_format, float(qwen_scale)

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        bbox = _box(row.get("bbox"), where)
        if row.get("question") is not None:
            prompt = _get(row, ("question",), where) + self.prompt_suffix
        else:
            prompt = GROUNDING_PROMPT.format(expression=_get(row, ("expression",), where)) + self.prompt_suffix
        image = _image(row, where, image_root)
        size = _image_size(row, image, where)
        return EvalSample(_sample_id(row, where), prompt, image, {"bbox": bbox, "size": list(size)}, where)

    def parse(self, sample: EvalSample, prediction: str) -> list[float] | None:
        """The predicted box in pixels, or None."""
        width, height = sample.reference["size"]
        box = parse_box(prediction, width, height, box_format=self.box_format, qwen_scale=self.qwen_scale)  # type: ignore[arg-type]
        return None if box is None else [round(v, 3) for v in box]

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        box = self.parse(sample, prediction)
        return {"score": 0.0 if box is None else iou(box, sample.reference["bbox"]), "box": box}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        scored = [self.score(s, p) for s, p in zip(samples, predictions, strict=True)]
        return grounding_metrics([None if r["box"] is None else r["score"] for r in scored])

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        return {"acc@0.5": metrics["acc@0.5"], "miou": metrics["miou"], "parse_failures": metrics["parse_failures"]}


class CaptionTask(Task):
    """Captioning: corpus BLEU-1..4, ROUGE-L and CIDEr(-D) (pycocoevalcap, pure-Python tokenisation)."""

    name = "caption"

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        captions = _answers(row, where, ("captions", "references"))
        if not any(c.strip() for c in captions):
            raise DataError(f"{where}: 'captions' are all empty")
        image = _image(row, where, image_root)
        prompt = _get(row, ("question",), where) if row.get("question") is not None else CAPTION_PROMPT
        sample_id = _sample_id(row, where, fallback=str(row.get("image")) if row.get("image") else None)
        return EvalSample(sample_id, prompt + self.prompt_suffix, image, {"captions": captions}, where)

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return {"score": rouge_l(prediction, sample.reference["captions"])}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        return caption_metrics(predictions, [s.reference["captions"] for s in samples])

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        return {key: metrics[key] for key in ("bleu4", "rouge_l", "cider")}


class McqTask(Task):
    """Multiple choice: accuracy of the parsed option letter."""

    name = "mcq"
    default_suffix = MCQ_SUFFIX

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        options = _get(row, ("options", "choices"), where, (list, tuple))
        if not 2 <= len(options) <= 26 or not all(isinstance(o, str | int | float) for o in options):
            raise DataError(f"{where}: 'options' must be a list of 2 to 26 option texts")
        options = [str(o) for o in options]
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(options)]
        answer = str(_get(row, ("answer",), where, (str, int))).strip()
        if answer.upper() in letters and len(answer) == 1:
            target = answer.upper()
        elif answer in options:
            target = letters[options.index(answer)]
        else:
            raise DataError(f"{where}: 'answer' {answer!r} is neither an option letter ({letters}) nor an option")
        lines = [_get(row, ("question",), where), *(f"{k}. {o}" for k, o in zip(letters, options, strict=True))]
        return EvalSample(
            _sample_id(row, where),
            "\n".join(lines) + self.prompt_suffix,
            _image(row, where, image_root),
            {"options": options, "answer": target},
            where,
        )

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        letter = mcq_parse(prediction, sample.reference["options"])
        return {"score": float(letter == sample.reference["answer"]), "parsed": letter}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        scored = [self.score(s, p) for s, p in zip(samples, predictions, strict=True)]
        return {
            "accuracy": _mean([r["score"] for r in scored]),
            "n": len(scored),
            "parse_failures": sum(r["parsed"] is None for r in scored),
        }

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        return {"accuracy": metrics["accuracy"], "parse_failures": metrics["parse_failures"]}


TASKS: dict[str, Callable[..., Task]] = {
    cls.name: cls for cls in (PopeTask, VqaTask, GqaTask, TextVqaTask, DocVqaTask, GroundingTask, CaptionTask, McqTask)
}


def task_names() -> list[str]:
    """The registered task names."""
    return list(TASKS)


def get_task(name: str, **options: Any) -> Task:
    """The task registered as exactly ``name``, built with ``options`` (e.g. ``prompt_suffix``).

    Raises RegistryError listing the valid names, or ConfigError for an option the task does not take.
    """
    if name not in TASKS:
        raise RegistryError(f"unknown evaluation task {name!r}; choose from {', '.join(TASKS)}")
    try:
        return TASKS[name](**options)
    except TypeError as exc:
        raise ConfigError(f"task {name!r}: invalid option ({exc})") from exc
