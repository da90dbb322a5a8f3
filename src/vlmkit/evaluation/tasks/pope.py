"""``pope``: yes/no object existence (POPE), LLaVA parsing, metrics overall and per category."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import DataError
from vlmkit.evaluation.metrics import pope_metrics, pope_parse
from vlmkit.evaluation.tasks.base import SHORT_ANSWER, EvalSample, Metrics, Task
from vlmkit.evaluation.tasks.registry import register_task
from vlmkit.evaluation.tasks.rows import get_field, image_path, sample_id


@register_task("pope")
class PopeTask(Task):
    """POPE: yes/no object existence, LLaVA parsing, metrics per category."""

    default_suffix = SHORT_ANSWER

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        raw = get_field(row, ("label", "answer"), where)
        label = raw.strip().lower()
        if label not in ("yes", "no"):
            raise DataError(f"{where}: 'label' must be 'yes' or 'no', got {raw!r}")
        category = row.get("category")
        reference = {"label": label, "category": None if category is None else str(category)}
        return EvalSample(
            sample_id(row, where),
            self._question(row, where, ("text", "question")),
            image_path(row, where, image_root),
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
