"""``grounding``: referring-expression grounding, accuracy at IoU ≥ 0.5, mean IoU, accuracy at 0.1 .. 0.9."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError
from vlmkit.evaluation.metrics import grounding_metrics, iou, parse_box
from vlmkit.evaluation.tasks.base import EvalSample, Metrics, Task
from vlmkit.evaluation.tasks.registry import register_task
from vlmkit.evaluation.tasks.rows import box_of, get_field, image_path, image_size, sample_id

GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {expression}"


@register_task("grounding")
class GroundingTask(Task):
    """Referring-expression grounding: accuracy at IoU ≥ 0.5, mean IoU, accuracy at 0.1 .. 0.9.

    Parsed boxes are rounded to ``box_decimals`` decimals (None: not rounded) before scoring.
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
        self.box_format, self.qwen_scale, self.box_decimals = box_format, float(qwen_scale), box_decimals

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        bbox = box_of(row.get("bbox"), where)
        if row.get("question") is not None:
            prompt = get_field(row, ("question",), where) + self.prompt_suffix
        else:
            prompt = GROUNDING_PROMPT.format(expression=get_field(row, ("expression",), where)) + self.prompt_suffix
        image = image_path(row, where, image_root)
        size = image_size(row, image, where)
        return EvalSample(sample_id(row, where), prompt, image, {"bbox": bbox, "size": list(size)}, where)

    def parse(self, sample: EvalSample, prediction: str) -> list[float] | None:
        """The predicted box in pixels, or None."""
        width, height = sample.reference["size"]
        box = parse_box(prediction, width, height, box_format=self.box_format, qwen_scale=self.qwen_scale)  # type: ignore[arg-type]
        if box is None:
            return None
        return list(box) if self.box_decimals is None else [round(v, self.box_decimals) for v in box]

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        box = self.parse(sample, prediction)
        return {"score": 0.0 if box is None else iou(box, sample.reference["bbox"]), "box": box}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        scored = [self.score(s, p) for s, p in zip(samples, predictions, strict=True)]
        return grounding_metrics([None if r["box"] is None else r["score"] for r in scored])

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        return {"acc@0.5": metrics["acc@0.5"], "miou": metrics["miou"], "parse_failures": metrics["parse_failures"]}
