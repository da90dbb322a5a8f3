"""``grounding``: referring-expression grounding, one box per question (RefCOCO) or several labelled boxes per
answer (Qwen-VL's ``<ref>label</ref><box>…</box>``): accuracy at IoU ≥ 0.5 over every reference box, mean IoU,
accuracy at 0.1 .. 0.9, precision over the predicted boxes and accuracy per label."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

from vlmkit.data.grounding import LabeledBox, parse_boxes
from vlmkit.errors import ConfigError, DataError
from vlmkit.evaluation.metrics import GROUNDING_THRESHOLDS, iou, parse_box
from vlmkit.evaluation.tasks.base import EvalSample, Metrics, Task
from vlmkit.evaluation.tasks.registry import register_task
from vlmkit.evaluation.tasks.rows import box_of, get_field, image_path, image_size, sample_id

GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {expression}"
MATCH_IOU = 0.5
"""The IoU at which a predicted box counts as finding a reference box (RefCOCO's, Qwen-VL's)."""


def normalize_label(label: str | None) -> str | None:
    """A ``<ref>`` label as labels are compared: case-folded, inner whitespace collapsed, outer spaces and
    punctuation stripped (``"A  Dog."`` → ``"a dog"``)."""
    if label is None:
        return None
    return re.sub(r"\s+", " ", label).strip(" \t\n.,;:!?\"'").casefold()


def match_boxes(references: Sequence[LabeledBox], predictions: Sequence[LabeledBox]) -> list[tuple[int, int, float]]:
    """One-to-one pairs ``(reference index, prediction index, IoU)`` of boxes with the same normalised label:
    greedily the pair of highest IoU first (ties: earlier reference, then earlier prediction), pairs of IoU 0
    left unmatched. When every reference box has one label, unlabelled predictions count as that label."""
    ref_labels = [normalize_label(r.label) for r in references]
    only = set(ref_labels)
    default = next(iter(only)) if len(only) == 1 else None
    pred_labels = [normalize_label(p.label) if p.label is not None else default for p in predictions]
    candidates = sorted(
        ((iou(r.box, p.box), i, j) for i, r in enumerate(references) for j, p in enumerate(predictions)
         if ref_labels[i] == pred_labels[j]),
        key=lambda c: (-c[0], c[1], c[2]),
    )  # fmt: skip
    used_r: set[int] = set()
    used_p: set[int] = set()
    pairs = []
    for value, i, j in candidates:
        if value > 0 and i not in used_r and j not in used_p:
            used_r.add(i)
            used_p.add(j)
            pairs.append((i, j, value))
    return sorted(pairs)


@register_task("grounding")
class GroundingTask(Task):
    """Referring-expression grounding.

    A row with ``bbox`` has one reference box: the answer's first box is scored against it, as Qwen-VL's and
    LLaVA's RefCOCO evaluations do. A row with ``boxes`` (``[{"label": ..., "bbox": [x1, y1, x2, y2]}, ...]``,
    pixels) or ``answer`` (Qwen-VL's grounding text, corners in ``[0, qwen_scale)``) has several labelled
    reference boxes: every box of the answer is parsed with its ``<ref>`` label and matched to them
    (:func:`match_boxes`). Parsed boxes are rounded to ``box_decimals`` decimals (None: not rounded).
    """

    def __init__(
        self,
        prompt_suffix: str | None = None,
        box_format: str = "auto",
        qwen_scale: float = 1000.0,
        box_decimals: int | None = 3,
    ) -> None:
        super().__init__(prompt_suffix)
        if box_format not in ("auto", "pixels", "normalized"):
            raise ConfigError(f"unknown box format {box_format!r}; choose from auto, pixels, normalized")
        self.box_format = cast(Literal["auto", "pixels", "normalized"], box_format)
        self.qwen_scale, self.box_decimals = float(qwen_scale), box_decimals

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        given = [k for k in ("bbox", "boxes", "answer") if row.get(k) is not None]
        if len(given) != 1:
            raise DataError(f"{where}: a grounding row needs exactly one of 'bbox', 'boxes' or 'answer'"
                            + (f", got {', '.join(given)}" if given else ""))  # fmt: skip
        if row.get("question") is not None:
            prompt = get_field(row, ("question",), where) + self.prompt_suffix
        else:
            prompt = GROUNDING_PROMPT.format(expression=get_field(row, ("expression",), where)) + self.prompt_suffix
        image = image_path(row, where, image_root)
        width, height = image_size(row, image, where)
        reference: dict[str, Any] = {"size": [width, height]}
        if given == ["bbox"]:
            reference["bbox"] = box_of(row["bbox"], where)
        elif given == ["boxes"]:
            reference["boxes"] = self._boxes_field(row["boxes"], where)
        else:
            boxes = parse_boxes(get_field(row, ("answer",), where), width, height, box_format=self.box_format,
                                qwen_scale=self.qwen_scale)  # fmt: skip
            if not boxes:
                raise DataError(
                    f"{where}: 'answer' holds no box (Qwen-VL's <ref>label</ref><box>(x1,y1),(x2,y2)</box>)"
                )
            reference["boxes"] = [{"label": b.label, "bbox": list(b.box)} for b in boxes]
        return EvalSample(sample_id(row, where), prompt, image, reference, where)

    @staticmethod
    def _boxes_field(value: Any, where: str) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not value:
            raise DataError(f"{where}: 'boxes' must be a non-empty list of {{'label', 'bbox'}}, got {value!r}")
        out = []
        for k, item in enumerate(value):
            if not isinstance(item, dict) or not isinstance(item.get("label", ""), str | None):
                raise DataError(f"{where}: boxes[{k}] must be {{'label': str, 'bbox': [x1, y1, x2, y2]}}")
            out.append({"label": item.get("label"), "bbox": box_of(item.get("bbox"), f"{where}: boxes[{k}]")})
        return out

    def _round(self, box: Sequence[float]) -> list[float]:
        return list(box) if self.box_decimals is None else [round(v, self.box_decimals) for v in box]

    def parse(self, sample: EvalSample, prediction: str) -> list[float] | None:
        """The answer's first box in pixels, or None."""
        width, height = sample.reference["size"]
        box = parse_box(prediction, width, height, box_format=self.box_format, qwen_scale=self.qwen_scale)
        return None if box is None else self._round(box)

    def parse_all(self, sample: EvalSample, prediction: str) -> list[LabeledBox]:
        """Every box of the answer in pixels, with its ``<ref>`` label (None when it has none)."""
        width, height = sample.reference["size"]
        boxes = parse_boxes(prediction, width, height, box_format=self.box_format, qwen_scale=self.qwen_scale)
        return [LabeledBox(b.label, tuple(self._round(b.box))) for b in boxes]  # type: ignore[arg-type]

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        """``score``: the IoU of the first box (``bbox`` rows) or the mean over the reference boxes of their
        matched IoU (0 when unmatched); ``refs``: each reference box's label and IoU; ``predicted``: the number
        of predicted boxes scored; ``box`` / ``boxes``: what was parsed."""
        if "bbox" in sample.reference:
            box = self.parse(sample, prediction)
            value = 0.0 if box is None else iou(box, sample.reference["bbox"])
            return {"score": value, "box": box, "refs": [[None, value]], "predicted": int(box is not None)}
        references = [LabeledBox(r["label"], tuple(r["bbox"])) for r in sample.reference["boxes"]]
        predictions = self.parse_all(sample, prediction)
        ious = [0.0] * len(references)
        for i, _, value in match_boxes(references, predictions):
            ious[i] = value
        return {
            "score": sum(ious) / len(ious),
            "boxes": [{"label": p.label, "bbox": list(p.box)} for p in predictions],
            "refs": [[r.label, value] for r, value in zip(references, ious, strict=True)],
            "predicted": len(predictions),
        }

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        """Over every reference box: ``acc@0.5`` (share found at IoU ≥ 0.5), ``miou`` and ``acc@0.1`` ..
        ``acc@0.9``; ``precision@0.5`` (share of predicted boxes that found a reference box at IoU ≥ 0.5);
        ``parse_failures`` (answers with no box), ``n`` (questions), ``boxes`` (reference boxes) and, when the
        references are labelled, ``by_label`` (``acc@0.5`` and ``boxes`` per normalised label)."""
        scored = [self.score(s, p) for s, p in zip(samples, predictions, strict=True)]
        refs = [(normalize_label(label), value) for r in scored for label, value in r["refs"]]
        values = [value for _, value in refs]
        n, predicted = len(values), sum(r["predicted"] for r in scored)
        out: Metrics = {
            "acc@0.5": sum(v >= MATCH_IOU for v in values) / n if n else 0.0,
            "miou": sum(values) / n if n else 0.0,
        }
        for t in GROUNDING_THRESHOLDS:
            out[f"acc@{t}"] = sum(v >= t for v in values) / n if n else 0.0
        out["precision@0.5"] = sum(v >= MATCH_IOU for v in values) / predicted if predicted else 0.0
        out["parse_failures"] = sum(r["predicted"] == 0 for r in scored)
        out["n"] = len(scored)
        out["boxes"] = n
        labels = [label for label in dict.fromkeys(label for label, _ in refs) if label is not None]
        if labels:
            out["by_label"] = {
                label: {"acc@0.5": sum(v >= MATCH_IOU for g, v in refs if g == label) / count, "boxes": count}
                for label in labels
                for count in [sum(g == label for g, _ in refs)]
            }
        return out

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        return {"acc@0.5": metrics["acc@0.5"], "miou": metrics["miou"], "parse_failures": metrics["parse_failures"]}
